"""Command line: ``python -m deqreg_lite demo | train | evaluate``.

* ``demo``: register the shipped 2D brain pair (classical and pretrained methods) and print a metrics table.
* ``train``: train a learned method with the paper's settings per dataset (:data:`PRESETS`), checkpoints in
  ``--out`` (``last.pt``, ``best.pt``, ``log.jsonl``, ``run.json``), ``--resume`` from ``OUT/last.pt``; ends with a
  Table 1 row on the validation pairs. ``--amp {off,bf16,fp16,auto}``: mixed precision (default ``auto``: bf16 on
  a CUDA GPU that supports it, else fp16; float32 on the CPU; ``--resume`` keeps the run's mode). Runs
  data-parallel under ``torchrun`` (:mod:`deqreg_lite.distributed`).
* ``evaluate``: a checkpoint on a dataset's evaluation pairs, printed (and saved) as a markdown Table 1.

Every bad argument (a number out of range, a non-number, an unknown method, dataset, device or path) ends with
``error: ...`` on stderr and exit code 2, never a traceback; ``0`` is never read as "the default" (where 0 has a
meaning, the help says it; elsewhere it is refused). ``train`` refuses a run folder that holds an earlier run
unless ``--resume`` or ``--overwrite``; Ctrl-C saves ``last.pt`` and exits with code 130 and the command to resume;
a diverging run ends with ``error: training diverged ...`` and exit code 1.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

__all__ = ["main"]


# ---------------------------------------------------------------------------------------------------------------
# argument types: a bad value is an argparse error (``error: argument --x: ...``, exit code 2)
# ---------------------------------------------------------------------------------------------------------------
def _int_type(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return integer


def _float_type(minimum: float, strict: bool):
    """An argparse type: a finite number > ``minimum`` (``strict``) or >= ``minimum``."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {minimum:g}, "
                                             f"got {text}")
        return value

    return number


