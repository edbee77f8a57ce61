"""Table 1 and Table 2 analogues of the equal-budget checkpoints, with the convergence certificate.

For every checkpoint in ``--checkpoints`` (default ``data/checkpoints``; each ``<name>.pt`` is rebuilt with
``RegistrationMethod.from_checkpoint`` and wrapped in ``HalfResolution``, as ``load_pretrained`` does), on the pairs
at 160x192:

* *real*: the shipped ``brain2d`` pair (the one real inter-subject pair; both brains are the training anatomy, so
  it is not an unseen-subject test);
* *heldout*: ``PairDataset("test", n + 1, (160, 192))`` items ``1..n``: generated pairs with test-range seeds, which
  neither training nor validation draws. They are deformations of the same two brains, so they are **not
  independent subjects**: a Wilcoxon test over them says how consistently one model beats another on this
  family of deformations, not that it generalises to new brains.

It measures:

* **Table 1**: Dice, HD95, folding %, SDlogJ (Learn2Reg's) and inference time per model (mean and std over the
  held-out pairs, and the real pair alone), with DEQReg's ``residual``, ``converged`` and ``spectral_radius``
  columns (``certificate=True``); Wilcoxon p-values of DEQReg against every other model on the held-out Dice.
* **Table 2**: Dice and folding against inference steps (1 .. 500, ``STEPS``), per model with a step count, the
  trained steps against the best; for DEQReg the drift from exactly 48 to exactly 500 solver steps: mean Dice
  change, folding change, and the largest displacement change (voxels at 160x192).
* **Seeds**: for models trained with several seeds (``--runs``, the training runs of
  ``scripts/train_pretrained.py``), each seed's selected checkpoint on the held-out pairs (mean Dice).

    python benchmarks/fair_tables.py                   # results/fair_tables.{json,md}; ~15 min on one CPU thread
    python benchmarks/fair_tables.py --quick           # smoke run: 2 pairs, short sweeps, to a temporary folder
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from deqreg_lite.checkpoints import load_checkpoint
from deqreg_lite.config import checkpoints_dir
from deqreg_lite.datasets.pairs import PairDataset
from deqreg_lite.evaluate import evaluate, step_sweep, wilcoxon
from deqreg_lite.methods.base import RegistrationMethod
from deqreg_lite.methods.resolution import HalfResolution

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("voxelmorph", "unrolling_ml", "unrolling", "gradirn", "riir", "deqreg12", "deqreg")
STEPS = (1, 2, 3, 6, 12, 24, 48, 96, 200, 500)
SIZE = (160, 192)


def load(path: Path) -> HalfResolution:
    """A checkpoint (shipped file or a run's ``best.pt``), read once, wrapped at its resolution factor (default 2)."""
    ckpt = load_checkpoint(path, "cpu")
    factor = int((ckpt.get("extra") or {}).get("factor", 2))
    return HalfResolution(RegistrationMethod.from_checkpoint(ckpt), factor).eval()


def pairs(n: int) -> dict[str, list]:
    ds = PairDataset("test", n + 1, SIZE)
    return {"real": [ds[0]], "heldout": [ds[i] for i in range(1, n + 1)]}


def summary(table, keys=("dice", "hd95", "folding_pct", "sdlogj", "time_s", "residual", "converged",
                         "spectral_radius")) -> dict:
    out = {}
    for k in keys:
        vals = [float(v) for v in table.values(k)] if k in table.columns() else []
        if vals:
            t = torch.tensor(vals, dtype=torch.float64)
            out[k] = float(t.mean())
            out[f"{k}_std"] = float(t.std(unbiased=False))
            out[f"{k}_max"] = float(t.max())
    return out


def drift(model: HalfResolution, items: list, long_steps: int) -> dict:
    rows = []
    with torch.no_grad():
        for s in items:
            a = model(s["fixed"], s["moving"], steps=48).disp
            b = model(s["fixed"], s["moving"], steps=long_steps).disp
            rows.append(float((b - a).abs().max()))
    return {"max_move_vox": max(rows), "per_pair": rows, "long_steps": long_steps}


def run(ckpt_dir: Path, runs: Path | None, n: int, steps: tuple, long_steps: int, names=ORDER) -> dict:
    data = pairs(n)
    res: dict = {"pairs": {"real": "brain2d as shipped (160x192)",
                           "heldout": f"PairDataset('test', {n + 1}, (160, 192)) items 1..{n}"},
                 "table1": {}, "table2": {}, "wilcoxon": {}, "seeds": {}}
    tables = {}
    for name in names:
        path = ckpt_dir / f"{name}.pt"
        if not path.is_file():
            continue
        model = load(path)
        t0 = time.perf_counter()
        t_real = evaluate(model, data["real"], memory=False, certificate=True, name=name)
        t_held = evaluate(model, data["heldout"], memory=False, certificate=True, name=name)
        tables[name] = t_held
        res["table1"][name] = {"real": summary(t_real), "heldout": summary(t_held),
                               "trained_steps": getattr(model, "trained_steps", None)}
        if getattr(model, "trained_steps", None) and name != "voxelmorph":
            sw = step_sweep(model, data["heldout"], steps, use_states=False)
            res["table2"][name] = {k: sw[k] for k in ("steps", "dice", "dice_std", "folding_pct",
                                                      "folding_pct_std", "trained_steps")}
        if name.startswith("deqreg"):
            res["table2"].setdefault(name, {})["drift"] = drift(model, data["heldout"], long_steps)
        res["table1"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {res['table1'][name]['heldout']}", flush=True)
    base = "deqreg"
    if base in tables:
        for name, t in tables.items():
            if name != base:
                res["wilcoxon"][f"{base} vs {name}"] = wilcoxon(tables[base], t, "dice")
    if runs is not None and runs.is_dir():
        for name in names:
            for folder in sorted(runs.glob(f"{name}-seed*")):
                if not (folder / "best.pt").is_file():
                    continue
                t = evaluate(load(folder / "best.pt"), data["heldout"], memory=False, hd95=False, name=folder.name)
                res["seeds"].setdefault(name, {})[folder.name] = summary(t, ("dice", "folding_pct"))
    return res


def markdown(res: dict) -> str:
    lines = ["# Equal-budget checkpoints: Table 1 and Table 2 analogues", "",
             f"Pairs: *heldout* = {res['pairs']['heldout']} (deformations of the two training brains: not "
             f"independent subjects); *real* = {res['pairs']['real']}.", "",
             "## Table 1 (held-out pairs: mean (std); real pair)", "",
             "| model | Dice | HD95 | folding % | SDlogJ | time (s) | residual (max) | converged | rho (max) | "
             "real Dice | real folding % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda d, k, p=3: (f"{d[k]:.{p}f} ({d[k + '_std']:.{p}f})" if k in d else "")
    for name, r in res["table1"].items():
        h, rl = r["heldout"], r["real"]
        lines.append(f"| {name} | {f(h, 'dice')} | {f(h, 'hd95', 2)} | {f(h, 'folding_pct')} | {f(h, 'sdlogj')} | "
                     f"{f(h, 'time_s')} | {h.get('residual_max', float('nan')):.2e} | "
                     f"{h.get('converged', float('nan')):.2f} | {h.get('spectral_radius_max', float('nan')):.3f} | "
                     f"{rl.get('dice', float('nan')):.3f} | {rl.get('folding_pct', float('nan')):.3f} |")
    if res["wilcoxon"]:
        lines += ["", "Wilcoxon signed-rank p-values on the held-out Dice (two-sided; pseudo-replicated pairs):", ""]
        lines += [f"* {k}: p = {v:.3g}" for k, v in res["wilcoxon"].items()]
    lines += ["", "## Table 2 (held-out pairs: Dice / folding % against inference steps)", ""]
    for name, r in res["table2"].items():
        if "steps" in r:
            cells = ", ".join(f"{t}: {d:.3f}/{fo:.3f}" for t, d, fo in zip(r["steps"], r["dice"], r["folding_pct"]))
            lines.append(f"* **{name}** (trained {r['trained_steps']}): {cells}")
        if "drift" in r:
            lines.append(f"  * largest move from 48 to {r['drift']['long_steps']} steps: "
                         f"{r['drift']['max_move_vox']:.3f} voxels (160x192)")
    if res["seeds"]:
        lines += ["", "## Seeds (held-out mean Dice of each seed's selected checkpoint)", ""]
        for name, seeds in res["seeds"].items():
            lines.append(f"* {name}: " + ", ".join(f"{k}: {v['dice']:.4f}" for k, v in seeds.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=None, help=f"folder of <name>.pt (default {checkpoints_dir()})")
    p.add_argument("--runs", default=None, help="training runs (scripts/train_pretrained.py --runs) for seeds")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--long-steps", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="smoke run: 2 pairs, steps up to 12, to a temporary folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpts = Path(args.checkpoints) if args.checkpoints else checkpoints_dir()
    if args.quick:
        res = run(ckpts, None, 2, (1, 3, 12), 24, names=("voxelmorph", "deqreg12"))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "fair_tables.md").write_text(markdown(res))
        print(markdown(res))
        return 0
    res = run(ckpts, Path(args.runs) if args.runs else None, args.pairs, STEPS, args.long_steps)
    res.update({"torch": torch.__version__, "threads": args.threads, "machine": platform.platform(),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(), "checkpoints": str(ckpts)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fair_tables.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "fair_tables.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
