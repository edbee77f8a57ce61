"""Float32 numerics of LNCC and of the methods that feed its gradient to a network, on the shipped ``brain2d`` pair.

What it measures (every number in one run, on the CPU unless ``--device``):

* **the similarity gradient**: ``deqreg_lite.methods._common.similarity_grad`` (the normalised LNCC gradient that
  GraDIRN and RIIR take as an input) at zero displacement and at a smooth random one, float32 against float64, as
  the max-abs difference over the largest value (goal <= 1e-3), at 160x192 and at the models' 80x96; and the exact
  derivative of the bilinearly warped energy (``Objective.grad``, what classical registration follows; same goal),
  whose one-sided differences on grid lines rounding used to decide (the warp now takes the central difference
  there);
* **scale invariance of lncc**: ``max |lncc(c a, b) - lncc(a, b)|`` over ``c`` in ``logspace(-3, 3)`` (goal
  <= 1e-4), ``lncc(1e-6 a, 1e-6 a)``, and classical registration (``deqreg_lite.classical.register``, Adam) of the
  pair scaled to [0, 0.01] against [0, 1], by Dice;
* **every shipped method** (``load_pretrained(name)``, eval mode, default steps): its displacement in float32
  against float64 (``model.double()`` with float64 inputs), the displacement moved by 1e-4 Gaussian noise on the
  fixed image and on the moving image (max over both), the displacement of each pair of a mixed batch of three
  (brain2d, brain2d swapped, brain2d mirrored) against the same pair alone, all as max-abs in voxels of the
  160x192 grid, and the Dice (mean over CSF/GM/WM) on brain2d; goals: 0.05, 0.1 and 1e-4 voxel;
* **speed of lncc**: forward + backward (gradient w.r.t. the moving image), 8x1x160x192 float32, the formula before
  this change (absolute ``eps = 1e-8`` on ``var_a * var_b``, written out here) against ``lncc`` now, interleaved
  rounds, median ratio.

    python benchmarks/numerics.py              # ~30 s on one quiet CPU thread; writes results/numerics.{json,md}
    python benchmarks/numerics.py --quick      # smoke run: two methods, fewer rounds, to a temporary folder

Options: ``--methods`` (comma-separated subset of the shipped names), ``--threads`` (default 1), ``--device``
(``cpu`` or ``cuda``; the float64 run and the batch test run there too), ``--out``.
"""
from __future__ import annotations

import argparse
import warnings
import copy
import datetime as _dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import deqreg_lite
from deqreg_lite._checks import check_image
from deqreg_lite.losses import Objective, box_mean, lncc
from deqreg_lite.methods._common import normalise_grad, similarity_grad
from deqreg_lite.metrics import dice
from deqreg_lite.warp import resize_image, warp

from _load import LoadMeter  # benchmarks/_load.py (the script's folder is on sys.path)

GOALS = {"grad_rel": 1e-3, "float64_vox": 0.05, "noise_vox": 0.1, "batch_vox": 1e-4, "scale": 1e-4}
NOISE = 1e-4


def lncc_before(a: torch.Tensor, b: torch.Tensor, win: int = 5, eps: float = 1e-8) -> torch.Tensor:
    """The lncc formula before this change, for the timing and the 'before' rows: ``cov / sqrt(var_a var_b + eps)``
    with an absolute ``eps``, and the same input checks as ``lncc``."""
    check_image(a, "a")
    check_image(b, "b")
    mu_a, mu_b = box_mean(a, win), box_mean(b, win)
    aa, bb, ab = box_mean(a * a, win), box_mean(b * b, win), box_mean(a * b, win)
    var_a = torch.addcmul(aa, mu_a, mu_a, value=-1.0).clamp_min(0.0)
    var_b = torch.addcmul(bb, mu_b, mu_b, value=-1.0).clamp_min(0.0)
    cov = torch.addcmul(ab, mu_a, mu_b, value=-1.0)
    return (cov * torch.rsqrt(var_a * var_b + eps)).clamp(-1.0, 1.0).mean()


