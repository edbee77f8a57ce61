"""Vanilla unrolling (Eq. 3) at one resolution: weight-tied residual updates trained by backpropagation through time.

:class:`Unrolling` (``"unrolling"``) is a **single-level** ``T = 3`` model, an extra of this package kept because the
shipped checkpoint ``data/checkpoints/unrolling.pt`` holds one. The paper's Unrolling baseline is multi-level
(GraDIRN without similarity gradients, 3 levels x 3 steps):
:class:`~deqreg_lite.methods.gradirn.MultiLevelUnrolling` (``"unrolling_ml"``).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..nets import UNet
from ..result import MethodInfo, RegistrationResult
from .base import Backward, LossFn, RegistrationMethod
from ._common import check_count, iterate_forward, last_field_training_step, rel_residual, residual_step

__all__ = ["RecurrentMethod", "Unrolling"]


class RecurrentMethod(RegistrationMethod):
    """Shared loop of the methods that repeat one learned update from ``phi_0 = 0`` (Unrolling, RIIR).

    Subclasses set ``T`` and define :meth:`_update` (one step, with an optional recurrent state) and, when they
    carry such a state, :meth:`_start`. ``forward`` runs ``steps`` updates (default ``T``); ``info`` holds
    ``steps``, ``nfe`` (= steps) and ``residuals`` (a :class:`~deqreg_lite.result.MethodInfo`) (``||phi_{t+1} - phi_t|| / ||phi_{t+1}||`` per step, maximum over
    the batch); states are ``phi_1 .. phi_steps`` (``state_steps`` 1..steps).
    """

    T: int

    def _start(self, fixed: Tensor) -> Any:
        """The recurrent state before the first step (``None``: no state)."""
        return None

    def _update(self, fixed: Tensor, moving: Tensor, phi: Tensor, state: Any) -> tuple[Tensor, Any]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _iterate(self, fixed: Tensor, moving: Tensor, steps: int,
                 keep: bool) -> tuple[Tensor, list[Tensor], MethodInfo]:
        """Run ``steps`` updates from zero (with the graph when grad mode is on); return the last field, the fields
        of every step when ``keep`` (else empty) and the :class:`MethodInfo` (steps, nfe, residual trace)."""
        phi = fixed.new_zeros(fixed.shape[0], self.ndim, *fixed.shape[2:])
        state = self._start(fixed)
        phis, residuals = [], []
        for _ in range(steps):
            new, state = self._update(fixed, moving, phi, state)
            residuals.append(rel_residual(new, phi))
            phi = new
            if keep:
                phis.append(phi)
        return phi, phis, MethodInfo(steps=steps, nfe=steps, residuals=residuals)

    def forward(self, fixed: Tensor, moving: Tensor, steps: Optional[int] = None,
                return_states: bool = False) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (both ``(B, 1, *spatial)``) in ``steps`` (default ``T``) updates."""
        return iterate_forward(self, fixed, moving, steps, return_states)


class Unrolling(RecurrentMethod):
    """``phi_{t+1} = phi_t + f_theta([If, Im o phi_t, phi_t])``, ``phi_0 = 0`` (Eq. 3), one U-Net (``2 + ndim``
    inputs) shared by every step, at the input resolution only. Trained by BPTT through ``T`` steps with the loss on
    the last step only (``w_t = 0`` in Eq. 4); memory grows linearly with ``T``. At test time ``steps`` may be any
    count >= 1; ``info`` and the states are :class:`RecurrentMethod`'s.

    A single-level extra, not the paper's Unrolling baseline, which is multi-level:
    :class:`~deqreg_lite.methods.gradirn.MultiLevelUnrolling` (``"unrolling_ml"``).
    """

    name = "unrolling"

    def __init__(self, ndim: int, T: int = 3) -> None:
        super().__init__(ndim)
        self.T = self.trained_steps = check_count(T, "T")
        self.net = UNet(ndim, 2 + ndim, ndim)

    def _update(self, fixed: Tensor, moving: Tensor, phi: Tensor, state: None) -> tuple[Tensor, None]:
        return residual_step(self.net, fixed, moving, phi), None

    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                      backward: Backward = Tensor.backward) -> dict[str, float]:
        """BPTT through ``T`` steps, loss on ``phi_T`` only."""
        return last_field_training_step(self, fixed, moving, loss_fn, backward, self.T)
