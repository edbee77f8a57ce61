"""Command line: ``python -m deqreg_lite demo`` (more commands arrive with the learned methods)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from .classical import register
    from .config import by_mode, seed_everything
    from .datasets import load_sample
    from .evaluate import format_table, pair_metrics
    from .viz import registration_figure

    seed_everything(args.seed)
    sample = load_sample(args.sample)
    iterations = args.iterations or by_mode(quick=60, default=150)
    print(f"deqreg_lite demo: registration of the shipped '{args.sample}' pair "
          f"{tuple(sample['fixed'].shape[2:])}, {sample['ids'][1]} -> {sample['ids'][0]}")
    print(f"  optimizer={args.optimizer} lam={args.lam} iterations={iterations} levels={args.levels}")
    zero = torch.zeros(1, sample["fixed"].dim() - 2, *sample["fixed"].shape[2:])
    rows = {"identity": {**pair_metrics(sample, zero), "time_s": 0.0}}
    t0 = time.perf_counter()
    result = register(sample["fixed"], sample["moving"], lam=args.lam, iterations=iterations,
                      optimizer=args.optimizer, lr=args.lr, levels=args.levels, progress=not args.no_progress)
    rows["classical GD"] = {**pair_metrics(sample, result.disp), "time_s": time.perf_counter() - t0}
    learned = [] if args.sample != "brain2d" else [m for m in args.methods.split(",") if m]
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
    gain = 100 * (rows["classical GD"]["dice"] - rows["identity"]["dice"])
    print(f"\nmean Dice {rows['identity']['dice']:.3f} -> {rows['classical GD']['dice']:.3f} "
          f"(+{gain:.1f} points); SDlogJ uses the Learn2Reg convention (sdlogj_plain: "
          f"{rows['classical GD']['sdlogj_plain']:.3f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = registration_figure(sample["fixed"], sample["moving"], result.disp,
                              title=f"classical registration, Dice {rows['classical GD']['dice']:.3f}")
    fig.savefig(out, dpi=110)
    print(f"figure saved to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deqreg_lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="register the shipped 2D brain pair and print a metrics table")
    demo.add_argument("--sample", default="brain2d", choices=["brain2d", "brain3d"])
    demo.add_argument("--optimizer", default="adam", choices=["adam", "gd"])
    demo.add_argument("--lam", type=float, default=3.0, help="diffusion weight (displacements in voxels)")
    demo.add_argument("--lr", type=float, default=None, help="step size (default: the optimizer's default)")
    demo.add_argument("--iterations", type=int, default=None, help="per resolution level; default 150, or 60 in quick mode")
    demo.add_argument("--levels", type=int, default=2, help="resolution levels")
    demo.add_argument("--methods", default="voxelmorph,unrolling,gradirn,riir,deqreg12,deqreg",
                      help="pretrained learned methods to add to the table (comma-separated; '' for none)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="outputs/demo.png", help="where to save the figure")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
