"""Warping, identity grids, composition and resizing of displacement fields.

Conventions, used throughout deqreg_lite:

* an image is a tensor ``(B, C, *spatial)`` with 2 or 3 spatial axes;
* a displacement ``disp`` is a tensor ``(B, ndim, *spatial)`` in **voxel units**, with its channels in
  **array-axis order** (channel 0 moves along axis ``spatial[0]``, and so on);
* warping pulls: ``warped(x) = image(x + disp(x))``, so ``disp`` maps the fixed grid into the moving image.
  This is the Learn2Reg convention: ``map_coordinates(moving, identity + disp, order=1)``.

The functions are stateless; :class:`Warp` is a thin ``nn.Module`` wrapper, as in ``torch.nn``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_disp, check_image, check_options

__all__ = ["identity", "warp", "compose", "resize_disp", "resize_image", "integrate_velocity", "Warp"]

_MODES = ("bilinear", "nearest")
_PADDINGS = ("border", "zeros")


def identity(shape: Sequence[int], device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32) -> Tensor:
    """The identity map: voxel coordinates of every grid point.

    Args:
        shape: spatial shape ``(H, W)`` or ``(D, H, W)``.
    Returns:
        Tensor ``(1, ndim, *shape)``; channel ``i`` holds the index along spatial axis ``i`` (voxels).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 entries, got {shape}")
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


