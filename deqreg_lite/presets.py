"""Per-dataset settings, shared by the command line (``python -m deqreg_lite train | evaluate``) and the script that
trains the shipped checkpoints (``scripts/train_pretrained.py``). Floor 5: nothing in the library imports it.

* :data:`PRESETS`: the defaults of ``train`` and ``evaluate`` per dataset (every entry can be overridden on the
  command line). ``oasis`` / ``nlst`` follow the paper (section 3): 128^3 and 224x192x224 volumes, AdamW lr 1e-4,
  100 epochs, batch 1. ``lam`` is in deqreg_lite's units (displacements in voxels, diffusion = mean squared forward
  difference): 1.0 for OASIS, not the paper's 0.1, because 0.1 in voxel units let models collapse (25-28% folded
  voxels; see :class:`deqreg_lite.losses.Objective`); 1.25 for NLST keeps the paper's NLST/OASIS ratio
  (0.125 / 0.1). ``sample`` = generated 2D pairs around the shipped brain slices, for CPU smoke runs, at the size,
  learning rate, ``lam`` and iteration count of the shipped 2D models (below).
* :data:`DATASET_DIRS`: the folder of each dataset under ``$DEQREG_DATA_DIR``.
* The shipped 2D checkpoints (``data/checkpoints``): :data:`SETTINGS` (per method: constructor options, iterations,
  AdamW learning rate, optional warm start), :data:`TRAIN_ORDER`, :data:`TRAIN_KINDS`, :data:`LAM`; their sizes
  :data:`TRAIN_SIZE` / :data:`INPUT_SIZE` come from :mod:`deqreg_lite.pretrained`, which needs them to load the models.
"""
from __future__ import annotations

from .pretrained import INPUT_SIZE, PRETRAINED, TRAIN_SIZE

__all__ = ["PRESETS", "DATASET_DIRS", "SETTINGS", "TRAIN_ORDER", "TRAIN_KINDS", "LAM", "PRETRAINED_LR",
           "PRETRAINED_BUDGET", "PRETRAINED_BATCH", "DEQ_RECIPE", "DEQ_STAGES", "DEQ12_STAGES", "SEEDS", "SELECTION", "TRAIN_SIZE",
           "INPUT_SIZE",
           "PRETRAINED"]

# ----------------------------------------------------------------------------------- the shipped 2D checkpoints
#: the order in which the script trains them (every one from scratch: no order dependence).
TRAIN_ORDER = ("voxelmorph", "unrolling_ml", "unrolling", "gradirn", "riir", "deqreg12", "deqreg")
#: kinds of training pairs (``"synth"`` is left out: its two images get independent random intensities, which LNCC
#: training at this budget did not learn from).
TRAIN_KINDS = ("brain", "inter")
#: the diffusion weight of their training loss, in voxel units.
LAM = 1.0
#: their AdamW learning rate (the paper: 1e-4; 1e-3 for a CPU budget), constant (no schedule), for every model.
PRETRAINED_LR = 1e-3
#: optimizer steps of every model (batch :data:`PRETRAINED_BATCH`): one budget for all, from scratch.
PRETRAINED_BUDGET = 5000
#: pairs per optimizer step.
PRETRAINED_BATCH = 1
#: the DEQ recipe of the retrained DEQReg and DEQReg-12, stage 1 (from step 0; ``benchmarks/recipes.py``, ``results/recipes.md``):
#: the forward solve iterates the damped map that the phantom gradient unrolls (``damping = tau = 0.5``); a fixed leak
#: (``g = phi + UNet(...) - 0.5 phi``) makes the untrained map a contraction; a Hutchinson Jacobian penalty on the
#: iteration map at ``phi*`` (weight 0.3) keeps its mean squared singular value small while it learns (every run
#: without it, and every run with only the aimed hinge below from step 0, sat at identity level for hundreds of
#: steps); and **the unwarped moving image is injected** (``inject_moving``: the U-Net sees ``[If, Im o phi, phi,
#: Im]``, a deviation from the paper's ``[If, Im o phi, phi]``). Why: at a fixed point ``Im o phi* ~ If``, so the
#: paper's inputs say nothing about ``phi*`` beyond ``phi*`` itself; in the directions the images cannot see (the
#: aperture problem: motion along an edge or inside uniform tissue) the map must then reproduce ``phi`` with gain 1,
#: an eigenvalue of 1 that no penalty can remove without pulling ``phi*`` towards zero. Measured with the paper's
#: input (stage 1, step 1800, 3 validation pairs): a real, positive dominant eigenvalue of 0.93-1.11 (Rayleigh
#: quotient equal to it), and forcing a contraction with the hinge cost 17 Dice points (0.707 -> 0.536). With ``Im`` injected the network can
#: predict those components from the pair, as VoxelMorph does.
DEQ_RECIPE = {"damping": 0.5, "leak": 0.5, "jac_weight": 0.3, "inject_moving": True}
#: the later stages of the DEQ recipe, ``(first optimizer step, options)``: from step 500 (once training has left
#: identity), Anderson solves the fixed point in training and the penalty is aimed at the dominant direction
#: (``jac_power`` = 4 power-iteration steps) with a hinge at spectral radius ``jac_target`` = 0.8, weight 1: the
#: Hutchinson probe keeps the *mean* squared singular value small while single directions reach 1 (with ``Im``
#: injected and no hinge, the training residual after 48 steps rose from 1e-3 at step 250 to 0.037 at step 750).
#: From step 1500 the hinge's direction is refined by 10 power steps instead of 4: at step 1000 (seed 0) the 4-step
#: estimate read about 0.81 while 30 steps gave 0.96 (mean) / 1.15 (max) on the validation pairs: too few steps
#: underestimate the spectral radius, so the hinge held the wrong number. Measured at step 1000 (seed 0):
#: validation Dice 0.632 (6 pairs), 5 of 6 validation solves converged (largest move 48 -> 500 steps below 0.004
#: voxels on those five, 2.5 on the sixth); on 10 of the 30 real unseen pairs Dice 0.575 (VoxelMorph on the same 10
#: pairs: 0.580, the paper's Unrolling 0.611), 80 % converged, spectral radius 0.95 mean / 1.09 max. At step 1750 (10 power steps since 1500): every
#: validation solve converged (rho <= 0.85, a largest move of 4e-4 voxels from 48 to 500 steps, val Dice 0.619),
#: and on the same 10 unseen pairs every solve converged with rho 0.86 mean / 0.94 max, Dice 0.558. **Not final**
#: (issue 10 is open): after step 1750 validation Dice fell (0.609, 0.564, 0.542 at 1750, 2000, 2250), and the
#: contraction came with smaller fields (mean |u| on 6 validation pairs: 3.08 voxels for the paper-input stage 1 at
#: step 1800, 2.24 at step 1000 here, 1.65 at 1750, 1.60 at 2350): the map contracts partly by shrinking its fixed
#: point. Compared in session 17 (``benchmarks/results/recipes.md``): a target of 0.9 from step 1750 lost the
#: certificate on unseen brains (6 of 10 solves converged, rho up to 1.13) for no Dice gain; this recipe, continued
#: to step 2800, kept every unseen solve converged (rho <= 0.90) and regained Dice (0.568 on the 10 unseen pairs),
#: still below VoxelMorph (0.580) and the paper's Unrolling (0.611) on those pairs.
DEQ_STAGES = ((500, {"solver": "anderson", "jac_weight": 1.0, "jac_power": 4, "jac_target": 0.8}),
              (1500, {"solver": "anderson", "jac_weight": 1.0, "jac_power": 10, "jac_target": 0.8}))
