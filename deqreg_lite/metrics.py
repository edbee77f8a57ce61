"""Registration metrics: overlap (Dice, HD95), regularity (Jacobian determinant, folding, SDlogJ) and TRE.

Shapes: label maps are integer tensors ``(B, 1, *spatial)``; displacements are ``(B, ndim, *spatial)`` in voxels
with channels in array-axis order; keypoints are ``(N, ndim)`` or ``(B, N, ndim)`` 0-based voxel indices in
array-axis order; ``spacing`` is mm per voxel along each spatial axis; masks are ``(B, 1, *spatial)`` (non-zero =
inside) and are checked against the displacement.

Missing structures. A label present in one map but not in the other is a failed registration of that structure,
never a skipped one: its Dice is 0 and its HD95 is the largest distance possible in the image (the diagonal of the
voxel grid in mm, :func:`max_distance`). The DeepMind ``surface-distance`` code that Learn2Reg's evaluation uses
returns inf there, and MONAI's ``compute_hausdorff_distance`` warns and returns inf or NaN; a finite worst case keeps the
means finite and ranks a structure wiped out by the warp below any structure that survives it. A label absent from
both maps is excluded (NaN); tables average over the labels with ``nanmean``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from ._checks import check_disp, check_keypoints, check_options, check_spacing
from .warp import warp

__all__ = ["seg_dice", "dice", "hd95", "max_distance", "jacobian_det", "folding_percent", "sd_log_jacobian", "tre",
           "sample_disp", "pair_metrics"]


def _check_segs(seg_a: Tensor, seg_b: Tensor) -> None:
    for name, s in (("seg_a", seg_a), ("seg_b", seg_b)):
        if not isinstance(s, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, 1, *spatial), got {type(s).__name__}")
        if s.dim() not in (4, 5) or s.shape[1] != 1:
            raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, 1, D, H, W), got {tuple(s.shape)}")
        if s.is_floating_point():
            raise ValueError(f"{name} must be an integer label map, got {s.dtype}")
    if seg_a.shape != seg_b.shape:
        raise ValueError(f"seg_a {tuple(seg_a.shape)} and seg_b {tuple(seg_b.shape)} must have the same shape")


_spacing = check_spacing  # (spacing, ndim) -> (ndim,) float64 mm; the one spacing check, in _checks


def _check_mask(mask: Tensor, disp: Tensor, name: str = "mask") -> Tensor:
    """A ``(B, 1, *spatial)`` mask matching ``disp`` ``(B, ndim, *spatial)``, as a bool tensor ``(B, *spatial)``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, 1, *spatial), got {type(mask).__name__}")
    expected = (disp.shape[0], 1, *disp.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape (B, 1, *spatial) = {expected} to match disp "
                         f"{tuple(disp.shape)}, got {tuple(mask.shape)}")
    return mask[:, 0].to(device=disp.device, dtype=torch.bool)


def max_distance(shape: Sequence[int], spacing: float | Sequence[float] | None = None) -> float:
    """The largest distance between two voxel centres of a grid ``shape``, in mm: its diagonal
    ``sqrt(sum(((n_i - 1) * spacing_i) ** 2))``. :func:`hd95` scores a missing structure with it."""
    sp = _spacing(spacing, len(shape))
    return float(np.sqrt(np.sum(((np.asarray(shape, dtype=np.float64) - 1) * sp) ** 2)))


