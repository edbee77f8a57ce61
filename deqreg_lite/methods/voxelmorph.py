"""VoxelMorph (one step): ``disp = UNet([fixed, moving])``."""
from __future__ import annotations

import torch
from torch import Tensor

from ..nets import UNet
from ..result import MethodInfo, RegistrationResult
from .base import Backward, LossFn, RegistrationMethod
from ._common import Clock, check_pair, check_steps, make_result, unet_apply

__all__ = ["VoxelMorph"]


class VoxelMorph(RegistrationMethod):
    """One-step registration: a U-Net (VoxelMorph's configuration, 2 inputs, ``ndim`` outputs) maps
    ``[fixed, moving]`` to the displacement in voxels. ``steps`` may only be ``None`` or 1.

    ``info``: ``steps`` (1), ``nfe`` (1), ``residuals`` (empty: there is no iteration).
    ``config()``: ``{"ndim": ndim}``.
    """

    name = "voxelmorph"
    trained_steps = 1

    def __init__(self, ndim: int) -> None:
        super().__init__(ndim)
        self.net = UNet(ndim, 2, ndim)

    def _disp(self, fixed: Tensor, moving: Tensor) -> Tensor:
        return unet_apply(self.net, torch.cat([fixed, moving], dim=1))

    def forward(self, fixed: Tensor, moving: Tensor, steps: int | None = None,
                return_states: bool = False) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (both ``(B, 1, *spatial)``); ``disp`` is ``(B, ndim, *spatial)``."""
        check_pair(fixed, moving, self.ndim, model=self)
        if check_steps(steps, 1) != 1:
            raise ValueError(f"VoxelMorph is a one-step method: steps must be None or 1, got {steps!r}")
        clock = Clock(fixed)
        disp = self._disp(fixed, moving)
        states = [disp.detach()] if return_states else []
        info = MethodInfo(steps=1, nfe=1, residuals=[])
        return make_result(disp, states, [1] if return_states else [], info, clock.elapsed())

    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                      backward: Backward = Tensor.backward) -> dict[str, float]:
        """``loss_fn(fixed, moving, UNet([fixed, moving]))``, back-propagated with ``backward``."""
        check_pair(fixed, moving, self.ndim, model=self)
        loss = loss_fn(fixed, moving, self._disp(fixed, moving))
        backward(loss)
        return {"loss": float(loss.detach()), "steps": 1.0, "nfe": 1.0}
