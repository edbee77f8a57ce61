"""GraDIRN-style unrolling: learned updates plus an explicit similarity-gradient step, over resolution levels.

Each step at level ``l`` (images resampled to that level, displacement in that level's voxels)::

    g    = normalise(d(1 - LNCC(If, Im o phi)) / d phi)         # max|g| = 1 per sample (similarity_grad)
    phi <- phi + CNN_l([If, Im o phi, phi, g]) - eta_l * g

with ``levels`` levels (default 3: 1/4, 1/2, 1) and ``steps_per_level`` steps each; the field is upsampled
between levels with :func:`~deqreg_lite.warp.resize_disp` (values rescaled to the new voxel size).

Design choices (documented because the paper leaves them open):

* **Weights shared per level**: one U-Net (VoxelMorph configuration, ``2 + 2 ndim`` inputs) per level, tied across
  that level's steps, and one learnable step size ``eta_l = softplus(rho_l)`` per level (initial 1 voxel of that
  level). Tying within a level is what lets ``steps`` vary at test time, as the paper does at the highest level.
* **The similarity gradient is an input**: computed with ``create_graph=False`` on a detached field, in training too,
  so no second derivatives are taken (cheaper, and ``grid_sample``'s double backward is not needed); the gradient of
  the training loss flows through the CNN and the identity path only. It is normalised by its max-abs per sample, so
  the step is scale-free (``eta_l`` is in voxels). It is :func:`~deqreg_lite.methods._common.similarity_grad`:
  the chain rule with the moving image's central-difference gradient (continuous in ``phi``, so float32, float64,
  CPU and CUDA agree; the exact derivative of the bilinear warp is one-sided on grid lines, where rounding picks the
  side) and an LNCC with a strong variance floor (``GRAD_EPS``), so that faint noise on flat patches does not
  steer the iteration.
* Images are blurred (a box about the reduction factor wide) and resampled with ``align_corners=True``, the grid
  convention of ``resize_disp``; sizes are ``max(2, s // 2**(levels - 1 - l))``. The U-Nets pad any size.
* ``steps`` at test time sets the number of steps at the **highest** level; coarser levels always run
  ``steps_per_level``. ``trained_steps`` is therefore ``steps_per_level``. States, ``state_steps`` and
  ``residuals`` cover the highest level only (``info.extras["coarse_residuals"]`` holds the others); ``nfe`` counts every
  network call.
* Loss on the final output only (``w_t = 0`` in Eq. 4), BPTT through all ``levels * steps_per_level`` steps.

**The paper's Unrolling baseline** is this method without the similarity gradient (its Fig. 1 and convergence
analysis: "the vanilla version of GraDIRN without incorporating similarity gradients", 3 levels x 3 steps, steps
varied at the finest level): :class:`MultiLevelUnrolling`, registered as ``"unrolling_ml"``. Each of its steps at
level ``l`` is Eq. 3 at that level::

    phi <- phi + CNN_l([If, Im o phi, phi])                   # no g, no eta_l: U-Net with 2 + ndim inputs

with the same levels, resampling, weight tying, ``steps`` / states / ``info`` and BPTT training as GraDIRN. The
switch is the class attribute :attr:`GraDIRN.use_grad` (``True`` here, ``False`` in the subclass), not a constructor
option, so that one configuration has one name: a ``"gradirn"`` model always has the gradient step, and its config
and checkpoints are unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets import UNet
from ..result import MethodInfo, RegistrationResult
from ..warp import resize_disp, warp
from .base import Backward, LossFn, RegistrationMethod
from ._common import (check_count, downsample, iterate_forward, last_field_training_step, rel_residual,
                      residual_step, similarity_grad, unet_apply)

__all__ = ["GraDIRN", "MultiLevelUnrolling"]


class GraDIRN(RegistrationMethod):
    """Multi-level learned gradient descent (GraDIRN). See the module docstring for the update and the choices.

    Args:
        ndim: 2 or 3.
        levels: resolution levels (factors ``2**(levels-1) .. 1``); the paper: 3.
        steps_per_level: steps at every level during training; the paper: 3.
        eta_init: initial step size of the gradient term, in voxels of each level.

    Attributes:
        use_grad: whether the steps use the similarity gradient (input ``g`` and step ``- eta_l g``): ``True`` for
            GraDIRN, ``False`` for :class:`MultiLevelUnrolling` (a class attribute: it names the method).
    """

    name = "gradirn"
    use_grad: bool = True

    def __init__(self, ndim: int, levels: int = 3, steps_per_level: int = 3, eta_init: float = 1.0) -> None:
        super().__init__(ndim)
        self.levels = check_count(levels, "levels")
        self.steps_per_level = self.trained_steps = check_count(steps_per_level, "steps_per_level")
        inputs = 2 + ndim + (ndim if self.use_grad else 0)  # [If, Im o phi, phi(, g)]
        self.nets = nn.ModuleList(UNet(ndim, inputs, ndim) for _ in range(levels))
        if self.use_grad:
            if not 0 < eta_init < math.inf:
                raise ValueError(f"eta_init must be a positive number, got {eta_init!r}")
            self.eta_init = float(eta_init)
            rho = math.log(math.expm1(self.eta_init))  # softplus^-1
            self.rho = nn.Parameter(torch.full((levels,), rho))

    @property
    def eta(self) -> Optional[Tensor]:
        """The per-level step sizes ``(levels,)``, in voxels of each level (``None`` without the gradient step)."""
        return F.softplus(self.rho) if self.use_grad else None

    def _iterate(self, fixed: Tensor, moving: Tensor, steps: int,
                 keep: bool) -> tuple[Tensor, list[Tensor], MethodInfo]:
        spatial = fixed.shape[2:]
        eta = self.eta
        phi: Optional[Tensor] = None
        phis: list[Tensor] = []
        residuals: list[list[float]] = []
        for level in range(self.levels):
            factor = 2 ** (self.levels - 1 - level)
            size = [max(2, s // factor) for s in spatial]
            f_l, m_l = downsample(fixed, size), downsample(moving, size)
            if phi is None:
                phi = fixed.new_zeros(fixed.shape[0], self.ndim, *size)
            else:
                phi = resize_disp(phi, size)
            top = level == self.levels - 1
            trace: list[float] = []
            for _ in range(steps if top else self.steps_per_level):
                if eta is not None:
                    g = similarity_grad(f_l, m_l, phi)
                    update = unet_apply(self.nets[level], torch.cat([f_l, warp(m_l, phi), phi, g], dim=1))
                    new = phi + update - eta[level] * g
                else:  # Eq. 3 at this level
                    new = residual_step(self.nets[level], f_l, m_l, phi)
                trace.append(rel_residual(new, phi))
                phi = new
                if keep and top:
                    phis.append(phi)
            residuals.append(trace)
        nfe = sum(len(t) for t in residuals)
        info = MethodInfo(steps=steps, nfe=nfe, residuals=residuals[-1],
                          extras={"coarse_residuals": residuals[:-1]})
        return phi, phis, info

    def forward(self, fixed: Tensor, moving: Tensor, steps: Optional[int] = None,
                return_states: bool = False) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (``(B, 1, *spatial)``); ``steps`` (default ``steps_per_level``) is the
        number of steps at the highest level. Works under ``torch.no_grad()`` (the similarity gradient enables grad
        locally)."""
        return iterate_forward(self, fixed, moving, steps, return_states)

    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                      backward: Backward = Tensor.backward) -> dict[str, float]:
        """BPTT through every level's steps (``levels * steps_per_level`` network calls), loss on the final
        full-resolution field only; returns ``loss``, ``steps``, ``nfe``, ``residual`` and, with the gradient step,
        ``eta0 .. eta{levels-1}``."""
        out = last_field_training_step(self, fixed, moving, loss_fn, backward, self.steps_per_level)
        eta = self.eta
        if eta is not None:
            out.update({f"eta{l}": float(e) for l, e in enumerate(eta.detach())})
        return out


