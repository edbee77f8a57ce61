"""The one interface that every registration method shares.

A method is an ``nn.Module``; calling it registers a batch::

    result = method(fixed, moving, steps=None, return_states=False)   # -> RegistrationResult

* ``fixed``, ``moving``: ``(B, 1, *spatial)`` images in [0, 1];
* ``steps``: number of iterations at test time (``None``: the trained number). One-step methods accept only
  ``None`` or 1. Iterative methods accept any ``steps >= 1``, far beyond the trained count too;
* ``return_states``: also fill ``result.states`` (every iterate, ``(B, ndim, *spatial)`` each) and
  ``result.state_steps``;
* ``result.info`` holds at least ``steps`` (iterations run) and, for iterative methods, ``residuals`` (the
  relative update size ``||phi_{t+1} - phi_t|| / ||phi_{t+1}||`` per step) and ``nfe`` (network calls).

Every method works under ``torch.no_grad()`` (methods that need a similarity gradient enable grad inside).

Training goes through :meth:`RegistrationMethod.training_step`, which computes the method's own training loss
(BPTT for unrolled methods, the Eq. 9 correction loss with the phantom gradient for DEQReg), calls ``backward``
on it, and returns a dict of floats (at least ``loss``). The trainer only zeroes gradients, calls
``training_step`` and steps the optimizer: it never reaches into a method's insides.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..losses import LossFn  # declared once, on the losses floor
from ..result import RegistrationResult

__all__ = ["RegistrationMethod", "LossFn", "Backward"]

#: ``backward(loss)``: ``loss.backward()`` by default; the trainer passes a scaled version under AMP.
Backward = Callable[[Tensor], None]


class RegistrationMethod(nn.Module):
    """Base class: subclasses implement :meth:`forward` and :meth:`training_step`.

    Attributes:
        name: short name used in tables and checkpoints (``"voxelmorph"``, ``"deqreg"``, ...).
        ndim: 2 or 3.
        trained_steps: the number of steps used in training (``None`` for one-step methods is 1).
    """

    name: str = "method"
    trained_steps: int = 1

    def __init__(self, ndim: int) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim = ndim

    def forward(self, fixed: Tensor, moving: Tensor, steps: int | None = None,
                return_states: bool = False) -> RegistrationResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                      backward: Backward = Tensor.backward) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        """The constructor arguments, so that a checkpoint can rebuild the method."""
        raise NotImplementedError
