"""The training loss of every learned method: the library's one objective, :class:`deqreg_lite.losses.Objective`.

``RegistrationLoss(lam, win, dice_weight)`` is ``Objective("lncc", "diffusion", lam, win, dice_weight)`` under its
training name and defaults: ``loss_fn(fixed, moving, disp) = (1 - lncc(fixed, warp(moving, disp), win)) + lam *
diffusion(disp)``, ``lam = 1`` in voxel units (:class:`~deqreg_lite.losses.Objective` says why not the paper's
0.1). The optional soft-Dice term (``dice_weight > 0``, labels bound with ``with_segs``) and :func:`soft_dice` live
in :mod:`deqreg_lite.losses` too; they are re-exported here so that older code, notebooks and checkpoints keep working.
"""
from __future__ import annotations

from ..losses import LossFn, Objective, soft_dice

__all__ = ["RegistrationLoss", "soft_dice", "LossFn"]


class RegistrationLoss(Objective):
    """``Objective("lncc", "diffusion", lam, win, dice_weight)``: the same values, gradients and checks.

    Args:
        lam: weight of the diffusion term, >= 0, in ``L_sim / voxel²`` (default 1; see
            :class:`~deqreg_lite.losses.Objective` for why not the paper's 0.1).
        win: LNCC window in voxels, a positive odd integer (the paper: 5).
        dice_weight: weight of ``1 - soft Dice`` when label maps are bound with ``with_segs`` (0: unused).

    Call with ``fixed``, ``moving`` ``(B, 1, *spatial)`` and ``disp`` ``(B, ndim, *spatial)``; returns a scalar.
    ``terms()`` returns :class:`~deqreg_lite.losses.Terms` (``energy``, ``similarity``, ``regulariser``).
    """

    def __init__(self, lam: float = 1.0, win: int = 5, dice_weight: float = 0.0) -> None:
        super().__init__("lncc", "diffusion", lam=lam, win=win, dice_weight=dice_weight)

    def __repr__(self) -> str:
        return f"RegistrationLoss(lam={self.lam:g}, win={self.win}, dice_weight={self.dice_weight:g})"
