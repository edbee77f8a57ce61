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
           "PRETRAINED_BUDGET", "PRETRAINED_BATCH", "DEQ_RECIPE", "DEQ_STAGES", "SEEDS", "SELECTION", "TRAIN_SIZE",
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
#: (``g = phi + UNet(...) - 0.5 phi``) makes the untrained map a contraction, so training leaves identity at once;
#: a Hutchinson Jacobian penalty on the iteration map at ``phi*`` keeps its mean squared singular value small as it
#: learns (without it the training residual rose from 1e-3 to 0.5 within 150 steps).
DEQ_RECIPE = {"damping": 0.5, "leak": 0.5, "jac_weight": 0.3}
#: the later stages of the DEQ recipe, ``(first optimizer step, options)``: from step 1800, Anderson solves the fixed
#: point in training (stage 1's damped iteration stalls at a relative residual of 1e-2 .. 3e-2 after 48 steps, so the
#: penalty and the phantom gradient were taken away from the fixed point) and the penalty is aimed at the dominant
#: direction (``jac_power`` power-iteration steps) with a hinge at ``jac_target``: the Hutchinson probe kept the mean
#: squared singular value near 0.1 while single directions stayed above 1 (spectral radius up to 1.11 on the
#: validation pairs at step 1800). From step 2000 the hinge is tightened (weight 1, target 0.7, 6 power steps):
#: with weight 0.3 and target 0.8 the spectral radius stayed at 1.01 (mean) / 1.13 (max) after 450 steps. Going
#: straight from stage 1 to the tight hinge diverged (the loss reached 1e8 within 350 steps); the two steps did not.
#: Measured in ``benchmarks/results/recipes.md``. **Not final** (issue 10 is open): at step 2800 the map is a
#: contraction on every validation pair (spectral radius <= 0.82, residual < 1e-3 after 13 Anderson steps, a largest
#: move of 3e-4 voxels from 48 to 500 steps), but validation Dice fell to 0.52-0.54 (stage 1 reached 0.705 at step
#: 1750), and on the unseen test brains the spectral radius reached 1.10 on some pairs (step 2500).
DEQ_STAGES = ((1800, {"solver": "anderson", "jac_weight": 0.3, "jac_power": 4, "jac_target": 0.8}),
              (2000, {"solver": "anderson", "jac_weight": 1.0, "jac_power": 6, "jac_target": 0.7}))
#: per method: constructor options (``stages``: later options from a given step on), iterations, AdamW learning rate; every model starts from scratch
#: (``init: "scratch"`` in the manifest) and is selected by the best validation Dice (``best.pt`` of its run).
SETTINGS: dict[str, dict] = {
    "voxelmorph": {"kwargs": {}},
    "unrolling_ml": {"kwargs": {}},
    "unrolling": {"kwargs": {"T": 3}},
    "gradirn": {"kwargs": {}},
    "riir": {"kwargs": {}},
    "deqreg12": {"kwargs": dict(DEQ_RECIPE), "stages": DEQ_STAGES},
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
