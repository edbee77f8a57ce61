"""Turn registration results into numbers and tables (floor 3: uses metrics, never the methods' insides).

* :func:`pair_metrics` - the metrics of one registered pair; :func:`format_table` - a plain-text table.
* :func:`evaluate` - run a method over pairs: a :class:`Table` of per-pair Dice, HD95, folding %, SDlogJ (the
  Learn2Reg ``sdlogj`` and the textbook ``sdlogj_plain``), TRE where keypoints exist, and inference time; plus,
  for learned methods, the training cost of one step (peak memory and time) in ``Table.info``.
* :func:`identity_method`, :func:`classical_method`, :func:`elastix_method` - baselines that go through the same
  path as the learned methods; :func:`evaluate_elastix` gives a "not installed" row when itk-elastix is missing.
* :func:`training_memory` - bytes saved for backward in one training step (CPU), or peak CUDA memory.
* :func:`step_sweep`, :func:`trained_vs_best`, :func:`table2` - Dice and folding against the number of inference
  steps (Fig. 3 and Table 2 of the paper).
* :func:`wilcoxon`, :func:`table1` - paired significance tests and the Table 1 analogue.

What ``evaluate`` accepts as a method. Either a :class:`~deqreg_lite.methods.base.RegistrationMethod` (an
``nn.Module``; run in eval mode under ``no_grad`` on the device of its parameters), or any callable
``f(fixed, moving, steps=None, return_states=False)`` returning a
:class:`~deqreg_lite.result.RegistrationResult` or a displacement tensor ``(1, ndim, *spatial)``. A callable that
takes neither ``steps`` nor ``return_states`` is called as ``f(fixed, moving)`` (asking it for ``steps`` is then a
``TypeError``). Callables run with gradients enabled (classical registration needs them), on the samples' device
unless ``device`` is given. A table's method name is ``method.name``, else the function's ``__name__``.
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import io
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import check_options
from .memory import SavedBytes
from .metrics import dice, folding_percent, hd95, sd_log_jacobian, tre
from .result import RegistrationResult

__all__ = ["pair_metrics", "format_table", "Table", "evaluate", "identity_method", "classical_method",
           "elastix_method", "elastix_available", "evaluate_elastix", "training_memory", "training_cost",
           "step_sweep", "trained_vs_best", "table2", "wilcoxon", "table1", "DEFAULT_SWEEP_STEPS",
           "ELASTIX_INSTALL_HINT", "save_l2r_disp", "load_l2r_disp"]

#: the inference step counts of the convergence study (Fig. 3).
DEFAULT_SWEEP_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)
ELASTIX_INSTALL_HINT = "pip install itk-elastix"


def pair_metrics(sample: Mapping, disp: Tensor, labels: Sequence[int] | None = None, *,
                 with_hd95: bool = True) -> dict[str, float]:
    """Metrics of one registered pair.

    Args:
        sample: a sample dict (``fixed_seg``, ``moving_seg``, ``spacing``, optionally ``labels``, ``fixed_kp``,
            ``moving_kp``, ``fixed_mask``).
        disp: ``(1, ndim, *spatial)`` displacement in voxels.
        labels: label ids for Dice and HD95 (default: ``sample["labels"]``, else every non-zero label).
        with_hd95: compute HD95 (the slowest metric; off for quick validation during training).
    Returns:
        ``dice`` (mean over labels, 0-1), ``dice_<id>`` per label, ``hd95`` (mm, mean over labels),
        ``folding_pct``, ``sdlogj`` (Learn2Reg convention), ``sdlogj_plain``, and ``tre_mm`` when keypoints exist.

    Missing structures count as failures in both means: a label in one map only (say, wiped out by the warp) has
    Dice 0 and HD95 equal to the image diagonal in mm (:func:`~deqreg_lite.metrics.max_distance`), so it can only
    make the mean worse. Only labels absent from both maps are left out of the means (NaN, skipped by
    ``nanmean``); a pair with none of its labels present gets NaN.
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
        if with_hd95:
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


# ---------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population, ddof=0) standard deviation over the finite values; NaN when there are none."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