@lru_cache(maxsize=32)
def _sampling_base(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Normalised identity grid ``(1, ndim, *shape)`` (channels in array-axis order, values in [-1, 1]) and the
    voxel->[-1, 1] scale per displacement channel, shaped ``(1, ndim, 1, ...)`` to broadcast against ``disp``."""
    ndim = len(shape)
    scale = torch.tensor([2.0 / (s - 1) if s > 1 else 0.0 for s in shape], device=device, dtype=dtype)
    scale = scale.view(1, ndim, *([1] * ndim))
    grid = (identity(shape, device=device, dtype=dtype) * scale - 1.0).contiguous()
    return grid, scale


def _sampling_grid(disp: Tensor) -> Tensor:
    """``grid_sample`` grid ``(B, *spatial, ndim)`` (xyz order) for ``disp``.

    Built channels-first (one fused pass over contiguous memory), then moved to the last axis as a view and
    flipped to xyz order; ``flip`` copies but keeps that planar layout, which ``grid_sample`` reads as fast as
    an interleaved one. Writing the interleaved layout directly costs a strided transpose, ~10x slower.
    """
    base, scale = _sampling_base(tuple(disp.shape[2:]), disp.device, disp.dtype)
    return torch.addcmul(base, disp, scale).movedim(1, -1).flip(-1)


def warp(image: Tensor, disp: Tensor, mode: str = "bilinear", padding: str = "border") -> Tensor:
    """Warp ``image`` with ``disp``: ``warped(x) = image(x + disp(x))``.

    Args:
        image: ``(B, C, *spatial)``, or ``(1, C, *spatial)`` to share one image across the batch of ``disp``.
            Integer (and bool) tensors, i.e. label maps, need ``mode="nearest"`` and come back with their dtype
            and their exact values: every output voxel is a copy of one input voxel (or 0 outside the image
            with ``padding="zeros"``), for any int64 ID (the labels are never cast to float). Float images
            with ``mode="nearest"`` are sampled as floats (the differentiable path).
        disp: ``(B, ndim, *spatial)`` displacement in voxels, channels in array-axis order.
        mode: ``"bilinear"`` (linear in 2D, trilinear in 3D) or ``"nearest"`` (for label maps).
        padding: ``"border"`` repeats edge values outside the image, ``"zeros"`` reads 0 there.
    Returns:
        ``(B, C, *spatial)`` warped image, with ``image``'s dtype. The sampling runs in the wider of float32 and
        ``disp``'s dtype: a float16 or bfloat16 displacement (a network's output under autocast) is warped in float32.
    """
    check_options(mode, _MODES, "mode")
    check_options(padding, _PADDINGS, "padding")
    ndim = check_disp(disp)
    if check_image(image, "image") != ndim:
        raise ValueError(f"image {tuple(image.shape)} and disp {tuple(disp.shape)} have different spatial ranks")
    if image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and disp {tuple(disp.shape)} must share the spatial shape")
    if image.shape[0] != disp.shape[0]:
        if image.shape[0] != 1:
            raise ValueError(f"image batch {image.shape[0]} must equal disp batch {disp.shape[0]} or be 1")
        image = image.expand(disp.shape[0], *image.shape[1:])
    is_label = not image.is_floating_point()
    if is_label and mode != "nearest":
        raise ValueError(f"integer image ({image.dtype}) needs mode='nearest'; bilinear would blend label values")
    if is_label:
        return _warp_labels(image, disp, padding)
    # Half-precision displacements (float16 / bfloat16, e.g. a network's output under autocast) are warped in
    # float32: the identity grid and the sampling positions in half precision would round by up to 0.25 voxel
    # (bfloat16 at 128 voxels), and the tie test of the gradient could never resolve TIE.
    work = torch.promote_types(disp.dtype, torch.float32)
    disp = disp.to(work)
    src = image.to(work) if image.dtype != work else image
    if mode == "bilinear" and disp.requires_grad and torch.is_grad_enabled():
        out = _bilinear_with_tie_gradient(src, disp, padding)
    else:
        out = F.grid_sample(src, _sampling_grid(disp), mode=mode, padding_mode=padding, align_corners=True)
    return out.to(image.dtype)


#: Sample positions closer than this (voxels) to a grid line count as *on* it for the displacement's gradient.
TIE = 1e-4


def _bilinear_with_tie_gradient(src: Tensor, disp: Tensor, padding: str) -> Tensor:
    """Bilinear warp whose gradient with respect to ``disp`` does not depend on float rounding.

    Linear interpolation is not differentiable where a sample lands on a grid line: the derivative along that axis
    jumps from the left to the right difference. ``grid_sample`` picks one by flooring the rescaled coordinate, so
    float rounding picks it, voxel by voxel, differently in float32 and float64 or on a CPU and a GPU. At zero
    displacement (where every registration starts) *every* voxel is on a grid line. Here, along each axis, a sample
    within :data:`TIE` voxels of a grid line gets the mean of the two one-sided derivatives (the central
    difference ``(I(p + e_k) - I(p - e_k)) / 2``); everywhere else the gradient is ``grid_sample``'s exact one.
    The value, and the gradient with respect to the image, are unchanged. (At those tie samples the displacement
    has no second derivative through the warp.)
    """
    ndim = disp.shape[1]
    with torch.no_grad():
        pos = disp.detach() + identity(disp.shape[2:], device=disp.device, dtype=disp.dtype)
        tie = (pos - pos.round()).abs() < TIE                                  # (B, ndim, *spatial)
    if not bool(tie.any()):
        return F.grid_sample(src, _sampling_grid(disp), mode="bilinear", padding_mode=padding, align_corners=True)
    out = F.grid_sample(src, _sampling_grid(torch.where(tie, disp.detach(), disp)), mode="bilinear",
                        padding_mode=padding, align_corners=True)
    detached = disp.detach()
    for k in range(ndim):
        tie_k = tie[:, k:k + 1]
        if not bool(tie_k.any()):
            continue
        with torch.no_grad():
            step = torch.zeros_like(detached)
            step[:, k] = 1.0
            sample = lambda d: F.grid_sample(src, _sampling_grid(d), mode="bilinear", padding_mode=padding,
                                             align_corners=True)
            central = (sample(detached + step) - sample(detached - step)).mul_(0.5)  # (B, C, *spatial)
        out = out + central * (tie_k * (disp[:, k:k + 1] - detached[:, k:k + 1]))
    return out


#: Largest integer ``n`` such that every integer in ``[0, n]`` is exact in the dtype.
_EXACT_INT = {torch.float64: 2 ** 53, torch.float32: 2 ** 24}


@lru_cache(maxsize=8)
def _index_image(shape: tuple[int, ...], offset: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``offset + flat voxel index`` as a ``(1, 1, *shape)`` image (read-only, cached)."""
    n = math.prod(shape)
    return torch.arange(offset, n + offset, device=device, dtype=dtype).view(1, 1, *shape)


def _warp_labels(image: Tensor, disp: Tensor, padding: str) -> Tensor:
    """Nearest-neighbour warp of an integer (or bool) label map that returns the input's exact values.

    The *voxel index* is sampled, not the labels: ``grid_sample`` (mode ``"nearest"``) reads an image holding
    the flat index of every voxel (``1 + index`` with ``padding="zeros"``, so that the 0 read outside the image
    stays distinguishable and becomes label 0), and the labels are then
    gathered at those indices. Casting the labels to float instead would round any ID above ``2**24``
    (float32), e.g. 614454277 -> 614454272. The index image is float32 when every index is exact there
    (up to ``2**24 - 1`` voxels), else float64; the chosen voxel is the one ``grid_sample`` picks for a float
    image on the same grid.
    """
    b, c, *spatial = image.shape
    n = math.prod(spatial)
    zeros = padding == "zeros"
    dt = disp.dtype if n + 1 <= _EXACT_INT.get(disp.dtype, 0) else torch.float64
    index = _index_image(tuple(spatial), int(zeros), disp.device, dt).expand(b, 1, *spatial)
    pos = F.grid_sample(index, _sampling_grid(disp.to(dt)), mode="nearest", padding_mode=padding,
                        align_corners=True).view(b, 1, n).long()  # exact integers: no rounding needed
    flat = image.reshape(b, c, n)
    if not zeros:
        return flat.gather(2, pos.expand(b, c, n)).view(b, c, *spatial)
    out = flat.gather(2, (pos - 1).clamp_min_(0).expand(b, c, n)).masked_fill_(pos == 0, 0)
    return out.view(b, c, *spatial)


