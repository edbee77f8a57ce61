"""The one result type that every registration method returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .warp import warp

__all__ = ["RegistrationResult"]


@dataclass
class RegistrationResult:
    """What a registration method returns.

    Attributes:
        disp: ``(B, ndim, *spatial)`` displacement in voxels (fixed grid -> moving image).
        states: intermediate displacements ``[(B, ndim, *spatial), ...]`` when asked for, else an empty list.
        state_steps: the iteration index of each entry of ``states``.
        trace: per-iteration curves, e.g. ``{"energy": [...], "similarity": [...], "regulariser": [...]}``, or the
            solver's residuals for learned methods.
        info: anything else (step counts, NFE, convergence flags, options).
        time: wall-clock seconds of the registration.
    """

    disp: Tensor
    states: list[Tensor] = field(default_factory=list)
    state_steps: list[int] = field(default_factory=list)
    trace: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0

    def warp(self, image: Tensor, mode: str = "bilinear") -> Tensor:
        """Warp ``image`` ``(B, C, *spatial)`` with this result's displacement (``mode="nearest"`` for labels)."""
        return warp(image, self.disp.to(image.device), mode=mode)
