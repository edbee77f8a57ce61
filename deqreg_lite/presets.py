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
           "TRAIN_SIZE", "INPUT_SIZE", "PRETRAINED"]

# ----------------------------------------------------------------------------------- the shipped 2D checkpoints
#: the order in which the script trains them (a warm-started model after its source).
TRAIN_ORDER = ("voxelmorph", "unrolling", "deqreg", "deqreg12", "gradirn", "riir")
#: kinds of training pairs (``"synth"`` is left out: its two images get independent random intensities, which LNCC
#: training at this budget did not learn from).
TRAIN_KINDS = ("brain", "inter")
#: the diffusion weight of their training loss, in voxel units.
LAM = 1.0
#: their AdamW learning rate (the paper: 1e-4; 1e-3 for a CPU budget).
PRETRAINED_LR = 1e-3
#: per method: constructor options, iterations, AdamW learning rate, and an optional warm start (``init``: the
#: name of a checkpoint whose weights initialise this method; same update map and U-Net).
SETTINGS: dict[str, dict] = {
    "voxelmorph": {"kwargs": {}, "iterations": 1500, "lr": PRETRAINED_LR},
    "unrolling": {"kwargs": {"T": 3}, "iterations": 1500, "lr": PRETRAINED_LR},
    "gradirn": {"kwargs": {}, "iterations": 800, "lr": PRETRAINED_LR},
    "riir": {"kwargs": {}, "iterations": 600, "lr": PRETRAINED_LR},
    "deqreg12": {"kwargs": {}, "iterations": 400, "lr": PRETRAINED_LR, "init": "unrolling"},
    # warm start (both DEQ models): trained from scratch at lr 1e-3, DEQReg still sat at identity level after 150
    # iterations (~4 min here), beyond this CPU budget; so DEQReg and DEQReg-12 start from the Unrolling (T = 3)
    # weights (same U-Net, same input [If, Im o phi, phi]) and are then trained with their own phantom-gradient
    # losses (DEQReg: T = 48, S = 3, Eq. 9; DEQReg-12: T = 12, S = 0).
    # 200 iterations: early stopping read off the validation curve of a 400-iteration run (val Dice 0.611 at the
    # warm start, 0.705 / 0.702 / 0.687 / 0.586 at 100 / 200 / 300 / 400 iterations, folding 0.35 / 0.30 / 0.44 /
    # 2.95%): at lr 1e-3 the DEQ fine-tune degraded after ~300 iterations.
    "deqreg": {"kwargs": {}, "iterations": 200, "lr": PRETRAINED_LR, "init": "unrolling"},
}

# ------------------------------------------------------------------------------------------- the command line
#: Per-dataset defaults of ``train`` and ``evaluate`` (see the module docstring).
PRESETS: dict[str, dict] = {
    "oasis": {"ndim": 3, "size": (128, 128, 128), "epochs": 100, "iterations": None, "batch_size": 1, "lr": 1e-4,
              "lam": 1.0, "val_pairs": None, "eval_split": "val"},
    "nlst": {"ndim": 3, "size": (224, 192, 224), "epochs": 100, "iterations": None, "batch_size": 1, "lr": 1e-4,
             "lam": 1.25, "val_pairs": None, "eval_split": "val"},
    "sample": {"ndim": 2, "size": tuple(TRAIN_SIZE), "epochs": None,
               "iterations": SETTINGS["voxelmorph"]["iterations"], "batch_size": 1, "lr": PRETRAINED_LR,
               "lam": LAM, "val_pairs": 9, "eval_split": "test", "train_pairs": 1000},
}
#: the folder of each dataset under ``$DEQREG_DATA_DIR``.
DATASET_DIRS = {"oasis": "OASIS", "nlst": "NLST"}
