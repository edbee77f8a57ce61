#!/usr/bin/env python
"""Train the small 3D models (VoxelMorph, the paper's Unrolling, DEQReg) on the CPU, and export them to
data/checkpoints/3d (see README, "Small 3D models").

Every model is trained **from scratch** with **one budget of optimizer steps** (``--iterations``, default
``BUDGET``), batch 1, the same data, learning rate, loss and selection rule (the best validation Dice), at one
internal size (``--size``, default ``SIZE`` = 32^3: the shipped 96^3 samples shrunk by 3). Equal steps rather than
equal wall time, because wall time on a shared CPU depends on what else runs (three 2D trainings shared these two
cores when this was written), so a time budget would not be reproducible; steps are, and they are the rule of the
2D checkpoints and of the paper (equal epochs). ``--minutes`` only stops a call early (``last.pt`` is written; the
same command resumes). One run per (model, seed) in ``runs/3d/<name>-seed<seed>/`` (``last.pt`` every
``--checkpoint-every`` steps, ``best.pt`` by validation Dice, ``log.jsonl``, ``run.json``, ``settings.json``); the
staged loop, resuming and the summary are ``scripts/train_pretrained.py``'s ``train_run``::

    python scripts/train_3d.py --names voxelmorph --threads 1            # one model, seed 0 (resumes if started)
    python scripts/train_3d.py --names deqreg --minutes 55               # stop this call after 55 min; rerun resumes
    python scripts/train_3d.py --export-only                             # best.pt of each run -> data/checkpoints/3d
    python scripts/train_3d.py --names voxelmorph --size 16 --iterations 4 --runs /tmp/r --out /tmp/c --export

Data (``deqreg_lite.datasets.volumes``): pairs generated on the fly from brain-like and lung-like label maps
(``--kinds``, default ``brain lung``), each side deformed by its own random smooth diffeomorphism and intensity
change; validation on held-out generated pairs (validation seed range). **The shipped samples stay unseen** unless
``--train-on-samples`` adds deformations of their fixed volumes to training; the run records it, the export's
manifest says so, and every table on those samples must then say that it is on training anatomy.

``deqreg_lite.pretrained.load_pretrained_3d`` wraps an exported model to take the shipped 96^3 volumes.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import train_pretrained as t2d  # noqa: E402  (the staged, resumable training loop of the 2D checkpoints)
from deqreg_lite.config import checkpoints_dir  # noqa: E402
from deqreg_lite.datasets.volumes import SHIPPED_KINDS, VOLUME_KINDS, VolumePairDataset  # noqa: E402
from deqreg_lite.methods import RegistrationLoss  # noqa: E402
from deqreg_lite.methods.base import RegistrationMethod  # noqa: E402
from deqreg_lite.presets import LAM, PRETRAINED_BATCH, PRETRAINED_LR, SETTINGS  # noqa: E402
from deqreg_lite.pretrained import INPUT_SIZE_3D, PRETRAINED_3D  # noqa: E402
from deqreg_lite.train import Trainer, load_checkpoint, save_checkpoint  # noqa: E402

#: the models, in training order (cheapest first).
NAMES = PRETRAINED_3D
#: the internal size (per axis), chosen by measuring (``MEASURED``): 96 / 3. Neither 32^3 nor 48^3 gives DEQReg 1000
#: steps in a CPU hour (about 150 and 90); 32^3 is the smaller cost (1000 steps: VoxelMorph ~22 min, Unrolling ~1.4 h,
#: DEQReg ~7 h, resumable in pieces with --minutes); 16^3 would fit DEQReg's 1000 steps in ~1.3 h, at 12 mm voxels
#: for the brain.
SIZE = 32
#: the sizes a run may use: they divide the shipped samples' 96 voxels and the U-Nets' 16.
SIZES = (16, 32, 48, 96)
#: optimizer steps of every model (batch 1): one budget for all, from scratch.
BUDGET = 1000
#: the kinds of training pairs by default: no shipped anatomy.
KINDS = ("brain", "lung")
#: the kinds of the validation pairs, whatever the training kinds (selection never looks at shipped anatomy).
VAL_KINDS = ("brain", "lung")
VAL_PAIRS = 6
VAL_EVERY = 100
CHECKPOINT_EVERY = 10
#: generated training pairs per epoch (each is drawn from its own seed; a 1000-step run sees each once).
N_TRAIN = 100_000
#: measured once (batch 1, one thread, nice 19, ``time.process_time`` of one training step with the optimizer
#: update, no data generation; median of 3 steps after a first one, of 2 at 16^3), while three 2D trainings ran on the
#: machine's two cores: the CPU seconds are the work; the wall seconds at nice 19 were 1.5-3.5x more. ``deqreg``:
#: stage 1 (``DEQ_RECIPE``) and the last stage (Anderson, 10 power steps). Generating a training pair adds about
#: 0.1 s at 32^3; validating DEQReg on one pair (48 steps) costs about 14 s at 32^3.
MEASURED = {
    "machine": "2 CPU cores (AMD EPYC), torch 2.13 CPU, busy: three 2D trainings at normal priority",
    "unit": "CPU seconds per optimizer step (batch 1, 1 thread)",
    16: {"voxelmorph": 0.27, "unrolling_ml": 2.13, "deqreg": 4.71},
    32: {"voxelmorph": 1.33, "unrolling_ml": 5.17, "deqreg": 25.1, "deqreg_last_stage": 23.1},
    48: {"voxelmorph": 1.99, "unrolling_ml": 11.9, "deqreg": 39.6, "deqreg_last_stage": 39.6},
}
BUDGET_RULE = ("equal optimizer steps (batch 1) for every model, from scratch; --minutes only stops a call early "
               "(resumable). Not equal wall time: on a shared CPU the wall time depends on the load")
SELECTION = ("the checkpoint with the best mean validation Dice (held-out generated pairs; validated every {every} "
             "steps and at the end; for DEQReg's recipe in stages, among its last stage's checkpoints)")


def check_settings(size: int, kinds: Sequence[str], *, iterations: int = BUDGET, val_every: int = VAL_EVERY,
                   val_pairs: int = VAL_PAIRS, checkpoint_every: int = CHECKPOINT_EVERY,
                   minutes: Optional[float] = None, train_on_samples: bool = False) -> tuple[str, ...]:
    """Validate a run's options; return the training kinds (with the shipped samples' kinds when
    ``train_on_samples``). ``ValueError`` for a bad one (the message says what is allowed)."""
    if isinstance(size, bool) or not isinstance(size, int) or size not in SIZES:
        raise ValueError(f"size must be one of {SIZES} (it divides the shipped samples' 96 voxels and is a multiple "
                         f"of 16 for the U-Nets), got {size!r}")
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    allowed = tuple(k for k in VOLUME_KINDS if k not in SHIPPED_KINDS)
    if not kinds or any(k not in allowed for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {allowed} (the shipped samples enter training only "
                         f"with train_on_samples=True / --train-on-samples), got {kinds!r}")
    for name, value, low in (("iterations", iterations, 1), ("val_every", val_every, 1), ("val_pairs", val_pairs, 1),
                             ("checkpoint_every", checkpoint_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not 0 < minutes < math.inf):
        raise ValueError(f"minutes must be a number > 0 or None, got {minutes!r}")
    if not isinstance(train_on_samples, bool):
        raise ValueError(f"train_on_samples must be True or False, got {train_on_samples!r}")
    return tuple(dict.fromkeys(kinds + (SHIPPED_KINDS if train_on_samples else ())))


def data_record(size: int, kinds: Sequence[str], val_pairs: int) -> dict:
    """What the models were trained and selected on (recorded in every run and in the manifest)."""
    shape = (size,) * 3
    shipped = any(k in SHIPPED_KINDS for k in kinds)
    return {
        "train": f"VolumePairDataset('train', {N_TRAIN}, {shape}, kinds={tuple(kinds)}, seed=<run seed>): pairs "
                 "generated on the fly (deqreg_lite.datasets.volumes): a label map painted once, each side deformed "
                 "by its own random smooth diffeomorphism (lung-like: plus a breathing motion) with its own noise, "
                 "gamma and bias field",
        "validation": f"VolumePairDataset('val', {val_pairs}, {shape}, kinds={VAL_KINDS}): held-out generated pairs "
                      "(validation seed range, never a training seed)",
        "kinds": list(kinds),
        "shipped_samples_in_training": shipped,
        "shipped_samples": ("IN TRAINING: deformations of brain3d's and lung3d's fixed volumes were training pairs, "
                            "so an evaluation on the shipped samples is on training anatomy" if shipped else
                            "unseen: brain3d and lung3d were never in training or validation"),
    }


@functools.lru_cache(maxsize=4)
def _val_pairs(size: int, n: int) -> tuple:
    ds = VolumePairDataset("val", n, (size,) * 3, kinds=VAL_KINDS)
    return tuple(ds[i] for i in range(n))


def _trainer_factory(size: int, kinds: tuple[str, ...], val_every: int, val_pairs: int,
                     checkpoint_every: int) -> Callable[..., Trainer]:
    def make(method: nn.Module, cfg: dict, folder: Path, seed: int, iterations: int, overwrite: bool) -> Trainer:
        train = VolumePairDataset("train", N_TRAIN, (size,) * 3, kinds=kinds, seed=seed)
        return Trainer(method, RegistrationLoss(lam=cfg["lam"]), train, list(_val_pairs(size, val_pairs)),
                       lr=cfg["lr"], batch_size=cfg["batch_size"], iterations=iterations, val_every=val_every,
                       checkpoint_dir=folder, checkpoint_every=checkpoint_every, log_every=checkpoint_every,
                       seed=seed, device="cpu", progress=False, log_path=folder / "log.jsonl", overwrite=overwrite)
    return make


def _printer(name: str, seed: int, log: Callable[[str], None]) -> Callable[[Trainer], None]:
    """A progress callback: the newest training row, and the validation rows made since the last call (a resumed
    trainer's history also holds the earlier calls' rows: only iterations after the last one shown count)."""
    seen: dict = {"iteration": None}

    def show(trainer: Trainer) -> None:
        low = seen["iteration"] if seen["iteration"] is not None else trainer.iteration - trainer.checkpoint_every
        seen["iteration"] = trainer.iteration
        rows = [r for r in trainer.history if low < r.get("iteration", -1) <= trainer.iteration]
        train = [r for r in rows if r.get("split") == "train"]
        parts = []
        if train:
            r = train[-1]
            parts.append(f"loss {r['loss']:.4f}")
            if "residual" in r:
                parts.append(f"residual {r['residual']:.3g}")
            if "time_s" in r:
                parts.append(f"{r['time_s']:.2f} s/step")
        for r in rows:
            if r.get("split") == "val":
                parts.append(f"val Dice {r['dice']:.4f} (folding {r.get('folding_pct', float('nan')):.2f}%)")
        log(f"[{name} seed {seed}] step {trainer.iteration}/{trainer.iterations}: " + ", ".join(parts))
    return show


def _settings_file(folder: Path, settings: dict, resume: bool) -> None:
    """Write ``settings.json`` for a fresh run; for a resumed one, refuse settings that differ from it."""
    path = folder / "settings.json"
    if resume and (folder / "last.pt").is_file() and path.is_file():
        stored = json.loads(path.read_text())
        diff = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{folder} was started with other settings ({what}); resume it with its own settings, "
                             "or use another --runs folder, or --restart")
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def train_3d(name: str, seed: int, runs: Path, *, size: int = SIZE, iterations: int = BUDGET,
             minutes: Optional[float] = None, kinds: Sequence[str] = KINDS, train_on_samples: bool = False,
             val_every: int = VAL_EVERY, val_pairs: int = VAL_PAIRS, checkpoint_every: int = CHECKPOINT_EVERY,
             resume: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train the 3D ``name`` (one of :data:`NAMES`) with ``seed`` from scratch into ``runs/<name>-seed<seed>/`` at
    ``size``^3 for ``iterations`` optimizer steps (resuming its ``last.pt`` when ``resume``); ``minutes`` stops
    this call early (resumable). DEQReg follows the presets' ``DEQ_RECIPE`` and ``DEQ_STAGES`` (ndim 3); stages that
    start at or after ``iterations`` are left out. Returns the run's summary (``run.json``).

    Raises:
        ValueError: an unknown name or a bad option (:func:`check_settings`), or a run folder started with other
            settings.
    """
    if name not in NAMES:
        raise ValueError(f"unknown 3D model {name!r}; choose one of {list(NAMES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    kinds = check_settings(size, kinds, iterations=iterations, val_every=val_every, val_pairs=val_pairs,
                           checkpoint_every=checkpoint_every, minutes=minutes, train_on_samples=train_on_samples)
    cfg = {"kwargs": dict(SETTINGS[name]["kwargs"]), "stages": tuple(SETTINGS[name].get("stages", ())),
           "iterations": iterations, "lr": PRETRAINED_LR, "batch_size": PRETRAINED_BATCH, "lam": LAM}
    folder = t2d.run_dir(Path(runs), name, seed)
    settings = {"ndim": 3, "size": size, "kinds": list(kinds), "lr": cfg["lr"], "batch_size": cfg["batch_size"],
                "lam": cfg["lam"], "val_pairs": val_pairs, "val_kinds": list(VAL_KINDS)}
    _settings_file(folder, settings, resume)
    record = {"ndim": 3, "size": [size] * 3, "input_size": list(INPUT_SIZE_3D), "factor": INPUT_SIZE_3D[0] // size,
              "data": data_record(size, kinds, val_pairs), "selection": SELECTION.format(every=val_every),
              "budget_rule": BUDGET_RULE,
              "val_every": val_every, "val_pairs": val_pairs, "checkpoint_every": checkpoint_every,
              "measured_s_per_step": MEASURED.get(size), "measured_on": MEASURED["machine"]}
    return t2d.train_run(name, seed, Path(runs), iterations=iterations, resume=resume, log=log, ndim=3, cfg=cfg,
                         make_trainer=_trainer_factory(size, kinds, val_every, val_pairs, checkpoint_every),
                         record=record, minutes=minutes, progress=_printer(name, seed, log))


