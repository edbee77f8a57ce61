"""Run-time settings: the mode (quick / default / full), data folders, device and seeds.

Everything that differs between quick mode and the default mode is a *size* or an *iteration count*,
never a code path. Read settings through the functions here so that notebooks, the CLI and the tests agree.

Environment variables
---------------------
``DEQREG_MODE``      ``quick`` (CI: every notebook in about a minute), ``default`` (a laptop CPU, about
                     10 minutes or less), or ``full`` (the paper's scale, for a GPU).
``DEQREG_DATA_DIR``  root folder of downloaded datasets (OASIS, NLST). Defaults to ``~/.deqreg_lite/data``.
``DEQREG_SAMPLES_DIR`` folder holding the shipped samples; defaults to the repository's ``data/samples``.
``DEQREG_CHECKPOINTS_DIR`` folder of the pretrained checkpoints; defaults to the repository's ``data/checkpoints``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

__all__ = ["MODES", "mode", "by_mode", "data_dir", "samples_dir", "default_device", "seed_everything",
           "REPO_URL", "REPO_ROOT", "checkpoints_dir"]

MODES = ("quick", "default", "full")
REPO_URL = "https://github.com/deqreg-lite/deqreg_lite"  # = pyproject.toml [project.urls] Repository (tested)
REPO_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def mode() -> str:
    """Return the current mode from ``DEQREG_MODE`` (``"default"`` when unset).

    Raises:
        ValueError: if the variable holds anything but ``quick``, ``default`` or ``full``.
    """
    value = os.environ.get("DEQREG_MODE", "default").strip().lower() or "default"
    if value not in MODES:
        raise ValueError(f"DEQREG_MODE must be one of {MODES}, got {value!r}")
    return value


def by_mode(quick: T, default: T, full: T | None = None) -> T:
    """Pick a size or an iteration count by mode. ``full`` falls back to ``default`` when not given."""
    m = mode()
    if m == "quick":
        return quick
    if m == "full" and full is not None:
        return full
    return default


def data_dir() -> Path:
    """Root folder for downloaded datasets (``DEQREG_DATA_DIR``, else ``~/.deqreg_lite/data``)."""
    return Path(os.environ.get("DEQREG_DATA_DIR", Path.home() / ".deqreg_lite" / "data")).expanduser()


def samples_dir() -> Path:
    """Folder of the shipped samples (``DEQREG_SAMPLES_DIR``, else ``<repo>/data/samples``)."""
    env = os.environ.get("DEQREG_SAMPLES_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "data" / "samples"


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU ``torch.Generator`` seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def checkpoints_dir() -> Path:
    """Folder of the pretrained checkpoints (``DEQREG_CHECKPOINTS_DIR``, else ``<repo>/data/checkpoints``)."""
    env = os.environ.get("DEQREG_CHECKPOINTS_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "data" / "checkpoints"
