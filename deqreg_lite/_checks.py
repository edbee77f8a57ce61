"""Input validation shared by the library: clear errors that say what was expected and what came."""
from __future__ import annotations

import operator
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["NonFiniteError", "check_bool", "check_int", "check_spacing", "check_image", "check_disp", "check_same_spatial", "check_finite", "check_options", "check_keypoints",
           "check_image_dtype", "check_unit_range", "UNIT_RANGE_TOL", "LOADER_RANGE_TOL",
           "to_unit_range"]


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf. A ``ValueError``, so that bad input reads as bad input; the trainer tells it apart
    from other ``ValueError``s to report a diverging run (a NaN computed from finite images) as divergence."""


def check_bool(value: Any, name: str) -> bool:
    """A switch: ``value`` if it is a ``bool``, else ``ValueError`` (``0``/``1``, ``"yes"``, ``None`` are refused).

    The one bool check of the library (``certificate``, ``inject_moving``, ``checkpoint``, ``use_grad``, ...). The
    message is ``"{name} must be True or False, got {value!r}"``.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(value: Any, name: str, low: int = 1, *, allow_none: bool = False, hint: str = "") -> int | None:
    """An integer option: ``value`` as an ``int`` if it is an integer ``>= low``, else ``ValueError``.

    The one integer check of the library (constructor options, counts, ``steps``, the CLI's and trainer's numbers).
    Integers are anything with ``__index__`` (``int``, NumPy integers, 0-d integer tensors); ``bool`` and floats,
    even ``3.0``, are refused. With ``allow_none=True``, ``None`` passes through unchanged. The message is
    ``"{name} must be an integer >= {low}[ or None]{hint}, got {value!r}"``; ``hint`` (e.g. ``" (0: off)"``) says
    what a special value means.
    """
    if value is None and allow_none:
        return None
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < low:
        raise ValueError(f"{name} must be an integer >= {low}{' or None' if allow_none else ''}{hint}, got {value!r}")
    return number


def check_spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray:
    """Voxel spacing in mm as ``ndim`` positive float64 numbers, in array-axis order (``ValueError`` otherwise).

    ``None`` means 1 mm on every axis; one number (or a sequence of one) is used on every axis.
    """
    if spacing is None:
        return np.ones(ndim)
    s = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if s.size == 1:
        s = np.repeat(s.reshape(1), ndim)
    if s.shape != (ndim,) or not np.all(s > 0):
        raise ValueError(f"spacing must be a positive number or {ndim} positive numbers, got {spacing}")
    return s


def check_finite(x: Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` (a ``ValueError``) if ``x`` holds NaN or inf.

    One reduction in the common case: a sum is finite only if every term is (NaN and inf propagate). Only when
    the sum is not finite (a bad value, or an overflow of large finite values) does the exact element-wise check
    decide.
    """
    if not x.is_floating_point() or bool(torch.isfinite(x.detach().sum())):
        return
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{name} holds {n_bad} NaN or inf values; expected finite numbers")


def check_image(x: Tensor, name: str = "image", finite: bool = True) -> int:
    """Check a ``(B, C, *spatial)`` image with 2 or 3 spatial axes; return the number of spatial axes."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, *spatial), got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"{name} must have shape (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
    if finite:
        check_finite(x, name)
    return x.dim() - 2


def check_disp(disp: Tensor, name: str = "disp", finite: bool = True) -> int:
    """Check a ``(B, ndim, *spatial)`` displacement; return ``ndim``."""
    ndim = check_image(disp, name, finite=finite)
    if disp.shape[1] != ndim:
        raise ValueError(f"{name} must have shape (B, ndim, *spatial) with ndim={ndim} channels for "
                         f"{ndim} spatial axes, got {tuple(disp.shape)}")
    if not disp.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {disp.dtype}")
    return ndim


def check_same_spatial(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` share batch size and spatial shape."""
    if a.shape[2:] != b.shape[2:] or a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must share the batch size "
                         f"and the spatial shape")


def check_options(value: str, allowed: Sequence[str], name: str) -> None:
    """Raise ``ValueError`` when a string option is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_keypoints(kp: Tensor, shape: Sequence[int] | None, name: str = "keypoints", where: str = "",
                    ndim: int = 3) -> None:
    """Keypoints ``(..., ndim)`` (voxel coordinates, array-axis order) must be finite and inside a grid ``shape``.

    Inside means ``-0.5 <= k_i <= n_i - 0.5`` on every axis (within the outer faces of the border voxels);
    ``shape=None`` checks only finiteness (``ndim`` columns).
    ``ValueError`` says how many points are NaN/inf and how many lie outside (and the first offender); ``where``
    (a file name, say) is added to the message.
    """
    kp = torch.as_tensor(kp)
    src = f" in {where}" if where else ""
    ndim = ndim if shape is None else len(shape)
    if kp.shape[-1:] != (ndim,):
        raise ValueError(f"{name}{src} must have shape (..., {ndim}) for a {ndim}D grid, got {tuple(kp.shape)}")
    pts = kp.reshape(-1, ndim).double()
    bad = ~torch.isfinite(pts).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{name}{src}: {int(bad.sum())} of {pts.shape[0]} keypoints hold NaN or inf "
                         f"(first at row {int(bad.nonzero()[0, 0])}); expected finite voxel coordinates")
    if shape is None:
        return
    hi = torch.tensor([float(n) - 0.5 for n in shape], dtype=torch.float64, device=pts.device)
    out = ((pts < -0.5) | (pts > hi)).any(dim=1)
    if bool(out.any()):
        i = int(out.nonzero()[0, 0])
        raise ValueError(f"{name}{src}: {int(out.sum())} of {pts.shape[0]} keypoints lie outside the volume "
                         f"{tuple(int(n) for n in shape)} (voxel coordinates must be in [-0.5, n - 0.5] per axis, "
                         f"array-axis order); first: row {i} = {pts[i].tolist()}")


