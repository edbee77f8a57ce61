"""Run a registration method at a coarser resolution: :class:`HalfResolution`, itself a registration method.

The shipped pretrained models were trained at 80 x 96 and take 160 x 192 images through this wrapper
(:func:`deqreg_lite.pretrained.load_pretrained`); the small 3D models, trained at a fixed size (e.g. 32^3), take
the shipped 96^3 volumes through it with ``size`` (:func:`deqreg_lite.pretrained.load_pretrained_3d`).
"""
from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

from torch import Tensor

from ..result import RegistrationResult
from ..warp import resize_disp, resize_image
from .base import Backward, LossFn, RegistrationMethod
from ._common import Clock, check_pair

__all__ = ["HalfResolution"]


class HalfResolution(RegistrationMethod):
    """Run ``method`` at ``1 / factor`` of the input resolution (the pretrained models work at 80 x 96).

    ``forward(fixed, moving, steps=None, return_states=False, **options)`` has the method's contract: ``fixed`` and
    ``moving`` ``(B, 1, *spatial)`` are blurred and resampled to ``max(2, s // factor)`` per axis
    (``align_corners=True``, :func:`~deqreg_lite.warp.resize_image`), the wrapped method runs there (``steps`` and
    any further keyword ``options``, e.g. DEQReg's ``tol`` and ``policy``, are passed on unchanged, so
    ``steps=None`` is the wrapped method's trained number of steps), and the displacement and every state come back
    at the input size via :func:`~deqreg_lite.warp.resize_disp` (in voxels of the input grid). ``info``,
    ``state_steps`` and the trace are the method's; ``info["internal_size"]`` and ``info["factor"]`` (in
    ``info.extras``) record the working size and the factor. ``name``, ``trained_steps``, ``ndim`` and
    ``config()`` are the wrapped method's (a checkpoint of the wrapper's ``method`` rebuilds it unwrapped);
    :meth:`training_step` trains it on the downsampled pair.

    With ``size``, the method runs at that fixed working size whatever the input's (a model trained at 32^3 then
    sees 32^3 for a 96^3 and for a 48^3 input alike), and ``factor`` is only the nominal ratio recorded in ``info``.

    Args:
        method: the registration method to wrap.
        factor: integer resolution factor >= 1 (2: half resolution).
        size: optional fixed working size, ``ndim`` integers >= 2 (default None: ``s // factor`` per axis).
    """

    def __init__(self, method: RegistrationMethod, factor: int = 2, size: Optional[Sequence[int]] = None) -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        if size is not None:
            try:
                items = tuple(size)
            except TypeError:
                items = ()
            if len(items) != method.ndim or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                    and v >= 2 for v in items):
                raise ValueError(f"size must be None or {method.ndim} integers >= 2 (the working size), got {size!r}")
            size = tuple(int(v) for v in items)
        super().__init__(method.ndim)
        self.method = method
        self.factor = factor
        self.size = size

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.method.name

    @property
    def trained_steps(self) -> int:  # type: ignore[override]
        return self.method.trained_steps

    def config(self) -> dict:
        """The wrapped method's constructor options (``build_method(name, **config())`` rebuilds it unwrapped)."""
        return self.method.config()

    def extra_repr(self) -> str:
        return f"factor={self.factor}" + (f", size={self.size}" if self.size is not None else "")

    def internal_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The working size for an input of size ``spatial`` (``size`` when it is set)."""
        if self.size is not None:
            return self.size
        return tuple(max(2, int(s) // self.factor) for s in spatial)

    def downsample(self, fixed: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
        """The images as the wrapped method sees them: ``(B, 1, *spatial)`` -> ``(B, 1, *internal_size)``.

        The inputs are checked first, as the wrapped method would (:func:`deqreg_lite.methods._common.check_pair`):
        same shape, floating point of the model's dtype, intensities in [0, 1]; ``ValueError`` otherwise."""
        check_pair(fixed, moving, self.ndim, model=self.method)
        size = self.internal_size(fixed.shape[2:])
        return resize_image(fixed, size), resize_image(moving, size)

    def forward(self, fixed: Tensor, moving: Tensor, steps: Optional[int] = None,
                return_states: bool = False, **options: Any) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (``(B, 1, *spatial)``) at ``1 / factor`` resolution; the fields come
        back at the input size. ``options`` go to the wrapped method's ``forward`` (``TypeError`` there for one it
        does not take)."""
        clock = Clock(fixed)
        spatial = tuple(fixed.shape[2:])
        f, m = self.downsample(fixed, moving)
        res = self.method(f, m, steps=steps, return_states=return_states, **options)
        info = res.info.copy()
        info["internal_size"] = tuple(f.shape[2:])
        info["factor"] = self.factor
        return RegistrationResult(disp=resize_disp(res.disp, spatial),
                                  states=[resize_disp(s, spatial) for s in res.states],
                                  state_steps=list(res.state_steps), trace=dict(res.trace), info=info,
                                  time=clock.elapsed())

    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                      backward: Backward = Tensor.backward) -> dict[str, float]:
        """The wrapped method's training step on the downsampled pair (``loss_fn`` sees the working size)."""
        f, m = self.downsample(fixed, moving)
        return self.method.training_step(f, m, loss_fn, backward)
