"""The training loss of every learned method: ``L(phi) = (1 - LNCC(If, Im o phi)) + lam * diffusion(phi)``.

Units and the default ``lam = 1``. Displacements are in **voxels** throughout deqreg_lite, so
:func:`~deqreg_lite.losses.diffusion` is in voxels² (mean squared forward difference) and ``lam`` is in
``L_sim / voxel²``. The paper's ``lam = 0.1`` (OASIS) was set in its own code's units; taken over to voxel units it
regularises too little: in measurements on this project (shared/lessons.md) one-step and unrolled models trained with
``lam = 0.1`` collapsed after 2-3 minutes (25-28% folded voxels, Dice falling from 0.89 to 0.85), while ``lam = 1``
did not. Hence the default ``lam = 1.0``; pass ``lam=0.1`` to reproduce the paper's number literally.

An optional soft-Dice term (``dice_weight > 0``) needs label maps: :meth:`RegistrationLoss.with_segs` binds them
and returns a loss with the same ``loss_fn(fixed, moving, disp)`` signature, so the methods never see labels.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .._checks import check_disp, check_image, check_same_spatial
from ..losses import diffusion, lncc
from ..warp import warp

__all__ = ["RegistrationLoss", "soft_dice"]

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def soft_dice(warped_onehot: Tensor, fixed_onehot: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean soft Dice over batch and channels of two ``(B, L, *spatial)`` maps in [0, 1]; a scalar in [0, 1]."""
    axes = tuple(range(2, warped_onehot.dim()))
    inter = (warped_onehot * fixed_onehot).sum(axes)
    denom = warped_onehot.sum(axes) + fixed_onehot.sum(axes)
    return ((2 * inter + eps) / (denom + eps)).mean()


class RegistrationLoss:
    """``loss_fn(fixed, moving, disp) = (1 - lncc(fixed, warp(moving, disp), win)) + lam * diffusion(disp)``.

    Args:
        lam: weight of the diffusion term, in ``L_sim / voxel²`` (displacements are in voxels; see the module
            docstring for why the default is 1 and not the paper's 0.1).
        win: LNCC window in voxels (the paper: 5).
        dice_weight: weight of ``1 - soft Dice`` when label maps are bound with :meth:`with_segs` (0: unused).

    Call with ``fixed``, ``moving`` ``(B, 1, *spatial)`` and ``disp`` ``(B, ndim, *spatial)``; returns a scalar.
    """

    def __init__(self, lam: float = 1.0, win: int = 5, dice_weight: float = 0.0) -> None:
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        if isinstance(win, bool) or not isinstance(win, int) or win < 1 or win % 2 == 0:
            raise ValueError(f"win must be a positive odd integer, got {win!r}")
        if not dice_weight >= 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight!r}")
        self.lam, self.win, self.dice_weight = float(lam), win, float(dice_weight)

    def __repr__(self) -> str:
        return f"RegistrationLoss(lam={self.lam:g}, win={self.win}, dice_weight={self.dice_weight:g})"

    def terms(self, fixed: Tensor, moving: Tensor, disp: Tensor) -> dict[str, Tensor]:
        """``{"loss", "similarity" (1 - lncc), "regulariser" (diffusion)}``, scalar tensors."""
        check_image(fixed, "fixed")
        check_disp(disp)
        check_same_spatial(fixed, disp, "fixed", "disp")
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same shape")
        sim = 1.0 - lncc(fixed, warp(moving, disp), win=self.win)
        reg = diffusion(disp)
        return {"loss": sim + self.lam * reg, "similarity": sim, "regulariser": reg}

    def __call__(self, fixed: Tensor, moving: Tensor, disp: Tensor) -> Tensor:
        return self.terms(fixed, moving, disp)["loss"]

    def with_segs(self, fixed_seg: Tensor, moving_seg: Tensor, labels: Sequence[int] | None = None) -> LossFn:
        """Bind label maps ``(B, 1, *spatial)`` (integers) and return ``loss_fn(fixed, moving, disp)`` that adds
        ``dice_weight * (1 - soft Dice)`` over ``labels`` (default: every label > 0 present in either map).
        The moving one-hot maps are warped bilinearly, so the term is differentiable. With ``dice_weight == 0``
        this returns ``self``."""
        if self.dice_weight == 0:
            return self
        check_image(fixed_seg, "fixed_seg")
        if fixed_seg.shape != moving_seg.shape or fixed_seg.shape[1] != 1:
            raise ValueError(f"fixed_seg {tuple(fixed_seg.shape)} and moving_seg {tuple(moving_seg.shape)} must be "
                             f"label maps of the same shape (B, 1, *spatial)")
        if fixed_seg.is_floating_point() or moving_seg.is_floating_point():
            raise ValueError("fixed_seg and moving_seg must be integer label maps")
        if labels is None:
            labels = sorted((set(torch.unique(fixed_seg).tolist()) | set(torch.unique(moving_seg).tolist())) - {0})
        if not labels:
            raise ValueError("no foreground label (> 0) to compute a Dice term on")
        ids = torch.as_tensor(list(labels), device=fixed_seg.device).view(1, -1, *([1] * (fixed_seg.dim() - 2)))
        fixed_oh = (fixed_seg == ids).float()
        moving_oh = (moving_seg == ids).float()

        def loss_fn(fixed: Tensor, moving: Tensor, disp: Tensor) -> Tensor:
            base = self(fixed, moving, disp)
            warped = warp(moving_oh.to(disp.dtype), disp)
            return base + self.dice_weight * (1.0 - soft_dice(warped, fixed_oh.to(disp.dtype)))

        return loss_fn
