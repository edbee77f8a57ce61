"""Table 1's "Mem." and "Time" columns, and Fig. 2c (memory against T), on whatever device this machine has.

For every method of the library at the paper's image sizes, batch 1, on synthetic smooth images:

* **methods**: VoxelMorph; Unrolling (the library's one-level U-Net unrolled T = 3 times) and Unrolling
  multi-level (``unrolling_ml``, the paper's baseline: 3 levels x 3 steps); GraDIRN; RIIR (T = 6); DEQReg-12; DEQReg
  (T = 48, S = 3, K = 3); and DEQReg with checkpointed phantom steps when this version of
  :class:`~deqreg_lite.methods.DEQReg` has a ``checkpoint_phantom`` option (detected, so the script runs before and
  after that option exists). The DEQ methods run with ``tol=0``, so every solver step runs (48, or 12): an untrained
  map would otherwise stop after a step or two and flatter the time;
* **sizes**: on CUDA, OASIS 128^3, NLST at half resolution (112x96x112, the size that reproduces the paper's NLST
  memory) and NLST full (224x192x224). On the CPU a **reduced size**, 3D 32^3 and 2D 160x192 (``--cpu-size``
  changes it), which the output says;
* **precisions**: ``float32`` (on CUDA with TF32 off: true float32), ``tf32`` (CUDA only: torch's default TF32
  convolutions and matrix products) and ``bf16`` (``torch.autocast`` with bfloat16, on CUDA and on the CPU);
* **columns**: training memory of one step, x VoxelMorph, train s/step (``zero_grad`` + ``method.training_step``:
  forward, loss and backward, no optimizer step), x VoxelMorph, and inference s (``method(fixed, moving)`` under
  ``no_grad``, eval mode, the trained steps). Times: ``--warmup`` calls (the memory step counts as the first
  training one), then the median of ``--repeats``;
* **Fig. 2c**: training memory against T for BPTT (Unrolling) and DEQReg (and its checkpointed variant), float32,
  at OASIS 128^3 on CUDA and at the reduced sizes on the CPU, with VoxelMorph as the reference line. It reuses
  ``benchmarks/memory_vs_steps.py``'s inputs and line fit; points that would not fit in the GPU's memory (predicted
  from the line) or run too long are skipped and recorded as skipped.

Memory, as ``deqreg_lite.evaluate.training_memory`` measures it on each device: on CUDA, the peak of
``torch.cuda.max_memory_allocated`` during the step minus what was allocated before it (the step's activations,
gradients, temporaries and cuDNN workspace; ``max_allocated_MiB`` in the JSON holds the peak with the model and the
inputs); on the CPU, the peak of the bytes saved for backward alive together (de-duplicated by storage), which
leaves out the model, gradients and temporaries, so its ratios are ratios of activations.

A point whose predicted run time exceeds ``--max-point-s`` is skipped (prediction: the method's cost relative to
VoxelMorph, from the issue's GPU table, times VoxelMorph's measured step; in a later precision, the method's time
in the first one times the largest slow-down measured so far in this table), as is every
point predicted to outrun what is left of ``--budget-s``; CUDA out-of-memory errors are recorded as such. Skipped
points are in the output with the reason. The machine's load (``_load.LoadMeter``) is recorded per table. On the CPU
the float32 tables run first, then Fig. 2c, then bf16 (slow on CPUs without bfloat16 units).

    python benchmarks/paper_scale.py                 # CPU: 3D 32^3 and 2D 160x192, float32 and bf16
    python benchmarks/paper_scale.py --quick         # smoke run (< 1 min): tiny sizes, 1 timing repeat, temp folder
    python benchmarks/paper_scale.py --cpu-size 24 128x160   # a smaller CPU run
    # a CUDA GPU (e.g. one NVIDIA H200), unattended, in one command from the repository root; --budget-s keeps it
    # inside a 10-minute slot (the points it leaves out are recorded as skipped); writes to $OUT when it is set:
    PYTHONPATH=. PYTHONUNBUFFERED=1 python benchmarks/paper_scale.py --budget-s 480

Writes ``paper_scale_<device>.{json,md}`` (``<device>``: the GPU's or the CPU's name as a slug, e.g.
``nvidia-h200``) to ``--out``, else ``$OUT`` when that is set, else ``benchmarks/results/`` (``--quick``: a temporary
folder unless ``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from deqreg_lite.evaluate import training_memory
from deqreg_lite.methods import DEQReg, RegistrationLoss, build_method

from _load import LoadMeter  # benchmarks/_load.py (the script's folder is on sys.path)
from memory_vs_steps import linear_fit, make_pair  # benchmarks/memory_vs_steps.py: the inputs, the line fit

MIB = 2 ** 20

#: (key, label, build name, options). DEQ methods with tol=0: every solver step runs.
METHOD_ROWS = [
    ("voxelmorph", "VoxelMorph", "voxelmorph", {}),
    ("unrolling", "Unrolling (T = 3)", "unrolling", {}),
    ("unrolling_ml", "Unrolling multi-level (3 x 3)", "unrolling_ml", {}),
    ("gradirn", "GraDIRN", "gradirn", {}),
    ("riir", "RIIR (T = 6)", "riir", {}),
    ("deqreg12", "DEQReg-12", "deqreg12", {"tol": 0.0}),
    ("deqreg", "DEQReg (T = 48, 48 steps run)", "deqreg", {"tol": 0.0}),
]
CHECKPOINT_OPTION = "checkpoint_phantom"
CHECKPOINT_ROW = ("deqreg_ckpt", "DEQReg, checkpointed phantom steps", "deqreg", {"tol": 0.0, CHECKPOINT_OPTION: True})

#: Train step over VoxelMorph's, to predict a point's time before it is measured (the issue's H200 table, TF32;
#: unrolling_ml and the checkpointed DEQReg: guesses). Only used to skip points that would run too long.
PRIOR_STEP_RATIO = {"voxelmorph": 1.0, "unrolling": 2.7, "unrolling_ml": 5.0, "gradirn": 4.9, "riir": 10.0,
                    "deqreg12": 5.9, "deqreg": 22.8, "deqreg_ckpt": 30.0}
#: Inference over one training step (the same table: infer s / train s, rounded up).
PRIOR_INFER_RATIO = 0.7

CUDA_SIZES = {"OASIS 128^3": (128, 128, 128), "NLST half 112x96x112": (112, 96, 112),
              "NLST full 224x192x224": (224, 192, 224)}
CPU_SIZES = {"3D 32^3": (32, 32, 32), "2D 160x192": (160, 192)}
QUICK_SIZES = {"2D 32x32": (32, 32)}
#: The size (label) that Fig. 2c runs at on CUDA, and the paper's rows to print beside the measured ones.
CUDA_FIG2C_SIZE = "OASIS 128^3"
FIG2C_STEPS = (1, 2, 4, 8, 16, 24, 48, 96)
QUICK_FIG2C_STEPS = (1, 2)
#: The paper's Table 1: Mem. (MB) and Time (s, training / inference per pair), on its GPU.
PAPER = {
    "OASIS": {"voxelmorph": (2645, 0.20, 0.14), "gradirn": (16619, 0.59, 0.24), "riir": (12542, 0.60, 0.30),
              "deqreg": (6925, 1.09, 0.98)},
    "NLST": {"voxelmorph": (1522, 0.24, 0.12), "gradirn": (9313, 0.41, 0.18), "riir": (7029, 0.40, 0.16),
             "deqreg": (3983, 0.74, 0.53)},
}
PRECISION_NOTES = {
    "float32": "float32 (on CUDA: TF32 off)",
    "tf32": "float32 with TF32 convolutions and matrix products (torch's CUDA default)",
    "bf16": "bfloat16 autocast (torch.autocast; warps, LNCC and the regulariser stay float32)",
}


# --------------------------------------------------------------------------------------------- helpers
def has_checkpoint_option() -> bool:
    """Whether this DEQReg takes ``checkpoint_phantom`` (an option added by another change)."""
    return CHECKPOINT_OPTION in inspect.signature(DEQReg.__init__).parameters


def method_rows() -> list[tuple]:
    return METHOD_ROWS + ([CHECKPOINT_ROW] if has_checkpoint_option() else [])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name or platform.processor() or platform.machine()}".strip()


def slug(text: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: lower case, runs of other characters as one ``-``, at most 48."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].strip("-") or "device"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def precision(name: str, device: torch.device) -> Iterator[None]:
    """``float32`` (TF32 off on CUDA), ``tf32`` (CUDA: TF32 on) or ``bf16`` (bfloat16 autocast; TF32 as torch's
    default for what autocast leaves in float32). Restores the TF32 flags."""
    if name not in PRECISION_NOTES:
        raise ValueError(f"precision must be one of {tuple(PRECISION_NOTES)}, got {name!r}")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if device.type == "cuda":
            tf32 = name != "float32"
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(name: str, ndim: int, options: dict, device: torch.device):
    torch.manual_seed(0)
    return build_method(name, ndim, **options).to(device)


def step_memory(method, fixed: Tensor, moving: Tensor, loss_fn, device: torch.device) -> dict:
    """Training memory of one step (see the module docstring), in bytes."""
    kind = "cuda_peak" if device.type == "cuda" else "saved"
    if device.type == "cuda":
        free_memory(device)
        sync(device)
        before = torch.cuda.memory_allocated(device)
        peak = training_memory(method, fixed, moving, loss_fn, kind=kind)
        return {"memory_bytes": int(peak - before), "max_allocated_MiB": peak / MIB, "memory_kind": "cuda_step_peak"}
    return {"memory_bytes": int(training_memory(method, fixed, moving, loss_fn, kind=kind)),
            "memory_kind": "saved_for_backward"}


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def train_step_fn(method, fixed, moving, loss_fn) -> Callable[[], object]:
    def step():
        method.zero_grad(set_to_none=True)
        return method.training_step(fixed, moving, loss_fn)
    return step


def infer_fn(method, fixed, moving) -> Callable[[], object]:
    def infer():
        with torch.no_grad():
            return method(fixed, moving).disp
    return infer


class Clock:
    """The run's budget: ``left()`` seconds of ``budget_s`` (inf without one)."""

    def __init__(self, budget_s: float | None) -> None:
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.used()