def rel_maxdiff(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|x - ref| / max|ref|`` (in float64)."""
    ref = ref.double()
    return float((x.double().cpu() - ref.cpu()).abs().max() / ref.abs().max().clamp_min(1e-300).cpu())


def smooth_disp(size, amplitude: float, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, len(size), 4, 4, generator=g, dtype=torch.float64) * amplitude
    return torch.nn.functional.interpolate(low, size=tuple(size), mode="bicubic", align_corners=True).to(device)


# ------------------------------------------------------------------------------------------------ gradient
def gradient_rows(sample: dict, device) -> list[dict]:
    rows = []
    exact = Objective("lncc", "diffusion", lam=0.0)
    for size in [(160, 192), (80, 96)]:
        f, m = sample["fixed"], sample["moving"]
        if tuple(f.shape[2:]) != size:
            f, m = resize_image(f, size, blur=True), resize_image(m, size, blur=True)
        f, m = f.to(device), m.to(device)
        for where, d in [("zero", torch.zeros(1, 2, *size, dtype=torch.float64, device=device)),
                         ("smooth (2 voxels)", smooth_disp(size, 2.0, 0, device))]:
            d32 = d.float()
            g32, g64 = similarity_grad(f, m, d32), similarity_grad(f.double(), m.double(), d)
            e32 = normalise_grad(exact.grad(f, m, d32))
            e64 = normalise_grad(exact.grad(f.double(), m.double(), d))
            rows.append({"size": list(size), "disp": where, "similarity_grad": rel_maxdiff(g32, g64),
                         "exact_objective_grad": rel_maxdiff(e32, e64)})
    return rows


# ------------------------------------------------------------------------------------------------ scale
def scale_rows(sample: dict, quick: bool) -> dict:
    f, m = sample["fixed"], sample["moving"]
    cs = [10.0 ** k for k in torch.linspace(-3, 3, 13).tolist()]
    out = {}
    for name, fn in (("before", lncc_before), ("now", lncc)):
        base = float(fn(f, m))
        out[name] = {"lncc(a, b)": base,
                     "max |lncc(c a, b) - lncc(a, b)|": max(abs(float(fn(c * f, m)) - base) for c in cs),
                     "lncc(1e-6 a, 1e-6 a)": float(fn(f * 1e-6, f * 1e-6)), "lncc(a, a)": float(fn(f, f))}
    # classical registration of the scaled pair (the loss is lncc now)
    from deqreg_lite.classical import register
    size = (80, 96)
    fs, ms = resize_image(f, size, blur=True), resize_image(m, size, blur=True)
    fseg = torch.nn.functional.interpolate(sample["fixed_seg"].float(), size=size, mode="nearest").long()
    mseg = torch.nn.functional.interpolate(sample["moving_seg"].float(), size=size, mode="nearest").long()
    labels = sample["labels"]
    dices = {"identity": float(dice(fseg, mseg, labels).mean())}
    for label, c in (("[0, 1]", 1.0), ("[0, 0.01]", 0.01)):
        res = register(fs * c, ms * c, iterations=30 if quick else 100, device="cpu")
        dices[label] = float(dice(fseg, warp(mseg, res.disp, mode="nearest"), labels).mean())
    out["classical Adam register (80x96), Dice"] = dices
    return out


# ------------------------------------------------------------------------------------------------ methods
def pair_dice(sample: dict, disp: torch.Tensor) -> float:
    moved = warp(sample["moving_seg"].to(disp.device), disp, mode="nearest")
    return float(dice(sample["fixed_seg"].to(disp.device), moved, sample["labels"]).mean())


def method_row(name: str, sample: dict, device) -> dict:
    from deqreg_lite.pretrained import load_pretrained
    model = load_pretrained(name, device=device)
    f, m = sample["fixed"].to(device), sample["moving"].to(device)
    run = lambda mod, a, b: mod(a, b).disp.detach()
    t0 = time.perf_counter()
    with torch.no_grad():
        d32 = run(model, f, m)
        seconds = time.perf_counter() - t0
        model64 = copy.deepcopy(model).double()
        d64 = run(model64, f.double(), m.double())
        g = torch.Generator(device="cpu").manual_seed(1)
        noise = lambda x: x + NOISE * torch.randn(x.shape, generator=g).to(device)
        dn = max(float((run(model, noise(f), m) - d32).abs().max()), float((run(model, f, noise(m)) - d32).abs().max()))
        # a mixed batch: the pair, the pair swapped, the pair mirrored left-right
        fb = torch.cat([f, m, f.flip(-1)]); mb = torch.cat([m, f, m.flip(-1)])
        batch_gap = lambda: float((run(model, fb, mb) - torch.cat([run(model, fb[i:i + 1], mb[i:i + 1])
                                                                      for i in range(3)])).abs().max())
        db = batch_gap()
        # oneDNN's CPU conv kernels round differently for different batch sizes (~1e-6 per call); without them
        # what is left is the method's own dependence on its batch neighbours
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            with torch.backends.mkldnn.flags(enabled=False):
                db_plain = batch_gap()
    return {"method": name, "float64_vox": float((d32.double() - d64).abs().max()), "noise_vox": dn, "batch_vox": db,
            "batch_vox_onednn_off": db_plain,
            "dice": pair_dice(sample, d32), "dice_float64": pair_dice(sample, d64.float()), "seconds": seconds}


# ------------------------------------------------------------------------------------------------ speed
def speed_row(repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.avg_pool2d(torch.rand(8, 1, 160, 192, generator=g), 3, 1, 1)
    b = torch.nn.functional.avg_pool2d(torch.rand(8, 1, 160, 192, generator=g), 3, 1, 1)

    def fb(fn):
        def call():
            x = b.detach().requires_grad_(True)
            (1.0 - fn(a, x)).backward()
        return call

    impls = {"before": fb(lncc_before), "now": fb(lncc)}
    for fn in impls.values():
        fn()
    times = {k: [] for k in impls}
    with LoadMeter() as load:
        for r in range(repeats):
            for k in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
                t0 = time.perf_counter()
                for _ in range(3):
                    impls[k]()
                times[k].append((time.perf_counter() - t0) / 3 * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": [8, 1, 160, 192], "median_ms": med, "now / before": med["now"] / med["before"],
            "rounds": repeats, "background_load_cores": load.cores}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: gradirn and riir only, fewer rounds")
    ap.add_argument("--methods", default=None, help="comma-separated shipped names (default: all six)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds of the lncc speed check (default 15)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results; with --quick a temporary folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from deqreg_lite.pretrained import PRETRAINED
    names = args.methods.split(",") if args.methods else (["gradirn", "riir"] if args.quick else list(PRETRAINED))
    out = args.out or (Path(tempfile.gettempdir()) / "deqreg_lite_bench" if args.quick else here / "results")
    t_start = time.perf_counter()
    sample = deqreg_lite.load_sample("brain2d")
    result: dict = {"goals": GOALS}
    result["gradient"] = gradient_rows(sample, device)
    print("gradient:", json.dumps(result["gradient"]), flush=True)
    result["scale"] = scale_rows(sample, args.quick)
    print("scale:", json.dumps(result["scale"]), flush=True)
    result["methods"] = []
    for name in names:
        row = method_row(name, sample, device)
        result["methods"].append(row)
        print(json.dumps(row), flush=True)
    result["speed"] = speed_row(3 if args.quick else args.repeats)
    print("speed:", json.dumps(result["speed"]), flush=True)
    result["meta"] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                      "platform": platform.platform(), "python": sys.version.split()[0],
                      "total_seconds": round(time.perf_counter() - t_start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "numerics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "numerics.md").write_text(markdown(result))
    print(f"wrote {out / 'numerics.json'} and numerics.md ({result['meta']['total_seconds']} s)")
    return result


def markdown(result: dict) -> str:
    g, meta = result["goals"], result["meta"]
    ok = lambda v, goal: "yes" if v <= goal else "**no**"
    lines = ["# Numerics: float32 LNCC and the methods that feed its gradient to a network", "",
             f"torch {meta['torch']}, {meta['threads']} thread(s), {meta['device']}, {meta['platform']}, "
             f"{meta['date']}; shipped `brain2d` pair and checkpoints.", "",
             "## Similarity gradient, float32 vs float64", "",
             f"max-abs difference / largest value (goal <= {g['grad_rel']:g}).", "",
             "| size | displacement | `similarity_grad` (network input) | goal met | exact `Objective.grad` | goal met |",
             "|---|---|---|---|---|---|"]
    for r in result["gradient"]:
        lines.append(f"| {r['size'][0]}x{r['size'][1]} | {r['disp']} | {r['similarity_grad']:.1e} "
                     f"| {ok(r['similarity_grad'], g['grad_rel'])} | {r['exact_objective_grad']:.1e} "
                     f"| {ok(r['exact_objective_grad'], g['grad_rel'])} |")
    s = result["scale"]
    lines += ["", "## Scale invariance of lncc", "",
              "| formula | lncc(a, b) | max over c in [1e-3, 1e3] of abs(lncc(c a, b) - lncc(a, b)) | goal met "
              "| lncc(1e-6 a, 1e-6 a) | lncc(a, a) |", "|---|---|---|---|---|---|"]
    for k in ("before", "now"):
        v = s[k]
        d = v["max |lncc(c a, b) - lncc(a, b)|"]
        lines.append(f"| {k} | {v['lncc(a, b)']:.4f} | {d:.1e} | {ok(d, g['scale'])} | {v['lncc(1e-6 a, 1e-6 a)']:.4g} "
                     f"| {v['lncc(a, a)']:.4f} |")
    dd = s["classical Adam register (80x96), Dice"]
    lines += ["", "`a` = the fixed image of brain2d: its flat background (about a quarter of the voxels) has "
              "correlation 0, so lncc(a, a) < 1 at any scale.", "",
              "Classical registration (Adam, 80x96, lncc now), Dice: "
              + ", ".join(f"{k} {v:.3f}" for k, v in dd.items()) + ".", "",
              "## Shipped methods", "",
              f"Max-abs displacement differences in voxels of the 160x192 grid. Goals: float32 vs float64 <= "
              f"{g['float64_vox']:g}, {NOISE:g} noise <= {g['noise_vox']:g}, "
              f"mixed batch vs alone <= {g['batch_vox']:g}.",
              "", "| method | float32 vs float64 | noise 1e-4 | batch vs alone | batch vs alone, oneDNN off "
              "| Dice (float32) | Dice (float64) | s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["methods"]:
        lines.append(f"| {r['method']} | {r['float64_vox']:.2e} ({ok(r['float64_vox'], g['float64_vox'])}) "
                     f"| {r['noise_vox']:.2e} ({ok(r['noise_vox'], g['noise_vox'])}) "
                     f"| {r['batch_vox']:.1e} ({ok(r['batch_vox'], g['batch_vox'])}) "
                     f"| {r['batch_vox_onednn_off']:.1e} ({ok(r['batch_vox_onednn_off'], g['batch_vox'])}) "
                     f"| {r['dice']:.3f} "
                     f"| {r['dice_float64']:.3f} | {r['seconds']:.1f} |")
    sp = result["speed"]
    load = sp["background_load_cores"]
    lines += ["", "## Speed of lncc (forward + backward, 8x1x160x192, float32, CPU)", "",
              f"before {sp['median_ms']['before']:.2f} ms, now {sp['median_ms']['now']:.2f} ms: now / before = "
              f"{sp['now / before']:.2f}x (median of {sp['rounds']} interleaved rounds; background load "
              f"{'n/a' if load is None else round(load, 2)} cores)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
