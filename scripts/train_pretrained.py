#!/usr/bin/env python
"""Train the small pretrained 2D checkpoints shipped in data/checkpoints (see data/checkpoints/README.md).

Every model is trained **from scratch** with one budget of optimizer steps (``presets.PRETRAINED_BUDGET``), the same
data, the same constant learning rate and the same selection rule (the best validation Dice), one run per (model,
seed) in ``runs/pretrained/<name>-seed<seed>/``. A run checkpoints every 50 steps and **resumes** from its
``last.pt`` when started again, so long runs survive interruptions (Ctrl-C saves too)::

    python scripts/train_pretrained.py --threads 1                       # every model and seed (resumes)
    python scripts/train_pretrained.py --names deqreg --seeds 1 --threads 1
    python scripts/train_pretrained.py --export-only                     # best.pt of each shipped seed -> data/checkpoints
    python scripts/train_pretrained.py --names voxelmorph --iterations 20 --runs /tmp/r --out /tmp/c --export
    python scripts/train_pretrained.py --evaluate-only                   # measure the shipped checkpoints

The models are trained and run at 80 x 96 (half of brain2d's 160 x 192); deqreg_lite.pretrained.load_pretrained
wraps them to take 160 x 192 images. Seeds are fixed, so a run is repeatable on the same machine and threads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from deqreg_lite.config import checkpoints_dir  # noqa: E402
from deqreg_lite.datasets.pairs import PairDataset  # noqa: E402
from deqreg_lite.evaluate import pair_metrics  # noqa: E402
from deqreg_lite.methods import RegistrationLoss, build_method  # noqa: E402
from deqreg_lite.methods.base import RegistrationMethod  # noqa: E402
from deqreg_lite.presets import LAM, SEEDS, SELECTION, SETTINGS, TRAIN_KINDS, TRAIN_ORDER  # noqa: E402
from deqreg_lite.pretrained import INPUT_SIZE, PRETRAINED, TRAIN_SIZE, _check_name  # noqa: E402
from deqreg_lite.train import Trainer, load_checkpoint, save_checkpoint  # noqa: E402


SWEEP_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)


# ---------------------------------------------------------------------------------------------------------------
# training: one run per (model, seed), from scratch, resumable; export picks each run's best.pt
# ---------------------------------------------------------------------------------------------------------------
VAL_PAIRS = 8
VAL_EVERY = 250
CHECKPOINT_EVERY = 50
#: the training-log fields kept in a run summary's ``train_curve`` (the mean of the 25 steps before every ``VAL_EVERY``-th
#: step; shipped inside each checkpoint with ``val_curve``, for the notebooks' training curves).
TRAIN_CURVE_KEYS = ("iteration", "loss", "loss_final", "residual", "converged", "nfe", "jac_fro2", "time_s")
N_TRAIN = 4000
DATA = {
    "train": f"PairDataset('train', {N_TRAIN}, {tuple(TRAIN_SIZE)}, kinds={TRAIN_KINDS}, seed=<run seed>): generated "
             "pairs of the two shipped brain slices (the MNI ICBM152 2009a coronal slice y = -15 mm and the dipy "
             "T1 coronal slice), each deformed by random smooth warps and re-shaded",
    "validation": f"PairDataset('val', {VAL_PAIRS}, {tuple(TRAIN_SIZE)}, include_real=False): held-out generated "
                  "pairs (eval-range seeds) of the same two brains; the real brain2d pair is not among them",
    "subjects": ["MNI ICBM152 2009a template (coronal slice y = -15 mm)", "dipy t1_coronal_slice"],
}


def run_dir(runs: Path, name: str, seed: int) -> Path:
    return runs / f"{name}-seed{seed}"


def _trainer(method: nn.Module, cfg: dict, folder: Path, seed: int, iterations: int, overwrite: bool) -> Trainer:
    train = PairDataset("train", N_TRAIN, TRAIN_SIZE, kinds=TRAIN_KINDS, seed=seed)
    val = PairDataset("val", VAL_PAIRS, TRAIN_SIZE, include_real=False)
    return Trainer(method, RegistrationLoss(lam=LAM), train, val, lr=cfg["lr"], batch_size=cfg["batch_size"],
                   iterations=iterations, val_every=VAL_EVERY, checkpoint_dir=folder, checkpoint_every=CHECKPOINT_EVERY,
                   log_every=25, seed=seed, device="cpu", progress=False, log_path=folder / "log.jsonl",
                   overwrite=overwrite)


def train_run(name: str, seed: int, runs: Path, *, iterations: Optional[int] = None, resume: bool = True,
              log: Callable[[str], None] = print, kwargs: Optional[dict] = None, ndim: int = 2,
              cfg: Optional[dict] = None, make_trainer: Optional[Callable[..., Trainer]] = None,
              record: Optional[dict] = None, minutes: Optional[float] = None,
              progress: Optional[Callable[[Trainer], None]] = None) -> dict:
    """Train ``name`` with ``seed`` from scratch into ``runs/<name>-seed<seed>/`` (``last.pt`` every
    ``CHECKPOINT_EVERY`` steps, ``best.pt`` by validation Dice, ``log.jsonl``); with ``resume`` an existing
    ``last.pt`` is continued. ``kwargs`` replace the method's constructor options of ``SETTINGS`` (recipe
    experiments; recorded in the summary's ``config``). Returns the run's summary (also written to ``run.json``).

    A recipe in stages (``cfg["stages"]``: ``(first step, options)``) runs as one run: each stage resumes the
    previous one's ``last.pt`` with its own options, and ``best.pt`` is chosen among the last stage's checkpoints.
    Stages that would start at or after the budget are left out (and out of the summary).

    The same loop trains the small 3D models (``scripts/train_3d.py``): ``ndim`` (2 or 3), ``cfg`` (default
    ``SETTINGS[name]``: ``kwargs``, ``iterations``, ``lr``, ``batch_size``, optional ``stages``), ``make_trainer``
    (``(method, cfg, folder, seed, iterations, overwrite) -> Trainer``, default the 2D data of this script) and
    ``record`` (fields that replace or extend the summary's, e.g. ``data`` and ``selection``). ``minutes`` stops
    this call after that much wall time, at the next multiple of the trainer's ``checkpoint_every`` steps
    (``last.pt`` is written there; running it again resumes): the summary then says ``finished: false``.
    ``progress(trainer)``, when given, is called after every ``checkpoint_every`` steps (e.g. to print the newest
    row of ``trainer.history``)."""
    cfg = dict(SETTINGS[name] if cfg is None else cfg)
    make_trainer = _trainer if make_trainer is None else make_trainer
    stages = [(0, dict(cfg["kwargs"]))] + [(start, {**cfg["kwargs"], **upd}) for start, upd in cfg.get("stages", ())]
    if kwargs:  # a recipe experiment: one stage with these options
        stages = [(0, {**cfg["kwargs"], **kwargs})]
    its = int(iterations if iterations is not None else cfg["iterations"])
    stages = [st for st in stages if st[0] == 0 or st[0] < its]  # a stage that starts after the budget never runs
    folder = run_dir(runs, name, seed)
    cont = resume and (folder / "last.pt").is_file()
    done = int(load_checkpoint(folder / "last.pt", "cpu")["iteration"]) if cont else 0
    t0 = time.perf_counter()
    deadline = t0 + 60.0 * minutes if minutes is not None else None
    trainer: Optional[Trainer] = None
    for i, (start, options) in enumerate(stages):
        end = min(its, stages[i + 1][0]) if i + 1 < len(stages) else its
        if i + 1 < len(stages) and done >= end:
            continue  # this stage is behind the run
        if trainer is not None and deadline is not None and time.perf_counter() >= deadline:
            break  # out of time at a stage boundary: the next call starts the next stage
        torch.manual_seed(seed)
        method = build_method(name, ndim, **options)
        trainer = make_trainer(method, cfg, folder, seed, end, overwrite=not cont)
        if cont:
            with warnings.catch_warnings():
                if i > 0:  # the checkpoint holds the previous stage's options: expected
                    warnings.filterwarnings("ignore", message="the checkpoint's method config")
                trainer.resume()
            trainer.iterations = end
            if i > 0 and done == start:  # entering a later stage: select among its checkpoints only
                trainer.restart_selection()
            log(f"[{name} seed {seed}] resumed at iteration {trainer.iteration} (stage {i + 1}/{len(stages)}: "
                f"{options})")
        _fit(trainer, deadline, progress)
        done, cont = trainer.iteration, True
        if trainer.iteration < end:  # stopped by the time limit
            break
    rows = trainer.history
    train_s = sum(r["time_s"] * trainer.log_every for r in rows if r.get("split") == "train" and "time_s" in r)
    vals = [r for r in rows if r.get("split") == "val"]
    last_start = max(start for start, _ in stages if start == 0 or start < trainer.iteration)
    eligible = [r for r in vals if r["iteration"] > last_start] if last_start else vals  # as best.pt was chosen
    best = max(eligible, key=lambda r: r["dice"]) if eligible else None
    curve_every = trainer.val_every or VAL_EVERY
    summary = {"name": name, "seed": seed, "config": method.config(), "iterations": trainer.iteration,
               "budget": its, "finished": trainer.iteration >= its, "lr": cfg["lr"], "schedule": "constant",
               "weight_decay": trainer.weight_decay, "batch_size": cfg["batch_size"],
               "lam": float(getattr(trainer.loss_fn, "lam", LAM)), "init": "scratch",
               "selected_iteration": best["iteration"] if best else None,
               "selected_val": {k: best[k] for k in ("dice", "dice_std", "folding_pct") if k in best} if best else None,
               "val_curve": [{k: r[k] for k in ("iteration", "dice", "folding_pct") if k in r} for r in vals],
               "train_curve": [{k: r[k] for k in TRAIN_CURVE_KEYS if k in r} for r in rows
                               if r.get("split") == "train" and r.get("iteration", 0) % curve_every == 0],
               "train_time_s": round(train_s, 1), "this_call_s": round(time.perf_counter() - t0, 1),
               "threads": torch.get_num_threads(), "torch_version": str(torch.__version__),
               "device": "cpu", "data": DATA, "selection": SELECTION,
               "stages": [{"from": start, "options": options} for start, options in stages], **(record or {})}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    state = "done" if summary["finished"] else f"stopped by the time limit ({minutes:g} min; run it again to resume)"
    log(f"[{name} seed {seed}] {state}: {trainer.iteration} of {its} steps, best val Dice "
        f"{best['dice'] if best else float('nan'):.4f} at {summary['selected_iteration']}, {train_s:.0f} s")
    return summary


def _fit(trainer: Trainer, deadline: Optional[float] = None,
         progress: Optional[Callable[[Trainer], None]] = None) -> None:
    """``trainer.fit()``; with a ``deadline`` (``time.perf_counter()`` seconds) or a ``progress`` callback, in pieces
    of ``checkpoint_every`` steps (``CHECKPOINT_EVERY`` when it is 0), calling ``progress(trainer)`` after each and
    stopping after the piece during which the deadline passed (so every call makes progress: at least one piece).
    Pieces give the same result as one fit (the data order and the RNG states depend on the iteration only)."""
    if deadline is None and progress is None:
        trainer.fit()
        return
    every = trainer.checkpoint_every or CHECKPOINT_EVERY
    while trainer.iteration < trainer.iterations:
        trainer.fit(until=min(trainer.iterations, (trainer.iteration // every + 1) * every))
        if progress is not None:
            progress(trainer)
        if deadline is not None and time.perf_counter() >= deadline:
            break


def export(names: Sequence[str], runs: Path, out: Path, log: Callable[[str], None] = print) -> dict:
    """Copy each model's shipped run (its first seed in ``SEEDS``), ``best.pt``'s weights, to ``out/<name>.pt``
    with the training record, and write ``out/manifest.json`` (every seed's summary under ``seeds``)."""
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for name in names:
        seeds = SEEDS[name]
        summaries = [json.loads((run_dir(runs, name, s) / "run.json").read_text()) for s in seeds
                     if (run_dir(runs, name, s) / "run.json").is_file()]
        if not summaries or summaries[0]["seed"] != seeds[0]:
            raise FileNotFoundError(f"{name}: no finished run for seed {seeds[0]} in {runs}")
        ship = summaries[0]
        method = RegistrationMethod.from_checkpoint(run_dir(runs, name, ship["seed"]) / "best.pt")  # its own config
        record = {**ship, "input_size": list(INPUT_SIZE), "train_size": list(TRAIN_SIZE), "factor": 2,
                  "seeds": [{k: s[k] for k in ("seed", "iterations", "selected_iteration", "selected_val",
                                               "train_time_s")} for s in summaries]}
        save_checkpoint(out / f"{name}.pt", method, None, iteration=ship["iterations"], history=[], rng=False,
                        extra={"factor": 2, "pretrained": json.loads(json.dumps(record))})
        records[name] = record
        _update_manifest(out, name, record)
        log(f"[{name}] exported seed {ship['seed']}, iteration {ship['selected_iteration']} -> {out / (name + '.pt')}")
    return records


def _update_manifest(out: Path, name: str, record: dict) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    models = manifest.get("models", {})
    slim = {k: v for k, v in record.items() if k not in ("val_during_training", "val_curve", "train_curve")}
    slim["file"] = f"{name}.pt"
    slim["bytes"] = (out / f"{name}.pt").stat().st_size
    models[name] = slim
    manifest = {**{k: v for k, v in manifest.items() if k != "models"},
                "format": "deqreg_lite.pretrained", "made_by": "python scripts/train_pretrained.py",
                "internal_size": list(TRAIN_SIZE), "input_size": list(INPUT_SIZE),
                "note": "models run at 80x96 internally (HalfResolution wrapper); lr 1e-3 (paper 1e-4) and lam 1 "
                        "(voxel units) are deliberate deviations for a CPU budget; every model from scratch with "
                        "one budget of optimizer steps",
                "models": models}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------


def evaluate_checkpoints(out: Path, n_val: int = 9, sweep_names=("unrolling", "deqreg", "deqreg12", "riir",
                                                                   "gradirn")) -> dict:
    """Measure the checkpoints in ``out`` at 160 x 192 through load_pretrained: the real brain2d pair and the
    held-out val pairs (PairDataset("val", n_val), item 0 being the real pair). Returns a dict of numbers and
    prints the done-when checks."""
    from deqreg_lite.evaluate import evaluate, step_sweep
    from deqreg_lite.pretrained import load_pretrained

    os.environ["DEQREG_CHECKPOINTS_DIR"] = str(out)
    ds = PairDataset("val", n_val, (160, 192))
    pairs = [ds[i] for i in range(len(ds))]
    groups = {"real": pairs[:1], "heldout": pairs[1:], "all": pairs}
    res: dict = {"pairs": {"real": "brain2d as shipped (160x192)",
                           "heldout": f"PairDataset('val', {n_val}, (160, 192)) items 1..{n_val - 1}"},
                 "identity": {}, "trained": {}, "sweep": {}}
    zero = torch.zeros(1, 2, 160, 192)
    for g, ps in groups.items():
        res["identity"][g] = sum(pair_metrics(p, zero, with_hd95=False)["dice"] for p in ps) / len(ps)
    for name in PRETRAINED:
        if not (out / f"{name}.pt").is_file():
            continue
        model = load_pretrained(name)
        t = evaluate(model, pairs, memory=False, hd95=False)
        rows = t.rows
        res["trained"][name] = {g: {"dice": sum(r["dice"] for r in rows[sl]) / len(rows[sl]),
                                    "folding_pct": sum(r["folding_pct"] for r in rows[sl]) / len(rows[sl])}
                                for g, sl in (("real", slice(0, 1)), ("heldout", slice(1, None)),
                                              ("all", slice(None)))}
        if name in sweep_names:
            res["sweep"][name] = {}
            sw = step_sweep(model, pairs, SWEEP_STEPS)  # once over all pairs; groups from the per-pair numbers
            for g, sl in (("real", slice(0, 1)), ("heldout", slice(1, None)), ("all", slice(None))):
                mean = lambda per: [sum(v[sl]) / len(v[sl]) for v in per]
                res["sweep"][name][g] = {"steps": sw["steps"], "dice": mean(sw["per_pair"]["dice"]),
                                         "folding_pct": mean(sw["per_pair"]["folding_pct"])}
        print(f"{name}: " + ", ".join(f"{g} dice {v['dice']:.4f} fold {v['folding_pct']:.3f}%"
                                      for g, v in res["trained"][name].items()), flush=True)
    checks = {}
    for g in groups:
        c = {}
        if "unrolling" in res["sweep"]:
            sw = res["sweep"]["unrolling"][g]
            d, f = dict(zip(sw["steps"], sw["dice"])), dict(zip(sw["steps"], sw["folding_pct"]))
            c["unrolling_96_dice_below_best"] = (d[96] < max(d.values()), d[96], max(d.values()))
            c["unrolling_96_folding_ge_2x_trained"] = (f[96] >= 2 * f[3], f[96], f[3])
        if "deqreg" in res["sweep"]:
            sw = res["sweep"]["deqreg"][g]
            d, f = dict(zip(sw["steps"], sw["dice"])), dict(zip(sw["steps"], sw["folding_pct"]))
            c["deqreg_96_within_1pt_of_best"] = (d[96] >= max(d.values()) - 0.01, d[96], max(d.values()))
            c["deqreg_96_folding_below_1pct"] = (f[96] < 1.0, f[96])
        if "deqreg" in res["trained"] and "voxelmorph" in res["trained"]:
            a, b = res["trained"]["deqreg"][g]["dice"], res["trained"]["voxelmorph"][g]["dice"]
            c["deqreg_dice_ge_voxelmorph"] = (a >= b, a, b)
        checks[g] = c
        for k, v in c.items():
            print(f"[{g}] {k}: {'HOLDS' if v[0] else 'FAILS'} {tuple(round(x, 4) for x in v[1:])}", flush=True)
    res["checks"] = checks
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", nargs="+", default=list(TRAIN_ORDER), choices=list(SETTINGS),
                   help="models (default: all, in TRAIN_ORDER)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds to train (default: each model's SEEDS)")
    p.add_argument("--iterations", type=int, default=None, help="override the budget (e.g. for a smoke test)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "pretrained"),
                   help="folder of the training runs (checkpoints, logs; not shipped)")
    p.add_argument("--out", default=None, help=f"folder of the exported checkpoints (default {checkpoints_dir()})")
    p.add_argument("--deq-recipe", default=None,
                   help="JSON dict replacing DEQReg/DEQReg-12 options (recipe experiments; use another --runs)")
    p.add_argument("--restart", action="store_true", help="start runs anew instead of resuming their last.pt")
    p.add_argument("--export", action="store_true", help="after training, export each model's best.pt to --out")
    p.add_argument("--export-only", action="store_true", help="only export finished runs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is fastest for these small models on a busy machine)")
    p.add_argument("--evaluate", action="store_true",
                   help="after exporting, measure every checkpoint at 160x192 (written to evaluation.json)")
    p.add_argument("--evaluate-only", action="store_true", help="only measure the existing checkpoints")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else checkpoints_dir()
    runs = Path(args.runs)
    names = list(dict.fromkeys(args.names))
    if not (args.export_only or args.evaluate_only):
        for name in names:
            for seed in (args.seeds if args.seeds is not None else SEEDS[name]):
                train_run(name, seed, runs, iterations=args.iterations, resume=not args.restart,
                          log=lambda s: print(s, flush=True),
                          kwargs=json.loads(args.deq_recipe) if args.deq_recipe and name.startswith("deqreg")
                          else None)
    if args.export or args.export_only:
        export(names, runs, out, log=lambda s: print(s, flush=True))
    if args.evaluate or args.evaluate_only:
        res = evaluate_checkpoints(out)
        (out / "evaluation.json").write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