# --------------------------------------------------------------------------------------------- Table 1
def run_table(label: str, spatial: tuple[int, ...], prec: str, device: torch.device, args, clock: Clock,
              fp32_steps: dict) -> dict:
    """One table: every method at ``spatial`` in precision ``prec``. ``fp32_steps[(label, key)]`` holds each
    method's float32 (or first measured) step time, to predict other precisions' times."""
    ndim = len(spatial)
    fixed, moving = make_pair(spatial, device)
    loss_fn = RegistrationLoss()
    rows: list[dict] = []
    vxm_step: float | None = None
    # training steps a point runs: the memory step (the first warm-up step), the other warm-up steps, the timed ones
    per_point = max(1, args.warmup) + args.repeats
    with LoadMeter() as load:
        for key, row_label, name, options in method_rows():
            row = {"key": key, "method": row_label, "build": name, "options": options}
            if vxm_step is not None:
                # the slowest ratio to the first precision seen so far in this table (bf16 on a CPU slows the
                # iterative methods far more than VoxelMorph: 4.5x against 15x measured)
                slow = max([1e-9] + [r["train_s"] / fp32_steps[(label, r["key"])] for r in rows
                                     if "train_s" in r and (label, r["key"]) in fp32_steps])
                if (label, key) in fp32_steps:
                    step_guess = fp32_steps[(label, key)] * slow
                else:
                    step_guess = PRIOR_STEP_RATIO.get(key, 25.0) * vxm_step
                predicted = step_guess * (per_point + PRIOR_INFER_RATIO * (args.warmup + args.repeats))
                if predicted > args.max_point_s:
                    row["skipped"] = f"predicted {predicted:.0f} s > --max-point-s {args.max_point_s:.0f}"
                elif predicted > clock.left():
                    row["skipped"] = f"predicted {predicted:.0f} s > the {max(0.0, clock.left()):.0f} s left of " \
                                     f"--budget-s {args.budget_s:.0f}"
            if "skipped" not in row and clock.left() <= 0:
                row["skipped"] = f"--budget-s {args.budget_s:.0f} spent"
            if "skipped" in row:
                print(f"  {label} {prec:<7} {row_label:<36} skipped ({row['skipped']})", flush=True)
                rows.append(row)
                continue
            method = None
            try:
                method = build(name, ndim, options, device)
                t0 = time.perf_counter()
                with precision(prec, device):
                    row.update(step_memory(method, fixed, moving, loss_fn, device))
                    method.train()
                    train = timed(train_step_fn(method, fixed, moving, loss_fn), device, max(0, args.warmup - 1),
                                  args.repeats)
                    method.zero_grad(set_to_none=True)
                    method.eval()
                    infer = timed(infer_fn(method, fixed, moving), device, args.warmup, args.repeats)
                row.update({"memory_MiB": row["memory_bytes"] / MIB, "train_s": statistics.median(train),
                            "train_s_all": [round(t, 5) for t in train], "infer_s": statistics.median(infer),
                            "infer_s_all": [round(t, 5) for t in infer], "seconds": round(time.perf_counter() - t0, 2)})
                fp32_steps.setdefault((label, key), row["train_s"])
                if key == "voxelmorph":
                    vxm_step = row["train_s"]
                print(f"  {label} {prec:<7} {row_label:<36} {row['memory_MiB']:10.1f} MiB  train "
                      f"{row['train_s']:.4f} s  infer {row['infer_s']:.4f} s  ({row['seconds']:.1f} s)", flush=True)
            except RuntimeError as err:
                if device.type != "cuda" or not is_oom(err):
                    raise
                row["skipped"] = "CUDA out of memory"
                print(f"  {label} {prec:<7} {row_label:<36} out of memory", flush=True)
            finally:
                del method
                free_memory(device)
            rows.append(row)
    vxm = next((r for r in rows if r["key"] == "voxelmorph" and "train_s" in r), None)
    for r in rows:
        if vxm is not None and "train_s" in r:
            r["memory_x_vxm"] = r["memory_bytes"] / vxm["memory_bytes"] if vxm["memory_bytes"] else None
            r["train_x_vxm"] = r["train_s"] / vxm["train_s"]
            r["infer_x_vxm"] = r["infer_s"] / vxm["infer_s"]
    return {"size": label, "shape": [1, 1, *spatial], "precision": prec, "rows": rows,
            "load_cores": load.cores, "loadavg": [round(v, 2) for v in load.loadavg] if load.loadavg else None}


