"""Small pretrained 2D checkpoints of the six learned methods, shipped in ``data/checkpoints``: loading only.

``load_pretrained(name)`` returns a ready method, in eval mode, for ``"voxelmorph"``, ``"unrolling"`` (T = 3),
``"gradirn"``, ``"riir"``, ``"deqreg"`` and ``"deqreg12"``. Each takes ``(B, 1, 160, 192)`` images in [0, 1] (the
shipped ``brain2d`` pair) and returns ``(B, 2, 160, 192)`` displacements in voxels of that grid::

    from deqreg_lite.pretrained import load_pretrained
    model = load_pretrained("deqreg")
    result = model(fixed, moving, steps=96, return_states=True)

**The models work at half resolution, 80 x 96, internally.** To fit a CPU budget they were trained on 80 x 96 pairs
(4x cheaper than 160 x 192); :class:`~deqreg_lite.methods.resolution.HalfResolution` (re-exported here) wraps each
one: it downsamples ``fixed`` and ``moving`` by 2 (a small box blur, then bilinear resampling with
``align_corners=True``, the grid convention of :func:`~deqreg_lite.warp.resize_disp`), runs the method, and
upsamples the displacement and every state back to the input size with :func:`~deqreg_lite.warp.resize_disp`
(values rescaled to the finer voxels). So the fields are smooth on a 2-voxel scale by construction, and the numbers
are those of 80 x 96 models.

This module trains nothing (it sits on the methods floor and imports neither ``train`` nor ``evaluate``). The
shipped checkpoints were made by ``python scripts/train_pretrained.py`` at :data:`TRAIN_SIZE`, with the settings
of :mod:`deqreg_lite.presets` (``SETTINGS``, ``TRAIN_KINDS``, ``LAM``); ``data/checkpoints/README.md`` records how,
and the measured numbers.

**Small 3D models** (``voxelmorph``, ``unrolling_ml``, ``deqreg``), trained on the CPU by ``python
scripts/train_3d.py`` and exported to ``data/checkpoints/3d`` (with a ``manifest.json``), load with
``load_pretrained_3d(name)``: the same :class:`HalfResolution` wrapper with a fixed working size, the size they were
trained at (``extra["train_size"]``, e.g. 32^3), so that they take the shipped 96^3 samples (or any size) and return
``(B, 3, *input size)`` displacements in voxels of the input grid. No 3D checkpoint is shipped yet: the loader then
raises ``FileNotFoundError`` with the commands that make one.

Checkpoints use the library's format (:mod:`deqreg_lite.checkpoints`, no optimizer, no RNG state;
``torch.load(weights_only=True)`` reads them); :meth:`RegistrationMethod.from_checkpoint
<deqreg_lite.methods.base.RegistrationMethod.from_checkpoint>` (or :func:`deqreg_lite.train.load_method`)
rebuilds the bare 80 x 96 method. ``extra["pretrained"]`` holds the training record (iterations, lr, lambda, time,
validation numbers) and ``extra["factor"]`` the resolution factor. The folder is
:func:`deqreg_lite.config.checkpoints_dir` (``data/checkpoints`` of the repository, or ``DEQREG_CHECKPOINTS_DIR``
when set).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import load_checkpoint
from .config import REPO_ROOT, checkpoints_dir  # noqa: F401  (re-exported: tests and scripts use them)
from .methods.base import RegistrationMethod
from .methods.resolution import HalfResolution

__all__ = ["PRETRAINED", "HalfResolution", "checkpoints_dir", "checkpoint_path", "available_pretrained",
           "load_pretrained", "TRAIN_SIZE", "INPUT_SIZE", "PRETRAINED_3D", "INPUT_SIZE_3D", "checkpoints_dir_3d",
           "available_pretrained_3d", "load_pretrained_3d"]

#: names of the shipped checkpoints.
PRETRAINED = ("voxelmorph", "unrolling", "unrolling_ml", "gradirn", "riir", "deqreg", "deqreg12")
#: the size the models were trained at (and run at internally), and the input size they are meant for.
TRAIN_SIZE = (80, 96)
INPUT_SIZE = (160, 192)

_HOW = "python scripts/train_pretrained.py --names {name}"
#: names of the small 3D models (``data/checkpoints/3d``), and the size of the shipped 3D samples they are meant for.
PRETRAINED_3D = ("voxelmorph", "unrolling_ml", "deqreg")
INPUT_SIZE_3D = (96, 96, 96)
_HOW_3D = "python scripts/train_3d.py --names {name}` then `python scripts/train_3d.py --export-only --names {name}"


def checkpoint_path(name: str) -> Path:
    """``checkpoints_dir() / f"{name}.pt"`` (it may not exist); ``ValueError`` for an unknown name."""
    _check_name(name)
    return checkpoints_dir() / f"{name}.pt"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {list(PRETRAINED)}")


def available_pretrained() -> dict[str, bool]:
    """``{name: whether its checkpoint file exists}`` for every name in :data:`PRETRAINED`."""
    return {name: (checkpoints_dir() / f"{name}.pt").is_file() for name in PRETRAINED}


def load_pretrained(name: str, device: str | torch.device | None = None,
                    train_if_missing: bool = False) -> HalfResolution:
    """The pretrained ``name`` model, wrapped to take ``(B, 1, 160, 192)`` images, in eval mode.

    The method is rebuilt by :meth:`RegistrationMethod.from_checkpoint
    <deqreg_lite.methods.base.RegistrationMethod.from_checkpoint>` (the same path as
    :func:`deqreg_lite.train.load_method`) and wrapped in :class:`HalfResolution` with the checkpoint's
    ``extra["factor"]`` (2).

    Args:
        name: one of :data:`PRETRAINED`.
        device: where the model goes (default the CPU: the checkpoints are small 2D models).
        train_if_missing: no longer supported here (this module trains nothing): ``True`` with a missing file
            raises ``FileNotFoundError`` saying which script makes it; with the file present it is ignored.
    Returns:
        a :class:`HalfResolution` around the method (which works at 80 x 96 internally).
    Raises:
        ValueError: unknown name (the message lists the names), or a corrupt or truncated checkpoint file (the
            message names the file and says how to remake it; it never suggests ``weights_only=False``).
        FileNotFoundError: no checkpoint file (the message says how to make one).
    """
    _check_name(name)
    path = checkpoints_dir() / f"{name}.pt"
    if not path.is_file():
        extra = (" (load_pretrained no longer trains: train_if_missing=True needs that script)"
                 if train_if_missing else "")
        raise FileNotFoundError(f"no pretrained checkpoint for {name!r} at {path}; make it with "
                                f"`{_HOW.format(name=name)}`{extra}")
    try:
        ckpt = load_checkpoint(path, "cpu", name=name)
        method = RegistrationMethod.from_checkpoint(ckpt, device="cpu")
    except ValueError as exc:  # corrupt / truncated / foreign file: the message names it; say how to remake it
        raise ValueError(f"{exc}. To remake the pretrained {name!r} checkpoint, delete {path} and run "
                         f"`{_HOW.format(name=name)}`") from None
    factor = int((ckpt.get("extra") or {}).get("factor", 2))
    model = HalfResolution(method, factor=factor)
    return model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()


# ------------------------------------------------------------------------------------------- the small 3D models
def checkpoints_dir_3d() -> Path:
    """The folder of the 3D checkpoints: ``checkpoints_dir() / "3d"``."""
    return checkpoints_dir() / "3d"


def available_pretrained_3d() -> dict[str, bool]:
    """``{name: whether its 3D checkpoint file exists}`` for every name in :data:`PRETRAINED_3D`."""
    return {name: (checkpoints_dir_3d() / f"{name}.pt").is_file() for name in PRETRAINED_3D}


def load_pretrained_3d(name: str, device: str | torch.device | None = None) -> HalfResolution:
    """The small 3D ``name`` model, wrapped to take ``(B, 1, D, H, W)`` volumes (the shipped 96^3 samples), in eval
    mode.

    The method is rebuilt from ``checkpoints_dir_3d() / f"{name}.pt"`` and wrapped in :class:`HalfResolution` with
    the checkpoint's ``extra["factor"]`` and a fixed working size, ``extra["train_size"]`` (the size it was trained
    at): the volumes are blurred and resampled to that size, the model runs there, and the displacement (and every
    state) comes back at the input size, in voxels of the input grid (``(B, 3, D, H, W)``; ``info["internal_size"]``
    records the working size). ``extra["pretrained"]`` holds the training record (size, steps, data, whether the
    shipped samples were in training, the label its table rows should carry).

    Args:
        name: one of :data:`PRETRAINED_3D`.
        device: where the model goes (default the CPU).
    Returns:
        a :class:`HalfResolution` around the 3D method.
    Raises:
        ValueError: unknown name, a corrupt file, or a checkpoint that is not a 3D model with a recorded training
            size (the message names the file and says how to remake it).
        FileNotFoundError: no checkpoint file (the message gives the commands that make it).
    """
    if not isinstance(name, str) or name not in PRETRAINED_3D:
        raise ValueError(f"unknown 3D pretrained model {name!r}; choose one of {list(PRETRAINED_3D)}")
    path = checkpoints_dir_3d() / f"{name}.pt"
    how = _HOW_3D.format(name=name)
    if not path.is_file():
        raise FileNotFoundError(f"no 3D checkpoint for {name!r} at {path}; make it with `{how}` (the 3D models "
                                "are trained on the CPU at a reduced size; README, 'Small 3D models')")
    try:
        ckpt = load_checkpoint(path, "cpu", name=name)
        method = RegistrationMethod.from_checkpoint(ckpt, device="cpu")
    except ValueError as exc:
        raise ValueError(f"{exc}. To remake the 3D {name!r} checkpoint, delete {path} and run `{how}`") from None
    extra = ckpt.get("extra") or {}
    size = extra.get("train_size")
    if method.ndim != 3 or not isinstance(size, (list, tuple)) or len(size) != 3:
        raise ValueError(f"{path} is not a 3D checkpoint made by scripts/train_3d.py (ndim {method.ndim}, "
                         f"train_size {size!r}); remake it with `{how}`")
    factor = int(extra.get("factor", max(1, INPUT_SIZE_3D[0] // int(size[0]))))
    model = HalfResolution(method, factor=factor, size=tuple(int(v) for v in size))
    return model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
