"""Speed of deqreg_lite's two hot kernels against MONAI and VoxelMorph, on the same inputs in one run.

* ``warp`` (forward, and forward + gradient w.r.t. the displacement) against ``monai.networks.blocks.Warp``
  (border padding, like our default) and VoxelMorph's ``SpatialTransformer`` (zero padding, fixed in 0.3.4);
  ours runs with the padding of the peer it is compared with, and the outputs are compared voxel by voxel.
* ``lncc`` forward + backward (gradient w.r.t. the moving image) against MONAI's
  ``LocalNormalizedCrossCorrelationLoss(kernel_size=5, kernel_type="rectangular")``. MONAI returns minus the
  mean *squared* local correlation, so the values differ by definition; the script also computes MONAI's
  quantity from our building blocks (``box_mean``) and compares that.

Inputs: a 3D volume 1x1x128^3 and a 2D batch 8x1x160x192, random images, a random smooth displacement of a
few voxels. Every implementation is warmed up, then timed ``--repeats`` times, interleaved (each round runs
all implementations, in a rotated order), and the median is reported. Absolute times depend on the machine;
quote the ratios (ours / fastest peer).

    pip install -e .[bench]
    python benchmarks/core_speed.py            # writes benchmarks/results/core_speed.{json,md}

A peer that is not installed is skipped (the script says so).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from deqreg_lite.losses import box_mean, lncc
from deqreg_lite.warp import warp

from _load import LoadMeter  # benchmarks/_load.py (the script's folder is on sys.path)

WIN = 5
WARP_TOL = 1e-4  # float32 trilinear interpolation of values in [0, 1]: only rounding may differ
GRAD_TOL = 1e-10  # warp gradients w.r.t. the displacement, compared in float64
LNCC_TOL = 1e-4  # float32 maps of squared correlations, values in [-1, 0]
SQ_KEY = "ours: MONAI's squared NCC loss from box_mean"
CASES = {"3D": (1, 1, 128, 128, 128), "2D": (8, 1, 160, 192)}


# --------------------------------------------------------------------------------------------- peers
def load_peers() -> tuple[dict, dict]:
    """Return ``(peers, versions)``; ``peers`` maps a name to its callables, ``versions`` the version or why
    it is missing."""
    peers, versions = {}, {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import monai
            from monai.losses import LocalNormalizedCrossCorrelationLoss
            from monai.networks.blocks import Warp as MonaiWarp
        peers["MONAI"] = {"warp": MonaiWarp, "lncc": LocalNormalizedCrossCorrelationLoss}
        versions["MONAI"] = monai.__version__
    except Exception as err:  # ImportError, or a broken install
        versions["MONAI"] = f"missing ({type(err).__name__}: {err})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import voxelmorph as vxm  # 0.3.x is PyTorch-only (neurite >= 0.3); no backend variable needed
            from voxelmorph.nn.modules import SpatialTransformer
        peers["VoxelMorph"] = {"warp": SpatialTransformer}
        versions["VoxelMorph"] = vxm.__version__
    except Exception as err:
        versions["VoxelMorph"] = f"missing ({type(err).__name__}: {err})"
    for name, v in versions.items():
        if v.startswith("missing"):
            print(f"{name} is not installed, skipping it: {v}  (pip install -e .[bench])")
    return peers, versions


# --------------------------------------------------------------------------------------------- inputs
def make_inputs(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch, ndim, spatial = shape[0], len(shape) - 2, shape[2:]
    fixed = torch.rand(shape, generator=gen)
    moving = torch.rand(shape, generator=gen)
    coarse = torch.randn(batch, ndim, *[max(2, s // 16) for s in spatial], generator=gen) * 2.0
    disp = F.interpolate(coarse, size=spatial, mode="trilinear" if ndim == 3 else "bilinear",
                         align_corners=True).contiguous()  # smooth, a few voxels
    return {"fixed": fixed, "moving": moving, "disp": disp}


# --------------------------------------------------------------------------------------------- timing
def time_interleaved(impls: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     budget_s: float = float("inf"), min_repeats: int = 5,
                     min_sample_ms: float = 20.0) -> tuple[dict[str, list[float]], int]:
    """Run every implementation once per round, rotating which goes first; stop after ``repeats`` rounds, or
    earlier (but not before ``min_repeats``) once the timed rounds have used ``budget_s`` seconds.

    Sub-millisecond calls are timed in batches of ``calls`` (the same for every implementation of a case, so
    that a sample lasts at least ``min_sample_ms``), which keeps timer and scheduler jitter out of the figures.
    Returns the milliseconds *per call* of every sample, and ``calls``.
    """
    names = list(impls)
    warm = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            t0 = time.perf_counter()
            impls[name]()
            warm[name].append((time.perf_counter() - t0) * 1e3)
    fastest = min(min(ms) for ms in warm.values()) if warmup else min_sample_ms
    if fastest < 5 * min_sample_ms:  # short calls: probe a few more times (the minimum resists a busy machine)
        for name in names:
            for _ in range(5):
                t0 = time.perf_counter()
                impls[name]()
                fastest = min(fastest, (time.perf_counter() - t0) * 1e3)
    calls = max(1, math.ceil(min_sample_ms / max(fastest, 1e-3)))
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = impls[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) * 1e3 / calls)
        if r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return times, calls


def summary(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2], "min_ms": min(ms),
            "times_ms": [round(t, 4) for t in ms]}


# --------------------------------------------------------------------------------------------- cases
def warp_case(dim: str, x: dict, peers: dict, grad: bool) -> dict:
    image, disp = x["moving"], x["disp"]
    impls: dict[str, Callable] = {}
    pads: dict[str, str] = {}  # which of our paddings each peer is compared with

    def run(fn):
        if not grad:
            def call():
                with torch.no_grad():
                    return fn(image, disp)
            return call

        def call():
            d = disp.detach().requires_grad_(True)
            fn(image, d).sum().backward()
            return d.grad
        return call

    impls["ours (border)"] = run(lambda i, d: warp(i, d, padding="border"))
    if "MONAI" in peers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Using PyTorch native grid_sample."
            mw = peers["MONAI"]["warp"](mode="bilinear", padding_mode="border")
        impls["MONAI"] = run(mw)
        pads["MONAI"] = "ours (border)"
    impls["ours (zeros)"] = run(lambda i, d: warp(i, d, padding="zeros"))
    if "VoxelMorph" in peers:
        st = peers["VoxelMorph"]["warp"](interpolation_mode="linear")  # zero padding, align_corners=True
        impls["VoxelMorph"] = run(st)
        pads["VoxelMorph"] = "ours (zeros)"

    # agreement: same convention everywhere (voxels, channels in array-axis order, pull), so no conversion
    agreement = {}
    with torch.no_grad():
        ours = {p: warp(image, disp, padding=p) for p in ("border", "zeros")}
        if "MONAI" in peers:
            agreement["MONAI vs ours (border)"] = float((mw(image, disp) - ours["border"]).abs().max())
        if "VoxelMorph" in peers:
            agreement["VoxelMorph vs ours (zeros)"] = float((st(image, disp) - ours["zeros"]).abs().max())
    if grad:
        # the gradients w.r.t. the displacement, in float64: in float32, where a sample lands on a grid line (a
        # kink of trilinear interpolation) rounding picks one side or the other, which on a random image flips a
        # handful of voxels by O(1) and says nothing about the implementations
        def grad64(fn):
            d = disp.double().requires_grad_(True)
            fn(image.double(), d).sum().backward()
            return d.grad

        fns = {"ours (border)": lambda i, d: warp(i, d, padding="border"),
               "ours (zeros)": lambda i, d: warp(i, d, padding="zeros")}
        with warnings.catch_warnings():  # fresh peer modules: they cache their identity grids
            warnings.simplefilter("ignore")
            fns.update({"MONAI": type(mw)(mode="bilinear", padding_mode="border")} if "MONAI" in peers else {})
        fns.update({"VoxelMorph": type(st)(interpolation_mode="linear")} if "VoxelMorph" in peers else {})
        for peer, mine in pads.items():
            agreement[f"{peer} vs {mine}: grad (float64)"] = float((grad64(fns[peer]) - grad64(fns[mine])).abs().max())
    return {"impls": impls, "pairs": pads, "agreement": agreement,
            "agree_ok": all(v <= (GRAD_TOL if "grad" in k else WARP_TOL) for k, v in agreement.items())}


def monai_ncc_from_ours(a: torch.Tensor, b: torch.Tensor, win: int, smooth_dr: float = 1e-5) -> torch.Tensor:
    """The map of MONAI's LNCC loss, ``-cross^2 / (var_t * var_p)`` with box *sums* and ``max(., smooth_dr)``
    (``smooth_nr`` = 0), written with our ``box_mean``; MONAI's loss is its mean."""
    n = win ** (a.dim() - 2)
    mu_a, mu_b = box_mean(a, win), box_mean(b, win)
    cov = box_mean(a * b, win) - mu_a * mu_b
    var_a = (box_mean(a * a, win) - mu_a * mu_a) * n
    var_b = (box_mean(b * b, win) - mu_b * mu_b) * n
    return -(cov * n) ** 2 / (var_a.clamp_min(smooth_dr) * var_b.clamp_min(smooth_dr))


