"""Which training recipe makes DEQReg's update map a contraction? Train DEQReg from scratch with one recipe, then
measure the convergence certificate, Dice and folding on validation pairs.

Each run trains ``DEQReg(2, **recipe)`` from scratch (no warm start) at 80x96 with AdamW, the library's
``RegistrationLoss(lam=LAM)`` and the Eq. 9 loss (T = 48, S = 3, gamma = 0.5, K = 3, tau = 0.5 unless the recipe
changes them), checkpointing to ``--out/<recipe>/`` so that an interrupted run continues with ``--resume``. Then,
on the validation pairs, it measures:

* the trained solve (``steps=None``): the final relative residual ``||g(phi) - phi|| / ||g(phi)||`` and whether it
  reached the tolerance 1e-3, the solver steps, Dice and folding;
* the spectral radius of the solver's iteration map at the returned field (``certificate=True``, 30 products);
* exactly 48 and exactly 500 solver steps: Dice and folding at each, and the largest displacement change between
  the two (voxels at 80x96): the drift past the trained steps.

Recipes (``RECIPES``):

* ``paper``: the paper's settings: undamped fixed-point solve, phantom gradient with tau = 0.5;
* ``damped``: the solve iterates the damped map that the phantom gradient unrolls (``damping = tau = 0.5``);
* ``damped_jac``: ``damped`` plus a Jacobian penalty (weight 1) on the iteration map at ``phi*``;
* ``paper_jac``: ``paper`` plus the same penalty on the undamped map;
* ``damped_leak``: ``damped`` with a fixed restoring term, ``g(phi) = phi + UNet(...) - 0.5 phi``;
* ``damped_leak_jac``: ``damped_leak`` plus the Jacobian penalty with weight 0.1.

    python benchmarks/recipes.py --recipe damped --iterations 600       # writes results/recipes/damped.json
    python benchmarks/recipes.py --recipe damped --iterations 900 --resume
    python benchmarks/recipes.py --measure-run RUN/last.pt --label NAME  # measure a run's checkpoint (e.g. a
                                                                         # stage of scripts/train_pretrained.py)
    python benchmarks/recipes.py --table                                # results/recipes.md from the JSON files
    python benchmarks/recipes.py --quick                                # smoke run (CI), to a temporary folder
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

from deqreg_lite.datasets.pairs import PairDataset
from deqreg_lite.methods import RegistrationLoss
from deqreg_lite.methods.deqreg import DEQReg
from deqreg_lite.metrics import pair_metrics
from deqreg_lite.presets import LAM, TRAIN_KINDS, TRAIN_SIZE
from deqreg_lite.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results"

RECIPES: dict[str, dict] = {
    "paper": {},
    "damped": {"damping": 0.5},
    "damped_jac": {"damping": 0.5, "jac_weight": 1.0},
    "paper_jac": {"jac_weight": 1.0},
    "damped_leak": {"damping": 0.5, "leak": 0.5},
    "damped_leak_jac": {"damping": 0.5, "leak": 0.5, "jac_weight": 0.1},
}


def measure(model: DEQReg, pairs: list[dict], long_steps: int = 500) -> dict:
    """The certificate, Dice and folding on ``pairs`` (samples at the model's size); means and per-pair lists."""
    model.eval()
    rows = []
    with torch.no_grad():
        for s in pairs:
            f, m = s["fixed"], s["moving"]
            res = model(f, m, certificate=True)
            info = res.info
            d48 = model(f, m, steps=48).disp
            dlong = model(f, m, steps=long_steps).disp
            met = pair_metrics(s, res.disp, with_hd95=False)
            m48 = pair_metrics(s, d48, with_hd95=False)
            mlong = pair_metrics(s, dlong, with_hd95=False)
            rows.append({"residual": info.extras["residual"], "converged": bool(info.converged),
                         "steps": int(info.steps), "rho": info.extras["spectral_radius"][0],
                         "rayleigh": info.extras["spectral_rayleigh"][0],
                         "dice": met["dice"], "folding_pct": met["folding_pct"],
                         "dice48": m48["dice"], "folding48": m48["folding_pct"],
                         "dice_long": mlong["dice"], "folding_long": mlong["folding_pct"],
                         "drift_max": float((dlong - d48).abs().max())})
    mean = {k: sum(float(r[k]) for r in rows) / len(rows) for k in rows[0]}
    mean["drift_max"] = max(r["drift_max"] for r in rows)
    mean["rho_max"] = max(r["rho"] for r in rows)
    mean["residual_max"] = max(r["residual"] for r in rows)
    mean["identity_dice"] = sum(pair_metrics(s, torch.zeros_like(d48), with_hd95=False)["dice"]
                                for s in pairs) / len(pairs)
    return {"mean": mean, "per_pair": rows, "long_steps": long_steps}


def run(recipe: str, iterations: int, out: Path, *, batch: int, n_val: int, seed: int, resume: bool,
        lr: float, val_every: int, long_steps: int) -> dict:
    kwargs = RECIPES[recipe]
    folder = out / recipe
    torch.manual_seed(seed)
    model = DEQReg(2, **kwargs)
    train = PairDataset("train", 4000, TRAIN_SIZE, kinds=TRAIN_KINDS, seed=seed)
    val_ds = PairDataset("val", n_val, TRAIN_SIZE)
    val = [val_ds[i] for i in range(len(val_ds))]
    trainer = Trainer(model, RegistrationLoss(lam=LAM), train, val, lr=lr, batch_size=batch,
                      iterations=iterations, val_every=val_every, checkpoint_dir=folder, checkpoint_every=25,
                      log_every=25, seed=seed, device="cpu", progress=False, log_path=folder / "log.jsonl",
                      overwrite=not resume)
    if resume and (folder / "last.pt").is_file():
        trainer.resume(folder / "last.pt")
        trainer.iterations = iterations
    t0 = time.perf_counter()
    trainer.fit()
    train_s = sum(r.get("time_s", 0.0) * 25 for r in trainer.history if r.get("split") == "train")
    result = measure(model, val, long_steps)
    result.update({"recipe": recipe, "kwargs": kwargs, "iterations": trainer.iteration, "batch": batch, "lr": lr,
                   "seed": seed, "train_time_s": round(train_s, 1), "session_time_s": round(time.perf_counter() - t0),
                   "history": [r for r in trainer.history if r.get("split") == "train"][-8:],
                   "val_history": [r for r in trainer.history if r.get("split") == "val"],
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "machine": platform.platform(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat()})
    return result


#: what the table cannot show: runs stopped before their measurement, and measurements made elsewhere (with sources).
NOTES = """
Context, measured on this project's 2-core CPU (torch 2.13 CPU, one thread per run, several runs sharing the cores):

* `paper` (undamped solve, tau 0.5 phantom), an earlier probe on this machine kind (35 minutes, 789 iterations at
  batch 4, measured on 6 real inter-subject pairs at 80x96 that the project does not hold): relative residual 0.42 after 48 steps, spectral radius 2.1-2.7 at the
  returned field, largest move from 48 to 500 steps 6.3 voxels. The shipped (warm-started) DEQReg-12:
  spectral radius 2.64 with Rayleigh quotient -2.64 (`results/certificate.md`): a negative, real dominant
  eigenvalue, i.e. the undamped solve overshoots, which is what a network trained through tau = 0.5 damped phantom
  steps learns.
* `damped` and `damped_jac` (no leak) sat at identity level for their first 125 iterations (val Dice 0.455 and
  0.452, identity 0.453) and were stopped there; with the leak, both recipes left identity (`damped_leak_jac`: val
  Dice 0.517 at 200 and 0.594 at 400 iterations).
* Training logs (relative residual of the solve, mean over 25 steps): `damped_leak` rose from 9e-4 (iterations
  1-50) to 0.09, 0.19, 0.32 and 0.52 at 75, 100, 125 and 150 as the map learned; `damped_leak_jac` (weight 0.1)
  stayed at 0.004-0.04 up to 400.
* The equal-budget run of `scripts/train_pretrained.py` (batch 1, `presets.DEQ_RECIPE`, Hutchinson penalty weight
  0.3) reached val Dice 0.640, 0.674, 0.690 and 0.705 at 750, 1000, 1500 and 1750 steps (8 held-out pairs;
  VoxelMorph's best over 5000 steps: 0.667), with a mean squared singular value of the iteration map of 0.09-0.15,
  but its residual after 48 steps rose to 0.02-0.03: the Frobenius (mean) penalty does not hold the *dominant*
  eigenvalue.
* The same run with the penalty aimed at the dominant direction instead (`jac_power=4`, `jac_target=0.8`, weight 1)
  sat at identity level for 1000 steps (val Dice 0.441-0.445; its hinge never became active) and was stopped: like
  the runs without a penalty, it did not leave identity, while both runs with the Hutchinson penalty did (one seed
  each).
* Stages of the equal-budget run (rows `stage*`, measured with `--measure-run`): the step-1800 checkpoint of stage 1
  (`stage1_at_1800`); 200 steps of the aimed hinge (weight 0.3, target 0.8) with the damped fixed-point solve kept
  (`stage2_fixedpoint_...`) or with Anderson in training (continued to 450 steps: `stage2_anderson_..._w0.3_t0.8`);
  and that Anderson run tightened after its first 200 steps to weight 1, target 0.7, 6 power steps, for 250 steps
  (`stage2_anderson_aimed_w1_t0.7`). Only the tight hinge made the map a contraction on every validation pair, at
  a cost in Dice at that point of training (0.551 against 0.707 at step 1800). Going from the step-1800 checkpoint
  straight to the tight hinge diverged: the training loss reached 1e8 and the solve returned NaN by step 2150 (val
  Dice 0.443 at step 2000), so `presets.DEQ_STAGES` tightens in two steps (1800, 2000).
* `stage3_tight_hinge_at_2800`: that path continued to step 2800. The map stays a contraction on every validation
  pair, but validation Dice did not recover (0.537, 0.539, 0.524 at 2250, 2500, 2750). On the 30 real unseen pairs
  (`unseen_brain_pairs`, every third pair, step 2500): Dice 0.534, residual 2.8e-3 mean / 0.015 max, 80 % converged,
  spectral radius 0.90 mean / 1.10 max, largest move 48 -> 500 steps 6.2 voxels: the contraction learned on the
  training anatomy does not carry over to every unseen brain.
* `stage2_anderson_hutchinson_only` (run E1): Anderson in training with stage 1's Hutchinson penalty and no hinge,
  from the step-1800 checkpoint, measured at step ~2325: Dice 0.702 (val Dice 0.708 at 2250), but the training
  solves did not converge (residual 0.011, 16-24 % converged) and the dominant eigenvalue became **negative**
  (spectral radius 1.71 mean / 1.89 max, Rayleigh quotient -1.71): without the damped iteration in training,
  nothing held the map's oscillating direction, which the damped solve had kept in check.
* **Injecting the unwarped moving image** (`inject_moving=True`: the U-Net sees `[If, Im o phi, phi, Im]`), seed 0,
  batch 1, the runs of `scripts/train_pretrained.py`: with stage 1's recipe (damped fixed point, leak 0.5,
  Hutchinson 0.3) it left identity faster than with the paper's input (val Dice 0.496 / 0.588 / 0.668 at 250 / 500 /
  750 steps, against 0.458 / 0.512 / 0.640), but the training residual after 48 steps rose the same way (1e-3 at
  step 250, 0.018-0.037 at 650-750): injection alone does not make the map contract. With only the aimed hinge
  from step 0 (Anderson, w 1, target 0.8, 4 power steps, no Hutchinson term) it sat at identity for 400 steps (val
  Dice 0.443 at 250, training loss flat) and was stopped, like the paper-input run with the hinge alone.
* `inject_stage2_hinge_at_1000`: stage 1 with `Im` injected to step 500, then Anderson + the aimed hinge (w 1,
  target 0.8, 4 power steps) to step 1000. Val Dice dipped (0.588 at 500, 0.548 at 750) and recovered (0.622 at
  1000, 0.618 at 1250). Five of six validation solves converge with a largest move 48 -> 500 of at most 0.004
  voxels; the sixth has rho 1.15 and moves 2.5 voxels. The 4-step power estimate inside the penalty read about
  0.81 while the 30-step certificate reads 0.96 (mean): too few power steps let rho sit above the target, so the
  recipe refines the direction with 10 steps from step 1500 (`presets.DEQ_STAGES`). On 10 of the 30 real unseen
  pairs (every third): Dice 0.575, folding 0.13 %, 80 % converged, rho 0.95 mean / 1.09 max; on all 30 pairs,
  VoxelMorph 0.557, the paper's Unrolling 0.578, the single-level Unrolling 0.568 (retrained, 5000 steps).
  Why the paper's input cannot contract where the images carry no signal: `presets.DEQ_RECIPE`'s comment. The
  dominant eigenvalue is real and positive in both maps without the hinge (power iteration, 40 steps, 3 validation
  pairs; `brain` = pixels above 0.05 in either image, about 80 % of the image): paper input, stage 1 at step 1800:
  0.93-1.11, 45-94 % of the eigenvector's mass in the brain; `Im` injected, stage 1 at step ~650: 0.99-1.09,
  80-100 % in the brain.
* `inject_stage3_hinge_p10_at_1750`: the same run (now `presets.DEQ_RECIPE` + `DEQ_STAGES`, seed 0) with the
  hinge's direction refined by 10 power steps from step 1500. Val Dice dipped again (0.618 at 1250, 0.592 at 1500)
  and recovered to 0.609 at 1750; every training solve converged from step ~1600 (16-18 Anderson steps, residual
  8e-4). At step 1750, every validation solve converges (15 Anderson steps on average), rho 0.81 mean / 0.85 max,
  a largest move of 4e-4 voxels from 48 to 500 steps, Dice unchanged. On 10 of the 30 real unseen pairs (every
  third): **every solve converged** (residual 8e-4 mean, 1.0e-3 max), **rho 0.86 mean / 0.94 max**, Dice 0.558,
  folding 0.14 % (VoxelMorph on all 30 pairs: 0.557, 1.0 %). The first recipe of this table whose map is a
  contraction on every validation pair and every unseen pair measured. **But its Dice did not keep rising**: val
  Dice 0.609, 0.564, 0.542 at 1750, 2000, 2250 (8 pairs; training loss `L(u*)` 0.48-0.50 at 1100-1300, 0.53-0.58 at
  1600-2350), and the fields shrank: mean |u| over 6 validation pairs 2.24 voxels at step 1000, 1.65 at 1750, 1.60 at
  2350, against 3.08 for the paper-input stage 1 at step 1800 (Dice 0.697 on the same pairs). The hinge makes the
  map contract partly by pulling its fixed point towards zero, even with `Im` injected. A branch with target 0.85
  from step 1750 fell the same way (val Dice 0.568 at 2000). Running at the end of session 16: target 0.9 from step
  1750, and a from-scratch run with leak 1 (`g = UNet(...)`: the network outputs the whole field, so predicting it
  from `[If, Im]` is its default and reproducing `u` must be learned, the opposite of leak 0.5).
"""


def table(folder: Path) -> str:
    lines = ["# DEQReg training recipes: the convergence certificate on the validation pairs", "",
             "Each row: `DEQReg(2, **recipe)` trained from scratch at 80x96 (`benchmarks/recipes.py`), measured on "
             "`PairDataset('val', n)` at 80x96. residual: the trained solve's final relative residual (mean, max); "
             "rho: spectral radius of the solver's iteration map at the returned field (mean, max); drift: the "
             "largest displacement change from exactly 48 to exactly 500 solver steps (voxels at 80x96).", "",
             "| recipe | iterations | batch | train time (s) | residual mean | residual max | converged | rho mean | "
             "rho max | Dice | Dice @48 | Dice @500 | folding % | folding @500 % | drift (vox) | identity Dice |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(folder.glob("*.json")):
        r = json.loads(p.read_text())
        m = r["mean"]
        lines.append(f"| {r['recipe']} | {r['iterations']} | {r['batch']} | {r['train_time_s']:.0f} | "
                     f"{m['residual']:.2e} | {m['residual_max']:.2e} | {m['converged']:.2f} | {m['rho']:.3f} | "
                     f"{m['rho_max']:.3f} | {m['dice']:.3f} | {m['dice48']:.3f} | {m['dice_long']:.3f} | "
                     f"{m['folding_pct']:.3f} | {m['folding_long']:.3f} | {m['drift_max']:.3f} | "
                     f"{m['identity_dice']:.3f} |")
    return "\n".join(lines) + "\n" + NOTES


def measure_run(path: Path, label: str, *, n_val: int, long_steps: int, note: str = "") -> dict:
    """Measure a training run's checkpoint (``path``, e.g. ``runs/.../deqreg-seed0/last.pt``; its ``log.jsonl`` beside
    it gives the training time) on the same validation pairs as :func:`run`."""
    from deqreg_lite.checkpoints import load_checkpoint
    from deqreg_lite.methods.base import RegistrationMethod
    ckpt = load_checkpoint(path, "cpu")
    model = RegistrationMethod.from_checkpoint(ckpt)
    val_ds = PairDataset("val", n_val, TRAIN_SIZE)
    result = measure(model, [val_ds[i] for i in range(len(val_ds))], long_steps)
    log = Path(path).with_name("log.jsonl")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    train_s = sum(r.get("time_s", 0.0) * 25 for r in rows if r.get("split") == "train")
    defaults = DEQReg(2).config()
    result.update({"recipe": label, "kwargs": {k: v for k, v in ckpt["config"].items() if defaults.get(k) != v},
                   "iterations": int(ckpt["iteration"]), "batch": 1, "lr": None, "seed": None,
                   "train_time_s": round(train_s, 1), "note": note, "checkpoint": str(path),
                   "val_history": [r for r in rows if r.get("split") == "val"][-4:],
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "machine": platform.platform(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat()})
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES))
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-val", type=int, default=6)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--long-steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=None, help="folder of the runs' checkpoints (default results/recipes_runs)")
    p.add_argument("--table", action="store_true", help="write results/recipes.md from results/recipes/*.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 iterations of 'damped_jac', 20 long steps")
    p.add_argument("--measure-run", default=None, help="measure this run checkpoint instead of training a recipe")
    p.add_argument("--label", default=None, help="the table row of --measure-run (results/recipes/<label>.json)")
    p.add_argument("--note", default="", help="what --measure-run's checkpoint is (kept in its JSON)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.table:
        text = table(RESULTS / "recipes")
        (RESULTS / "recipes.md").write_text(text)
        print(text)
        return 0
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            r = run("damped_jac", 2, Path(tmp), batch=1, n_val=2, seed=0, resume=False, lr=args.lr,
                    val_every=0, long_steps=20)
            print(json.dumps(r["mean"], indent=1))
        return 0
    if args.measure_run:
        if not args.label:
            p.error("--measure-run needs --label")
        r = measure_run(Path(args.measure_run), args.label, n_val=args.n_val, long_steps=args.long_steps,
                        note=args.note)
        (RESULTS / "recipes").mkdir(parents=True, exist_ok=True)
        (RESULTS / "recipes" / f"{args.label}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(json.dumps(r["mean"], indent=1))
        return 0
    if not args.recipe:
        p.error("--recipe is required (or --table / --quick)")
    out = Path(args.out) if args.out else RESULTS / "recipes_runs"
    r = run(args.recipe, args.iterations, out, batch=args.batch, n_val=args.n_val, seed=args.seed,
            resume=args.resume, lr=args.lr, val_every=args.val_every, long_steps=args.long_steps)
    (RESULTS / "recipes").mkdir(parents=True, exist_ok=True)
    (RESULTS / "recipes" / f"{args.recipe}.json").write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps(r["mean"], indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