# --------------------------------------------------------------------------------------------- Fig. 2c
def run_fig2c(label: str, spatial: tuple[int, ...], steps: tuple[int, ...], device: torch.device, args,
              clock: Clock) -> dict:
    """Memory against T (float32): BPTT (``unrolling(T)``), DEQReg (``S = 3, K = 3, tol = 0``) and, when the option
    exists, DEQReg with checkpointed phantom steps; VoxelMorph as the reference. Skips points predicted to exceed
    ``--max-point-s`` or, on CUDA, 90% of the GPU's memory (from the line through the points so far)."""
    ndim = len(spatial)
    fixed, moving = make_pair(spatial, device)
    loss_fn = RegistrationLoss()
    limit = 0.9 * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else math.inf
    series = {"bptt": lambda T: build("unrolling", ndim, {"T": T}, device),
              "deqreg": lambda T: build("deqreg", ndim, {"T": T, "S": 3, "K": 3, "tau": 0.5, "tol": 0.0}, device)}
    if has_checkpoint_option():
        series["deqreg checkpointed"] = lambda T: build(
            "deqreg", ndim, {"T": T, "S": 3, "K": 3, "tau": 0.5, "tol": 0.0, CHECKPOINT_OPTION: True}, device)
    points: list[dict] = []

    def record(name: str, T: int, make) -> dict | None:
        method = None
        try:
            method = make(T)
            t0 = time.perf_counter()
            with precision("float32", device):
                mem = step_memory(method, fixed, moving, loss_fn, device)
            row = {"series": name, "T": T, **mem, "MiB": mem["memory_bytes"] / MIB,
                   "seconds": round(time.perf_counter() - t0, 2)}
            print(f"  fig2c {label} {name:<20} T={T:<3} {row['MiB']:10.1f} MiB  ({row['seconds']:.1f} s)", flush=True)
        except RuntimeError as err:
            if device.type != "cuda" or not is_oom(err):
                raise
            row = {"series": name, "T": T, "skipped": "CUDA out of memory"}
            print(f"  fig2c {label} {name:<20} T={T:<3} out of memory", flush=True)
        finally:
            del method
            free_memory(device)
        points.append(row)
        return row

    with LoadMeter() as load:
        vxm = record("voxelmorph", 1, lambda T: build("voxelmorph", ndim, {}, device))
        for name, make in series.items():
            done: list[dict] = []
            for T in steps:
                reason = None
                if done:
                    last = done[-1]
                    calls = (lambda t: t + 12) if name.startswith("deqreg") else (lambda t: t)
                    est_s = last["seconds"] * calls(T) / calls(last["T"])
                    if len(done) >= 2:
                        fit = linear_fit([p["T"] for p in done], [p["memory_bytes"] for p in done])
                        est_b = fit["intercept"] + fit["slope"] * T
                    else:
                        est_b = last["memory_bytes"] * (T / last["T"] if name == "bptt" else 1.0)
                    if est_s > args.max_point_s:
                        reason = f"predicted {est_s:.0f} s > --max-point-s {args.max_point_s:.0f}"
                    elif est_s > clock.left():
                        reason = f"predicted {est_s:.0f} s > the {max(0.0, clock.left()):.0f} s left of --budget-s"
                    elif est_b > limit:
                        reason = f"predicted {est_b / 2**30:.1f} GiB > 90% of the GPU's memory"
                if reason is None and clock.left() <= 0:
                    reason = f"--budget-s {args.budget_s:.0f} spent"
                if reason is not None:
                    points.append({"series": name, "T": T, "skipped": reason})
                    print(f"  fig2c {label} {name:<20} T={T:<3} skipped ({reason})", flush=True)
                    continue
                row = record(name, T, make)
                if row is not None and "memory_bytes" in row:
                    done.append(row)
    summary: dict = {"voxelmorph_MiB": vxm.get("MiB")}
    for name in series:
        pts = [p for p in points if p["series"] == name and "memory_bytes" in p]
        if not pts:
            continue
        mib = [p["MiB"] for p in pts]
        s = {"MiB_min": min(mib), "MiB_max": max(mib), "spread": (max(mib) - min(mib)) / min(mib) if min(mib) else None}
        if len(pts) >= 2:
            s["fit_MiB"] = linear_fit([p["T"] for p in pts], mib)
        if vxm.get("MiB"):
            s["max_x_vxm"] = max(mib) / vxm["MiB"]
        summary[name] = s
    return {"size": label, "shape": [1, 1, *spatial], "precision": "float32", "points": points, "summary": summary,
            "load_cores": load.cores, "loadavg": [round(v, 2) for v in load.loadavg] if load.loadavg else None}


