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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from deqreg_lite.pretrained import PRETRAINED, TRAIN_ORDER, checkpoints_dir, train_pretrained  # noqa: E402


SWEEP_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)


def evaluate_checkpoints(out: Path, n_val: int = 9, sweep_names=("unrolling", "deqreg", "deqreg12", "riir",
                                                                   "gradirn")) -> dict:
    """Measure the checkpoints in ``out`` at 160 x 192 through load_pretrained: the real brain2d pair and the
    held-out val pairs (PairDataset("val", n_val), item 0 being the real pair). Returns a dict of numbers and
    prints the done-when checks."""
    import os

    from deqreg_lite.datasets.pairs import PairDataset
    from deqreg_lite.evaluate import evaluate, pair_metrics, step_sweep
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
        import json

        res = evaluate_checkpoints(out)
        (out / "evaluation.json").write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
