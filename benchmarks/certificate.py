"""The convergence certificate of the shipped DEQ models on the shipped ``brain2d`` pair: residual, convergence and
the spectral radius of the update map's Jacobian at the returned field.

What it measures, for each of ``load_pretrained("deqreg")`` and ``("deqreg12")`` (eval mode, through their
``HalfResolution`` wrapper, so at the models' 80x96):

* **the trained solve** (``steps=None``: ``T`` steps at most, tolerance ``model.tol``, the lowest-residual
  iterate): solver steps, network calls, the final relative residual ``||g(phi) - phi|| / ||g(phi)||`` of the
  returned field against the tolerance, ``converged``, the time, and the Dice (mean over CSF/GM/WM) and folding %;
* **the spectral-radius estimate** of ``dg/dphi`` at the returned field (``g(phi) = phi + UNet([If, Im o phi,
  phi])``, :meth:`DEQReg.update_map`), by :func:`deqreg_lite.deq.spectral_radius` with ``--iters`` (60)
  Jacobian-vector products: the norm growth ratio after 20, 30 (what ``forward(..., certificate=True)`` reports)
  and 60 products (one run; the first 30 are exactly ``certificate=True``'s), the signed Rayleigh quotient,
  whether it settled (changes <= 1e-3 over the last 3 products), and the time; and ``forward(...,
  certificate=True)``'s total time.

Below 1 the map is a contraction near the returned field (fixed-point iteration is attracted there); above 1 it is
not. These are the shipped, not yet retrained models: the "before" of the retraining issue.

    python benchmarks/certificate.py            # ~15 s on one CPU thread; writes results/certificate.{json,md}
    python benchmarks/certificate.py --quick    # smoke run: deqreg12 only, 10 products, to a temporary folder

Options: ``--methods`` (comma-separated, default ``deqreg,deqreg12``), ``--iters`` (60), ``--threads`` (1),
``--device`` (``cpu``), ``--out``.
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

import deqreg_lite
from deqreg_lite.datasets import load_sample
from deqreg_lite.deq import spectral_radius
from deqreg_lite.methods.deqreg import CERTIFICATE_ITERS
from deqreg_lite.metrics import pair_metrics
from deqreg_lite.pretrained import load_pretrained

from _load import LoadMeter  # benchmarks/_load.py (the script's folder is on sys.path)


def measure(name: str, sample: dict, iters: int, device: str) -> dict:
    wrapper = load_pretrained(name).to(device).eval()
    model = wrapper.method  # the DEQReg inside HalfResolution
    fixed, moving = sample["fixed"].to(device), sample["moving"].to(device)
    f, m = wrapper.downsample(fixed, moving)
    with torch.no_grad():
        model(f, m)  # warm-up
        t0 = time.perf_counter()
        res = model(f, m)
        solve_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cert = model(f, m, certificate=True)
        cert_s = time.perf_counter() - t0
        full = wrapper(fixed, moving)
    assert torch.equal(res.disp, cert.disp)
    t0 = time.perf_counter()
    rho = spectral_radius(model.update_map(f, m), res.disp, iters=iters)
    rho_s = time.perf_counter() - t0
    at = lambda k: float(rho.trace[min(k, iters) - 1, 0])
    metrics = pair_metrics(sample, full.disp.cpu(), with_hd95=False)
    info = res.info
    return {"method": name, "internal_size": list(f.shape[2:]), "T": model.T, "tol": model.tol,
            "solver": model.solver, "steps": info.steps, "nfe": info.nfe,
            "residual": float(info.sample_residual[0]), "residual_over_tol": float(info.sample_residual[0]) / model.tol,
            "converged": bool(info.sample_converged[0]), "diverged": bool(info.sample_diverged[0]),
            "best_step": int(info.sample_best_step[0]), "solve_s": solve_s,
            "dice": float(metrics["dice"]), "folding_pct": float(metrics["folding_pct"]),
            "rho_20": at(20), "rho_30": at(30), f"rho_{iters}": at(iters), "rho": float(rho.value[0]),
            "rayleigh": float(rho.rayleigh[0]), "settled": bool(rho.settled[0]), "iters": iters,
            "rho_s": rho_s, "rho_s_per_product": rho_s / iters,
            "certificate": {"spectral_radius": cert.info["spectral_radius"][0],
                            "settled": cert.info["spectral_settled"][0], "iters": cert.info["spectral_iters"],
                            "forward_s": cert_s},
            "rho_trace": rho.trace[:, 0].tolist(), "rayleigh_trace": rho.rayleigh_trace[:, 0].tolist()}


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Convergence certificate of the shipped DEQ models", "",
             f"deqreg_lite {meta['version']}, torch {meta['torch']}, {meta['threads']} thread(s), {meta['device']}, "
             f"{meta['platform']}, {meta['date']}; shipped `brain2d` pair (160x192, the models run at 80x96) and "
             f"checkpoints (not yet retrained). Load: {meta['load_cores']} other core(s) busy.", "",
             "Trained solve (`steps=None`) and the spectral-radius estimate of `dg/dphi` at the returned field "
             "(power iteration, norm growth ratio `||J v|| / ||v||` after 20, 30 and "
             f"{result['iters']} Jacobian-vector products; `rayleigh`: the signed Rayleigh quotient).", "",
             "| method | T | steps | residual | tol | converged | solve (s) | Dice | fold (%) | rho@20 | rho@30 | "
             f"rho@{result['iters']} | rayleigh | settled | rho time (s) | certificate=True (s) |",
             "|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['T']} | {r['steps']} | {r['residual']:.2e} | {r['tol']:g} | "
                     f"{'yes' if r['converged'] else 'no'} | {r['solve_s']:.2f} | {r['dice']:.3f} | "
                     f"{r['folding_pct']:.3f} | {r['rho_20']:.4f} | {r['rho_30']:.4f} | "
                     f"{r['rho_' + str(result['iters'])]:.4f} | {r['rayleigh']:+.4f} | "
                     f"{'yes' if r['settled'] else 'no'} | {r['rho_s']:.2f} | {r['certificate']['forward_s']:.2f} |")
    lines += ["", "Above 1 the update map is not a contraction at the returned field: fixed-point iteration is not "
              "attracted there, and more steps move the field away. A negative `rayleigh` of the same size as rho "
              "means the dominant eigenvalue is real and negative (the iteration oscillates).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: deqreg12 only, 10 products, to a temp folder")
    ap.add_argument("--methods", default="deqreg,deqreg12", help="comma-separated shipped DEQ names")
    ap.add_argument("--iters", type=int, default=60, help="Jacobian-vector products (default 60)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results; a temporary folder with --quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = ["deqreg12"] if args.quick else [m.strip() for m in args.methods.split(",") if m.strip()]
    iters = 10 if args.quick else args.iters
    if iters < 30:
        print(f"note: --iters {iters} < {CERTIFICATE_ITERS}: rho@30 is rho@{iters}")
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    sample = load_sample("brain2d")
    start = time.perf_counter()
    rows = []
    with LoadMeter() as load:
        for name in methods:
            row = measure(name, sample, iters, args.device)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_trace")}), flush=True)
    result = {"iters": iters, "rows": rows}
    result["meta"] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      "version": deqreg_lite.__version__, "torch": torch.__version__,
                      "platform": platform.platform(), "python": sys.version.split()[0],
                      "threads": torch.get_num_threads(), "device": args.device,
                      "load_cores": None if load.cores is None else round(load.cores, 2),
                      "total_seconds": round(time.perf_counter() - start, 1)}
    (out / "certificate.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "certificate.md").write_text(markdown(result))
    print(f"wrote {out / 'certificate.json'} and certificate.md ({result['meta']['total_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
