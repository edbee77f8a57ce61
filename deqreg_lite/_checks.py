"""Input validation shared by the library: clear errors that say what was expected and what came."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["check_image", "check_disp", "check_same_spatial", "check_finite", "check_options"]


def check_finite(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or inf.

    One reduction in the common case: a sum is finite only if every term is (NaN and inf propagate). Only when
    the sum is not finite (a bad value, or an overflow of large finite values) does the exact element-wise check
    decide.
    """
    if not x.is_floating_point() or bool(torch.isfinite(x.detach().sum())):
        return
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} holds {n_bad} NaN or inf values; expected finite numbers")


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