def dice(seg_a: Tensor, seg_b: Tensor, labels: Sequence[int]) -> Tensor:
    """Dice overlap ``2|A∩B| / (|A| + |B|)`` for each label.

    Args:
        seg_a, seg_b: integer label maps ``(B, 1, *spatial)``.
        labels: label ids to score (background is usually left out).
    Returns:
        ``(B, len(labels))`` float tensor: 0 where a label is in one map only (a missing structure is a
        failure), NaN where a label is absent from both maps (excluded: average with ``nanmean``).
    """
    _check_segs(seg_a, seg_b)
    labels = torch.as_tensor(list(labels), device=seg_a.device)
    a = seg_a.flatten(1).unsqueeze(-1) == labels  # (B, N, L)
    b = seg_b.flatten(1).unsqueeze(-1) == labels
    inter = (a & b).sum(1).double()
    total = a.sum(1).double() + b.sum(1).double()
    out = 2 * inter / total
    return out.float()


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def hd95(seg_a: Tensor, seg_b: Tensor, labels: Sequence[int], spacing: float | Sequence[float] | None = None
         ) -> Tensor:
    """95th-percentile symmetric Hausdorff distance between label surfaces, in mm.

    A label's surface is its voxels with a face neighbour outside it. For each label, the distances from every
    surface voxel of ``A`` to the nearest surface voxel of ``B`` (Euclidean, scaled by ``spacing``) and back are
    computed; the result is the larger of the two 95th percentiles (as MONAI's ``compute_hausdorff_distance``).

    Args:
        seg_a, seg_b: integer label maps ``(B, 1, *spatial)``.
        labels: label ids to score.
        spacing: mm per voxel, one number or one per spatial axis (default 1).
    Returns:
        ``(B, len(labels))`` float tensor in mm. A label present in one map only (e.g. a structure the warp wiped
        out) scores :func:`max_distance` of the image, the worst value possible, as a failure (see the module
        docstring); a label absent from both maps is NaN (excluded: average with ``nanmean``).
    """
    _check_segs(seg_a, seg_b)
    ndim = seg_a.dim() - 2
    sp = _spacing(spacing, ndim)
    worst = max_distance(seg_a.shape[2:], sp)
    a_np, b_np = seg_a[:, 0].cpu().numpy(), seg_b[:, 0].cpu().numpy()
    out = np.full((a_np.shape[0], len(labels)), np.nan)
    for i in range(a_np.shape[0]):
        for j, lab in enumerate(labels):
            ma, mb = a_np[i] == lab, b_np[i] == lab
            in_a, in_b = bool(ma.any()), bool(mb.any())
            if in_a != in_b:
                out[i, j] = worst
            if not (in_a and in_b):
                continue
            sa, sb = _surface(ma), _surface(mb)
            d_ab = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]
            d_ba = ndimage.distance_transform_edt(~sa, sampling=sp)[sb]
            out[i, j] = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    return torch.from_numpy(out).float()