#: Rounding slack allowed around [0, 1] by :func:`check_unit_range` (resampling and float32 arithmetic stay far
#: inside it; an image in another unit, 0..255 or HU, is far outside it).
UNIT_RANGE_TOL = 1e-3

_NORMALISE_HINT = ("normalise it first: min-max, (x - x.min()) / (x.max() - x.min()); for CT in HU, a window, "
                   "e.g. (x.clamp(-1000, 500) + 1000) / 1500; for uint8 0..255, x.float() / 255")


def check_unit_range(x: Tensor, name: str = "image", tol: float = UNIT_RANGE_TOL) -> None:
    """Raise ``ValueError`` unless every value of the float image ``x`` lies in ``[-tol, 1 + tol]``.

    The message gives the range found and how to normalise (min-max, an HU window for CT).
    """
    if x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if lo < -tol or hi > 1.0 + tol:
        raise ValueError(f"{name} must hold intensities in [0, 1] (tolerance {tol:g}), found values in "
                         f"[{lo:.6g}, {hi:.6g}]; {_NORMALISE_HINT}")


def check_image_dtype(x: Tensor, name: str = "image", expected: torch.dtype | None = None) -> None:
    """A learned method's image must be floating point, of the model parameters' dtype ``expected`` when given.

    Integer and uint8 images raise ``ValueError`` (convert with ``.float()`` and scale to [0, 1]); a float dtype
    other than ``expected`` (e.g. float64 or float16 given to a float32 model) raises ``ValueError`` that names both
    dtypes and both fixes (``x.to(dtype)``, or ``model.to(x.dtype)``, e.g. ``model.double()`` for float64 runs).
    """
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point image in [0, 1], got {x.dtype}; convert it with "
                         f"x.float() and scale it to [0, 1] (uint8 0..255: x.float() / 255)")
    if expected is not None and x.dtype != expected:
        raise ValueError(f"{name} has dtype {x.dtype} but the model's parameters are {expected}; convert the image "
                         f"with x.to({expected}) (x.float() for float32), or the model with model.to({x.dtype})")


#: Loaders: a stored volume within ``[-0.05, 1.05]`` is "about [0, 1]" (resampling overshoot of preprocessed data)
#: and is clipped; anything wider is another unit and is rescaled (:func:`to_unit_range`).
LOADER_RANGE_TOL = 0.05


def to_unit_range(arr: np.ndarray, where: str, tol: float = LOADER_RANGE_TOL) -> np.ndarray:
    """A stored image volume as float32 in [0, 1], for loaders whose files should already hold [0, 1] intensities.

    The rule: values within ``[-tol, 1 + tol]`` (default :data:`LOADER_RANGE_TOL` = 0.05: preprocessed data is
    "about [0, 1]", with small interpolation overshoot) are clipped to [0, 1]. Otherwise the volume is in
    another unit (0..255, 0..4095, ...): it is rescaled min-max, ``(x - min) / (max - min)``, with a ``UserWarning``
    that names ``where`` (the file) and the range found, never clipped (clipping a 0..255 volume to [0, 1] turns
    almost every voxel into 1). A constant volume outside [0, 1] becomes zeros (with the warning). NaN or inf
    values raise ``ValueError`` naming ``where``.
    """
    x = np.asarray(arr, dtype=np.float32)
    if x.size == 0:
        return x
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: the image holds {int((~np.isfinite(x)).sum())} NaN or inf values; expected "
                         f"finite intensities")
    lo, hi = float(x.min()), float(x.max())
    if lo >= -tol and hi <= 1.0 + tol:
        return np.clip(x, 0.0, 1.0)
    warnings.warn(f"{where}: intensities span [{lo:.6g}, {hi:.6g}], not [0, 1]; rescaled min-max to [0, 1] "
                  f"((x - {lo:.6g}) / ({hi:.6g} - {lo:.6g})) instead of clipping", UserWarning, stacklevel=3)
    if hi == lo:
        return np.zeros_like(x)
    return ((x - lo) / np.float32(hi - lo)).astype(np.float32)
