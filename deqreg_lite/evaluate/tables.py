"""Tables of results and their formats: :class:`Table` (per-pair rows of one method, markdown and CSV),
:func:`format_table` (plain text), :func:`table1` (the paper's Table 1), :func:`trained_vs_best` and :func:`table2`
(the paper's Table 2, from step sweeps)."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .stats import is_number as _is_number
from .stats import mean_std as _mean_std
from .stats import wilcoxon

__all__ = ["Table", "format_table", "table1", "trained_vs_best", "table2", "CERTIFICATE_COLUMNS"]

#: the convergence columns of DEQ methods (:func:`~.run.evaluate`): the final relative residual, converged (1/0) and
#: the spectral-radius estimate at the returned field. :meth:`Table.summary` adds each one's worst pair
#: (``residual_max``, ``converged_min``, ``spectral_radius_max``): the certificate holds for every pair only when
#: the worst one passes.
CERTIFICATE_COLUMNS = {"residual": "max", "converged": "min", "spectral_radius": "max"}
#: columns printed in scientific notation by :meth:`Table.to_markdown` (a residual of 4e-4 is not 0.000).
_SCIENTIFIC = ("residual",)


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


@dataclass
class Table:
    """Per-pair results of one method.

    Attributes:
        rows: one dict per pair: ``pair`` (an id string) and numbers (``dice``, ``dice_<label>``, ``hd95``,
            ``folding_pct``, ``sdlogj``, ``sdlogj_plain``, ``tre_mm`` with keypoints, ``time_s`` the inference
            time, and ``steps`` / ``nfe`` when the method reports them; for DEQ methods ``residual`` (final relative
            residual), ``converged`` (1.0/0.0) and, with ``evaluate(..., certificate=True)``, ``spectral_radius``).
        name: the method's name.
        info: per-method numbers: ``memory_bytes`` and ``memory_kind`` (``"saved_tensors"`` on the CPU,
            ``"cuda_peak"`` on CUDA), ``train_time_s`` (one training step of one pair), ``steps``, ``device``.
        note: a reason the table is empty (e.g. "not installed"); shown in place of numbers.
    """

    rows: list[dict] = field(default_factory=list)
    name: str = "method"
    info: dict = field(default_factory=dict)
    note: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> list[str]:
        """The numeric per-pair columns, in order of first appearance."""
        return list(dict.fromkeys(k for r in self.rows for k, v in r.items() if _is_number(v)))

    def values(self, metric: str) -> list[float]:
        """The per-pair values of ``metric`` (NaN where a pair lacks it)."""
        return [float(r.get(metric, float("nan"))) for r in self.rows]

    def summary(self) -> dict:
        """Mean and std (ddof=0, over finite values) of every column: ``{"n", col, f"{col}_std", ...}``, plus
        ``memory_mb`` and ``train_time_s`` from ``info`` when measured, and ``note`` when set. For the
        convergence columns (:data:`CERTIFICATE_COLUMNS`) also the worst pair: ``residual_max``,
        ``converged_min`` (1.0: every pair converged) and ``spectral_radius_max`` (NaN where a pair's value is NaN:
        the worst case is unknown). The mean of ``converged`` is the fraction of pairs that converged."""
        out: dict = {"n": len(self.rows)}
        for c in self.columns():
            out[c], out[f"{c}_std"] = _mean_std(self.values(c))
        for c, worst in CERTIFICATE_COLUMNS.items():
            if c in out:
                vals = np.asarray(self.values(c), dtype=np.float64)
                out[f"{c}_{worst}"] = float(vals.max() if worst == "max" else vals.min())
        if self.info.get("memory_bytes") is not None:
            out["memory_mb"] = self.info["memory_bytes"] / 2**20
        if self.info.get("train_time_s") is not None:
            out["train_time_s"] = float(self.info["train_time_s"])
        if self.note:
            out["note"] = self.note
        return out

    def to_markdown(self, columns: Sequence[str] | None = None, digits: int = 3, per_pair: bool = True) -> str:
        """A markdown table: one line per pair (``per_pair``), then ``mean`` and ``std`` lines, and a ``worst``
        line when a convergence column (:data:`CERTIFICATE_COLUMNS`) is shown. ``residual`` is printed in
        scientific notation (``digits - 1`` decimals), the other columns with ``digits`` decimals."""
        if self.note and not self.rows:
            return f"| method | note |\n|---|---|\n| {self.name} | {self.note} |"
        cols = list(columns) if columns is not None else self.columns()

        def fmt(v, c: str) -> str:
            if not _is_number(v) or not math.isfinite(float(v)):
                return "-"
            return f"{float(v):.{max(digits - 1, 0)}e}" if c in _SCIENTIFIC else f"{float(v):.{digits}f}"
        lines = ["| pair | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        if per_pair:
            for r in self.rows:
                lines.append(f"| {r.get('pair', '')} | " + " | ".join(fmt(r.get(c), c) for c in cols) + " |")
        s = self.summary()
        lines.append("| **mean** | " + " | ".join(fmt(s.get(c), c) for c in cols) + " |")
        lines.append("| std | " + " | ".join(fmt(s.get(f"{c}_std"), c) for c in cols) + " |")
        if any(c in CERTIFICATE_COLUMNS for c in cols):
            worst = [fmt(s.get(f"{c}_{CERTIFICATE_COLUMNS[c]}"), c) if c in CERTIFICATE_COLUMNS else "" for c in cols]
            lines.append("| worst | " + " | ".join(worst) + " |")
        return "\n".join(lines)

    def to_csv(self, path: str | None = None) -> str:
        """The per-pair rows as CSV (columns: ``method``, ``pair``, then the numbers); also written to ``path``."""
        cols = ["method", "pair"] + self.columns()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({"method": self.name, **r})
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(text)
        return text


def trained_vs_best(sweep: Mapping, trained_steps: int | None = None, metric: str = "dice") -> dict:
    """Table 2 of the paper: the metrics at the trained step count and at the step count with the best ``metric``.

    Args:
        sweep: a :func:`step_sweep` result.
        trained_steps: default ``sweep["trained_steps"]``; must be one of the sweep's steps.
        metric: ``"dice"`` (best = highest) or ``"folding_pct"`` (best = lowest).
    Returns:
        ``method``, ``trained_steps``, ``trained_dice``, ``trained_dice_std``, ``trained_folding_pct``,
        ``trained_folding_pct_std``, ``best_steps``, ``best_dice``, ``best_dice_std``, ``best_folding_pct``,
        ``best_folding_pct_std``. Ties pick the fewest steps.
    """
    if metric not in ("dice", "folding_pct"):
        raise ValueError(f"metric must be 'dice' or 'folding_pct', got {metric!r}")
    steps = list(sweep["steps"])
    trained = sweep.get("trained_steps") if trained_steps is None else trained_steps
    if trained is None or int(trained) not in steps:
        raise ValueError(f"trained_steps {trained} is not one of the sweep's steps {steps}; add it to the sweep")
    vals = np.asarray(sweep[metric], dtype=np.float64)
    vals = np.where(np.isfinite(vals), vals, -np.inf if metric == "dice" else np.inf)
    best = int(np.argmax(vals)) if metric == "dice" else int(np.argmin(vals))
    out: dict = {"method": sweep.get("method"), "trained_steps": int(trained), "best_steps": steps[best]}
    for prefix, j in (("trained", steps.index(int(trained))), ("best", best)):
        for key in ("dice", "folding_pct"):
            out[f"{prefix}_{key}"] = sweep[key][j]
            out[f"{prefix}_{key}_std"] = sweep[f"{key}_std"][j]
    return out


def table2(sweeps: Mapping[str, Mapping], trained_steps: Mapping[str, int] | None = None) -> str:
    """A markdown Table 2: per method, Dice (%) and folding % at the trained steps and at the best steps."""
    trained_steps = trained_steps or {}
    lines = ["| Method | Steps | Dice (%) | fold (%) | best Steps | Dice (%) | fold (%) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    pm = lambda m, s, k=1.0, d=2: f"{m * k:.{d}f} ({s * k:.{d}f})"
    for name, sw in sweeps.items():
        r = trained_vs_best(sw, trained_steps.get(name))
        lines.append(f"| {name} | {r['trained_steps']} | {pm(r['trained_dice'], r['trained_dice_std'], 100)} | "
                     f"{pm(r['trained_folding_pct'], r['trained_folding_pct_std'], d=3)} | {r['best_steps']} | "
                     f"{pm(r['best_dice'], r['best_dice_std'], 100)} | "
                     f"{pm(r['best_folding_pct'], r['best_folding_pct_std'], d=3)} |")
    return "\n".join(lines)


#: (column, header, scale, higher is better) of Table 1.
_TABLE1_METRICS = [("dice", "Dice (%)", 100.0, True), ("hd95", "HD95 (mm)", 1.0, False),
                   ("folding_pct", "\\|J\\|<=0 (%)", 1.0, False), ("sdlogj", "SDlogJ", 1.0, False),
                   ("tre_mm", "TRE (mm)", 1.0, False)]


def table1(tables: Mapping[str, Table], reference: str = "deqreg", metrics: Sequence[str] | None = None, *,
           alpha: float = 0.05, symbol: str = "\u2020", digits: int = 3) -> str:
    """A markdown Table 1: mean (std) per method and metric, memory and time, with significance marks.

    A cell of a method other than ``reference`` gets ``symbol`` (default a dagger, so as not to clash with
    markdown bold) when its paired Wilcoxon test against the
    reference on that metric gives ``p < alpha``; the best mean of each column is in bold. Columns: the
    ``metrics`` given (default: those of Dice, HD95, folding %, SDlogJ (Learn2Reg) and TRE that some table has),
    ``Mem. (MB)`` and ``Time (s)`` (train/inference per pair). A table with a ``note`` (e.g. elastix not
    installed) shows the note.
    """
    known = {m[0]: m for m in _TABLE1_METRICS}
    if metrics is None:
        present = {c for t in tables.values() for c in t.columns()}
        metrics = [m[0] for m in _TABLE1_METRICS if m[0] in present]
    specs = [known.get(m, (m, m, 1.0, True)) for m in metrics]
    ref = tables.get(reference)
    summaries = {n: t.summary() for n, t in tables.items()}
    best: dict[str, float] = {}
    for col, _, _, higher in specs:
        vals = [s[col] for s in summaries.values() if _is_number(s.get(col)) and math.isfinite(s[col])]
        if vals:
            best[col] = max(vals) if higher else min(vals)
    header = ["Method"] + [h for _, h, _, _ in specs] + ["Mem. (MB)", "Time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    n_pairs = len(ref.rows) if ref is not None else 0
    for name, t in tables.items():
        s = summaries[name]
        if t.note and not t.rows:
            lines.append(f"| {name} | " + " | ".join([t.note] * (len(header) - 1)) + " |")
            continue
        cells = [name]
        for col, _, scale, _ in specs:
            m, sd = s.get(col), s.get(f"{col}_std")
            if not _is_number(m) or not math.isfinite(m):
                cells.append("-")
                continue
            d = max(1, digits - 2) if scale == 100.0 else digits
            cell = f"{m * scale:.{d}f} ({sd * scale:.{d}f})"
            if best.get(col) == m:
                cell = f"**{cell}**"
            if ref is not None and t is not ref and ref.rows:
                try:
                    p = wilcoxon(ref, t, col)
                except ValueError:
                    p = float("nan")
                if p < alpha:
                    cell += symbol
            cells.append(cell)
        mem = t.info.get("memory_bytes")
        cells.append(f"{mem / 2**20:.1f}" if mem is not None else "-")
        train_t = t.info.get("train_time_s")
        infer_t = s.get("time_s")
        if train_t is not None and _is_number(infer_t):
            cells.append(f"{train_t:.3f}/{infer_t:.3f}")
        elif _is_number(infer_t) and math.isfinite(infer_t):
            cells.append(f"{infer_t:.3f}")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    if ref is not None:
        lines.append("")
        lines.append(f"{symbol}: differs from {reference} with p < {alpha:g} (paired Wilcoxon signed-rank test over "
                     f"{n_pairs} pairs). Bold: best mean. Mean (std) over pairs; Time is train/inference per pair.")
    return "\n".join(lines)
