"""Table 1 and Table 2 analogues of the equal-budget checkpoints, with the convergence certificate and the issue's
acceptance checks.

For every checkpoint in ``--checkpoints`` (default ``data/checkpoints``; each ``<name>.pt`` is rebuilt with
``RegistrationMethod.from_checkpoint`` and wrapped in ``HalfResolution``, as ``load_pretrained`` does), on pairs at
160x192:

* *unseen* (the main test set): ``deqreg_lite.datasets.unseen_brain_pairs()``, real inter-subject pairs of three
  brains that no training or validation pair contains (``data/samples/brain2d_test.npz``, five matched coronal
  planes, every ordered pair of different subjects). Three subjects: the pairs are **not** independent samples of
  a population, so a Wilcoxon test over them says how consistently one model beats another on these three brains;
  the per-subject-pair means are given beside it;
* *heldout*: ``PairDataset("test", n + 1, (160, 192))`` items ``1..n``: generated pairs with test-range seeds (new
  deformations of the two training brains: pseudo-replicated, a secondary table);
* *real*: the shipped ``brain2d`` pair (both brains are the training anatomy).

It measures:

* **Table 1** (unseen, heldout, real): Dice, HD95, folding %, SDlogJ (Learn2Reg's) and inference time per model
  (mean and std), with DEQ models' ``residual``, ``converged`` and ``spectral_radius`` columns
  (``certificate=True``); Wilcoxon p-values of DEQReg against every other model on the unseen Dice.
* **Table 2** (unseen): Dice and folding against inference steps (1 .. 500, ``STEPS``) for every model with a step
  count; for DEQ models the drift from exactly 48 to exactly 500 solver steps: Dice and folding change, and the
  largest displacement change (voxels at 160x192).
* **Seeds**: for models trained with several seeds (``--runs``, the training runs of
  ``scripts/train_pretrained.py``), each finished seed's selected checkpoint on the unseen pairs (mean Dice); a run
  without its ``run.json`` (still training) is left out.
* **Checks**: issue 10's acceptance criteria, each with the measured value and pass/fail.

    python benchmarks/fair_tables.py --runs runs/pretrained   # results/fair_tables.{json,md}
    python benchmarks/fair_tables.py --quick                  # smoke run: 2 pairs each, short sweeps, temporary folder
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
from deqreg_lite.datasets import unseen_brain_pairs
from deqreg_lite.datasets.pairs import PairDataset
from deqreg_lite.evaluate import evaluate, min_pairs_for_test, step_sweep, wilcoxon
from deqreg_lite.methods.base import RegistrationMethod
from deqreg_lite.methods.baselines import IdentityBaseline
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


def pairs(n: int, n_unseen: int | None = None) -> dict[str, list]:
    ds = PairDataset("test", n + 1, SIZE)
    unseen = unseen_brain_pairs(SIZE)
    return {"unseen": unseen[:n_unseen] if n_unseen else unseen, "heldout": [ds[i] for i in range(1, n + 1)],
            "real": [ds[0]]}


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
            out[f"{k}_min"] = float(t.min())
    return out


def drift(model: HalfResolution, items: list, long_steps: int) -> dict:
    """The largest displacement change (voxels at 160x192) from exactly 48 to exactly ``long_steps`` solver steps."""
    rows = []
    with torch.no_grad():
        for s in items:
            a = model(s["fixed"], s["moving"], steps=48).disp
            b = model(s["fixed"], s["moving"], steps=long_steps).disp
            rows.append(float((b - a).abs().max()))
    return {"max_move_vox": max(rows), "per_pair": rows, "long_steps": long_steps}


def subject_means(table, items: list, key: str = "dice") -> dict[str, float]:
    """Mean of ``key`` per ordered subject pair (``moving -> fixed``), from a table over ``items`` (same order)."""
    out: dict[str, list] = {}
    for s, v in zip(items, table.values(key)):
        out.setdefault(f"{s.get('moving_subject', '?')}->{s.get('fixed_subject', '?')}", []).append(float(v))
    return {k: sum(v) / len(v) for k, v in out.items()}


def run(ckpt_dir: Path, runs: Path | None, n: int, steps: tuple, long_steps: int, names=ORDER,
        n_unseen: int | None = None) -> dict:
    data = pairs(n, n_unseen)
    res: dict = {"pairs": {"unseen": f"unseen_brain_pairs((160, 192)): {len(data['unseen'])} real inter-subject "
                                     "pairs of three brains outside training and validation",
                           "heldout": f"PairDataset('test', {n + 1}, (160, 192)) items 1..{n}",
                           "real": "brain2d as shipped (160x192)"},
                 "table1": {}, "table2": {}, "wilcoxon": {}, "subject_means": {}, "seeds": {}, "manifest": {}}
    ident = IdentityBaseline(2)
    res["table1"]["identity"] = {k: summary(evaluate(ident, data[k], memory=False, name="identity"))
                                 for k in ("unseen", "heldout", "real")}
    tables = {}
    manifest = ckpt_dir / "manifest.json"
    if manifest.is_file():
        models = json.loads(manifest.read_text()).get("models", {})
        res["manifest"] = {k: {f: v.get(f) for f in ("init", "iterations", "budget", "selected_iteration", "seed")}
                           for k, v in models.items()}
    for name in names:
        path = ckpt_dir / f"{name}.pt"
        if not path.is_file():
            continue
        model = load(path)
        t0 = time.perf_counter()
        row = {}
        for key in ("unseen", "heldout", "real"):
            t = evaluate(model, data[key], memory=False, certificate=True, name=name)
            row[key] = summary(t)
            if key == "unseen":
                tables[name] = t
                res["subject_means"][name] = subject_means(t, data[key])
        row["trained_steps"] = getattr(model, "trained_steps", None)
        res["table1"][name] = row
        if getattr(model, "trained_steps", None) and name != "voxelmorph":
            sw = step_sweep(model, data["unseen"], steps, use_states=False)
            res["table2"][name] = {k: sw[k] for k in ("steps", "dice", "dice_std", "folding_pct",
                                                      "folding_pct_std", "trained_steps")}
        if name.startswith("deqreg"):
            res["table2"].setdefault(name, {})["drift"] = drift(model, data["unseen"], long_steps)
        res["table1"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {res['table1'][name]['unseen']}", flush=True)
    base = "deqreg"
    if base in tables:
        for name, t in tables.items():
            if name != base:
                res["wilcoxon"][f"{base} vs {name}"] = wilcoxon(tables[base], t, "dice")
    if runs is not None and runs.is_dir():
        for name in names:
            for folder in sorted(runs.glob(f"{name}-seed*")):
                if not (folder / "best.pt").is_file() or not (folder / "run.json").is_file():
                    print(f"{folder.name}: not finished (no run.json): left out of the seed spread", flush=True)
                    continue
                t = evaluate(load(folder / "best.pt"), data["unseen"], memory=False, hd95=False, name=folder.name)
                res["seeds"].setdefault(name, {})[folder.name] = summary(t, ("dice", "folding_pct"))
    res["checks"] = checks(res, long_steps)
    return res


def _at(sweep: dict, step: int, key: str) -> float:
    return sweep[key][sweep["steps"].index(step)] if step in sweep.get("steps", []) else float("nan")


def checks(res: dict, long_steps: int) -> list[dict]:
    """Issue 10's acceptance criteria on the unseen pairs: ``{"check", "value", "target", "pass"}`` rows (``pass``
    is None where the models needed are missing)."""
    t1, t2, out = res["table1"], res["table2"], []

    def add(check: str, value, target: str, ok) -> None:
        out.append({"check": check, "value": value, "target": target, "pass": ok})

    nan = float("nan")
    if "deqreg" in t1:
        u = t1["deqreg"]["unseen"]
        add("DEQReg trained solve: largest relative residual", u.get("residual_max", nan), "<= 1e-3",
            u.get("residual_max", nan) <= 1e-3)
        add("DEQReg: largest spectral radius at the returned field", u.get("spectral_radius_max", nan), "< 1",
            u.get("spectral_radius_max", nan) < 1)
        sw = t2.get("deqreg", {})
        if "steps" in sw:
            dd = 100 * (_at(sw, long_steps, "dice") - _at(sw, 48, "dice"))
            df = _at(sw, long_steps, "folding_pct") - _at(sw, 48, "folding_pct")
            add(f"DEQReg: mean Dice change 48 -> {long_steps} steps (points)", dd, "|change| <= 0.5", abs(dd) <= 0.5)
            add(f"DEQReg: folding change 48 -> {long_steps} steps (percentage points)", df, "<= 0.05", df <= 0.05)
        if "drift" in sw:
            mv = sw["drift"]["max_move_vox"]
            add(f"DEQReg: largest move 48 -> {long_steps} steps (voxels, 160x192)", mv, "<= 0.25", mv <= 0.25)
        for other in ("voxelmorph", "unrolling_ml"):
            if other in t1:
                diff = 100 * (u["dice"] - t1[other]["unseen"]["dice"])
                p = res["wilcoxon"].get(f"deqreg vs {other}", nan)
                add(f"DEQReg mean Dice - {other}'s (points; Wilcoxon p = {p:.3g})", diff, ">= 0", diff >= 0)
    for name in ("unrolling_ml", "unrolling"):
        sw = t2.get(name, {})
        if "steps" in sw:
            best = max(sw["dice"])
            trained = sw["trained_steps"]
            d_long, f_long = _at(sw, long_steps, "dice"), _at(sw, long_steps, "folding_pct")
            f_tr = _at(sw, trained, "folding_pct") if trained in sw["steps"] else nan
            add(f"{name}: Dice at {long_steps} steps below its best ({best:.3f})", d_long, f"< {best:.3f}",
                d_long < best)
            ratio = f_long / f_tr if f_tr else float("inf")
            add(f"{name}: folding at {long_steps} steps / at its trained {trained}", ratio, ">= 2", ratio >= 2)
    if "deqreg12" in t1:
        gain = 100 * (t1["deqreg12"]["unseen"]["dice"] - t1["identity"]["unseen"]["dice"])
        add("DEQReg-12 mean Dice - identity's (points)", gain, ">= 5", gain >= 5)
    man = res.get("manifest") or {}
    learned = [k for k in ORDER if k in t1]
    if learned:
        inits = {k: (man.get(k) or {}).get("init") for k in learned}
        budgets = {k: (man.get(k) or {}).get("budget") for k in learned}
        add("every checkpoint: init", inits, "all 'scratch'", all(v == "scratch" for v in inits.values()))
        add("every checkpoint: budget (optimizer steps)", budgets, "one budget",
            len(set(budgets.values())) == 1 and None not in budgets.values())
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items())
    return str(v)


def markdown(res: dict) -> str:
    lines = ["# Equal-budget checkpoints: Table 1 and Table 2 analogues", "",
             f"Pairs: *unseen* = {res['pairs']['unseen']}; *heldout* = {res['pairs']['heldout']} (deformations of "
             f"the two training brains: not independent subjects); *real* = {res['pairs']['real']}.", ""]
    f = lambda d, k, p=3: (f"{d[k]:.{p}f} ({d[k + '_std']:.{p}f})" if k in d else "")
    nan = float("nan")
    for key, title in (("unseen", "real unseen pairs"), ("heldout", "generated held-out pairs"),
                       ("real", "the brain2d pair")):
        lines += [f"## Table 1, {title}: mean (std)", "",
                  "| model | Dice | HD95 | folding % | SDlogJ | time (s) | residual (max) | converged | rho (max) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in res["table1"].items():
            h = r[key]
            lines.append(f"| {name} | {f(h, 'dice')} | {f(h, 'hd95', 2)} | {f(h, 'folding_pct')} | "
                         f"{f(h, 'sdlogj')} | {f(h, 'time_s')} | {h.get('residual_max', nan):.2e} | "
                         f"{h.get('converged', nan):.2f} | {h.get('spectral_radius_max', nan):.3f} |")
        lines.append("")
    if res["wilcoxon"]:
        n = len(next(iter(res["subject_means"].values()), {}))
        lines += ["Wilcoxon signed-rank p-values on the unseen pairs' Dice (two-sided). The pairs come from three "
                  "subjects, so they are not independent: the p-value says how consistently one model beats the "
                  f"other on these brains, not that it generalises to a population (a test across the {n} ordered "
                  f"subject pairs would need at least {min_pairs_for_test()} independent ones).", ""]
        lines += [f"* {k}: p = {v:.3g}" for k, v in res["wilcoxon"].items()]
        lines += ["", "Mean Dice per ordered subject pair (moving -> fixed):", "",
                  "| model | " + " | ".join(next(iter(res["subject_means"].values())).keys()) + " |",
                  "|---|" + "---|" * n]
        for name, m in res["subject_means"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in m.values()) + " |")
    lines += ["", "## Table 2 (unseen pairs: Dice / folding % against inference steps)", ""]
    for name, r in res["table2"].items():
        if "steps" in r:
            cells = ", ".join(f"{t}: {d:.3f}/{fo:.3f}" for t, d, fo in zip(r["steps"], r["dice"], r["folding_pct"]))
            lines.append(f"* **{name}** (trained {r['trained_steps']}): {cells}")
        if "drift" in r:
            lines.append(f"  * largest move from 48 to {r['drift']['long_steps']} steps: "
                         f"{r['drift']['max_move_vox']:.3f} voxels (160x192)")
    if res.get("checks"):
        lines += ["", "## Acceptance checks (issue 10, unseen pairs)", "", "| check | measured | target | pass |",
                  "|---|---|---|---|"]
        for c in res["checks"]:
            ok = "n/a" if c["pass"] is None else ("yes" if c["pass"] else "**no**")
            lines.append(f"| {c['check']} | {_fmt(c['value'])} | {c['target']} | {ok} |")
    if res["seeds"]:
        lines += ["", "## Seeds (unseen mean Dice of each seed's selected checkpoint)", ""]
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
        res = run(ckpts, None, 2, (1, 3, 12, 24), 24, names=("voxelmorph", "deqreg12"), n_unseen=2)
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
