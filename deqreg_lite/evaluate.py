"""Turn registration results into numbers and tables (floor 3: uses metrics, never the methods' insides)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .metrics import dice, folding_percent, hd95, sd_log_jacobian, tre

__all__ = ["pair_metrics", "format_table"]


def pair_metrics(sample: Mapping, disp: Tensor, labels: Sequence[int] | None = None) -> dict[str, float]:
    """Metrics of one registered pair.

    Args:
        sample: a sample dict (``fixed_seg``, ``moving_seg``, ``spacing``, optionally ``labels``, ``fixed_kp``,
            ``moving_kp``, ``fixed_mask``).
        disp: ``(1, ndim, *spatial)`` displacement in voxels.
        labels: label ids for Dice and HD95 (default: ``sample["labels"]``, else every non-zero label).
    Returns:
        ``dice`` (mean over labels, 0-1), ``dice_<id>`` per label, ``hd95`` (mm, mean over labels),
        ``folding_pct``, ``sdlogj`` (Learn2Reg convention), ``sdlogj_plain``, and ``tre_mm`` when keypoints exist.
    """
    disp = disp.detach().float().cpu()
    out: dict[str, float] = {}
    spacing = sample.get("spacing")
    if "fixed_seg" in sample and "moving_seg" in sample:
        fixed_seg, moving_seg = sample["fixed_seg"].cpu(), sample["moving_seg"].cpu()
        if labels is None:
            labels = sample.get("labels") or [int(v) for v in torch.unique(fixed_seg) if v != 0]
        from .warp import warp

        warped_seg = warp(moving_seg, disp, mode="nearest")
        d = dice(fixed_seg, warped_seg, labels)[0]
        out["dice"] = float(torch.nanmean(d))
        for lab, v in zip(labels, d.tolist()):
            out[f"dice_{lab}"] = v
        out["hd95"] = float(torch.nanmean(hd95(fixed_seg, warped_seg, labels, spacing)[0]))
    mask = sample.get("fixed_mask")
    out["folding_pct"] = float(folding_percent(disp)[0])
    out["sdlogj"] = float(sd_log_jacobian(disp, "l2r", mask=None if mask is None else mask.cpu())[0])
    out["sdlogj_plain"] = float(sd_log_jacobian(disp, "plain")[0])
    if "fixed_kp" in sample and "moving_kp" in sample:
        out["tre_mm"] = float(tre(sample["fixed_kp"], sample["moving_kp"], disp, spacing).mean())
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def format_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str] | None = None,
                 headers: Mapping[str, str] | None = None) -> str:
    """A plain-text table: one row per method, one column per metric (missing values print as ``-``)."""
    columns = list(columns or dict.fromkeys(k for r in rows.values() for k in r))
    headers = headers or {}
    head = ["method"] + [headers.get(c, c) for c in columns]
    body = [[name] + [_fmt(r.get(c, float("nan"))) for c in columns] for name, r in rows.items()]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    line = lambda row: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                                 enumerate(zip(row, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep] + [line(r) for r in body])