# --------------------------------------------------------------------------------------------- output
def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def markdown(result: dict) -> str:
    meta = result["meta"]
    mem_note = ("training memory = peak torch.cuda.max_memory_allocated during one step minus the memory allocated "
                "before it (MiB)" if meta["memory_kind"] == "cuda_step_peak" else
                "training memory = peak of the bytes saved for backward alive together (MiB; activations only: no "
                "model, gradients, optimizer or temporaries)")
    lines = [
        f"# Table 1 (Mem., Time) and Fig. 2c at paper scale: {meta['device_name']}",
        "",
        f"`python benchmarks/paper_scale.py {' '.join(meta.get('argv', []))}`".replace(" `", "`"),
        "",
        f"{meta['date']}, torch {meta['torch']}" + (f" (CUDA {meta['cuda']})" if meta.get("cuda") else "") +
        f", device {meta['device']} ({meta['device_name']}), {meta['threads']} CPU thread(s); batch 1, synthetic "
        f"smooth images, loss 1 - LNCC + 1.0 diffusion. {mem_note}. Train s/step = zero_grad + training_step "
        f"(forward, loss, backward; no optimizer step), inference s = method(fixed, moving) under no_grad; medians "
        f"of {meta['repeats']} after {meta['warmup']} warm-up. DEQ methods with tol = 0 (all 48 or 12 solver steps "
        f"run). Load: per table below; at the end, load average {meta['loadavg']}, "
        f"{_f(meta['background_load_cores'], '.2f')} cores busy with other processes over the run.",
        "",
    ]
    if meta.get("reduced"):
        lines += [f"**Reduced size (CPU):** {meta['reduced']}", ""]
    if meta.get("quick"):
        lines += ["**Quick smoke run:** tiny sizes, 1 repeat; the numbers mean nothing.", ""]
    lines += ["Checkpointed DEQReg row: " + ("included (DEQReg has `checkpoint_phantom`)." if meta["checkpoint_option"]
                                            else "not measured (this DEQReg has no `checkpoint_phantom` option)."), ""]
    for table in result["tables"]:
        lines += [f"## {table['size']}, {table['precision']}", "",
                  f"{PRECISION_NOTES[table['precision']]}. Other processes kept {_f(table['load_cores'], '.2f')} cores "
                  f"busy; load average at the end {table['loadavg']}.", ""]
        paper = PAPER.get(table["size"].split()[0])
        head = "| method | training MiB | x VoxelMorph | train s/step | x VoxelMorph | infer s |"
        rule = "|---|---|---|---|---|---|"
        if paper:
            head += " paper MB | paper train / infer s |"
            rule += "---|---|"
        lines += [head, rule]
        for r in table["rows"]:
            if "skipped" in r:
                cells = [r["method"], f"skipped: {r['skipped']}", "", "", "", ""]
            else:
                cells = [r["method"], f"{r['memory_MiB']:.0f}" if r["memory_MiB"] >= 100 else f"{r['memory_MiB']:.1f}",
                         _f(r.get("memory_x_vxm"), ".2f"), f"{r['train_s']:.3f}", _f(r.get("train_x_vxm"), ".1f"),
                         f"{r['infer_s']:.3f}"]
            if paper:
                p = paper.get(r["key"])
                cells += [str(p[0]), f"{p[1]} / {p[2]}"] if p else ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for fig in result["fig2c"]:
        lines += [f"## Fig. 2c: training memory against T, {fig['size']}, float32", "",
                  f"Other processes kept {_f(fig['load_cores'], '.2f')} cores busy; load average at the end "
                  f"{fig['loadavg']}. VoxelMorph: {_f(fig['summary'].get('voxelmorph_MiB'), '.1f')} MiB.", ""]
        names = [n for n in ("bptt", "deqreg", "deqreg checkpointed") if any(p["series"] == n for p in fig["points"])]
        lines += ["| T | " + " | ".join(f"{n} MiB" for n in names) + " |", "|---|" + "---|" * len(names)]
        by = {(p["series"], p["T"]): p for p in fig["points"]}
        for T in sorted({p["T"] for p in fig["points"] if p["series"] != "voxelmorph"}):
            cells = []
            for n in names:
                p = by.get((n, T))
                cells.append("" if p is None else f"skipped: {p['skipped']}" if "skipped" in p else f"{p['MiB']:.1f}")
            lines.append(f"| {T} | " + " | ".join(cells) + " |")
        lines.append("")
        for n in names:
            s = fig["summary"].get(n)
            if not s:
                continue
            text = f"* {n}: {s['MiB_min']:.1f} to {s['MiB_max']:.1f} MiB over T"
            if s.get("spread") is not None and n != "bptt":
                text += f" (spread (max - min) / min {100 * s['spread']:.2f}%)"
            if s.get("fit_MiB"):
                text += f"; line: {s['fit_MiB']['slope']:.2f} MiB per step + {s['fit_MiB']['intercept']:.1f} MiB, " \
                        f"R^2 {s['fit_MiB']['r2']:.4f}"
            if s.get("max_x_vxm") is not None:
                text += f"; at most {s['max_x_vxm']:.2f}x VoxelMorph"
            lines.append(text + ".")
        lines.append("")
    skipped = [(t["size"], t["precision"], r["method"], r["skipped"]) for t in result["tables"] for r in t["rows"]
               if "skipped" in r]
    if skipped:
        lines += ["## Skipped points", ""] + [f"* {s}, {p}, {m}: {why}" for s, p, m, why in skipped] + [""]
    lines.append(f"Total run time {meta['total_seconds']} s.")
    return "\n".join(lines) + "\n"