#: DEQReg-12's stages: DEQReg's first two, without the switch to 10 power steps. Measured (seed 0, session 17): with
#: ``DEQ_STAGES`` DEQReg-12 trained stably to step 1500 (val Dice 0.609; its 12 Anderson steps end at a relative
#: residual of about 8e-3, so its solves never meet the 1e-3 tolerance and the hinge acts on an unconverged point),
#: then **diverged** within 200 steps of the switch to 10 power steps (penalty 4.1 and training loss 92 at step
#: 1700, NaN residuals and every solve flagged as diverged from step ~1800, val Dice 0.284 at 1750). The
#: convergence certificate is a goal for DEQReg (T = 48); DEQReg-12 is the paper's truncated variant.
DEQ12_STAGES = DEQ_STAGES[:1]
#: per method: constructor options (``stages``: later options from a given step on), iterations, AdamW learning rate; every model starts from scratch
#: (``init: "scratch"`` in the manifest) and is selected by the best validation Dice (``best.pt`` of its run).
SETTINGS: dict[str, dict] = {
    "voxelmorph": {"kwargs": {}},
    "unrolling_ml": {"kwargs": {}},
    "unrolling": {"kwargs": {"T": 3}},
    "gradirn": {"kwargs": {}},
    "riir": {"kwargs": {}},
    "deqreg12": {"kwargs": dict(DEQ_RECIPE), "stages": DEQ12_STAGES},
    "deqreg": {"kwargs": dict(DEQ_RECIPE), "stages": DEQ_STAGES},
}
for _cfg in SETTINGS.values():
    _cfg.update(iterations=PRETRAINED_BUDGET, lr=PRETRAINED_LR, batch_size=PRETRAINED_BATCH)
#: seeds trained per model (the first one ships; the others measure the spread).
SEEDS: dict[str, tuple[int, ...]] = {name: (0,) for name in SETTINGS}
SEEDS.update(deqreg=(0, 1), unrolling_ml=(0, 1))
#: the selection rule, as recorded in the manifest.
SELECTION = ("the checkpoint with the best mean validation Dice (validated every 250 steps and at the end; for a "
             "recipe in stages, among the checkpoints of its last stage)")

# ------------------------------------------------------------------------------------------- the command line
#: Per-dataset defaults of ``train`` and ``evaluate`` (see the module docstring).
PRESETS: dict[str, dict] = {
    "oasis": {"ndim": 3, "size": (128, 128, 128), "epochs": 100, "iterations": None, "batch_size": 1, "lr": 1e-4,
              "lam": 1.0, "val_pairs": None, "eval_split": "val"},
    "nlst": {"ndim": 3, "size": (224, 192, 224), "epochs": 100, "iterations": None, "batch_size": 1, "lr": 1e-4,
             "lam": 1.25, "val_pairs": None, "eval_split": "val"},
    "sample": {"ndim": 2, "size": tuple(TRAIN_SIZE), "epochs": None,
               "iterations": 1500, "batch_size": 1, "lr": PRETRAINED_LR,
               "lam": LAM, "val_pairs": 9, "eval_split": "test", "train_pairs": 1000},
}
#: the folder of each dataset under ``$DEQREG_DATA_DIR``.
DATASET_DIRS = {"oasis": "OASIS", "nlst": "NLST"}