def jacobian_det(disp: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``x -> x + disp(x)``, by central differences.

    ``J = det(I + ∇disp)`` with ``(∇disp)_ij = d disp_i / d x_j`` (array-axis order); second-order central
    differences inside, first-order one-sided ones at the border (as ``numpy.gradient``).

    Args:
        disp: ``(B, ndim, *spatial)`` in voxels.
    Returns:
        ``(B, *spatial)``; values ``<= 0`` mark folding.
    """
    ndim = check_disp(disp)
    grads = torch.gradient(disp, dim=list(range(2, 2 + ndim)))  # grads[j][:, i] = d disp_i / d x_j
    m = [[grads[j][:, i] + (1.0 if i == j else 0.0) for j in range(ndim)] for i in range(ndim)]
    if ndim == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def folding_percent(disp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Percentage of voxels with ``J <= 0``; returns ``(B,)``.

    Args:
        disp: ``(B, ndim, *spatial)`` in voxels.
        mask: optional ``(B, 1, *spatial)`` (non-zero = inside; ``ValueError`` for any other shape): only voxels
            inside count; an empty mask gives 0.
    """
    neg = (jacobian_det(disp) <= 0).float()
    if mask is None:
        return 100.0 * neg.flatten(1).mean(1)
    m = _check_mask(mask, disp).float()
    return 100.0 * (neg * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


def sd_log_jacobian(disp: Tensor, convention: str = "l2r", mask: Tensor | None = None) -> Tensor:
    """Standard deviation of the log Jacobian determinant; returns ``(B,)``.

    Conventions:
        ``"l2r"``: Learn2Reg's evaluation, ``std(log(clip(J + 3, 1e-9, 1e9)))`` over the crop ``[2:-2]`` of every
        spatial axis. The ``+ 3`` shift comes from the official code and makes this *not* the textbook value.
        ``"plain"``: the textbook ``std(log|J|)`` over all voxels (``|J|`` clipped at 1e-9).
    Args:
        disp: ``(B, ndim, *spatial)`` in voxels.
        mask: optional ``(B, 1, *spatial)`` (non-zero = inside; ``ValueError`` for any other shape); only voxels
            inside it count (NLST scores inside the lung mask).
    """
    check_options(convention, ("l2r", "plain"), "convention")
    jac = jacobian_det(disp)
    ndim = disp.shape[1]
    m = torch.ones_like(jac, dtype=torch.bool) if mask is None else _check_mask(mask, disp)
    if convention == "l2r":
        crop = (slice(None),) + (slice(2, -2),) * ndim
        jac, m = jac[crop], m[crop]
        logj = torch.log((jac + 3).clamp(1e-9, 1e9))
    else:
        logj = torch.log(jac.abs().clamp(1e-9, 1e9))
    out = []
    for b in range(jac.shape[0]):
        vals = logj[b][m[b]].double()
        out.append(vals.std(unbiased=False) if vals.numel() > 1 else vals.new_tensor(float("nan")))
    return torch.stack(out).float()


def sample_disp(disp: Tensor, points: Tensor) -> Tensor:
    """Linearly interpolate ``disp`` at voxel coordinates.

    Args:
        disp: ``(B, ndim, *spatial)``.
        points: ``(B, N, ndim)`` voxel coordinates in array-axis order.
    Returns:
        ``(B, N, ndim)`` displacement at the points (border values outside the image).
    """
    ndim = check_disp(disp)
    if points.dim() != 3 or points.shape[-1] != ndim or points.shape[0] != disp.shape[0]:
        raise ValueError(f"points must have shape (B={disp.shape[0]}, N, {ndim}), got {tuple(points.shape)}")
    # Treat the points as a (B, ndim, N, 1[, 1]) "image" grid: the displacement there is identity-relative.
    size = torch.tensor(disp.shape[2:], dtype=disp.dtype, device=disp.device)
    grid = (points.to(disp.dtype) * 2 / (size - 1).clamp_min(1) - 1).flip(-1)
    grid = grid.view(points.shape[0], points.shape[1], *([1] * (ndim - 1)), ndim)
    vals = torch.nn.functional.grid_sample(disp, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return vals.reshape(disp.shape[0], ndim, -1).transpose(1, 2)


def tre(kp_fixed: Tensor, kp_moving: Tensor, disp: Tensor, spacing: float | Sequence[float] | None = None
        ) -> Tensor:
    """Target registration error in mm: ``|| (kp_fixed + disp(kp_fixed) - kp_moving) * spacing ||``.

    ``disp`` is sampled at the fixed keypoints by linear interpolation (Learn2Reg's convention).
    Args:
        kp_fixed, kp_moving: ``(N, ndim)`` or ``(B, N, ndim)`` matching voxel coordinates (array-axis order).
        disp: ``(B, ndim, *spatial)`` in voxels (``B = 1`` for unbatched keypoints).
        spacing: mm per voxel.
    Returns:
        ``(N,)`` or ``(B, N)`` distances in mm, matching the keypoints' batching.
    Raises:
        ValueError: keypoints that are NaN/inf or outside the volume: every coordinate must lie in
            ``[-0.5, n - 0.5]`` on an axis of ``n`` voxels (inside the outer faces of the border voxels); the
            message says how many. Outside, ``disp`` would only be read from the border: a meaningless TRE.
    """
    ndim = check_disp(disp)
    kp_fixed, kp_moving = torch.as_tensor(kp_fixed), torch.as_tensor(kp_moving)
    if kp_fixed.shape != kp_moving.shape:
        raise ValueError(f"kp_fixed {tuple(kp_fixed.shape)} and kp_moving {tuple(kp_moving.shape)} must match")
    if kp_fixed.dim() not in (2, 3) or kp_fixed.shape[-1] != ndim:
        raise ValueError(f"keypoints must have shape (N, {ndim}) or (B, N, {ndim}) for a {ndim}D disp, "
                         f"got {tuple(kp_fixed.shape)}")
    for name, kp in (("kp_fixed", kp_fixed), ("kp_moving", kp_moving)):
        check_keypoints(kp, disp.shape[2:], name)
    batched = kp_fixed.dim() == 3
    if not batched:
        kp_fixed, kp_moving = kp_fixed.unsqueeze(0), kp_moving.unsqueeze(0)
    kf = kp_fixed.to(disp.device, disp.dtype)
    km = kp_moving.to(disp.device, disp.dtype)
    sp = torch.as_tensor(_spacing(spacing, ndim), dtype=disp.dtype, device=disp.device)
    err = torch.linalg.vector_norm((kf + sample_disp(disp, kf) - km) * sp, dim=-1)
    return err if batched else err[0]


def seg_dice(sample: Mapping, disp: Tensor, labels: Sequence[int] | None = None
             ) -> tuple[Sequence[int], Tensor, Tensor, Tensor] | None:
    """Dice after warping the moving segmentation by ``disp`` (``(1, ndim, *spatial)``, on the CPU) with nearest
    neighbour.

    Returns ``(labels, dice (L,), fixed_seg, warped_seg)``, or ``None`` when the sample has no segmentations.
    ``labels`` default to ``sample["labels"]``, else every non-zero label of the fixed segmentation.
    """
    if "fixed_seg" not in sample or "moving_seg" not in sample:
        return None
    fixed_seg, moving_seg = sample["fixed_seg"].cpu(), sample["moving_seg"].cpu()
    if labels is None:
        labels = sample.get("labels") or [int(v) for v in torch.unique(fixed_seg) if v != 0]
    warped_seg = warp(moving_seg, disp, mode="nearest")
    return labels, dice(fixed_seg, warped_seg, labels)[0], fixed_seg, warped_seg


def pair_metrics(sample: Mapping, disp: Tensor, labels: Sequence[int] | None = None, *,
                 with_hd95: bool = True) -> dict[str, float]:
    """Metrics of one registered pair (the numbers of a Table 1 row; :mod:`deqreg_lite.evaluate` and the trainer's
    validation both use this one function).

    Args:
        sample: a sample dict (``fixed_seg``, ``moving_seg``, ``spacing``, optionally ``labels``, ``fixed_kp``,
            ``moving_kp``, ``fixed_mask``).
        disp: ``(1, ndim, *spatial)`` displacement in voxels.
        labels: label ids for Dice and HD95 (default: ``sample["labels"]``, else every non-zero label).
        with_hd95: compute HD95 (the slowest metric; off for quick validation during training).
    Returns:
        ``dice`` (mean over labels, 0-1), ``dice_<id>`` per label, ``hd95`` (mm, mean over labels),
        ``folding_pct``, ``sdlogj`` (Learn2Reg convention), ``sdlogj_plain``, and ``tre_mm`` when keypoints exist.

    Missing structures count as failures in both means: a label in one map only (say, wiped out by the warp) has
    Dice 0 and HD95 equal to the image diagonal in mm (:func:`max_distance`), so it can only make the mean worse.
    Only labels absent from both maps are left out of the means (NaN, skipped by ``nanmean``); a pair with none of
    its labels present gets NaN.
    """
    disp = disp.detach().float().cpu()
    out: dict[str, float] = {}
    spacing = sample.get("spacing")
    seg = seg_dice(sample, disp, labels)
    if seg is not None:
        labels, d, fixed_seg, warped_seg = seg
        out["dice"] = float(torch.nanmean(d))
        for lab, v in zip(labels, d.tolist()):
            out[f"dice_{lab}"] = v
        if with_hd95:
            out["hd95"] = float(torch.nanmean(hd95(fixed_seg, warped_seg, labels, spacing)[0]))
    mask = sample.get("fixed_mask")
    out["folding_pct"] = float(folding_percent(disp)[0])
    out["sdlogj"] = float(sd_log_jacobian(disp, "l2r", mask=None if mask is None else mask.cpu())[0])
    out["sdlogj_plain"] = float(sd_log_jacobian(disp, "plain")[0])
    if "fixed_kp" in sample and "moving_kp" in sample:
        out["tre_mm"] = float(tre(sample["fixed_kp"], sample["moving_kp"], disp, spacing).mean())
    return out
