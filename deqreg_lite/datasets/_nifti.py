"""Shared helpers of the dataset loaders (:mod:`.oasis`, :mod:`.nlst`): reading NIfTI arrays as stored,
clear errors for a missing root / malformed JSON / missing files / mismatched shapes, and resampling.

Resampling convention (the same as :func:`deqreg_lite.warp.resize_disp`): the corner voxels of the old and new
grids coincide (``align_corners=True``). A voxel index ``i`` on an axis of ``n`` voxels becomes
``i * (m - 1) / (n - 1)`` on an axis of ``m`` voxels, and the spacing becomes ``s * (n - 1) / (m - 1)``.
Images are resampled (bi/tri)linearly, labels and masks by nearest neighbour on that same grid, so they stay
integer and keep exactly the stored label values.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import data_dir

__all__ = ["load_array", "missing_root_error", "read_json", "check_files", "check_shapes", "resize_image",
           "resize_label", "scale_factors", "scaled_spacing", "normalise_size"]


def load_array(path: Path, ndim: int | None = None) -> np.ndarray:
    """The array of a NIfTI file as stored (the orientation header is ignored on purpose).

    Trailing singleton axes beyond ``ndim`` are dropped (the neurite-oasis 2D slices are 160 x 192 x 1 on disk).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable NIfTI image (corrupt, truncated, or another format); the message
            names the file and says what nibabel reported.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no NIfTI file at {path}")
    try:
        arr = np.asanyarray(nib.load(str(path)).dataobj)
    except MemoryError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib and numpy each raise their own type for a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a readable NIfTI image (corrupt or truncated file? "
                         f"{type(exc).__name__}: {reason}); download or extract it again") from exc
    if ndim is not None:
        while arr.ndim > ndim and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != ndim:
            raise ValueError(f"{path} holds an array of shape {arr.shape}; expected {ndim} spatial axes")
    return arr


def find_root(root: Path, marker: str) -> Path:
    """``root`` if it holds ``marker``, else its one sub-folder that does (an archive's top folder), else ``root``."""
    if (root / marker).exists() or not root.is_dir():
        return root
    inner = [d for d in root.iterdir() if d.is_dir() and (d / marker).exists()]
    return inner[0] if len(inner) == 1 else root


def missing_root_error(dataset: str, root: Path, expected: str, source: str, subdir: str) -> FileNotFoundError:
    """A ``FileNotFoundError`` that says where the data comes from and how to point the loader at it."""
    return FileNotFoundError(
        f"{dataset} data not found: {root} has no {expected}. The data is not shipped with deqreg_lite "
        f"(its licence forbids redistribution); download it from {source}, extract it, and either pass "
        f"root=<folder holding {expected}> or set the environment variable DEQREG_DATA_DIR to the folder that "
        f"holds {subdir}/ (now {data_dir()}, so the default root is {data_dir() / subdir})."
    )


def read_json(path: Path, required: Iterable[str]) -> dict:
    """Read a dataset JSON; ``ValueError`` naming every missing required key (or saying why it is unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(meta, Mapping):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{path} is malformed: missing key(s) {missing} (present: {sorted(meta)})")
    return dict(meta)


def check_files(paths: Iterable[Path], what: str) -> None:
    """``FileNotFoundError`` listing every missing path at once."""
    missing = sorted({str(p) for p in paths if not Path(p).is_file()})
    if missing:
        shown = "\n  ".join(missing[:50]) + (f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else "")
        raise FileNotFoundError(f"{what}: {len(missing)} file(s) missing:\n  {shown}")


def check_shapes(arrays: Mapping[str, np.ndarray], context: str) -> None:
    """``ValueError`` unless every array has the same shape; the message lists each one."""
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{context}: mismatched shapes: {desc}; they must all be equal")


def normalise_size(size: Sequence[int] | None, ndim: int) -> tuple[int, ...] | None:
    if size is None:
        return None
    size = tuple(int(s) for s in size)
    if len(size) != ndim or any(s < 1 for s in size):
        raise ValueError(f"size must be None or {ndim} positive integers, got {size}")
    return size


def scale_factors(old: Sequence[int], new: Sequence[int]) -> np.ndarray:
    """Per-axis factor ``(m - 1) / (n - 1)`` that maps voxel indices of the old grid into the new one."""
    return np.array([(m - 1) / (n - 1) if n > 1 else 1.0 for n, m in zip(old, new)], dtype=np.float64)


def scaled_spacing(spacing: Sequence[float], old: Sequence[int], new: Sequence[int]) -> tuple[float, ...]:
    f = scale_factors(old, new)
    return tuple(float(s / fi) if fi > 0 else float(s) for s, fi in zip(spacing, f))


def resize_image(x: Tensor, size: Sequence[int] | None) -> Tensor:
    """(Bi/tri)linear resampling of a float ``(1, 1, *spatial)`` tensor, corners aligned."""
    if size is None or tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=True)


def resize_label(x: Tensor, size: Sequence[int] | None) -> Tensor:
    """Nearest-neighbour resampling of an integer or bool ``(1, 1, *spatial)`` tensor, corners aligned."""
    if size is None or tuple(x.shape[2:]) == tuple(size):
        return x
    out = x
    for axis, (n, m) in enumerate(zip(x.shape[2:], size)):
        if n == m:
            continue
        idx = torch.round(torch.arange(m, dtype=torch.float64) * ((n - 1) / (m - 1) if m > 1 else 0.0)).long()
        out = out.index_select(axis + 2, idx.clamp_(0, n - 1))
    return out