def export_3d(names: Sequence[str], runs: Path, out: Path, *, seed: int = 0, allow_unfinished: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Copy each model's run with ``seed`` (its ``best.pt`` weights, no optimizer) to ``out/<name>.pt`` with the
    training record (``extra["pretrained"]``, ``extra["factor"]``, ``extra["train_size"]``) and update
    ``out/manifest.json``. Other seeds' summaries go under ``seeds``.

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: no run (or no ``best.pt``) for a name; the message gives the command that makes it.
        RuntimeError: a run that has not reached its budget, unless ``allow_unfinished`` (its record then says
            ``finished: false``).
    """
    runs, out = Path(runs), Path(out)
    records = {}
    for name in names:
        if name not in NAMES:
            raise ValueError(f"unknown 3D model {name!r}; choose one of {list(NAMES)}")
        folder = t2d.run_dir(runs, name, seed)
        how = f"`python scripts/train_3d.py --names {name} --seeds {seed} --runs {runs}`"
        if not (folder / "run.json").is_file():
            raise FileNotFoundError(f"{name}: no trained run in {folder}; make it with {how}")
        ship = json.loads((folder / "run.json").read_text())
        if not ship.get("finished", False) and not allow_unfinished:
            raise RuntimeError(f"{name}: the run in {folder} stopped at step {ship['iterations']} of its budget "
                               f"{ship['budget']}; resume it (run the same command again) or export with "
                               "--allow-unfinished (the manifest then says finished: false)")
        if not (folder / "best.pt").is_file():
            raise FileNotFoundError(f"{name}: the run in {folder} has no best.pt (no validation yet); continue it "
                                    f"with {how}")
        others = [json.loads(p.read_text()) for p in sorted(runs.glob(f"{name}-seed*/run.json"))]
        method = RegistrationMethod.from_checkpoint(folder / "best.pt")
        if method.ndim != 3:
            raise ValueError(f"{folder / 'best.pt'} holds a {method.ndim}D model, not a 3D one")
        best_iteration = int(load_checkpoint(folder / "best.pt", "cpu")["iteration"])
        size = int(ship["size"][0])
        record = {**ship, "file": f"{name}.pt", "label": label(ship), "checkpoint_iteration": best_iteration,
                  "seeds": [{k: s.get(k) for k in ("seed", "iterations", "finished", "selected_iteration",
                                                   "selected_val", "train_time_s")} for s in others]}
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out / f"{name}.pt", method, None, iteration=best_iteration, history=[], rng=False,
                        extra={"factor": INPUT_SIZE_3D[0] // size, "train_size": [size] * 3,
                               "input_size": list(INPUT_SIZE_3D), "pretrained": json.loads(json.dumps(record))})
        records[name] = record
        _update_manifest(out, name, record)
        log(f"[{name}] exported seed {seed}, step {best_iteration} of {ship['iterations']} -> {out / (name + '.pt')} "
            f"({(out / (name + '.pt')).stat().st_size / 2**20:.1f} MiB)")
    return records


def label(record: dict) -> str:
    """The label of a model's rows in tables: where and how it was trained."""
    s = record["size"][0]
    data = "synthetic brain-like/lung-like volumes only" if not record["data"]["shipped_samples_in_training"] \
        else "synthetic volumes AND deformations of the shipped samples (evaluation on them is on training anatomy)"
    done = "" if record.get("finished") else f", unfinished ({record['iterations']} of {record['budget']} steps)"
    return (f"CPU-trained at {s}^3 from scratch ({record['iterations']} steps, batch {record['batch_size']}; "
            f"{data}){done}")


def _update_manifest(out: Path, name: str, record: dict) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    models = manifest.get("models", {})
    slim = {k: v for k, v in record.items() if k not in ("val_curve", "train_curve")}
    slim["bytes"] = (out / f"{name}.pt").stat().st_size
    models[name] = slim
    manifest = {"format": "deqreg_lite.pretrained_3d", "made_by": "python scripts/train_3d.py",
                "input_size": list(INPUT_SIZE_3D), "device": "cpu", "budget_rule": BUDGET_RULE,
                "note": "small 3D models trained on the CPU from scratch at a reduced size (the paper: 128^3 OASIS "
                        "and 224x192x224 NLST on a GPU); load_pretrained_3d runs each at its training size and "
                        "returns displacements in voxels of the input grid", "models": models}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", nargs="+", default=list(NAMES), choices=list(NAMES), help="models (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to train (default 0; 0 is exported)")
    p.add_argument("--size", type=int, default=SIZE, help=f"internal size per axis, one of {SIZES} (default {SIZE})")
    p.add_argument("--iterations", type=int, default=BUDGET,
                   help=f"optimizer steps of every model: the budget (default {BUDGET})")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop each run of this call after this many minutes (last.pt is saved; rerun to resume)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), help=f"kinds of generated training pairs "
                   f"(default {' '.join(KINDS)}; also: synth)")
    p.add_argument("--train-on-samples", action="store_true",
                   help="also train on deformations of the shipped samples (then evaluations on them are on "
                        "training anatomy; recorded)")
    p.add_argument("--val-every", type=int, default=VAL_EVERY, help=f"validate every N steps (default {VAL_EVERY})")
    p.add_argument("--val-pairs", type=int, default=VAL_PAIRS, help=f"validation pairs (default {VAL_PAIRS})")
    p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                   help=f"write last.pt and print progress every N steps (default {CHECKPOINT_EVERY})")
    p.add_argument("--runs", default=str(ROOT / "runs" / "3d"), help="folder of the training runs (not shipped)")
    p.add_argument("--out", default=None, help=f"folder of the exported checkpoints (default "
                                               f"{checkpoints_dir() / '3d'})")
    p.add_argument("--restart", action="store_true", help="start runs anew instead of resuming their last.pt")
    p.add_argument("--export", action="store_true", help="after training, export each model's best.pt to --out")
    p.add_argument("--export-only", action="store_true", help="only export (seed --seeds[0])")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export runs that stopped before their budget (labelled unfinished)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    try:
        check_settings(args.size, args.kinds, iterations=args.iterations, val_every=args.val_every,
                       val_pairs=args.val_pairs, checkpoint_every=args.checkpoint_every, minutes=args.minutes,
                       train_on_samples=args.train_on_samples)
        if args.threads < 1 or any(s < 0 for s in args.seeds):
            raise ValueError("--threads must be >= 1 and --seeds >= 0")
    except ValueError as exc:
        p.error(str(exc))
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else checkpoints_dir() / "3d"
    names = list(dict.fromkeys(args.names))
    log = functools.partial(print, flush=True)
    if not args.export_only:
        for name in names:
            for seed in args.seeds:
                t0 = time.perf_counter()
                train_3d(name, seed, Path(args.runs), size=args.size, iterations=args.iterations,
                         minutes=args.minutes, kinds=args.kinds, train_on_samples=args.train_on_samples,
                         val_every=args.val_every, val_pairs=args.val_pairs, checkpoint_every=args.checkpoint_every,
                         resume=not args.restart, log=log)
                log(f"[{name} seed {seed}] this call: {time.perf_counter() - t0:.0f} s")
    if args.export or args.export_only:
        export_3d(names, Path(args.runs), out, seed=args.seeds[0], allow_unfinished=args.allow_unfinished, log=log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
