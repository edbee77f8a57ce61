"""Time of one DEQReg training step over one VoxelMorph training step, in the same run (Table 1's "Time").

The paper reports 1.09 s per training pair for DEQReg (T = 48 fixed-point steps, S = 3, K = 3) against 0.20 s
for VoxelMorph: 5.5x. A DEQReg step costs the solve (up to T network calls under no_grad) plus (S + 1) K = 12
network calls with a graph and their backward; a relative-tolerance early stop and Anderson acceleration cut the
first part only. This script times, interleaved in one run, at 2D 160x192 and 128x128, batch 1:

* ``voxelmorph`` (one U-Net call and its backward);
* ``deqreg fixed_point tol=0``: always all 48 steps (the paper's setting);
* ``deqreg fixed_point tol=1e-3``, ``deqreg anderson tol=1e-3``, ``deqreg anderson tol=1e-2``: early stop on the
  relative residual ``||g(phi) - phi|| / ||g(phi)||``, at most 48 steps.

Every call is ``zero_grad`` + ``method.training_step`` (train mode, no optimizer step). Each round runs every
configuration once in a rotated order; the medians over the rounds and the ratios of medians to VoxelMorph are
reported, with the mean solver network calls (``nfe``) per step and the load (cores kept busy by other processes,
and the load average). Absolute seconds depend on the machine: quote the ratios.

Which weights. An untrained DEQReg (last layer initialised at ~0) is a near-identity map that "converges" after
one or two steps, which would flatter the early stop. The script uses, in this order: a trained DEQReg from
``deqreg_lite.pretrained.load_pretrained("deqreg")``, else a DEQReg checkpoint under ``data/checkpoints/`` (via
``deqreg_lite.train.load_method``), else it trains one itself for ``--warm-iters`` (default 100) quick AdamW
iterations (lr 1e-4, T = 8, S = 0) on generated 64x64 pairs, and says which in the results. VoxelMorph's weights do
not change its time and stay untrained.

    python benchmarks/step_cost.py            # ~2-3 min on one busy CPU core
    python benchmarks/step_cost.py --quick    # smoke run (< 1 min): 64x64, 2 rounds, 10 warm-up iterations
    python benchmarks/step_cost.py --checkpoint runs/pretrained/deqreg-seed0/last.pt --out /tmp/sc
        # a training run's DEQReg: its own map (damping, leak) under each solver setting, and its step as trained

Writes ``benchmarks/results/step_cost.{json,md}`` (``--quick``: to a temporary folder unless ``--out``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from deqreg_lite.datasets import brain_pairs
from deqreg_lite.methods import RegistrationLoss, build_method

from _load import LoadMeter  # benchmarks/_load.py (the script's folder is on sys.path)

PAPER = {"deqreg_s": 1.09, "voxelmorph_s": 0.20}
PAPER_RATIO = PAPER["deqreg_s"] / PAPER["voxelmorph_s"]  # 5.45
SIZES = {"2D 160x192": (160, 192), "2D 128x128": (128, 128)}
QUICK_SIZES = {"2D 64x64": (64, 64)}
CONFIGS = {  # name -> DEQReg options (T = 48, S = 3, K = 3, tau = 0.5 throughout)
    "deqreg fixed_point tol=0": {"solver": "fixed_point", "tol": 0.0},
    "deqreg fixed_point tol=1e-3": {"solver": "fixed_point", "tol": 1e-3},
    "deqreg anderson tol=1e-3": {"solver": "anderson", "tol": 1e-3},
    "deqreg anderson tol=1e-2": {"solver": "anderson", "tol": 1e-2},
}
REFERENCE = "deqreg fixed_point tol=0"
AS_TRAINED = "deqreg as trained (--checkpoint's options)"


# --------------------------------------------------------------------------------------------- weights
def trained_deqreg_state(warm_iters: int, device: torch.device) -> tuple[dict, str]:
    """``(state_dict, how)``: the weights of a trained 2D DEQReg (see the module docstring for the order)."""
    try:
        from deqreg_lite.pretrained import load_pretrained

        method = getattr(load_pretrained("deqreg"), "method", None)  # unwrap HalfResolution: the bare DEQReg
        if method is not None and getattr(method, "ndim", 2) == 2:
            return method.state_dict(), ("deqreg_lite.pretrained.load_pretrained('deqreg') (trained at 80x96, "
                                         "timed here at the sizes below)")
    except Exception as err:  # module missing, or no weights
        print(f"no pretrained DEQReg ({type(err).__name__}: {err})")
    root = Path(__file__).resolve().parents[1] / "data" / "checkpoints"
    if root.is_dir():
        from deqreg_lite.train import load_method
        for path in sorted(root.rglob("*.pt")):
            if "deqreg" not in str(path.relative_to(root)).lower():
                continue
            try:
                method = load_method(path, "cpu")
            except Exception as err:
                print(f"skipping {path}: {type(err).__name__}: {err}")
                continue
            if method.name in ("deqreg", "deqreg12") and method.ndim == 2:
                return method.state_dict(), f"checkpoint {path.relative_to(root.parents[1])}"
    # fall back: a quick training run, enough to move the map away from the near-identity start
    torch.manual_seed(0)
    pairs = brain_pairs("train", 64, (64, 64))
    items = [pairs[i] for i in range(len(pairs))]
    method = build_method("deqreg", 2, T=8, S=0).to(device).train()
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    loss_fn = RegistrationLoss()
    losses = []
    t0 = time.perf_counter()
    for it in range(warm_iters):
        b = items[it % len(items)]
        opt.zero_grad(set_to_none=True)
        out = method.training_step(b["fixed"].to(device), b["moving"].to(device), loss_fn)
        opt.step()
        losses.append(out["loss"])
    k = max(1, min(20, warm_iters // 4))
    how = (f"trained here: {warm_iters} AdamW iterations (lr 1e-4, T = 8, S = 0, K = 3) on generated 64x64 pairs, "
           f"{time.perf_counter() - t0:.0f} s; loss {statistics.mean(losses[:k]):.3f} (first {k}) -> "
           f"{statistics.mean(losses[-k:]):.3f} (last {k}). No trained checkpoint was found.")
    return method.state_dict(), how


# --------------------------------------------------------------------------------------------- timing
def run_size(label: str, size: tuple[int, int], state: dict, repeats: int, warmup: int, budget_s: float,
             device: torch.device, loss_fn, trained_config: dict | None = None) -> dict:
    pair = brain_pairs("val", 2, size)[1]  # a held-out generated pair (item 0 is the real pair, kept for eval)
    fixed, moving = pair["fixed"].to(device), pair["moving"].to(device)
    methods = {"voxelmorph": build_method("voxelmorph", 2)}
    # a checkpoint's own map (damping, leak) under every solver configuration, without its training penalty ...
    base = {k: v for k, v in (trained_config or {}).items() if k in ("damping", "leak")}
    for name, opts in CONFIGS.items():
        m = build_method("deqreg", 2, T=48, S=3, K=3, tau=0.5, **base, **opts)
        m.load_state_dict(state)
        methods[name] = m
    if trained_config:  # ... and the step exactly as it was trained (its solver, tolerance and Jacobian penalty)
        m = build_method("deqreg", 2, **{k: v for k, v in trained_config.items() if k != "ndim"})
        m.load_state_dict(state)
        methods[AS_TRAINED] = m
    nfe: dict[str, list[float]] = {name: [] for name in methods}
    steps: dict[str, list[float]] = {name: [] for name in methods}

    def call(name):
        m = methods[name].to(device).train()
        m.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = m.training_step(fixed, moving, loss_fn)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        nfe[name].append(out.get("nfe", 1.0))
        steps[name].append(out.get("steps", 1.0))
        return dt

    names = list(methods)
    for _ in range(warmup):
        for name in names:
            call(name)
    for name in names:
        nfe[name].clear()
        steps[name].clear()
    times: dict[str, list[float]] = {name: [] for name in names}
    with LoadMeter() as load:
        start = time.perf_counter()
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(call(name))
            done = r + 1
            print(f"  {label} round {done}: " + ", ".join(f"{n.replace('deqreg ', '')} {times[n][-1]:.2f}s"
                                                       for n in names), flush=True)
            if done >= 3 and time.perf_counter() - start > budget_s:
                break
    med = {n: statistics.median(ts) for n, ts in times.items()}
    rows = {}
    for n in names:
        paired = [t / v for t, v in zip(times[n], times["voxelmorph"])]
        rows[n] = {"median_s": med[n], "min_s": min(times[n]), "times_s": [round(t, 4) for t in times[n]],
                   "ratio_to_voxelmorph": med[n] / med["voxelmorph"],
                   "median_of_paired_ratios": statistics.median(paired),
                   "ratio_to_fixed_point_tol0": med[n] / med[REFERENCE],
                   "mean_nfe": statistics.mean(nfe[n]), "mean_steps": statistics.mean(steps[n]),
                   "grad_nfe": 0 if n == "voxelmorph" else 12}
    best = min((n for n in names if n != "voxelmorph"), key=lambda n: rows[n]["ratio_to_voxelmorph"])
    return {"case": label, "shape": [1, 1, *size], "rounds": len(times["voxelmorph"]), "rows": rows,
            "best_config": best, "best_ratio": rows[best]["ratio_to_voxelmorph"],
            "beats_paper": rows[best]["ratio_to_voxelmorph"] < PAPER_RATIO,
            "background_load_cores": load.cores,
            "loadavg_start": [round(v, 2) for v in load.loadavg_start] if load.loadavg_start else None,
            "loadavg_end": [round(v, 2) for v in load.loadavg] if load.loadavg else None}


# --------------------------------------------------------------------------------------------- output
def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Training step cost: DEQReg / VoxelMorph",
        "",
        f"{meta['date']}, torch {meta['torch']}, device {meta['device']}, {meta['threads']} thread(s), batch 1, "
        f"loss 1 - LNCC + 1.0 diffusion; DEQReg T = 48 (most steps), S = 3, K = 3, tau = 0.5. One call = zero_grad + "
        f"training_step (forward, Eq. 9 with phantom gradients, backward; no optimizer step). Medians over interleaved "
        f"rounds; ratio = median / VoxelMorph's median. nfe = solver network calls per step (mean over the timed "
        f"calls); every DEQReg step adds (S + 1) K = 12 calls with a graph, and their backward.",
        "",
        f"DEQReg weights: {meta['weights']}",
        "",
        f"The paper: {PAPER['deqreg_s']} s / {PAPER['voxelmorph_s']} s = {PAPER_RATIO:.2f}x (GPU, 3D OASIS).",
        "",
    ]
    for case in result["cases"]:
        load = case["background_load_cores"]
        lines += [f"## {case['case']}", "",
                  f"{case['rounds']} rounds; other processes kept {load:.2f} cores busy"
                  f" (load average {case['loadavg_start']} -> {case['loadavg_end']}).", "",
                  "| configuration | median s | / VoxelMorph | median of paired ratios | / fixed_point tol=0 "
                  "| mean nfe | beats 5.45x |",
                  "|---|---|---|---|---|---|---|"]
        for n, r in case["rows"].items():
            beats = "" if n == "voxelmorph" else ("yes" if r["ratio_to_voxelmorph"] < PAPER_RATIO else "no")
            lines.append(f"| {n} | {r['median_s']:.3f} | {r['ratio_to_voxelmorph']:.2f}x "
                         f"| {r['median_of_paired_ratios']:.2f}x | {r['ratio_to_fixed_point_tol0']:.2f} "
                         f"| {r['mean_nfe']:.1f} | {beats} |")
        lines += ["", f"Best: {case['best_config']}, {case['best_ratio']:.2f}x VoxelMorph: "
                  f"{'beats' if case['beats_paper'] else '**does not beat**'} the paper's {PAPER_RATIO:.2f}x.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 64x64, 2 rounds, 10 warm-up iterations")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per size (default 7)")
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="stop adding rounds to a size after this many seconds, once 3 are done (default 100)")
    ap.add_argument("--warm-iters", type=int, default=100,
                    help="training iterations of the fallback DEQReg weights (default 100)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU (default 1)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="time this DEQReg checkpoint (e.g. a training run's last.pt) with its own map options, plus "
                         "a row for its step exactly as trained")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results; with --quick a temporary folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        args.repeats, args.warm_iters = 2, 10
    sizes = QUICK_SIZES if args.quick else SIZES
    out = args.out or (Path(tempfile.gettempdir()) / "deqreg_lite_bench" if args.quick else here / "results")
    loss_fn = RegistrationLoss()
    t_start = time.perf_counter()
    trained_config = None
    if args.checkpoint is not None:
        from deqreg_lite.checkpoints import load_checkpoint
        ckpt = load_checkpoint(args.checkpoint, "cpu")
        state, trained_config = ckpt["model"], dict(ckpt["config"])
        how = f"checkpoint {args.checkpoint} (iteration {ckpt['iteration']}; options {trained_config})"
    else:
        state, how = trained_deqreg_state(args.warm_iters, device)
    print(f"DEQReg weights: {how}", flush=True)
    cases = [run_size(label, size, state, args.repeats, 1, args.budget_s, device, loss_fn, trained_config)
             for label, size in sizes.items()]
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0], "quick": args.quick,
            "weights": how, "deqreg": {"T": 48, "S": 3, "K": 3, "tau": 0.5}, "configs": CONFIGS,
            "paper": PAPER, "paper_ratio": PAPER_RATIO, "total_seconds": round(time.perf_counter() - t_start, 1)}
    result = {"meta": meta, "cases": cases}
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "step_cost.md").write_text(markdown(result))
    for case in cases:
        print(f"{case['case']}: " + ", ".join(f"{n} {r['ratio_to_voxelmorph']:.2f}x (nfe {r['mean_nfe']:.1f})"
                                             for n, r in case["rows"].items()))
    print(f"wrote {out / 'step_cost.json'} and step_cost.md ({meta['total_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
