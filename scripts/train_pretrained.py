#!/usr/bin/env python
"""Train the small pretrained 2D checkpoints shipped in data/checkpoints (see data/checkpoints/README.md).

    python scripts/train_pretrained.py                        # every model, the shipped settings
    python scripts/train_pretrained.py --names deqreg --threads 1
    python scripts/train_pretrained.py --names voxelmorph --iterations 50 --out /tmp/ckpt   # a smoke test
    python scripts/train_pretrained.py --evaluate-only        # measure the shipped checkpoints (README numbers)

The models are trained and run at 80 x 96 (half of brain2d's 160 x 192); deqreg_lite.pretrained.load_pretrained
wraps them to take 160 x 192 images. Seeds are fixed (--seed), so a run is repeatable on the same machine/threads.
Without --from-scratch, models whose checkpoint already exists in --out are skipped (quick mode just loads them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from deqreg_lite.config import checkpoints_dir  # noqa: E402
from deqreg_lite.datasets.pairs import PairDataset  # noqa: E402
from deqreg_lite.evaluate import pair_metrics  # noqa: E402
from deqreg_lite.methods import RegistrationLoss, build_method  # noqa: E402
from deqreg_lite.presets import LAM, SETTINGS, TRAIN_KINDS, TRAIN_ORDER  # noqa: E402
from deqreg_lite.pretrained import INPUT_SIZE, PRETRAINED, TRAIN_SIZE, _check_name  # noqa: E402
from deqreg_lite.train import Trainer, load_checkpoint, save_checkpoint  # noqa: E402


SWEEP_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)


# ---------------------------------------------------------------------------------------------------------------
# training (moved here from deqreg_lite.pretrained, which only loads)
# ---------------------------------------------------------------------------------------------------------------
def _quick_val(method: nn.Module, pairs: list) -> dict:
    was = method.training
    method.eval()
    try:
        with torch.no_grad():
            rows = [pair_metrics(s, method(s["fixed"], s["moving"]).disp, with_hd95=False) for s in pairs]
    finally:
        method.train(was)
    mean = lambda k: float(sum(r[k] for r in rows) / len(rows))
    return {"dice": mean("dice"), "folding_pct": mean("folding_pct"), "real_dice": rows[0]["dice"]}


def train_pretrained(names: Sequence[str] = PRETRAINED, out: str | os.PathLike | None = None, *,
                     iterations: Optional[int] = None, seed: int = 0, n_train: int = 4000, n_val: int = 5,
                     val_every: int = 100, log: Callable[[str], None] = print,
                     settings: Optional[dict] = None) -> dict:
    """Train the named models at 80 x 96 and write ``<out>/<name>.pt`` and ``<out>/manifest.json``.

    Each method is trained on generated ``PairDataset("train", n_train, TRAIN_SIZE, kinds=TRAIN_KINDS)`` pairs
    with AdamW and ``RegistrationLoss(lam=LAM)``, at the learning rates and iteration counts of ``SETTINGS``
    (deviations from the paper: lr 1e-3, not 1e-4, and far fewer iterations, for a CPU; the warm starts and the
    early stop are explained in data/checkpoints/README.md).

    Args:
        names: which models (in this order; a model with ``init`` in its settings needs that checkpoint in
            ``out`` first).
        out: folder (default :func:`deqreg_lite.config.checkpoints_dir`).
        iterations: override every model's iteration count (e.g. for a smoke test).
        seed: seeds the initialisation (``torch.manual_seed``) and the trainer's data order.
        n_train: size of the generated training set (``kinds=TRAIN_KINDS``, train seeds).
        n_val: validation pairs during training (the real pair at 80 x 96 plus held-out generated ones).
        val_every: iterations between validations (logged and stored in the record).
        log: where progress lines go.
        settings: override :data:`SETTINGS` entries (``{name: {...}}``).
    Returns:
        ``{name: record}`` (the records also stored in the checkpoints and the manifest).
    """
    out = Path(out) if out is not None else checkpoints_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        _check_name(name)
    train = PairDataset("train", n_train, TRAIN_SIZE, kinds=TRAIN_KINDS, seed=seed)
    val_ds = PairDataset("val", n_val, TRAIN_SIZE)
    val = [val_ds[i] for i in range(len(val_ds))]
    loss = RegistrationLoss(lam=LAM)
    records = {}
    for name in names:
        cfg = {**SETTINGS[name], **((settings or {}).get(name, {}))}
        its = int(iterations if iterations is not None else cfg["iterations"])
        torch.manual_seed(seed)
        method = build_method(name, 2, **cfg["kwargs"])
        init = cfg.get("init")
        if init:
            src = load_checkpoint(out / f"{init}.pt", "cpu", name=init)
            method.load_state_dict({k: v.float() for k, v in src["model"].items()})
            log(f"[{name}] warm start from {init}.pt")
        trainer = Trainer(method, loss, train, None, lr=cfg["lr"], iterations=its, log_every=25, seed=seed,
                          device="cpu", progress=False)
        vals = [{"iteration": 0, **_quick_val(method, val)}]
        log(f"[{name}] it 0 val {vals[-1]}")
        t0 = time.perf_counter()
        while trainer.iteration < its:
            trainer.fit(min(its, trainer.iteration + val_every))
            train_rows = [r for r in trainer.history if r.get("split") == "train"][-4:]
            tl = sum(r["loss"] for r in train_rows) / max(1, len(train_rows))
            vals.append({"iteration": trainer.iteration, "time_s": time.perf_counter() - t0, "train_loss": tl,
                         **_quick_val(method, val)})
            log(f"[{name}] it {trainer.iteration} {vals[-1]['time_s']:.0f}s loss {tl:.4f} val dice "
                f"{vals[-1]['dice']:.4f} real {vals[-1]['real_dice']:.4f} fold {vals[-1]['folding_pct']:.3f}%")
            if not math.isfinite(tl):
                raise RuntimeError(f"{name}: training loss became {tl}")
        elapsed = time.perf_counter() - t0
        record = {"name": name, "config": method.config(), "iterations": its, "lr": cfg["lr"], "weight_decay": 1e-2,
                  "lam": LAM, "loss": repr(loss), "batch_size": 1, "seed": seed, "train_size": list(TRAIN_SIZE),
                  "input_size": list(INPUT_SIZE), "factor": 2, "train_kinds": list(TRAIN_KINDS),
                  "n_train": n_train, "init": init or None, "train_time_s": round(elapsed, 1),
                  "threads": torch.get_num_threads(), "val_during_training": vals,
                  "final_val_dice": vals[-1]["dice"], "final_val_folding_pct": vals[-1]["folding_pct"],
                  "final_real_dice": vals[-1]["real_dice"], "torch_version": str(torch.__version__)}
        method.eval()
        save_checkpoint(out / f"{name}.pt", method, None, iteration=its, history=[], rng=False,
                        extra={"factor": 2, "pretrained": json.loads(json.dumps(record))})
        records[name] = record
        _update_manifest(out, name, record)
        log(f"[{name}] saved {out / f'{name}.pt'} ({elapsed:.0f} s)")
    return records


def _update_manifest(out: Path, name: str, record: dict) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    models = manifest.get("models", {})
    slim = {k: v for k, v in record.items() if k != "val_during_training"}
    slim["file"] = f"{name}.pt"
    slim["bytes"] = (out / f"{name}.pt").stat().st_size
    models[name] = slim
    manifest = {**{k: v for k, v in manifest.items() if k != "models"},
                "format": "deqreg_lite.pretrained", "made_by": "python scripts/train_pretrained.py",
                "internal_size": list(TRAIN_SIZE), "input_size": list(INPUT_SIZE),
                "note": "models run at 80x96 internally (HalfResolution wrapper); lr 1e-3 (paper 1e-4) and lam 1 "
                        "(voxel units) are deliberate deviations for a CPU budget",
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
    p.add_argument("--names", nargs="+", default=list(TRAIN_ORDER), choices=list(PRETRAINED),
                   help="models to train, in this order (default: all, deqreg12 before deqreg)")
    p.add_argument("--iterations", type=int, default=None, help="override every model's iteration count")
    p.add_argument("--out", default=None, help=f"output folder (default {checkpoints_dir()})")
    p.add_argument("--from-scratch", action="store_true",
                   help="retrain even when a checkpoint exists (default: skip existing ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is fastest for these small models on a busy machine)")
    p.add_argument("--evaluate", action="store_true",
                   help="after training, measure every checkpoint at 160x192 (written to evaluation.json)")
    p.add_argument("--evaluate-only", action="store_true", help="only measure the existing checkpoints")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else checkpoints_dir()
    names = list(dict.fromkeys(args.names))  # the order given (a warm-started model after its source)
    if not args.from_scratch:
        skipped = [n for n in names if (out / f"{n}.pt").is_file()]
        if skipped:
            print(f"skipping existing checkpoints {skipped} (pass --from-scratch to retrain)")
        names = [n for n in names if n not in skipped]
    if names and not args.evaluate_only:
        train_pretrained(names, out, iterations=args.iterations, seed=args.seed,
                         log=lambda s: print(s, flush=True))
    if args.evaluate or args.evaluate_only:
        res = evaluate_checkpoints(out)
        (out / "evaluation.json").write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