def compose(u: Tensor, v: Tensor) -> Tensor:
    """Displacement of applying ``v`` first, then ``u``.

    ``warp(warp(image, v), u) == warp(image, compose(u, v))`` up to interpolation error, because
    ``compose(u, v)(x) = u(x) + v(x + u(x))``.

    Args:
        u, v: ``(B, ndim, *spatial)`` displacements in voxels.
    Returns:
        ``(B, ndim, *spatial)``.
    """
    check_disp(u, "u")
    check_disp(v, "v")
    if u.shape != v.shape:
        raise ValueError(f"u {tuple(u.shape)} and v {tuple(v.shape)} must have the same shape")
    return u + warp(v, u, padding="border")


def resize_disp(disp: Tensor, size: Sequence[int]) -> Tensor:
    """Resample a displacement to a new grid and rescale its values to the new voxel size.

    The corners of both grids coincide (``align_corners=True``), so a displacement of ``d`` voxels on an axis of
    ``n`` voxels becomes ``d * (m - 1) / (n - 1)`` voxels on an axis of ``m`` voxels.

    Args:
        disp: ``(B, ndim, *spatial)`` in voxels.
        size: new spatial shape, ``ndim`` entries.
    Returns:
        ``(B, ndim, *size)`` in voxels of the new grid.
    """
    ndim = check_disp(disp)
    size = tuple(int(s) for s in size)
    if len(size) != ndim:
        raise ValueError(f"size must have {ndim} entries, got {size}")
    old = disp.shape[2:]
    if tuple(old) == size:
        return disp
    out = F.interpolate(disp, size=size, mode="bilinear" if ndim == 2 else "trilinear", align_corners=True)
    factors = torch.tensor([(m - 1) / (n - 1) if n > 1 else 1.0 for m, n in zip(size, old)],
                           device=disp.device, dtype=disp.dtype)
    return out * factors.view(1, ndim, *([1] * ndim))


def resize_image(image: Tensor, size: Sequence[int], blur: bool = True) -> Tensor:
    """Resample an image to ``size`` on the grid convention of :func:`resize_disp` (corners aligned).

    Args:
        image: ``(B, C, *spatial)`` float image.
        size: new spatial shape.
        blur: when shrinking, first average over an odd box about as wide as the reduction factor (anti-aliasing).
    Returns:
        ``(B, C, *size)``.
    """
    ndim = check_image(image, "image")
    size = tuple(int(s) for s in size)
    if len(size) != ndim:
        raise ValueError(f"size must have {ndim} entries, got {size}")
    if tuple(image.shape[2:]) == size:
        return image
    k = 2 * int(max(n / m for n, m in zip(image.shape[2:], size)) // 2) + 1
    if blur and k > 1:
        pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
        image = pool(image, k, stride=1, padding=k // 2, count_include_pad=False)
    return F.interpolate(image, size=size, mode="bilinear" if ndim == 2 else "trilinear", align_corners=True)


def integrate_velocity(velocity: Tensor, steps: int = 7) -> Tensor:
    """Scaling and squaring: the displacement of the flow of a stationary velocity field at time 1.

    Args:
        velocity: ``(B, ndim, *spatial)`` in voxels per unit time.
        steps: number of squarings; the field is first scaled by ``2**-steps``.
    Returns:
        ``(B, ndim, *spatial)`` displacement in voxels (a diffeomorphism when the steps resolve the flow).
    """
    check_disp(velocity, "velocity")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    disp = velocity / (2 ** steps)
    for _ in range(steps):
        disp = disp + warp(disp, disp, padding="border")
    return disp


class Warp(nn.Module):
    """Module form of :func:`warp` (VoxelMorph's ``SpatialTransformer``): ``Warp()(image, disp)``."""

    def __init__(self, mode: str = "bilinear", padding: str = "border") -> None:
        super().__init__()
        check_options(mode, _MODES, "mode")
        check_options(padding, _PADDINGS, "padding")
        self.mode, self.padding = mode, padding

    def forward(self, image: Tensor, disp: Tensor) -> Tensor:
        return warp(image, disp, mode=self.mode, padding=self.padding)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding={self.padding!r}"