def _parse_size(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is N (a cube N^3) or AxB or AxBxC, got {text!r}") from None
    if len(dims) == 1:
        dims = dims * 3
    if len(dims) not in (2, 3) or min(dims) < 8:
        raise argparse.ArgumentTypeError(f"a size needs 2 or 3 numbers >= 8, got {text!r}")
    return dims


def _size_label(dims: tuple[int, ...]) -> str:
    if len(dims) == 3 and len(set(dims)) == 1:
        return f"3D {dims[0]}^3"
    return f"{len(dims)}D " + "x".join(str(d) for d in dims)


def main(argv: list[str] | None = None) -> dict:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2D 32x32, 1 timing repeat, --max-point-s 10, Fig. 2c at T <= 2, a temp folder")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU (default 1)")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated of float32, tf32, bf16 (default: all three on CUDA, float32,bf16 on the CPU)")
    ap.add_argument("--sizes", default=None,
                    help="CUDA: comma-separated labels of " + ", ".join(CUDA_SIZES) + " (default: all)")
    ap.add_argument("--cpu-size", type=_parse_size, nargs="+", default=None,
                    help="the reduced CPU sizes (default 32 160x192: 3D 32^3 and 2D 160x192)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up calls per point before timing, the memory step counting as the first training one "
                         "(default 1; CUDA 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per point (default 3; CUDA 5; quick 1)")
    ap.add_argument("--max-point-s", type=float, default=None,
                    help="skip a point predicted to take longer than this (default 120 s; CUDA 240 s)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip every point once the run has used this many seconds (default: none)")
    ap.add_argument("--no-fig2c", action="store_true", help="skip the memory-against-T sweep")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default $OUT when set, else benchmarks/results; --quick: a temporary folder)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or not cuda else 2)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5 if cuda else 3)
    args.max_point_s = args.max_point_s if args.max_point_s is not None else (
        10.0 if args.quick else 240.0 if cuda else 120.0)
    precs = [p.strip() for p in (args.precisions or ("float32,tf32,bf16" if cuda else "float32,bf16")).split(",")]
    for p in precs:
        if p not in PRECISION_NOTES:
            ap.error(f"--precisions: unknown {p!r}; choose from {', '.join(PRECISION_NOTES)}")
        if p == "tf32" and not cuda:
            ap.error("--precisions: tf32 exists on CUDA only")
    reduced = None
    if args.quick:
        sizes = dict(QUICK_SIZES)
        fig_sizes, fig_steps = dict(QUICK_SIZES), QUICK_FIG2C_STEPS
    elif cuda:
        wanted = [s.strip() for s in args.sizes.split(",")] if args.sizes else list(CUDA_SIZES)
        unknown = [s for s in wanted if s not in CUDA_SIZES]
        if unknown:
            ap.error(f"--sizes: unknown {unknown}; choose from {list(CUDA_SIZES)}")
        sizes = {s: CUDA_SIZES[s] for s in wanted}
        fig_sizes = {CUDA_FIG2C_SIZE: CUDA_SIZES[CUDA_FIG2C_SIZE]}
        fig_steps = FIG2C_STEPS
    else:
        dims = args.cpu_size or list(CPU_SIZES.values())
        sizes = {_size_label(d): d for d in dims}
        fig_sizes, fig_steps = dict(sizes), FIG2C_STEPS
        reduced = (f"the paper's sizes (OASIS 128^3, NLST 224x192x224) do not fit a CPU run; this one ran at "
                   f"{', '.join(sizes)} instead"
                   + ("" if args.cpu_size is None else f" (--cpu-size; the default CPU sizes are {', '.join(CPU_SIZES)})")
                   + ", and its memory is saved-for-backward bytes, not a GPU's allocation.")
    if args.out is None:
        if args.quick:
            args.out = Path(tempfile.gettempdir()) / "deqreg_lite_bench"
        elif os.environ.get("OUT"):
            args.out = Path(os.environ["OUT"])
        else:
            args.out = here / "results"
    name = device_name(device)
    print(f"paper_scale: {name}, torch {torch.__version__}, sizes {list(sizes)}, precisions {precs}, "
          f"checkpointed DEQReg row: {has_checkpoint_option()}", flush=True)
    clock = Clock(args.budget_s)
    tables, figs, fp32_steps = [], [], {}
    with LoadMeter() as load:
        if cuda:  # size by size, Fig. 2c after OASIS (before the costly NLST full)
            for label, spatial in sizes.items():
                for prec in precs:
                    tables.append(run_table(label, spatial, prec, device, args, clock, fp32_steps))
                if not args.no_fig2c and label in fig_sizes:
                    figs.append(run_fig2c(label, spatial, fig_steps, device, args, clock))
        else:  # the first precision at every size, Fig. 2c, then the others (bf16 is slow on most CPUs)
            for prec in precs[:1]:
                for label, spatial in sizes.items():
                    tables.append(run_table(label, spatial, prec, device, args, clock, fp32_steps))
            if not args.no_fig2c:
                for label, spatial in fig_sizes.items():
                    figs.append(run_fig2c(label, spatial, fig_steps, device, args, clock))
            for prec in precs[1:]:
                for label, spatial in sizes.items():
                    tables.append(run_table(label, spatial, prec, device, args, clock, fp32_steps))
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "argv": list(sys.argv[1:] if argv is None else argv), "cuda": torch.version.cuda if cuda else None, "device": str(device), "device_name": name,
        "memory_kind": "cuda_step_peak" if cuda else "saved_for_backward", "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
        "quick": args.quick, "reduced": reduced, "sizes": {k: list(v) for k, v in sizes.items()},
        "precisions": precs, "precision_notes": {p: PRECISION_NOTES[p] for p in precs}, "warmup": args.warmup,
        "repeats": args.repeats, "max_point_s": args.max_point_s, "budget_s": args.budget_s,
        "checkpoint_option": has_checkpoint_option(), "fig2c_steps": list(fig_steps), "paper": PAPER,
        "background_load_cores": load.cores, "loadavg": [round(v, 2) for v in load.loadavg] if load.loadavg else None,
        "total_seconds": round(clock.used(), 1),
    }
    result = {"meta": meta, "tables": tables, "fig2c": figs}
    stem = f"paper_scale_{slug(name)}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {args.out / stem}.{{json,md}} ({meta['total_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