def lncc_case(dim: str, x: dict, peers: dict) -> dict:
    fixed, moving = x["fixed"], x["moving"]
    ndim = fixed.dim() - 2

    def ours():
        b = moving.detach().requires_grad_(True)
        loss = 1.0 - lncc(fixed, b, win=WIN)
        loss.backward()
        return loss.detach(), b.grad

    impls: dict[str, Callable] = {"ours": ours}
    pairs, agreement, values = {}, {}, {}
    with torch.no_grad():
        values["ours: lncc (similarity)"] = float(lncc(fixed, moving, win=WIN))
        sq_map = monai_ncc_from_ours(fixed, moving, WIN)
        values[SQ_KEY] = float(sq_map.mean())
    if "MONAI" in peers:
        loss_fn = peers["MONAI"]["lncc"](spatial_dims=ndim, kernel_size=WIN, kernel_type="rectangular")

        def monai():
            b = moving.detach().requires_grad_(True)
            loss = loss_fn(b, fixed)  # (pred, target): the gradient flows into the moving image
            loss.backward()
            return loss.detach(), b.grad

        impls["MONAI"] = monai
        pairs["MONAI"] = "ours"
        with torch.no_grad():
            values["MONAI: loss"] = float(loss_fn(moving, fixed))
            map_fn = peers["MONAI"]["lncc"](spatial_dims=ndim, kernel_size=WIN, kernel_type="rectangular",
                                            reduction="none")
            agreement["MONAI loss map vs its formula with our box_mean"] = float(
                (map_fn(moving, fixed) - sq_map).abs().max())
    finite = bool(torch.isfinite(ours()[1]).all())
    flat = torch.zeros_like(fixed)
    finite &= bool(torch.isfinite(lncc(flat, moving, win=WIN))) and float(lncc(flat, flat, win=WIN)) == 0.0
    return {"impls": impls, "pairs": pairs, "agreement": agreement, "values": values,
            "agree_ok": finite and all(v <= LNCC_TOL for v in agreement.values()), "finite": finite}


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    ap.add_argument("--budget-s", type=float, default=30.0,
                    help="stop a case's timed rounds after this many seconds, once 5 are done (default 30)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--out", type=Path, default=here / "results", help="folder for core_speed.{json,md}")
    ap.add_argument("--no-grad-warp", action="store_true", help="skip the warp forward+backward rows")
    ap.add_argument("--only", choices=["warp", "lncc"], default=None, help="run one op only")
    ap.add_argument("--dims", default="3D,2D", help="comma-separated subset of 3D,2D (default both)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peers, versions = load_peers()
    t_start = time.perf_counter()

    rows = []
    for dim in args.dims.split(","):
        shape = CASES[dim.strip()]
        x = make_inputs(shape)
        specs = []
        if args.only in (None, "warp"):
            specs.append(("warp", "forward", lambda: warp_case(dim, x, peers, grad=False)))
            if not args.no_grad_warp:
                specs.append(("warp", "forward+backward", lambda: warp_case(dim, x, peers, grad=True)))
        if args.only in (None, "lncc"):
            specs.append(("lncc", "forward+backward", lambda: lncc_case(dim, x, peers)))
        for op, kind, build in specs:
            case = build()
            with LoadMeter() as load:
                times, calls = time_interleaved(case["impls"], args.repeats, args.warmup, args.budget_s)
            stats = {name: summary(ms) for name, ms in times.items()}
            ratios = {}
            for peer, mine in case["pairs"].items():
                paired = [m / p for m, p in zip(times[mine], times[peer])]
                ratios[f"{mine} / {peer}"] = {"ratio_of_medians": stats[mine]["median_ms"] / stats[peer]["median_ms"],
                                              "median_of_paired_ratios": statistics.median(paired)}
            fastest = min(case["pairs"], key=lambda p: stats[p]["median_ms"]) if case["pairs"] else None
            row = {"op": op, "kind": kind, "dim": dim, "shape": list(shape),
                   "repeats": min(len(ms) for ms in times.values()), "calls_per_sample": calls,
                   "background_load_cores": load.cores,
                   "stats": stats, "ratios": ratios,
                   "fastest_peer": fastest, "agreement": case["agreement"], "outputs_agree": case["agree_ok"]}
            if "values" in case:
                row["values"] = case["values"]
            if fastest is not None:
                mine = case["pairs"][fastest]
                row["ratio_vs_fastest_peer"] = ratios[f"{mine} / {fastest}"]["ratio_of_medians"]
                if kind == "forward" and op == "warp":
                    row["goal"] = "warp within 1.1x of the faster peer, same output"
                    row["goal_met"] = row["ratio_vs_fastest_peer"] <= 1.1 and case["agree_ok"]
                elif op == "lncc":
                    row["goal"] = "lncc forward+backward no slower than MONAI"
                    row["goal_met"] = row["ratio_vs_fastest_peer"] <= 1.0 and case["finite"]
            rows.append(row)
            med = ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in stats.items())
            r = row.get("ratio_vs_fastest_peer")
            bg = "" if load.cores is None else f", background load {load.cores:.2f} cores"
            batch = f" x {calls} calls" if calls > 1 else ""
            print(f"{op} {kind} {dim} ({row['repeats']} rounds{batch}{bg}): {med}"
                  + (f" | ours/{fastest} = {r:.2f}x" if r else "")
                  + "".join(f" | {k}: {v:.1e}" for k, v in case["agreement"].items()), flush=True)

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0], "peers": versions, "repeats": args.repeats, "warmup": args.warmup,
        "device": "cpu", "dtype": "float32", "lncc_window": WIN, "total_seconds": None,
    }
    meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
    result = {"meta": meta, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "core_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "core_speed.md").write_text(markdown(result))
    print(f"wrote {args.out / 'core_speed.json'} and core_speed.md ({meta['total_seconds']} s)")
    return result


def markdown(result: dict) -> str:
    meta = result["meta"]
    peers = ["MONAI", "VoxelMorph"]
    lines = [
        "# Core speed: deqreg_lite vs MONAI and VoxelMorph",
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['platform']}, {meta['date']}; "
        f"median of {meta['repeats']} interleaved repeats (ms, CPU, float32). "
        f"Peers: " + ", ".join(f"{k} {v}" for k, v in meta["peers"].items()) + ".",
        "",
        "Absolute times depend on the machine; quote the ratios. Warp: ours uses the padding of the peer it is "
        "compared with (MONAI: border, VoxelMorph: zeros); the ratio is ours / the faster peer. Agreement: max abs "
        "difference of the outputs (warp: float32 outputs, and for forward+backward also the gradients w.r.t. the "
        "displacement in float64; lncc: MONAI's loss map against the same formula computed with our `box_mean`). Load: cores kept busy by other "
        "processes during the case (0 on a quiet machine; a busy machine inflates and scatters the times). "
        "Rounds: timed rounds, x calls per sample where one call is too short to time alone.",
        "",
        "| op | input | ours | MONAI | VoxelMorph | ours / fastest peer | agreement | goal met | rounds, load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        s = row["stats"]
        if row["op"] == "warp":
            ours = f"{s['ours (border)']['median_ms']:.2f} (border) / {s['ours (zeros)']['median_ms']:.2f} (zeros)"
        else:
            ours = f"{s['ours']['median_ms']:.2f}"
        cells = [f"{s[p]['median_ms']:.2f}" if p in s else "n/a" for p in peers]
        r = row.get("ratio_vs_fastest_peer")
        ratio = f"{r:.2f}x (vs {row['fastest_peer']})" if r is not None else "n/a"
        diff = "; ".join(f"{v:.1e}" for v in row["agreement"].values()) or "n/a"
        goal = {True: "yes", False: "**no**"}.get(row.get("goal_met"), "(info)")
        shape = "x".join(str(v) for v in row["shape"])
        rounds = f"{row['repeats']} x {row['calls_per_sample']}" if row["calls_per_sample"] > 1 else row["repeats"]
        load = row["background_load_cores"]
        load = "" if load is None else f", {load:.2f}"
        lines.append(f"| {row['op']} {row['kind']} | {shape} | {ours} | {cells[0]} | {cells[1]} | {ratio} "
                     f"| {diff} | {goal} | {rounds}{load} |")
    lncc_rows = [r for r in result["rows"] if r["op"] == "lncc"]
    if lncc_rows:
        lines += ["", "LNCC values (they differ by definition: ours is the mean local correlation, MONAI's loss is "
                  "minus the mean squared one; the middle column is MONAI's formula computed with our box_mean):", "",
                  "| input | ours: lncc | ours: MONAI's formula | MONAI: loss |", "|---|---|---|---|"]
        for r in lncc_rows:
            v = r["values"]
            monai = f"{v['MONAI: loss']:.6f}" if "MONAI: loss" in v else "n/a"
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {v['ours: lncc (similarity)']:.6f} "
                         f"| {v[SQ_KEY]:.6f} "
                         f"| {monai} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