class MultiLevelUnrolling(GraDIRN):
    """The paper's **Unrolling** baseline: GraDIRN without the similarity gradient (module docstring).

    ``phi <- phi + CNN_l([If, Im o phi, phi])`` (Eq. 3 per level), ``levels`` levels (1/4, 1/2, 1 by default) of
    ``steps_per_level`` weight-tied steps each, one U-Net (``2 + ndim`` inputs, VoxelMorph configuration) per level;
    the field is upsampled between levels. ``steps`` at test time sets the steps at the finest level (the paper's
    Fig. 1 and Fig. 3 vary those), coarser levels always run ``steps_per_level``; ``trained_steps`` is
    ``steps_per_level``. States, ``state_steps`` and ``info["residuals"]`` cover the finest level,
    ``info.extras["coarse_residuals"]`` the others, ``nfe`` counts every network call. Trained by BPTT through all
    ``levels * steps_per_level`` steps, loss on the final field only (``w_t = 0`` in Eq. 4); memory grows linearly
    with ``steps_per_level``.

    Naming: registered as ``"unrolling_ml"`` (multi-level unrolling). The name ``"unrolling"`` still belongs to
    :class:`~deqreg_lite.methods.unrolling.Unrolling`, a single-level ``T = 3`` model that is kept as an extra
    because the shipped checkpoint ``data/checkpoints/unrolling.pt`` holds one; the names are to be swapped when the
    checkpoints are retrained, not before.

    Args:
        ndim: 2 or 3.
        levels: resolution levels (factors ``2**(levels-1) .. 1``); the paper: 3.
        steps_per_level: steps at every level during training; the paper: 3.
    """

    name = "unrolling_ml"
    use_grad = False

    def __init__(self, ndim: int, levels: int = 3, steps_per_level: int = 3) -> None:
        super().__init__(ndim, levels=levels, steps_per_level=steps_per_level)