@dataclass
class Table:
    """Per-pair results of one method.

    Attributes:
        rows: one dict per pair: ``pair`` (an id string) and numbers (``dice``, ``dice_<label>``, ``hd95``,
            ``folding_pct``, ``sdlogj``, ``sdlogj_plain``, ``tre_mm`` with keypoints, ``time_s`` the inference
            time, and ``steps`` / ``nfe`` when the method reports them).
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
        ``memory_mb`` and ``train_time_s`` from ``info`` when measured, and ``note`` when set."""
        out: dict = {"n": len(self.rows)}
        for c in self.columns():
            out[c], out[f"{c}_std"] = _mean_std(self.values(c))
        if self.info.get("memory_bytes") is not None:
            out["memory_mb"] = self.info["memory_bytes"] / 2**20
        if self.info.get("train_time_s") is not None:
            out["train_time_s"] = float(self.info["train_time_s"])
        if self.note:
            out["note"] = self.note
        return out

    def to_markdown(self, columns: Sequence[str] | None = None, digits: int = 3, per_pair: bool = True) -> str:
        """A markdown table: one line per pair (``per_pair``), then ``mean`` and ``std`` lines."""
        if self.note and not self.rows:
            return f"| method | note |\n|---|---|\n| {self.name} | {self.note} |"
        cols = list(columns) if columns is not None else self.columns()
        fmt = lambda v: "-" if not _is_number(v) or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
        lines = ["| pair | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        if per_pair:
            for r in self.rows:
                lines.append(f"| {r.get('pair', '')} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
        s = self.summary()
        lines.append("| **mean** | " + " | ".join(fmt(s.get(c)) for c in cols) + " |")
        lines.append("| std | " + " | ".join(fmt(s.get(f"{c}_std")) for c in cols) + " |")
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


# ---------------------------------------------------------------------------------------------------------------
# calling a method
# ---------------------------------------------------------------------------------------------------------------
def _method_name(method: Any) -> str:
    name = getattr(method, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(method, "__name__", type(method).__name__)


def _accepts(fn: Callable) -> tuple[bool, bool]:
    """Whether ``fn`` takes ``steps`` and ``return_states`` keywords."""
    if isinstance(fn, nn.Module):
        return True, True
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True, True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True, True
    return "steps" in params, "return_states" in params


def _device_of(method: Any, device: str | torch.device | None) -> torch.device | None:
    if device is not None:
        return torch.device(device)
    if isinstance(method, nn.Module):
        for t in (*method.parameters(), *method.buffers()):
            return t.device
        return None
    return None


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(method: Any, fixed: Tensor, moving: Tensor, steps: int | None = None,
         return_states: bool = False) -> RegistrationResult:
    """Call ``method`` (a RegistrationMethod or a callable) and return a RegistrationResult."""
    takes_steps, takes_states = _accepts(method)
    kwargs: dict = {}
    if steps is not None:
        if not takes_steps:
            raise TypeError(f"{_method_name(method)} does not take steps; call it with steps=None")
        kwargs["steps"] = steps
    if return_states and takes_states:
        kwargs["return_states"] = True
    if isinstance(method, nn.Module):
        with torch.no_grad():
            out = method(fixed, moving, **kwargs)
    else:
        with torch.enable_grad():
            out = method(fixed, moving, **kwargs)
    if isinstance(out, Tensor):
        out = RegistrationResult(disp=out)
    if not isinstance(out, RegistrationResult):
        raise TypeError(f"{_method_name(method)} must return a RegistrationResult or a displacement tensor, got "
                        f"{type(out).__name__}")
    ndim = fixed.dim() - 2
    if tuple(out.disp.shape) != (fixed.shape[0], ndim, *fixed.shape[2:]):
        raise ValueError(f"{_method_name(method)} returned disp {tuple(out.disp.shape)}; expected "
                         f"{(fixed.shape[0], ndim, *fixed.shape[2:])}")
    return out


def _as_pairs(pairs: Any) -> list:
    if isinstance(pairs, Mapping):
        return [pairs]
    if hasattr(pairs, "__len__") and hasattr(pairs, "__getitem__"):
        items = [pairs[i] for i in range(len(pairs))]
    elif isinstance(pairs, Iterable):
        items = list(pairs)
    else:
        raise TypeError(f"pairs must be a sample dict or a sequence of them, got {type(pairs).__name__}")
    for i, s in enumerate(items):
        if not (isinstance(s, Mapping) and "fixed" in s and "moving" in s):
            raise TypeError(f"pairs[{i}] must be a sample dict with 'fixed' and 'moving', got {type(s).__name__}")
        if s["fixed"].shape[0] != 1:
            raise ValueError(f"pairs[{i}] has batch size {s['fixed'].shape[0]}; evaluate takes samples of batch 1 "
                             "(one pair each)")
    return items


def _pair_id(sample: Mapping, index: int) -> str:
    ids = sample.get("ids")
    if isinstance(ids, (tuple, list)) and len(ids) == 2 and all(isinstance(i, str) for i in ids):
        return f"{ids[1]}->{ids[0]}"
    return str(index)


# ---------------------------------------------------------------------------------------------------------------
# training cost: memory and time of one training step
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _isolated_rng():
    """Leave the global RNGs (torch, CUDA, NumPy, Python) as they were."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextlib.contextmanager
def _training_mode(method: nn.Module):
    """Train mode, fresh gradients; restores the mode and the previous ``.grad`` of every parameter."""
    params = list(method.parameters())
    grads = [p.grad for p in params]
    was_training = method.training
    method.train()
    try:
        for p in params:
            p.grad = None
        with _isolated_rng():
            yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        method.train(was_training)


def _default_loss() -> Callable:
    from .losses import Objective

    return Objective("lncc", "diffusion", lam=1.0).energy


def training_memory(method: nn.Module, fixed: Tensor, moving: Tensor, loss_fn: Callable | None = None, *,
                    kind: str = "auto") -> int:
    """Memory of one training step of ``method`` on ``(fixed, moving)``, in bytes.

    * ``kind="saved"`` (the default on the CPU): the peak of the bytes saved for backward that are alive together
      during ``method.training_step``, counted with ``torch.autograd.graph.saved_tensors_hooks`` and
      de-duplicated by storage (parameters saved by convolutions count too). This is the part of training memory
      that grows with BPTT's T and stays flat for a DEQ; temporaries and the optimizer are not in it.
    * ``kind="cuda_peak"`` (the default on CUDA): ``torch.cuda.max_memory_allocated`` during the step (everything
      allocated, model and inputs included), as the paper's "Mem." column.

    The step runs in train mode; parameters and their ``.grad`` and the global RNG states are left as they were
    (no optimizer step is taken).

    Args:
        method: a RegistrationMethod.
        fixed, moving: ``(B, 1, *spatial)`` on the method's device.
        loss_fn: ``(fixed, moving, disp) -> scalar``; default ``1 - LNCC + 1.0 * diffusion``.
        kind: ``"auto"``, ``"saved"`` or ``"cuda_peak"``.
    """
    if kind not in ("auto", "saved", "cuda_peak"):
        raise ValueError(f"kind must be one of ('auto', 'saved', 'cuda_peak'), got {kind!r}")
    loss_fn = loss_fn if loss_fn is not None else _default_loss()
    if kind == "auto":
        kind = "cuda_peak" if fixed.device.type == "cuda" else "saved"
    if kind == "cuda_peak" and fixed.device.type != "cuda":
        raise ValueError(f"kind='cuda_peak' needs CUDA tensors, got them on {fixed.device}")
    with _training_mode(method):
        if kind == "cuda_peak":
            torch.cuda.synchronize(fixed.device)
            torch.cuda.reset_peak_memory_stats(fixed.device)
            method.training_step(fixed, moving, loss_fn)
            torch.cuda.synchronize(fixed.device)
            return int(torch.cuda.max_memory_allocated(fixed.device))
        with SavedBytes() as saved:
            method.training_step(fixed, moving, loss_fn)
        return int(saved.peak)


def training_cost(method: nn.Module, fixed: Tensor, moving: Tensor, loss_fn: Callable | None = None) -> dict:
    """``memory_bytes`` and ``memory_kind`` (:func:`training_memory`, which also warms up) and ``train_time_s``
    (wall time of one more training step, per pair), without changing the method."""
    loss_fn = loss_fn if loss_fn is not None else _default_loss()
    kind = "cuda_peak" if fixed.device.type == "cuda" else "saved"
    mem = training_memory(method, fixed, moving, loss_fn, kind=kind)
    with _training_mode(method):
        _sync(fixed.device)
        t0 = time.perf_counter()
        method.training_step(fixed, moving, loss_fn)
        _sync(fixed.device)
        elapsed = time.perf_counter() - t0
    return {"memory_bytes": mem, "memory_kind": "cuda_peak" if kind == "cuda_peak" else "saved_tensors",
            "train_time_s": elapsed / fixed.shape[0]}


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------
def evaluate(method: Any, pairs: Any, steps: int | None = None, memory: bool = True,
             labels: Sequence[int] | None = None, *, loss_fn: Callable | None = None, hd95: bool = True,
             name: str | None = None, device: str | torch.device | None = None, progress: bool = False,
             disp_dir: str | Path | None = None, disp_format: str = "nii.gz") -> Table:
    """Register every pair with ``method`` and score it.

    Args:
        method: a RegistrationMethod or a callable (see the module docstring).
        pairs: a sample dict, or a sequence / dataset of sample dicts of batch 1 (e.g.
            :func:`deqreg_lite.datasets.brain_pairs` ``("val")``).
        steps: inference steps (None: the method's own default, its trained count).
        memory: for an ``nn.Module`` method, also measure one training step on the first pair
            (:func:`training_cost`: ``memory_bytes``, ``memory_kind``, ``train_time_s`` in ``Table.info``).
        labels: label ids for Dice and HD95 (default: each sample's ``labels``).
        loss_fn: the training loss for the memory measurement (default ``1 - LNCC + 1.0 * diffusion``).
        hd95: compute HD95 (the slowest metric).
        name: the table's name (default the method's).
        device: where to run (default: the method's parameters' device; the samples' device for callables).
        progress: show a tqdm bar.
        disp_dir: also write each pair's displacement there as a Learn2Reg submission file
            (:func:`save_l2r_disp`, ``disp_{fixed}_{moving}.nii.gz`` or ``.npz``, named from the sample's ``ids``).
        disp_format: ``"nii.gz"`` or ``"npz"``.
    Returns:
        a :class:`Table`; ``time_s`` is the wall time of the method's call (CUDA synchronised); on CUDA the
        first pair is run once untimed first, to warm up.
    """
    items = _as_pairs(pairs)
    dev = _device_of(method, device)
    is_module = isinstance(method, nn.Module)
    was_training = method.training if is_module else None
    table = Table(name=name or _method_name(method),
                  info={"steps": steps, "device": str(dev) if dev is not None else "cpu"})
    if is_module:
        method.eval()
    try:
        from tqdm.auto import tqdm

        if dev is not None and dev.type == "cuda" and items:
            s = items[0]
            _run(method, s["fixed"].to(dev), s["moving"].to(dev), steps)
        for i, s in enumerate(tqdm(items, desc=f"evaluate {table.name}", disable=not progress, leave=False)):
            fixed, moving = (s["fixed"].to(dev), s["moving"].to(dev)) if dev is not None else (s["fixed"],
                                                                                                 s["moving"])
            _sync(dev)
            t0 = time.perf_counter()
            result = _run(method, fixed, moving, steps)
            _sync(dev)
            elapsed = time.perf_counter() - t0
            row: dict = {"pair": _pair_id(s, i)}
            row.update(pair_metrics(s, result.disp, labels, with_hd95=hd95))
            row["time_s"] = elapsed
            for k in ("steps", "nfe"):
                v = result.info.get(k)
                if _is_number(v):
                    row[k] = float(v)
            if disp_dir is not None:
                ids = s.get("ids") or (f"{2 * i:04d}", f"{2 * i + 1:04d}")
                row["disp_file"] = str(save_l2r_disp(result.disp, disp_dir, ids[0], ids[1], fmt=disp_format))
            table.rows.append(row)
        if memory and is_module and items and hasattr(method, "training_step"):
            s = items[0]
            fixed, moving = (s["fixed"].to(dev), s["moving"].to(dev)) if dev is not None else (s["fixed"],
                                                                                                 s["moving"])
            table.info.update(training_cost(method, fixed, moving, loss_fn))
    finally:
        if is_module:
            method.train(was_training)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Learn2Reg submission files
# ---------------------------------------------------------------------------------------------------------------
def _case_number(sample_id: str) -> str:
    """The 4-digit case number of an id such as ``OASIS_0395``, ``NLST_0101_0000`` or ``0395``."""
    groups = re.findall(r"\d+", str(sample_id))
    if not groups:
        raise ValueError(f"cannot find a case number in the id {sample_id!r}")
    # NLST ids end in the _0000/_0001 image index: the case is the group before it
    number = groups[-2] if len(groups) > 1 and re.search(r"_000[01]$", str(sample_id)) else groups[-1]
    return f"{int(number):04d}"


def save_l2r_disp(disp: Tensor, folder: str | Path, fixed_id: str, moving_id: str, fmt: str = "nii.gz") -> Path:
    """Write a displacement in Learn2Reg's submission convention; return the file's path.

    The file ``disp_{fixed4}_{moving4}.nii.gz`` (or ``.npz`` with key ``arr_0``) holds a ``(*spatial, 3)``
    float array in **voxels**, channels in array-axis order, mapping the fixed grid into the moving image:
    ``warped = map_coordinates(moving, identity + disp.transpose(3, 0, 1, 2), order=1)``, which is exactly
    :func:`deqreg_lite.warp.warp`'s convention, so the values are written unchanged (only moved channel-last).

    Args:
        disp: ``(1, 3, D, H, W)`` or ``(3, D, H, W)`` displacement in voxels.
        folder: output folder (created).
        fixed_id, moving_id: sample ids; their 4-digit case numbers name the file.
        fmt: ``"nii.gz"`` (float32, identity affine: Learn2Reg reads the array as stored) or ``"npz"``.
    """
    check_options(fmt, ("nii.gz", "npz"), "fmt")
    d = disp.detach().float().cpu()
    if d.dim() == 5 and d.shape[0] == 1:
        d = d[0]
    if d.dim() != 4 or d.shape[0] != 3:
        raise ValueError(f"disp must be (1, 3, D, H, W) or (3, D, H, W) for a Learn2Reg file, got {tuple(disp.shape)}")
    arr = d.permute(1, 2, 3, 0).contiguous().numpy()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"disp_{_case_number(fixed_id)}_{_case_number(moving_id)}.{fmt}"
    if fmt == "npz":
        np.savez_compressed(path, arr_0=arr)
    else:
        import nibabel as nib

        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def load_l2r_disp(path: str | Path) -> Tensor:
    """Read a Learn2Reg displacement file back as ``(1, 3, D, H, W)`` in voxels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no displacement file at {path}")
    if path.name.endswith(".npz"):
        arr = np.load(path)["arr_0"]
    else:
        import nibabel as nib

        arr = np.asanyarray(nib.load(str(path)).dataobj)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path} holds an array of shape {arr.shape}; expected (D, H, W, 3)")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(3, 0, 1, 2)[None]


# ---------------------------------------------------------------------------------------------------------------
# baselines through the same path
# ---------------------------------------------------------------------------------------------------------------
def identity_method(fixed: Tensor, moving: Tensor, steps: int | None = None,
                    return_states: bool = False) -> RegistrationResult:
    """No registration: a zero displacement (the "Affine"/"Initial" row; the pairs are pre-aligned)."""
    ndim = fixed.dim() - 2
    disp = fixed.new_zeros(fixed.shape[0], ndim, *fixed.shape[2:])
    return RegistrationResult(disp=disp, states=[disp] if return_states else [],
                              state_steps=[0] if return_states else [], info={"steps": 0})


identity_method.name = "identity"  # type: ignore[attr-defined]


class _Classical:
    """Callable adapter over :func:`deqreg_lite.classical.register` (see :func:`classical_method`)."""

    def __init__(self, name: str = "classical", **register_kwargs) -> None:
        register_kwargs.setdefault("progress", False)
        if "record_every" in register_kwargs:
            raise TypeError("classical_method sets record_every itself (from return_states)")
        self.name = name
        self.register_kwargs = register_kwargs
        its = register_kwargs.get("iterations", 200)
        self.trained_steps = its if isinstance(its, int) else int(list(its)[-1])

    def __repr__(self) -> str:
        return f"classical_method({', '.join(f'{k}={v!r}' for k, v in self.register_kwargs.items())})"

    def __call__(self, fixed: Tensor, moving: Tensor, steps: int | None = None,
                 return_states: bool = False) -> RegistrationResult:
        from .classical import register

        kw = dict(self.register_kwargs)
        if steps is not None:
            levels = int(kw.get("levels", 1))
            its = kw.get("iterations", 200)
            its = [int(its)] * levels if isinstance(its, int) else [int(i) for i in its]
            its[-1] = int(steps)  # steps counts the iterations of the finest level
            kw["iterations"] = its if levels > 1 else its[0]
        with torch.enable_grad():
            result = register(fixed, moving, record_every=1 if return_states else 0, **kw)
        its = result.info.get("iterations")
        if its:
            result.info["steps"] = int(its[-1])
        return result


def classical_method(name: str = "classical", **register_kwargs) -> Callable[..., RegistrationResult]:
    """Classical gradient-descent registration (:func:`deqreg_lite.classical.register`) as a method callable.

    ``steps`` sets the iterations of the finest level; ``return_states`` records every iteration of the finest
    level (``state_steps`` 0, 1, ..., steps), so :func:`step_sweep` reads a whole sweep from one run.

    Example: ``evaluate(classical_method(lam=1.0, iterations=200, levels=3), pairs)``.
    """
    return _Classical(name=name, **register_kwargs)


def elastix_available() -> bool:
    """Whether the optional ``itk-elastix`` package can be imported."""
    try:
        import itk

        return hasattr(itk, "elastix_registration_method")
    except ImportError:
        return False


def _import_itk():
    try:
        import itk
    except ImportError as e:
        raise ImportError(f"elastix needs the optional package itk-elastix, which is not installed: "
                          f"`{ELASTIX_INSTALL_HINT}` (about 100 MB of wheels)") from e
    if not hasattr(itk, "elastix_registration_method"):
        raise ImportError(f"the installed itk has no elastix; install the elastix wheels: `{ELASTIX_INSTALL_HINT}`")
    return itk


def elastix_method(grid_spacing: float = 4.0, levels: int = 3, iterations: int = 500,
                   metric: str = "AdvancedNormalizedCorrelation", name: str = "elastix",
                   **parameters: Any) -> Callable[..., RegistrationResult]:
    """elastix B-spline registration (the paper's baseline: 3 levels, final grid spacing 4 voxels).

    Needs the optional ``itk-elastix`` package (``pip install itk-elastix``). Images are passed with unit spacing,
    so the grid spacing is in voxels and the returned displacement is in voxels (array-axis order, fixed grid ->
    moving image, as everywhere in deqreg_lite). Extra ``parameters`` override entries of elastix's default
    B-spline parameter map (values are converted to lists of strings). Untested here: itk-elastix was not
    installed on the development machine.

    Raises:
        ImportError: when itk-elastix is not installed; the message says how to install it.
    """
    itk = _import_itk()

    def elastix(fixed: Tensor, moving: Tensor) -> RegistrationResult:
        if fixed.shape[0] != 1:
            raise ValueError(f"elastix registers one pair at a time; got a batch of {fixed.shape[0]}")
        f_np = np.ascontiguousarray(fixed[0, 0].detach().cpu().numpy().astype(np.float32))
        m_np = np.ascontiguousarray(moving[0, 0].detach().cpu().numpy().astype(np.float32))
        f_img, m_img = itk.GetImageFromArray(f_np), itk.GetImageFromArray(m_np)
        params = itk.ParameterObject.New()
        pmap = params.GetDefaultParameterMap("bspline", int(levels), float(grid_spacing))
        pmap["Metric"] = [metric]
        pmap["MaximumNumberOfIterations"] = [str(int(iterations))]
        for k, v in parameters.items():
            pmap[k] = [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
        params.AddParameterMap(pmap)
        t0 = time.perf_counter()
        _, transform = itk.elastix_registration_method(f_img, m_img, parameter_object=params,
                                                       log_to_console=False)
        field_img = itk.transformix_deformation_field(m_img, transform)
        elapsed = time.perf_counter() - t0
        field_np = np.asarray(itk.array_from_image(field_img), dtype=np.float32)  # (*spatial, ndim), x first
        disp = torch.from_numpy(field_np[..., ::-1].copy()).movedim(-1, 0)[None]  # array-axis order
        return RegistrationResult(disp=disp.to(fixed.device), time=elapsed,
                                  info={"grid_spacing": grid_spacing, "levels": levels, "iterations": iterations})

    elastix.name = name  # type: ignore[attr-defined]
    return elastix


def evaluate_elastix(pairs: Any, labels: Sequence[int] | None = None, **elastix_kwargs: Any) -> Table:
    """The elastix row: :func:`evaluate` of :func:`elastix_method`, or an empty :class:`Table` whose ``note`` says
    "not installed (pip install itk-elastix)" when the package is missing (so a results table still lists it)."""
    try:
        method = elastix_method(**elastix_kwargs)
    except ImportError:
        return Table(name=elastix_kwargs.get("name", "elastix"), note=f"not installed ({ELASTIX_INSTALL_HINT})")
    return evaluate(method, pairs, labels=labels, memory=False)


# ---------------------------------------------------------------------------------------------------------------
# convergence: metrics against inference steps
# ---------------------------------------------------------------------------------------------------------------
def _step_metrics(sample: Mapping, disp: Tensor, labels: Sequence[int] | None) -> tuple[float, float]:
    from .warp import warp

    disp = disp.detach().float().cpu()
    d = float("nan")
    if "fixed_seg" in sample and "moving_seg" in sample:
        fixed_seg, moving_seg = sample["fixed_seg"].cpu(), sample["moving_seg"].cpu()
        labs = labels if labels is not None else (sample.get("labels") or
                                                  [int(v) for v in torch.unique(fixed_seg) if v != 0])
        d = float(torch.nanmean(dice(fixed_seg, warp(moving_seg, disp, mode="nearest"), labs)[0]))
    return d, float(folding_percent(disp)[0])


def step_sweep(method: Any, pairs: Any, steps: Sequence[int] = DEFAULT_SWEEP_STEPS,
               labels: Sequence[int] | None = None, *, use_states: bool = True,
               device: str | torch.device | None = None, progress: bool = False) -> dict:
    """Dice and folding % at each number of inference steps (the paper's Fig. 3).

    Efficient path: each pair is registered once with ``max(steps)`` and ``return_states=True``; the state whose
    ``result.state_steps`` entry is ``t`` is the result after ``t`` steps. Step counts missing from
    ``state_steps`` (or all of them, with ``use_states=False`` or a method that returns no states) are run
    separately with ``steps=t``. Reading states assumes the state after ``t`` steps equals what a run with
    ``steps=t`` returns; for a solver that returns its lowest-residual iterate rather than the last one, pass
    ``use_states=False`` for exact numbers.

    Returns:
        dict with ``method``, ``steps`` (sorted), ``dice``, ``dice_std``, ``folding_pct``, ``folding_pct_std``
        (lists over steps; mean and ddof=0 std over pairs), ``per_pair`` (``{"dice": [[...pairs] per step],
        "folding_pct": ...}``), ``trained_steps`` (the method's, if it has one), ``n_pairs`` and ``mode``
        (``"states"``, ``"runs"`` or ``"mixed"``: how the numbers were obtained).
    """
    steps = sorted({int(t) for t in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"steps must be integers >= 1, got {steps}")
    items = _as_pairs(pairs)
    dev = _device_of(method, device)
    is_module = isinstance(method, nn.Module)
    was_training = method.training if is_module else None
    per_dice = [[float("nan")] * len(items) for _ in steps]
    per_fold = [[float("nan")] * len(items) for _ in steps]
    used = set()
    if is_module:
        method.eval()
    try:
        from tqdm.auto import tqdm

        for i, s in enumerate(tqdm(items, desc=f"step sweep {_method_name(method)}", disable=not progress,
                                   leave=False)):
            fixed, moving = (s["fixed"].to(dev), s["moving"].to(dev)) if dev is not None else (s["fixed"],
                                                                                                 s["moving"])
            found: dict[int, Tensor] = {}
            if use_states:
                res = _run(method, fixed, moving, steps[-1], return_states=True)
                found = {int(t): st for t, st in zip(res.state_steps, res.states) if int(t) in steps}
                if len(found) < len(steps) and steps[-1] not in found and len(res.states) == 0:
                    found[steps[-1]] = res.disp  # no states, but the max-step run itself is usable
            for j, t in enumerate(steps):
                if t in found:
                    disp = found[t]
                    used.add("states")
                else:
                    disp = _run(method, fixed, moving, t).disp
                    used.add("runs")
                per_dice[j][i], per_fold[j][i] = _step_metrics(s, disp, labels)
    finally:
        if is_module:
            method.train(was_training)
    out: dict = {"method": _method_name(method), "steps": steps, "n_pairs": len(items),
                 "trained_steps": getattr(method, "trained_steps", None),
                 "mode": "mixed" if len(used) > 1 else (used.pop() if used else "runs")}
    for key, per in (("dice", per_dice), ("folding_pct", per_fold)):
        ms = [_mean_std(v) for v in per]
        out[key] = [m for m, _ in ms]
        out[f"{key}_std"] = [sd for _, sd in ms]
    out["per_pair"] = {"dice": per_dice, "folding_pct": per_fold}
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# statistics and Table 1
# ---------------------------------------------------------------------------------------------------------------
def _paired_values(table_a: Table, table_b: Table, metric: str) -> tuple[np.ndarray, np.ndarray]:
    ids_a = [r.get("pair") for r in table_a.rows]
    ids_b = [r.get("pair") for r in table_b.rows]
    if None not in ids_a and len(set(ids_a)) == len(ids_a) and set(ids_a) == set(ids_b) and \
            len(set(ids_b)) == len(ids_b):
        by_b = {r["pair"]: float(r.get(metric, float("nan"))) for r in table_b.rows}
        a = np.asarray(table_a.values(metric), dtype=np.float64)
        b = np.asarray([by_b[i] for i in ids_a], dtype=np.float64)
    else:
        if len(table_a.rows) != len(table_b.rows):
            raise ValueError(f"the tables hold different pairs ({len(table_a.rows)} and {len(table_b.rows)} rows, "
                             "ids not matching): evaluate both methods on the same pairs")
        a = np.asarray(table_a.values(metric), dtype=np.float64)
        b = np.asarray(table_b.values(metric), dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def wilcoxon(table_a: Table, table_b: Table, metric: str = "dice", alternative: str = "two-sided") -> float:
    """Paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) of ``metric`` between two tables of the same
    pairs (matched by their ``pair`` ids, else by position); returns the p-value.

    Pairs where either value is NaN are dropped. Returns NaN with no pairs left, and 1.0 when every difference is
    zero (no evidence of a difference). With few pairs the p-value cannot be small: with n pairs and no ties the
    smallest two-sided p is ``2 / 2^n`` (n = 5 gives 0.0625), so use at least 6 pairs.
    """
    from scipy import stats

    a, b = _paired_values(table_a, table_b, metric)
    if a.size == 0:
        return float("nan")
    if np.all(a == b):
        return 1.0
    return float(stats.wilcoxon(a, b, alternative=alternative).pvalue)


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
