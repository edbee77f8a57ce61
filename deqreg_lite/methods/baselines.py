"""The baselines, behind the same interface as the learned methods: no registration, classical gradient descent
(:func:`deqreg_lite.classical.register`, Eq. 2) and elastix B-splines (optional ``itk-elastix``).

Each is a :class:`~deqreg_lite.methods.base.RegistrationMethod` for a given ``ndim``::

    result = IdentityBaseline(2)(fixed, moving, steps=None, return_states=False)  # -> RegistrationResult

They have no parameters and nothing to train: :meth:`~BaselineMethod.training_step` raises ``TypeError``.

The factories used in tables, :func:`identity_method`, :func:`classical_method` and :func:`elastix_method`, give a
baseline for any ``ndim``: :class:`AnyNdim` builds the method for the number of spatial axes of the pair it is
called with (once per ``ndim``), so one object registers 2D and 3D pairs alike, as a plain callable.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..result import RegistrationResult
from .base import Backward, LossFn, RegistrationMethod

__all__ = ["BaselineMethod", "IdentityBaseline", "ClassicalBaseline", "ElastixBaseline", "AnyNdim",
           "identity_method", "classical_method", "elastix_method", "elastix_available", "ELASTIX_INSTALL_HINT"]

ELASTIX_INSTALL_HINT = "pip install itk-elastix"


class BaselineMethod(RegistrationMethod):
    """A registration method with nothing to learn (no parameters); :meth:`training_step` raises ``TypeError``."""

    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                      backward: Backward = Tensor.backward) -> dict[str, float]:
        raise TypeError(f"{type(self).__name__} ({self.name!r}) is a baseline: it has no parameters and nothing "
                        "to train; train a learned method (deqreg_lite.methods.build_method) instead")

    def _check_ndim(self, fixed: Tensor, moving: Tensor) -> None:
        for label, x in (("fixed", fixed), ("moving", moving)):
            if x.dim() != self.ndim + 2:
                raise ValueError(f"{label} must have shape (B, C, *{self.ndim} spatial axes) for a {self.ndim}D "
                                 f"{self.name} method, got {tuple(x.shape)}")


class IdentityBaseline(BaselineMethod):
    """No registration: a zero displacement ``(B, ndim, *spatial)`` (the "Affine"/"Initial" row: the pairs are
    pre-aligned). ``steps`` is ignored; ``info["steps"]`` is 0; ``return_states`` gives the one zero state
    (``state_steps == [0]``)."""

    name = "identity"
    trained_steps = 0

    def __init__(self, ndim: int) -> None:
        super().__init__(ndim)

    def config(self) -> dict:
        return {"ndim": self.ndim}

    def forward(self, fixed: Tensor, moving: Tensor, steps: int | None = None,
                return_states: bool = False) -> RegistrationResult:
        self._check_ndim(fixed, moving)
        disp = fixed.new_zeros(fixed.shape[0], self.ndim, *fixed.shape[2:])
        return RegistrationResult(disp=disp, states=[disp] if return_states else [],
                                  state_steps=[0] if return_states else [], info={"steps": 0})


class ClassicalBaseline(BaselineMethod):
    """Classical gradient-descent registration, :func:`deqreg_lite.classical.register` with ``register_kwargs``
    (``lam``, ``iterations``, ``levels``, ``optimizer``, ...; ``progress`` defaults to False).

    ``steps`` sets the iterations of the finest level (``None``: those given); ``return_states`` records every
    iteration of the finest level (``state_steps`` 0, 1, ..., steps), so a step sweep reads from one run.
    ``info["steps"]`` is the number of finest-level iterations run. Runs with gradients enabled, also under
    ``torch.no_grad()``.
    """

    def __init__(self, ndim: int, name: str = "classical", **register_kwargs: Any) -> None:
        super().__init__(ndim)
        register_kwargs.setdefault("progress", False)
        if "record_every" in register_kwargs:
            raise TypeError("classical_method sets record_every itself (from return_states)")
        self.name = name
        self.register_kwargs = register_kwargs
        its = register_kwargs.get("iterations", 200)
        self.trained_steps = its if isinstance(its, int) else int(list(its)[-1])

    def config(self) -> dict:
        return {"ndim": self.ndim, "name": self.name, **self.register_kwargs}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.register_kwargs.items())

    def forward(self, fixed: Tensor, moving: Tensor, steps: int | None = None,
                return_states: bool = False) -> RegistrationResult:
        from ..classical import register

        self._check_ndim(fixed, moving)
        kw = dict(self.register_kwargs)
        if steps is not None:
            levels = int(kw.get("levels", 1))
            its = kw.get("iterations", 200)
            its = [int(its)] * levels if isinstance(its, int) else [int(i) for i in its]
            its[-1] = int(steps)  # steps counts the iterations of the finest level
            kw["iterations"] = its if levels > 1 else its[0]
        with torch.enable_grad():
            result = register(fixed, moving, record_every=1 if return_states else 0, **kw)
        its = result.info.get("iterations")
        if its:
            result.info["steps"] = int(its[-1])
        return result


def elastix_available() -> bool:
    """Whether the optional ``itk-elastix`` package can be imported."""
    try:
        import itk

        return hasattr(itk, "elastix_registration_method")
    except ImportError:
        return False


def _import_itk():
    try:
        import itk
    except ImportError as e:
        raise ImportError(f"elastix needs the optional package itk-elastix, which is not installed: "
                          f"`{ELASTIX_INSTALL_HINT}` (about 100 MB of wheels)") from e
    if not hasattr(itk, "elastix_registration_method"):
        raise ImportError(f"the installed itk has no elastix; install the elastix wheels: `{ELASTIX_INSTALL_HINT}`")
    return itk


class ElastixBaseline(BaselineMethod):
    """elastix B-spline registration (the paper's baseline: 3 levels, final grid spacing 4 voxels).

    Needs the optional ``itk-elastix`` package (``pip install itk-elastix``); building the method without it raises
    ``ImportError`` saying how to install it. Images are passed with unit spacing, so the grid spacing is in voxels
    and the returned displacement is in voxels (array-axis order, fixed grid -> moving image, as everywhere in
    deqreg_lite). Extra ``parameters`` override entries of elastix's default B-spline parameter map (values are
    converted to lists of strings). One pair at a time (batch 1). elastix has no step count: ``steps`` other than
    ``None`` is a ``TypeError``; ``return_states`` gives no states. ``result.time`` is elastix's wall time.
    Untested here: itk-elastix was not installed on the development machine.
    """

    def __init__(self, ndim: int, grid_spacing: float = 4.0, levels: int = 3, iterations: int = 500,
                 metric: str = "AdvancedNormalizedCorrelation", name: str = "elastix", **parameters: Any) -> None:
        super().__init__(ndim)
        self._itk = _import_itk()
        self.name = name
        self.grid_spacing, self.levels, self.iterations, self.metric = grid_spacing, levels, iterations, metric
        self.parameters = parameters

    def config(self) -> dict:
        return {"ndim": self.ndim, "grid_spacing": self.grid_spacing, "levels": self.levels,
                "iterations": self.iterations, "metric": self.metric, "name": self.name, **self.parameters}

    def forward(self, fixed: Tensor, moving: Tensor, steps: int | None = None,
                return_states: bool = False) -> RegistrationResult:
        if steps is not None:
            raise TypeError(f"{self.name} does not take steps; call it with steps=None")
        self._check_ndim(fixed, moving)
        if fixed.shape[0] != 1:
            raise ValueError(f"elastix registers one pair at a time; got a batch of {fixed.shape[0]}")
        itk = self._itk
        f_np = np.ascontiguousarray(fixed[0, 0].detach().cpu().numpy().astype(np.float32))
        m_np = np.ascontiguousarray(moving[0, 0].detach().cpu().numpy().astype(np.float32))
        f_img, m_img = itk.GetImageFromArray(f_np), itk.GetImageFromArray(m_np)
        params = itk.ParameterObject.New()
        pmap = params.GetDefaultParameterMap("bspline", int(self.levels), float(self.grid_spacing))
        pmap["Metric"] = [self.metric]
        pmap["MaximumNumberOfIterations"] = [str(int(self.iterations))]
        for k, v in self.parameters.items():
            pmap[k] = [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
        params.AddParameterMap(pmap)
        t0 = time.perf_counter()
        _, transform = itk.elastix_registration_method(f_img, m_img, parameter_object=params,
                                                       log_to_console=False)
        field_img = itk.transformix_deformation_field(m_img, transform)
        elapsed = time.perf_counter() - t0
        field_np = np.asarray(itk.array_from_image(field_img), dtype=np.float32)  # (*spatial, ndim), x first
        disp = torch.from_numpy(field_np[..., ::-1].copy()).movedim(-1, 0)[None]  # array-axis order
        return RegistrationResult(disp=disp.to(fixed.device), time=elapsed,
                                  info={"grid_spacing": self.grid_spacing, "levels": self.levels,
                                        "iterations": self.iterations})


class AnyNdim:
    """A baseline for pairs of any ``ndim``: calls ``cls(fixed.dim() - 2, **options)``, built once per ``ndim``.

    ``AnyNdim(cls, **options)(fixed, moving, steps=None, return_states=False) -> RegistrationResult``. It is a
    plain callable, not a module; ``name`` and ``trained_steps`` are those of the methods it builds. The options
    are checked at once, by building the 2D method.
    """

    def __init__(self, cls: type[BaselineMethod], **options: Any) -> None:
        self.cls, self.options = cls, options
        self._built: dict[int, BaselineMethod] = {2: cls(2, **options)}
        self.name: str = self._built[2].name
        self.trained_steps: int = self._built[2].trained_steps

    def method(self, ndim: int) -> BaselineMethod:
        """The method for ``ndim`` spatial axes (2 or 3)."""
        if ndim not in self._built:
            self._built[ndim] = self.cls(ndim, **self.options)
        return self._built[ndim]

    def __call__(self, fixed: Tensor, moving: Tensor, steps: int | None = None,
                 return_states: bool = False) -> RegistrationResult:
        return self.method(fixed.dim() - 2)(fixed, moving, steps=steps, return_states=return_states)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"AnyNdim({self.cls.__name__}{', ' if options else ''}{options})"


#: No registration, for pairs of any ndim (see :class:`IdentityBaseline`).
identity_method = AnyNdim(IdentityBaseline)


def classical_method(name: str = "classical", **register_kwargs: Any) -> AnyNdim:
    """Classical gradient-descent registration (:class:`ClassicalBaseline`) for pairs of any ndim.

    ``steps`` sets the iterations of the finest level; ``return_states`` records every iteration of the finest
    level (``state_steps`` 0, 1, ..., steps), so :func:`deqreg_lite.evaluate.step_sweep` reads a whole sweep from
    one run. Example: ``evaluate(classical_method(lam=1.0, iterations=200, levels=3), pairs)``.
    """
    return AnyNdim(ClassicalBaseline, name=name, **register_kwargs)


def elastix_method(grid_spacing: float = 4.0, levels: int = 3, iterations: int = 500,
                   metric: str = "AdvancedNormalizedCorrelation", name: str = "elastix",
                   **parameters: Any) -> AnyNdim:
    """elastix B-spline registration (:class:`ElastixBaseline`) for pairs of any ndim.

    Raises:
        ImportError: when itk-elastix is not installed; the message says how to install it.
    """
    return AnyNdim(ElastixBaseline, grid_spacing=grid_spacing, levels=levels, iterations=iterations, metric=metric,
                   name=name, **parameters)
