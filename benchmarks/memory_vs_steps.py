"""Training memory against the number of steps T: BPTT (Unrolling) vs DEQReg, with VoxelMorph as the reference.

The paper's Fig. 2c and Table 1 ("Mem."): unrolled methods trained by backpropagation through time (BPTT) need
memory that grows linearly with the number of steps T, while DEQReg's stays flat (its solver runs under no_grad
and only the K phantom-gradient steps of one Eq. 9 term keep a graph); DEQReg used 6925 MB against VoxelMorph's
2645 MB (2.6x) on OASIS.

Measured here, one training step (``method.training_step``) per point, batch 1, at 2D 128x128 and 3D 32^3:

* ``voxelmorph``: one U-Net call (the reference line);
* ``unrolling(T)``: BPTT through T steps, T in {1, 2, 4, 8, 16, 48, 96};
* ``deqreg(T, S=3, K=3, tau=0.5, tol=0)``: the library's DEQReg, each Eq. 9 term back-propagated as soon as it is
  formed. ``tol=0`` makes the solver run all T steps (an untrained map would otherwise stop after 1-2);
* ``deqreg naive`` (T = 48 only): the same Eq. 9 loss built as one scalar (``deq.correction_loss``) and
  back-propagated once, so the S + 1 = 4 K-step graphs are alive together: what the library avoids;
* ``deqreg K=1, K=2`` (T = 48 only): how the ratio to VoxelMorph scales with K;
* ``deqreg ckpt`` (T = 48 only): DEQReg with ``checkpoint_phantom=True``, activation checkpointing of the K phantom
  steps (each step's input kept, the step recomputed in the backward; goal: <= 1.5x VoxelMorph), and the time of
  its training step over the plain DEQReg's (process CPU time on the CPU, wall time on CUDA): ``--time-rounds``
  rounds (default 3; 1 with ``--quick``), each running both once, the order alternating, same weights; the median
  of the per-round ratios.

Memory: on the CPU, :func:`deqreg_lite.evaluate.training_memory` with ``kind="saved"``: the peak of the bytes saved
for backward that are alive together (de-duplicated by storage; parameters saved by the convolutions count too;
temporaries, the model, the gradients and the optimizer do not; with checkpointed phantom steps, the stored step
inputs and the activations recomputed in the backward count, through ``deqreg_lite.memory.recompute_context``). On CUDA, ``kind="cuda_peak"``:
``torch.cuda.max_memory_allocated`` during the step (everything, as the paper's column). The device is picked
automatically (``--device`` overrides). Saved-bytes counts do not depend on the machine or on its load; CUDA peaks
depend a little on the allocator. A point whose predicted run time exceeds ``--max-point-s`` is skipped and
recorded as skipped.

    python benchmarks/memory_vs_steps.py            # ~14 min on one CPU core at load average 5.5 on 2 cores
    python benchmarks/memory_vs_steps.py --quick    # smoke run (~2 min there): 2D 64x64 and 3D 16^3, T <= 8

Writes ``benchmarks/results/memory_vs_steps.{json,md,png}`` (``--quick``: to a temporary folder unless ``--out``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from deqreg_lite.deq import correction_loss, phantom
from deqreg_lite.evaluate import training_memory
from deqreg_lite.memory import SavedBytes
from deqreg_lite.methods import DEQReg, RegistrationLoss, build_method

from _load import LoadMeter  # benchmarks/_load.py (the script's folder is on sys.path)

PAPER = {"voxelmorph_MB": 2645, "deqreg_MB": 6925}
GOAL_RATIO = PAPER["deqreg_MB"] / PAPER["voxelmorph_MB"]  # 2.618: the paper's, rounded to 2.6 in the issue
GOAL_RATIO_ROUNDED = 2.6
CKPT_GOAL_RATIO = 1.5  # issue 12: DEQReg with checkpointed phantom steps at most 1.5x VoxelMorph
FLAT_TOL = 0.05
STEPS = (1, 2, 4, 8, 16, 48, 96)
CASES = {"2D 128x128": (128, 128), "3D 32^3": (32, 32, 32)}
QUICK_STEPS = (1, 2, 4, 8)
QUICK_CASES = {"2D 64x64": (64, 64), "3D 16^3": (16, 16, 16)}
MIB = 2 ** 20


class NaiveDEQReg(DEQReg):
    """DEQReg whose Eq. 9 loss is one scalar back-propagated once: all S + 1 phantom graphs alive together."""

    name = "deqreg_naive"

    def training_step(self, fixed, moving, loss_fn, backward=Tensor.backward):
        g = self.update_map(fixed, moving)
        with torch.no_grad():
            z_star, states, info = self.deq(g, self._zeros(fixed))

        def term(z):
            return loss_fn(fixed, moving, z)

        loss = correction_loss(term, phantom(g, z_star, self.K, self.tau),
                               [phantom(g, s, self.K, self.tau) for s in states], self.gamma)
        backward(loss)
        return {"loss": float(loss.detach()), "nfe": float(info.nfe)}


# --------------------------------------------------------------------------------------------- inputs
def make_pair(spatial: tuple[int, ...], device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Smooth random images in [0, 1] (the values do not change the saved bytes)."""
    gen = torch.Generator().manual_seed(seed)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"

    def img():
        coarse = torch.rand(1, 1, *[max(2, s // 8) for s in spatial], generator=gen)
        return F.interpolate(coarse, size=spatial, mode=mode, align_corners=True).clamp(0, 1)
    return img().to(device), img().to(device)


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else 0.0
    icpt = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    return {"slope": slope, "intercept": icpt, "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


# --------------------------------------------------------------------------------------------- measure
def measure(method, fixed, moving, loss_fn, kind) -> tuple[int, float]:
    t0 = time.perf_counter()
    nbytes = training_memory(method, fixed, moving, loss_fn, kind=kind)
    return nbytes, time.perf_counter() - t0


def time_ratio(plain, ckpt, fixed, moving, loss_fn, rounds: int) -> dict:
    """Time of one ``training_step`` of each method, interleaved (``rounds`` rounds, each running both once, the
    order alternating), after one untimed step each. ``ratio`` is the median of the per-round ckpt / plain ratios of
    the process's CPU time on the CPU (on a machine shared with other jobs, wall time swung by 2x from step to step
    while CPU time stayed within about 10%), of wall time on CUDA; both are recorded."""
    cuda = fixed.device.type == "cuda"

    def one(method) -> tuple[float, float]:
        method.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(fixed.device)
        w0, c0 = time.perf_counter(), time.process_time()
        method.training_step(fixed, moving, loss_fn)
        if cuda:
            torch.cuda.synchronize(fixed.device)
        return time.perf_counter() - w0, time.process_time() - c0

    plain.train(), ckpt.train()
    one(plain), one(ckpt)  # warm-up
    wall: dict[str, list[float]] = {"plain": [], "ckpt": []}
    cpu: dict[str, list[float]] = {"plain": [], "ckpt": []}
    for r in range(rounds):
        order = (("plain", plain), ("ckpt", ckpt)) if r % 2 == 0 else (("ckpt", ckpt), ("plain", plain))
        for key, method in order:
            w, c = one(method)
            wall[key].append(w)
            cpu[key].append(c)
    plain.zero_grad(set_to_none=True), ckpt.zero_grad(set_to_none=True)
    used = wall if cuda else cpu
    ratios = [c / p for c, p in zip(used["ckpt"], used["plain"])]
    wall_ratios = [c / p for c, p in zip(wall["ckpt"], wall["plain"])]
    return {"rounds": rounds, "clock": "wall" if cuda else "process CPU time",
            "plain_s": used["plain"], "ckpt_s": used["ckpt"],
            "plain_median_s": statistics.median(used["plain"]), "ckpt_median_s": statistics.median(used["ckpt"]),
            "ratio": statistics.median(ratios), "ratios": ratios,
            "wall_plain_s": wall["plain"], "wall_ckpt_s": wall["ckpt"], "wall_ratio": statistics.median(wall_ratios)}


def run_case(label: str, spatial: tuple[int, ...], steps: tuple[int, ...], device: torch.device, kind: str,
             loss_fn, max_point_s: float, extras: bool, time_rounds: int = 3) -> dict:
    ndim = len(spatial)
    fixed, moving = make_pair(spatial, device)
    torch.manual_seed(0)
    points: list[dict] = []

    def record(series, T, method, extra=None):
        method = method.to(device)
        nbytes, secs = measure(method, fixed, moving, loss_fn, kind)
        row = {"series": series, "T": T, "bytes": nbytes, "MiB": nbytes / MIB, "seconds": round(secs, 2)}
        row.update(extra or {})
        points.append(row)
        print(f"  {label} {series:<14} T={T!s:<3} {nbytes / MIB:9.1f} MiB  ({secs:.1f} s)", flush=True)
        return row

    if device.type == "cuda":  # warm-up: cuDNN picks its algorithms, the allocator fills its caches
        for name in ("voxelmorph", "unrolling"):
            training_memory(build_method(name, ndim).to(device), fixed, moving, loss_fn, kind=kind)

    vxm = record("voxelmorph", 1, build_method("voxelmorph", ndim))
    per_step: dict[str, float] = {}  # seconds per solver/unrolled step, to predict the next point's time
    for series, make in (("bptt", lambda T: build_method("unrolling", ndim, T=T)),
                         ("deqreg", lambda T: build_method("deqreg", ndim, T=T, S=3, K=3, tau=0.5, tol=0.0))):
        for T in steps:
            est = per_step.get(series, 0.0) * T
            if est > max_point_s:
                points.append({"series": series, "T": T, "skipped": f"predicted {est:.0f} s > {max_point_s:.0f} s"})
                print(f"  {label} {series:<14} T={T:<3} skipped (predicted {est:.0f} s)", flush=True)
                continue
            row = record(series, T, make(T))
            per_step[series] = max(per_step.get(series, 0.0), row["seconds"] / (T + (12 if series == "deqreg" else 0)))
    timing = floor = None
    if extras:
        T = 48 if 48 in steps else max(steps)
        record("deqreg naive", T, NaiveDEQReg(ndim, T=T, S=3, K=3, tau=0.5, tol=0.0),
               {"note": "Eq. 9 as one scalar: S + 1 = 4 phantom graphs alive together"})
        for K in (1, 2):
            record(f"deqreg K={K}", T, build_method("deqreg", ndim, T=T, S=3, K=K, tau=0.5, tol=0.0))
        record("deqreg ckpt", T, build_method("deqreg", ndim, T=T, S=3, K=3, tau=0.5, tol=0.0,
                                              checkpoint_phantom=True),
               {"note": "checkpoint_phantom=True: each phantom step's input kept, the step recomputed in backward"})
        # what the checkpointed peak is made of: the K stored step inputs (B, ndim, *spatial), and, for comparison,
        # the loss's own saved tensors (alive together with the U-Net's in VoxelMorph's peak)
        disp = torch.zeros(1, ndim, *spatial, device=device, requires_grad=True)
        with SavedBytes() as loss_mem:
            loss_value = loss_fn(fixed, moving, disp)
        del loss_value
        floor = {"stored_inputs_bytes": 3 * disp.numel() * disp.element_size(), "loss_saved_bytes": loss_mem.peak}
        if time_rounds > 0:
            torch.manual_seed(0)
            plain = build_method("deqreg", ndim, T=T, S=3, K=3, tau=0.5, tol=0.0).to(device)
            ckpt = build_method("deqreg", ndim, T=T, S=3, K=3, tau=0.5, tol=0.0, checkpoint_phantom=True).to(device)
            ckpt.load_state_dict(plain.state_dict())
            timing = time_ratio(plain, ckpt, fixed, moving, loss_fn, time_rounds)
            print(f"  {label} deqreg ckpt time / deqreg time (T={T}, {time_rounds} rounds): {timing['ratio']:.3f}x "
                  f"({timing['ckpt_median_s']:.2f} s / {timing['plain_median_s']:.2f} s)", flush=True)

    # summaries
    def series_of(name):
        return [p for p in points if p["series"] == name and "bytes" in p]

    bptt, deq = series_of("bptt"), series_of("deqreg")
    fit = linear_fit([p["T"] for p in bptt], [p["MiB"] for p in bptt]) if len(bptt) >= 2 else None
    deq_mib = [p["MiB"] for p in deq]
    spread = (max(deq_mib) - min(deq_mib)) / min(deq_mib) if deq_mib else None
    ref_T = 48 if any(p["T"] == 48 for p in deq) else (max(p["T"] for p in deq) if deq else None)
    deq_ref = next((p for p in deq if p["T"] == ref_T), None)
    ratio = deq_ref["bytes"] / vxm["bytes"] if deq_ref else None
    ratios = {p["series"] + f" T={p['T']}": p["bytes"] / vxm["bytes"] for p in points if "bytes" in p}
    # BPTT's T with the same memory as DEQReg (from the fit)
    bptt_equiv = ((deq_ref["MiB"] - fit["intercept"]) / fit["slope"]) if (fit and deq_ref and fit["slope"] > 0) else None
    ckpt = next((p for p in points if p["series"] == "deqreg ckpt" and "bytes" in p), None)
    plain_at = next((p for p in deq if ckpt and p["T"] == ckpt["T"]), None)
    k1 = next((p for p in points if p["series"] == "deqreg K=1" and "bytes" in p), None)
    ckpt_ratio = ckpt["bytes"] / vxm["bytes"] if ckpt else None
    summary = {
        "voxelmorph_MiB": vxm["MiB"],
        "deqreg_ref_T": ref_T, "deqreg_ref_MiB": deq_ref["MiB"] if deq_ref else None,
        "deqreg_over_voxelmorph": ratio,
        "goal_ratio_le": GOAL_RATIO_ROUNDED, "goal_ratio_met": ratio is not None and ratio <= GOAL_RATIO_ROUNDED,
        "deqreg_spread_over_T": spread, "deqreg_flat_within": FLAT_TOL,
        "deqreg_flat": spread is not None and spread <= FLAT_TOL,
        "bptt_fit_MiB": fit, "bptt_slope_MiB_per_step": fit["slope"] if fit else None,
        "bptt_r2": fit["r2"] if fit else None, "bptt_linear": bool(fit and fit["r2"] >= 0.99),
        "bptt_T_with_deqreg_memory": bptt_equiv, "ratios_to_voxelmorph": ratios,
        "ckpt_T": ckpt["T"] if ckpt else None, "ckpt_MiB": ckpt["MiB"] if ckpt else None,
        "ckpt_over_voxelmorph": ckpt_ratio, "ckpt_goal_ratio_le": CKPT_GOAL_RATIO,
        "ckpt_goal_met": ckpt_ratio is not None and ckpt_ratio <= CKPT_GOAL_RATIO,
        "ckpt_over_deqreg": ckpt["bytes"] / plain_at["bytes"] if (ckpt and plain_at) else None,
        "ckpt_over_deqreg_K1": ckpt["bytes"] / k1["bytes"] if (ckpt and k1) else None,
        "ckpt_time": timing, "ckpt_floor": floor,
    }
    return {"case": label, "shape": [1, 1, *spatial], "points": points, "summary": summary}


# --------------------------------------------------------------------------------------------- output
def markdown(result: dict) -> str:
    meta = result["meta"]
    unit = "saved-for-backward MiB (peak alive together)" if meta["memory_kind"] == "saved" else \
        "MiB, torch.cuda.max_memory_allocated"
    lines = [
        "# Training memory vs steps T: BPTT (Unrolling) vs DEQReg, VoxelMorph as reference",
        "",
        f"{meta['date']}, torch {meta['torch']}, device {meta['device']}, {meta['threads']} thread(s); memory = {unit}; "
        f"batch 1, loss 1 - LNCC + 1.0 diffusion. DEQReg: S = 3, K = 3, tau = 0.5, fixed-point solver with tol = 0 "
        f"(all T steps run). Load average at the end: {meta['loadavg']}.",
        "",
        "Saved-for-backward bytes are the part of training memory that depends on T (and on K); they do not include "
        "the model, its gradients, the optimizer or temporaries, so the ratios here are activation ratios. On CUDA "
        "the paper's measure (max_memory_allocated) adds the same constant to every method.",
        "",
    ]
    for case in result["cases"]:
        s = case["summary"]
        lines += [f"## {case['case']}", "", "| T | BPTT MiB | BPTT / VXM | DEQReg MiB | DEQReg / VXM |", "|---|---|---|---|---|"]
        by = {(p["series"], p["T"]): p for p in case["points"]}
        for T in result["meta"]["steps"]:
            cells = []
            for series in ("bptt", "deqreg"):
                p = by.get((series, T))
                if p is None:
                    cells += ["", ""]
                elif "skipped" in p:
                    cells += [f"skipped ({p['skipped']})", ""]
                else:
                    cells += [f"{p['MiB']:.1f}", f"{p['bytes'] / (s['voxelmorph_MiB'] * MIB):.2f}x"]
            lines.append(f"| {T} | " + " | ".join(cells) + " |")
        extra = [p for p in case["points"] if p["series"].startswith("deqreg ") and "bytes" in p]
        lines += ["", f"VoxelMorph: {s['voxelmorph_MiB']:.1f} MiB."]
        for p in extra:
            lines.append(f"{p['series']} (T = {p['T']}): {p['MiB']:.1f} MiB = "
                         f"{p['bytes'] / (s['voxelmorph_MiB'] * MIB):.2f}x VoxelMorph.")
        fit = s["bptt_fit_MiB"]
        goal = "yes" if s["goal_ratio_met"] else "**no**"
        lines += [
            "",
            f"* DEQReg (T = {s['deqreg_ref_T']}) / VoxelMorph = **{s['deqreg_over_voxelmorph']:.2f}x** "
            f"(goal <= {GOAL_RATIO_ROUNDED}x, the paper's 6925 / 2645 MB = {GOAL_RATIO:.2f}x): {goal}.",
            f"* DEQReg flat across T: spread (max - min) / min = {100 * s['deqreg_spread_over_T']:.2f}% "
            f"(goal <= {100 * FLAT_TOL:.0f}%): {'yes' if s['deqreg_flat'] else '**no**'}.",
        ]
        if fit:
            lines.append(f"* BPTT linear in T: {fit['slope']:.2f} MiB per step + {fit['intercept']:.1f} MiB, "
                         f"R^2 = {fit['r2']:.5f}: {'yes' if s['bptt_linear'] else '**no**'}; DEQReg's memory equals "
                         f"BPTT's at T = {s['bptt_T_with_deqreg_memory']:.1f}.")
        if s.get("ckpt_over_voxelmorph") is not None:
            goal = "yes" if s["ckpt_goal_met"] else "**no**"
            lines.append(f"* DEQReg with checkpointed phantom steps (`checkpoint_phantom=True`, T = {s['ckpt_T']}) / "
                         f"VoxelMorph = **{s['ckpt_over_voxelmorph']:.2f}x** (goal <= {CKPT_GOAL_RATIO}x): {goal}; "
                         f"{s['ckpt_over_deqreg']:.2f}x the plain DEQReg's, {s['ckpt_over_deqreg_K1']:.2f}x DEQReg "
                         f"with K = 1.")
            fl = s.get("ckpt_floor")
            if fl:
                lines.append(f"* What that peak is: the K = 3 stored step inputs ({fl['stored_inputs_bytes'] / MIB:.2f} "
                             f"MiB) and, during each step's backward, that step recomputed: one update-map call "
                             f"(U-Net and warp), the floor of per-step checkpointing. VoxelMorph's peak holds one "
                             f"U-Net call together with the loss's saved tensors ({fl['loss_saved_bytes'] / MIB:.2f} "
                             f"MiB); the recomputation runs after the loss's graph has been freed, hence a little "
                             f"below 1x.")
            t = s.get("ckpt_time")
            if t:
                lines.append(f"* Its training step takes **{t['ratio']:.2f}x** the plain DEQReg's {t['clock']} (median "
                             f"of {t['rounds']} interleaved rounds: {t['ckpt_median_s']:.2f} s against "
                             f"{t['plain_median_s']:.2f} s; per-round ratios {', '.join(f'{r:.3f}' for r in t['ratios'])}"
                             f"; wall-time ratio {t['wall_ratio']:.2f}x): K (S + 1) = 12 more "
                             f"forward U-Net calls next to the T = {s['ckpt_T']} solver calls and the 12 phantom "
                             f"calls' forward and backward.")
        lines.append("")
    lines += ["![memory vs steps](memory_vs_steps.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # matplotlib missing: JSON and markdown still written
        print(f"no plot ({err})")
        return False
    cases = result["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        s = case["summary"]
        for series, style, label in (("bptt", "o-", "BPTT (Unrolling)"), ("deqreg", "s-", "DEQReg (S=3, K=3)")):
            pts = [p for p in case["points"] if p["series"] == series and "bytes" in p]
            ax.plot([p["T"] for p in pts], [p["MiB"] for p in pts], style, label=label)
            skipped = [p["T"] for p in case["points"] if p["series"] == series and "skipped" in p]
            for T in skipped:
                ax.axvline(T, color="grey", ls=":", lw=0.8)
        ax.axhline(s["voxelmorph_MiB"], color="k", ls="--", lw=1, label="VoxelMorph")
        ax.axhline(GOAL_RATIO_ROUNDED * s["voxelmorph_MiB"], color="tab:red", ls=":", lw=1,
                   label=f"{GOAL_RATIO_ROUNDED}x VoxelMorph (paper's ratio)")
        naive = [p for p in case["points"] if p["series"] == "deqreg naive" and "bytes" in p]
        for p in naive:
            ax.plot([p["T"]], [p["MiB"]], "x", color="tab:purple", ms=9, label="DEQReg naive (4 graphs alive)")
        for p in [p for p in case["points"] if p["series"] == "deqreg ckpt" and "bytes" in p]:
            ax.plot([p["T"]], [p["MiB"]], "D", color="tab:green", ms=7, label="DEQReg, checkpointed phantom steps")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(result["meta"]["steps"])
        ax.set_xticklabels([str(t) for t in result["meta"]["steps"]])
        ax.set_xlabel("training steps T")
        ax.set_ylabel("MiB " + ("saved for backward (peak)" if result["meta"]["memory_kind"] == "saved"
                                else "max allocated"))
        ax.set_title(case["case"] + ", batch 1")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, T <= 8 (~2 min on a busy core)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU (default 1)")
    ap.add_argument("--max-point-s", type=float, default=150.0,
                    help="skip a point predicted to take longer than this (default 150 s)")
    ap.add_argument("--time-rounds", type=int, default=None,
                    help="interleaved rounds timing DEQReg with and without checkpointed phantom steps "
                         "(default 3; 1 with --quick; 0: no timing)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results; with --quick a temporary folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = "cuda_peak" if device.type == "cuda" else "saved"
    steps = QUICK_STEPS if args.quick else STEPS
    cases = QUICK_CASES if args.quick else CASES
    loss_fn = RegistrationLoss()
    time_rounds = args.time_rounds if args.time_rounds is not None else (1 if args.quick else 3)
    if time_rounds < 0:
        raise SystemExit(f"--time-rounds must be >= 0, got {time_rounds}")
    t_start = time.perf_counter()
    results = []
    with LoadMeter() as load:
        for label, spatial in cases.items():
            results.append(run_case(label, spatial, steps, device, kind, loss_fn, args.max_point_s, extras=True,
                                    time_rounds=time_rounds))
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "device": str(device), "memory_kind": kind, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "python": sys.version.split()[0], "quick": args.quick,
        "steps": list(steps), "deqreg": {"S": 3, "K": 3, "tau": 0.5, "solver": "fixed_point", "tol": 0.0},
        "ckpt_goal_ratio": CKPT_GOAL_RATIO, "time_rounds": time_rounds,
        "paper": PAPER, "goal_ratio": GOAL_RATIO_ROUNDED, "background_load_cores": load.cores,
        "loadavg": [round(v, 2) for v in load.loadavg] if load.loadavg else None,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    result = {"meta": meta, "cases": results}
    stem = "memory_vs_steps"
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "deqreg_lite_bench" if args.quick else here / "results"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    plot(result, args.out / f"{stem}.png")
    for case in results:
        s = case["summary"]
        print(f"{case['case']}: DEQReg/VoxelMorph = {s['deqreg_over_voxelmorph']:.2f}x (goal <= {GOAL_RATIO_ROUNDED}: "
              f"{s['goal_ratio_met']}), DEQReg spread {100 * s['deqreg_spread_over_T']:.2f}% (flat: {s['deqreg_flat']}),"
              f" BPTT {s['bptt_slope_MiB_per_step']:.2f} MiB/step R^2 {s['bptt_r2']:.4f}; with checkpointed phantom "
              f"steps {s['ckpt_over_voxelmorph']:.2f}x (goal <= {CKPT_GOAL_RATIO}: {s['ckpt_goal_met']})"
              + (f", step time {s['ckpt_time']['ratio']:.2f}x" if s["ckpt_time"] else ""))
    print(f"wrote {args.out / stem}.{{json,md,png}} ({meta['total_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