def _device_type(text: str) -> str:
    """An argparse type: a torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (try cpu or cuda)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (try cpu or cuda)")
    return text


def _unit_interval(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = _float_type(0.0, strict=True)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


_POS_INT, _NONNEG_INT = _int_type(1), _int_type(0)
_POS_FLOAT, _NONNEG_FLOAT = _float_type(0.0, strict=True), _float_type(0.0, strict=False)


def _demo(args: argparse.Namespace) -> int:
    try:
        return _demo_run(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


#: the demo's row name for each ``--optimizer``.
_OPTIMIZER_NAMES = {"adam": "Adam", "gd": "GD"}


def _demo_run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from .classical import register
    from .config import by_mode, seed_everything
    from .datasets import load_sample
    from .evaluate import format_table, pair_metrics
    from .viz import registration_figure

    from .pretrained import PRETRAINED

    learned = [] if args.sample != "brain2d" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in learned if m not in PRETRAINED]
    if unknown:
        raise CLIError(f"--methods: unknown pretrained method(s) {unknown}; choose from {list(PRETRAINED)}")
    fig_path = Path(args.out)
    if fig_path.is_dir():
        raise CLIError(f"--out {fig_path} is a folder; give a file name such as {fig_path / 'demo.png'}")
    try:
        fig_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out: cannot create the folder {fig_path.parent} ({e.strerror or e})") from e
    seed_everything(args.seed)
    sample = load_sample(args.sample)
    iterations = args.iterations if args.iterations is not None else by_mode(quick=60, default=150)
    print(f"deqreg_lite demo: registration of the shipped '{args.sample}' pair "
          f"{tuple(sample['fixed'].shape[2:])}, {sample['ids'][1]} -> {sample['ids'][0]}")
    print(f"  optimizer={args.optimizer} lam={args.lam} iterations={iterations} levels={args.levels}")
    zero = torch.zeros(1, sample["fixed"].dim() - 2, *sample["fixed"].shape[2:])
    rows = {"identity": {**pair_metrics(sample, zero), "time_s": 0.0}}
    t0 = time.perf_counter()
    result = register(sample["fixed"], sample["moving"], lam=args.lam, iterations=iterations,
                      optimizer=args.optimizer, lr=args.lr, levels=args.levels, progress=not args.no_progress)
    classical = f"classical ({_OPTIMIZER_NAMES[args.optimizer]})"  # name what runs: Adam or plain gradient descent
    rows[classical] = {**pair_metrics(sample, result.disp), "time_s": time.perf_counter() - t0}
    if learned:
        from .pretrained import load_pretrained

        print(f"  learned methods (pretrained, 80x96 internally): {', '.join(learned)}")
    for name in learned:
        model = load_pretrained(name)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(sample["fixed"], sample["moving"])
        rows[name] = {**pair_metrics(sample, out.disp), "time_s": time.perf_counter() - t0}
    names = sample.get("label_names", {})
    cols = ["dice"] + [f"dice_{l}" for l in sample["labels"]] + ["hd95", "folding_pct", "sdlogj", "time_s"]
    headers = {"dice": "Dice", "hd95": "HD95 mm", "folding_pct": "fold %", "sdlogj": "SDlogJ",
               "time_s": "time s", **{f"dice_{l}": f"Dice {names.get(l, l)}" for l in sample["labels"]}}
    print()
    print(format_table(rows, cols, headers))
    gain = 100 * (rows[classical]["dice"] - rows["identity"]["dice"])
    print(f"\nmean Dice {rows['identity']['dice']:.3f} -> {rows[classical]['dice']:.3f} "
          f"(+{gain:.1f} points); SDlogJ uses the Learn2Reg convention (sdlogj_plain: "
          f"{rows[classical]['sdlogj_plain']:.3f})")
    fig = registration_figure(sample["fixed"], sample["moving"], result.disp,
                              title=f"{classical} registration, Dice {rows[classical]['dice']:.3f}")
    try:
        fig.savefig(fig_path, dpi=110)
    except (OSError, ValueError) as e:  # unwritable, or an extension matplotlib does not know
        raise CLIError(f"--out: cannot save the figure to {fig_path} ({e})") from e
    print(f"figure saved to {fig_path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# train / evaluate
# ---------------------------------------------------------------------------------------------------------------
#: The per-dataset defaults of ``train`` and ``evaluate`` live in :mod:`deqreg_lite.presets` (re-exported here).
from .presets import DATASET_DIRS, PRESETS  # noqa: E402

#: The method options the command line has flags for (the ``dest`` of each flag is the constructor's keyword).
METHOD_OPTIONS = ("T", "S", "gamma", "K", "tau", "tol", "solver", "checkpoint_phantom")


class CLIError(Exception):
    """A user-facing error: printed as ``error: ...`` without a traceback, exit code 2."""


def _data_root(dataset: str, data_dir: str | None) -> Path:
    from .config import data_dir as default_data_dir

    root = Path(data_dir).expanduser() if data_dir else default_data_dir() / DATASET_DIRS[dataset]
    if not root.is_dir():
        raise CLIError(f"the {dataset} data folder {root} does not exist: download the dataset (where to get it and "
                       f"the folder layout: README.md, 'Real datasets', and the docstring of "
                       f"deqreg_lite.datasets.{dataset}) and pass --data-dir, or set DEQREG_DATA_DIR (default "
                       f"{default_data_dir() / DATASET_DIRS[dataset]})")
    return root


def _dataset(args: argparse.Namespace, split: str, n: int | None = None):
    """The ``split`` pairs of ``args.dataset`` at ``args.size`` (loaders are imported lazily)."""
    size = tuple(args.size)
    if args.dataset == "sample":
        from .datasets import brain_pairs

        if split == "train":
            return brain_pairs("train", n if n is not None else PRESETS["sample"]["train_pairs"], size,
                               kinds=("brain", "inter"), seed=args.seed)
        return brain_pairs(split, n if n is not None else PRESETS["sample"]["val_pairs"], size)
    root = _data_root(args.dataset, args.data_dir)
    try:
        if args.dataset == "oasis":
            from .datasets.oasis import OASIS

            kw = {"layout": args.layout} if getattr(args, "layout", None) else {}
            data = OASIS(root, ndim=3, size=size, split=split, **kw)
        else:
            from .datasets.nlst import NLST

            data = NLST(root, split=split, size=size)
    except ImportError as e:
        raise CLIError(f"the {args.dataset} loader is not available ({e})") from e
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise CLIError(f"cannot load {args.dataset} from {root}: {e}") from e
    if n is not None and n < len(data):
        import torch.utils.data

        data = torch.utils.data.Subset(data, range(n))
    return data


def _method_flags() -> list[tuple]:
    """``(option, argparse type or choices, help)`` of each method option in :data:`METHOD_OPTIONS` (the names of the
    constructors' keywords and of the paper's symbols)."""
    from .solvers import SOLVERS

    return [
        ("T", _POS_INT, "iterations, >= 1 (unrolling, riir; deqreg, deqreg12: most solver steps, 48 / 12)"),
        ("S", _NONNEG_INT, "DEQ methods: trajectory states in the Eq. 9 correction loss, >= 0 (deqreg: 3; 0: none)"),
        ("gamma", _NONNEG_FLOAT, "DEQ methods: the weight of the state terms in Eq. 9, >= 0 (0.5)"),
        ("K", _POS_INT, "DEQ methods: phantom-gradient steps (Eq. 7-8), >= 1 (3)"),
        ("tau", _unit_interval, "DEQ methods: phantom-gradient damping (Eq. 7), in (0, 1] (0.5)"),
        ("tol", _NONNEG_FLOAT, "DEQ methods: relative tolerance of the fixed-point solve, >= 0 (1e-3)"),
        ("solver", tuple(SOLVERS), "DEQ methods: the fixed-point solver (fixed_point)"),
        ("checkpoint_phantom", bool, "DEQ methods: recompute each phantom step in the backward pass instead of "
                                     "storing it (about 1/3 of the training memory for about 1.2x the step time)"),
    ]


def _method_kwargs(name: str, args: argparse.Namespace) -> dict:
    """The method options given on the command line (``--T``, ``--S``, ...), as constructor keywords.

    An option the method's constructor does not take (``--method gradirn --T 5``) is a :class:`CLIError` (exit
    code 2), as an unknown keyword is a ``TypeError`` everywhere in the library; it is never dropped silently.
    """
    import inspect

    from .methods import METHODS

    params = inspect.signature(METHODS[name].__init__).parameters
    takes = [k for k in METHOD_OPTIONS if k in params]
    given = {k: getattr(args, k) for k in METHOD_OPTIONS if getattr(args, k, None) is not None}
    refused = [k for k in given if k not in params]
    if refused:
        flag = lambda k: "--" + k.replace("_", "-")
        flags = ", ".join(flag(k) for k in refused)
        hint = f"it takes {', '.join(flag(k) for k in takes)}" if takes else "it takes none of the method options"
        raise CLIError(f"{flags}: not an option of {name} ({hint})")
    return given


def _fill_defaults(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.dataset]
    if args.size is None:
        args.size = list(preset["size"])
    if len(args.size) != preset["ndim"]:
        raise CLIError(f"--size needs {preset['ndim']} numbers for {args.dataset}, got {args.size}")
    return preset


def _eval_table_text(tables: dict, reference: str) -> str:
    from .evaluate import table1

    return table1(tables, reference=reference)


def _validate_fn(method, val_data, steps) -> dict:
    """The trainer's validation in ``train``: :func:`deqreg_lite.evaluate.evaluate` without memory and HD95, its
    summary (mean and std of every column)."""
    from .evaluate import evaluate

    return evaluate(method, val_data, steps=steps, memory=False, hd95=False).summary()


def _evaluate_tables(method, pairs, steps, memory: bool, loss_fn=None, disp_dir=None) -> dict:
    from .evaluate import evaluate, identity_method

    t = evaluate(method, pairs, steps=steps, memory=memory, loss_fn=loss_fn, disp_dir=disp_dir)
    return {method.name: t, "identity": evaluate(identity_method, pairs, memory=False)}


def _train(args: argparse.Namespace) -> int:
    import json
    import math

    from . import distributed as D
    from .config import seed_everything
    from .losses import Objective
    from .methods import build_method
    from .train import TrainingDivergedError, existing_run_files

    info = D.init_from_env()
    main_rank = D.is_main()
    say = print if main_rank else (lambda *a, **k: None)
    try:
        preset = _fill_defaults(args)
        out = Path(args.out or f"runs/{args.dataset}-{args.method}")
        last = out / "last.pt"
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out} is a file, not a folder")
        if args.resume and args.overwrite:
            raise CLIError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                           "--overwrite replaces it")
        if args.resume and not last.is_file():
            raise CLIError(f"--resume: no checkpoint at {last}")
        if not args.resume and not args.overwrite:
            found = existing_run_files(out, out / "log.jsonl") + [p for p in [out / "run.json"] if p.is_file()]
            if found:
                raise CLIError(f"{out} already holds a run ({', '.join(p.name for p in found)}): pass --resume to "
                               "continue it, --overwrite to replace it, or another --out")
        train_data = _dataset(args, "train")
        val_n = args.val_pairs if args.val_pairs is not None else preset["val_pairs"]
        val_data = None if val_n == 0 else _dataset(args, preset["eval_split"] if args.dataset == "sample" else
                                                     "val", val_n)
        batch_size = args.batch_size if args.batch_size is not None else preset["batch_size"]
        per_epoch = max(1, math.ceil(len(train_data) / batch_size))
        if args.iterations is not None:
            iterations = args.iterations
        elif args.epochs is not None:
            iterations = args.epochs * per_epoch
        elif preset["iterations"] is not None:
            iterations = preset["iterations"]
        else:
            iterations = preset["epochs"] * per_epoch
        val_every = args.val_every if args.val_every is not None else (
            250 if args.dataset == "sample" else per_epoch)
        lam = args.lam if args.lam is not None else preset["lam"]
        if args.lr is not None:
            lr = args.lr
        elif args.resume:  # keep the run's learning rate (a given --lr replaces it, and is recorded)
            from .train import load_checkpoint

            groups = (load_checkpoint(last, "cpu").get("optimizer") or {}).get("param_groups") or [{}]
            lr = float(groups[0].get("lr", preset["lr"]))
        else:
            lr = preset["lr"]
        if args.amp is not None:
            amp = args.amp
        elif args.resume:  # keep the run's mixed-precision mode (a given --amp replaces it)
            from .train import _checkpoint_amp, load_checkpoint

            amp = _checkpoint_amp(load_checkpoint(last, "cpu").get("trainer")) or "auto"
        else:
            amp = "auto"
        kwargs = _method_kwargs(args.method, args)
        seed_everything(args.seed)
        method = build_method(args.method, preset["ndim"], **kwargs)
        loss_fn = Objective("lncc", "diffusion", lam=lam)
        device = info["device"] if info["device"] is not None else args.device
        trainer = D.DistributedTrainer(
            method, loss_fn, train_data, val_data, lr=lr, batch_size=batch_size, iterations=iterations,
            val_every=val_every, val_steps=args.steps, checkpoint_dir=out,
            checkpoint_every=args.checkpoint_every if args.checkpoint_every is not None else (val_every or None),
            log_every=args.log_every, seed=args.seed, device=device, amp=amp, grad_clip=args.grad_clip,
            progress=not args.no_progress, log_path=out / "log.jsonl", overwrite=args.overwrite,
            validate_fn=_validate_fn)
        if args.resume:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.resume(last)
            for w in caught:  # the lr change is reported in the banner below
                if "with lr=" not in str(w.message):
                    say(f"warning: {w.message}", file=sys.stderr)
            if trainer.iteration > iterations:
                raise CLIError(f"--resume: the checkpoint is at iteration {trainer.iteration}, beyond --iterations "
                               f"{iterations}")
    except (CLIError, ValueError, TypeError) as e:  # ValueError / TypeError: an option a constructor refused
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        D.cleanup()
        return 2
    run = {"dataset": args.dataset, "method": args.method, "method_kwargs": kwargs, "size": list(args.size),
           "data_dir": args.data_dir, "layout": getattr(args, "layout", None), "lam": lam, "lr": lr,
           "batch_size": batch_size, "iterations": iterations, "seed": args.seed, "amp": trainer.amp_mode,
           "world_size": D.world_size(), "val_pairs": val_n}
    lr_note = ""
    if args.resume:
        previous = _read_run(out / "run.json")
        run["resumed_at"] = list(previous.get("resumed_at", [])) + [trainer.iteration]
        run["lr_changes"] = list(trainer.lr_changes)  # {iteration, previous, lr}: every lr a resume applied
        if trainer.lr_changes and trainer.lr_changes[-1]["iteration"] == trainer.iteration:
            lr_note = f" (changed from {trainer.lr_changes[-1]['previous']:g} at iteration {trainer.iteration})"
    say(f"deqreg_lite train: {args.method} {kwargs} on {args.dataset} {tuple(args.size)}, {len(train_data)} training "
        f"pairs, batch {batch_size} x {iterations} iterations ({iterations / per_epoch:.2f} epochs), AdamW lr {lr:g}"
        f"{lr_note}, lambda {lam:g} (voxel units), {D.world_size()} process(es) on {trainer.device}, "
        f"amp {trainer.amp_mode}"
        + (f"; resumed at iteration {trainer.iteration}" if args.resume else ""))
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except KeyboardInterrupt:
        if main_rank:
            print(f"\ninterrupted: {last} holds iteration {_load_iteration(last)}; continue with the same command "
                  "and --resume", file=sys.stderr)
        D.cleanup()
        return 130
    except TrainingDivergedError as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        D.cleanup()
        return 1
    say(f"trained to iteration {trainer.iteration} in {time.perf_counter() - t0:.1f} s; checkpoint {last}, "
        f"log {out / 'log.jsonl'}")
    if main_rank and val_data is not None and not args.no_eval:
        tables = _evaluate_tables(trainer.method, val_data, args.steps, memory=True, loss_fn=loss_fn)
        text = _eval_table_text(tables, args.method)
        (out / "table.md").write_text(text + "\n")
        print()
        print(text)
    D.cleanup()
    return 0


def _read_run(path: Path) -> dict:
    """The run record ``run.json`` ({} when absent or unreadable)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _load_iteration(path: Path) -> int | str:
    """The iteration a checkpoint holds ("none" if it cannot be read)."""
    from .train import load_checkpoint

    try:
        return int(load_checkpoint(path)["iteration"])
    except (OSError, ValueError, KeyError):
        return "none"


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from .losses import Objective
    from .train import load_method

    try:
        ckpt = Path(args.checkpoint)
        if ckpt.is_dir():
            ckpt = ckpt / "last.pt"
        if not ckpt.is_file():
            raise CLIError(f"no checkpoint at {ckpt}")
        run_file = ckpt.parent / "run.json"
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
        args.dataset = args.dataset or run.get("dataset")
        if args.dataset is None:
            raise CLIError(f"--dataset is needed ({run_file} not found)")
        if args.size is None and run.get("dataset") == args.dataset:
            args.size = run.get("size")
        if args.data_dir is None and run.get("dataset") == args.dataset:
            args.data_dir = run.get("data_dir")
        if getattr(args, "layout", None) is None and run.get("dataset") == args.dataset:
            args.layout = run.get("layout")
        args.seed = 0
        preset = _fill_defaults(args)
        if args.out is not None:
            if Path(args.out).is_dir():
                raise CLIError(f"--out {args.out} is a folder; give a file name such as {Path(args.out) / 'table.md'}")
            try:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CLIError(f"--out: cannot create the folder {Path(args.out).parent} ({e.strerror or e})") from e
        if args.disp_dir is not None and preset["ndim"] != 3:
            raise CLIError(f"--disp-dir writes Learn2Reg 3D displacement files; {args.dataset} is "
                           f"{preset['ndim']}D")
        try:
            method = load_method(ckpt, args.device)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e)) from e
        if method.ndim != preset["ndim"]:
            raise CLIError(f"the checkpoint holds a {method.ndim}D {method.name}, {args.dataset} is "
                           f"{preset['ndim']}D")
        split = args.split or preset["eval_split"]
        pairs = _dataset(args, split, args.pairs if args.pairs is not None else preset["val_pairs"])
    except (CLIError, ValueError, TypeError) as e:  # ValueError / TypeError: an option a loader refused
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"deqreg_lite evaluate: {method.name} from {ckpt} on {args.dataset} {split} ({len(pairs)} pairs, "
          f"{tuple(args.size)}), steps={args.steps or method.trained_steps}")
    lam = run.get("lam", PRESETS[args.dataset]["lam"])
    tables = _evaluate_tables(method, pairs, args.steps, memory=not args.no_memory, loss_fn=Objective("lncc", "diffusion", lam=lam),
                              disp_dir=args.disp_dir)
    text = _eval_table_text(tables, method.name)
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"table saved to {out}")
    return 0


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--dataset", choices=sorted(PRESETS), required=required, default=None,
                   help="oasis (3D, 128^3), nlst (3D, 224x192x224) or sample (the shipped 2D brains, for CPU runs)")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $DEQREG_DATA_DIR/OASIS or /NLST, i.e. ~/.deqreg_lite/data/...)")
    p.add_argument("--layout", default=None, help="OASIS folder layout (passed to the OASIS loader)")
    p.add_argument("--size", type=_POS_INT, nargs="+", default=None,
                   help="image size (2 numbers for sample, 3 for oasis/nlst; default per dataset: deqreg_lite.presets)")
    p.add_argument("--device", type=_device_type, default=None,
                   help="default: cuda when available, else cpu (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--steps", type=_POS_INT, default=None,
                   help="inference steps, >= 1 (default: the method's trained count)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deqreg_lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="register the shipped 2D brain pair and print a metrics table")
    demo.add_argument("--sample", default="brain2d", choices=["brain2d", "brain3d"])
    demo.add_argument("--optimizer", default="adam", choices=["adam", "gd"])
    demo.add_argument("--lam", type=_NONNEG_FLOAT, default=3.0,
                      help="diffusion weight, >= 0 (displacements in voxels)")
    demo.add_argument("--lr", type=_POS_FLOAT, default=None, help="step size, > 0 (default: the optimizer's default)")
    demo.add_argument("--iterations", type=_NONNEG_INT, default=None,
                      help="per resolution level (0: no optimisation, the identity); default 150, or 60 in quick mode")
    demo.add_argument("--levels", type=_POS_INT, default=2, help="resolution levels, >= 1")
    demo.add_argument("--methods", default="voxelmorph,unrolling,gradirn,riir,deqreg12,deqreg",
                      help="pretrained learned methods to add to the table (comma-separated; '' for none)")
    demo.add_argument("--seed", type=_NONNEG_INT, default=0)
    demo.add_argument("--out", default="outputs/demo.png", help="where to save the figure")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=_demo)

    from .methods import METHODS

    train = sub.add_parser("train", help="train a learned method (paper settings per dataset; torchrun for DDP)",
                           description="Train a learned method. Defaults per dataset: PRESETS in "
                                       "deqreg_lite/presets.py.")
    _add_data_args(train, required=True)
    train.add_argument("--method", required=True, choices=sorted(METHODS))
    its = train.add_mutually_exclusive_group()
    its.add_argument("--iterations", type=_NONNEG_INT, default=None,
                     help="total iterations (optimizer steps; 0: none, the untrained model is saved and evaluated)")
    its.add_argument("--epochs", type=_NONNEG_INT, default=None,
                     help="epochs over the training pairs (paper: 100; 0: none)")
    valued = [  # (flag, type, default, help), in the order --help lists them
        ("--batch-size", _POS_INT, None, "global batch, >= 1 (split across torchrun ranks)"),
        ("--lr", _POS_FLOAT, None, "AdamW learning rate, > 0 (paper: 1e-4). With --resume: default the run's; a new "
                                   "value is applied from the checkpoint's iteration on and recorded in run.json "
                                   "(lr_changes)"),
        ("--lam", _NONNEG_FLOAT, None, "diffusion weight in voxel units, >= 0 (default per dataset)"),
        ("--out", str, None, "run folder (default runs/DATASET-METHOD)"),
        ("--seed", _NONNEG_INT, 0, None),
        ("--grad-clip", _POS_FLOAT, None, "clip the gradient norm to this, > 0"),
        ("--val-every", _NONNEG_INT, None, "validate every N iterations (default: each epoch; 250 for sample; 0: only "
                                           "at the end)"),
        ("--val-pairs", _NONNEG_INT, None, "validation pairs (default: all; 9 for sample; 0: no validation)"),
        ("--checkpoint-every", _NONNEG_INT, None, "write last.pt every N iterations (default: --val-every; 0: only "
                                                  "around validations and at the end)"),
        ("--log-every", _POS_INT, 10, "iterations per log row, >= 1"),
    ]
    for flag, kind, default, text in valued:
        train.add_argument(flag, type=kind, default=default, help=text)
    switches = [
        ("--resume", "continue from OUT/last.pt"),
        ("--overwrite", "replace the run in OUT (refused without it: last.pt, best.pt, log.jsonl, run.json)"),
        ("--no-eval", "skip the final Table 1 row"),
        ("--no-progress", "hide the progress bar"),
    ]
    for flag, text in switches:
        train.add_argument(flag, action="store_true", help=text)
    from .train import AMP_CHOICES

    train.add_argument("--amp", choices=AMP_CHOICES, nargs="?", const="auto", default=None,
                       help="mixed precision of the training steps: bf16 (CUDA, or the CPU), fp16 (CUDA, with loss "
                            "scaling), off (float32), auto (the default: bf16 on a CUDA GPU that supports it, else "
                            "fp16; off on the CPU). A bare --amp is auto. With --resume: default the run's mode")
    opts = train.add_argument_group(
        "method options", "passed to the method's constructor; an option the method does not take is an error")
    for name, kind, text in _method_flags():
        if kind is bool:  # a switch: --checkpoint-phantom (None when absent, so it is only passed when given)
            opts.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_const", const=True,
                              default=None, help=text)
            continue
        opts.add_argument(f"--{name}", default=None, help=text,
                          **({"choices": kind} if isinstance(kind, (tuple, list)) else {"type": kind}))
    train.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint and print a Table 1 (markdown)")
    ev.add_argument("--checkpoint", required=True, help="a .pt file, or a run folder holding last.pt")
    _add_data_args(ev, required=False)
    ev.add_argument("--split", default=None, help="default: val (oasis, nlst), test (sample)")
    ev.add_argument("--pairs", type=_POS_INT, default=None, help="number of pairs, >= 1 (default: all; 9 for sample)")
    ev.add_argument("--no-memory", action="store_true", help="skip the training-step memory/time measurement")
    ev.add_argument("--out", default=None, help="also write the table to this markdown file")
    ev.add_argument("--disp-dir", default=None,
                    help="also write Learn2Reg submission files disp_XXXX_YYYY.nii.gz (3D datasets) into this folder")
    ev.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # outside training (which saves and says how to resume): just stop, no traceback
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
