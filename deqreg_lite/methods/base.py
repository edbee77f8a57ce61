"""The one interface that every registration method shares: :class:`RegistrationMethod`.

A method is an ``nn.Module``; calling it registers a batch::

    result = method(fixed, moving, steps=None, return_states=False)   # -> RegistrationResult

* ``fixed``, ``moving``: ``(B, 1, *spatial)`` images in [0, 1];
* ``return_states``: also fill ``result.states`` (every iterate, ``(B, ndim, *spatial)`` each) and
  ``result.state_steps``;
* ``result.info`` is a :class:`~deqreg_lite.result.MethodInfo`: ``steps`` (iterations run), ``nfe`` (network
  calls), ``residuals`` (the relative update size per step; empty for one-step methods; ``result.trace["residual"]``
  reads the same list), and for solvers ``converged``, ``diverged`` and the per-pair fields; method-specific values
  in ``info.extras``. It reads like a dict (``result.info["steps"]``).

What ``steps`` means, for every method
--------------------------------------
``steps=None`` **is the trained number of steps** (:attr:`RegistrationMethod.trained_steps`) and gives exactly what
the method computed in training; ``steps=t`` runs ``t`` steps (any ``t >= 1``, far beyond the trained count too).

============  ===============  ======================================================================================
method        trained_steps    ``steps=None`` / ``steps=t``
============  ===============  ======================================================================================
voxelmorph    1                one network call; only ``None`` or ``1`` are accepted (``ValueError`` otherwise)
unrolling     ``T`` (3)        ``T`` / ``t`` residual updates from zero, the last one returned
riir          ``T`` (6)        ``T`` / ``t`` ConvGRU updates from zero, the last one returned
gradirn       steps_per_level  ``steps_per_level`` / ``t`` steps at the finest level (coarser levels always run
              (3)              ``steps_per_level``), the last one returned
unrolling_ml  steps_per_level  as gradirn (the paper's Unrolling: GraDIRN without similarity gradients)
              (3)
deqreg        ``T`` (48)       the trained solve: at most ``T`` solver steps, stopping at the relative tolerance
                               ``tol`` (1e-3), the **lowest-residual** iterate returned (``policy="lowest"``) /
                               exactly ``t`` steps with ``tol=0``, the **last** iterate (``policy="last"``). Both
                               are the same call, ``forward(steps=n, tol=..., policy=...)``: ``steps=None`` is
                               ``steps=T, tol=method.tol, policy="lowest"``; an explicit ``steps=t`` defaults to
                               ``tol=0, policy="last"``; pass ``tol=`` / ``policy=`` to choose otherwise
deqreg12      ``T`` (12)       as deqreg
============  ===============  ======================================================================================

So ``method(f, m)`` equals ``method(f, m, steps=method.trained_steps)`` for every method but the DEQs, where it
equals ``method(f, m, steps=method.T, tol=method.tol, policy="lowest")``.

Every method works under ``torch.no_grad()`` (methods that need a similarity gradient enable grad inside).

Training goes through :meth:`RegistrationMethod.training_step`, which computes the method's own training loss
(BPTT for unrolled methods, the Eq. 9 correction loss with the phantom gradient for DEQReg), calls ``backward``
on it, and returns a dict of floats (at least ``loss``). The trainer only zeroes gradients, calls
``training_step`` and steps the optimizer: it never reaches into a method's insides.

The contract is enforced when a method is **built**: :class:`RegistrationMethod` is an abstract base class, so a
subclass that lacks ``forward`` or ``training_step`` cannot be instantiated (``TypeError``), and the constructor
arguments are captured automatically (:meth:`RegistrationMethod.config`), so every method can be saved and rebuilt
(:meth:`RegistrationMethod.from_checkpoint`).
"""
from __future__ import annotations

import functools
import inspect
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..checkpoints import load_checkpoint, upgrade_checkpoint
from ..losses import LossFn  # declared once, on the losses floor
from ..result import RegistrationResult

__all__ = ["RegistrationMethod", "LossFn", "Backward", "registered_methods"]

#: ``backward(loss)``: ``loss.backward()`` by default; the trainer passes a scaled version under AMP.
Backward = Callable[[Tensor], None]

#: ``{name: class}`` of every method class that sets its own ``name`` (filled when the class is defined).
_REGISTRY: dict[str, type["RegistrationMethod"]] = {}


def registered_methods() -> dict[str, type["RegistrationMethod"]]:
    """``{name: class}`` of the method classes defined so far (the ones :meth:`RegistrationMethod.from_checkpoint`
    can build); a copy."""
    return dict(_REGISTRY)


def _capture_config(init: Callable) -> Callable:
    """Wrap a subclass's ``__init__`` so that the outermost call records its arguments (defaults applied)."""
    signature = inspect.signature(init)
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
        raise TypeError(f"{init.__qualname__} takes *args: a RegistrationMethod's constructor arguments must have "
                        "names, so that config() can record them")

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        outermost = "_config" not in self.__dict__
        if outermost:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            config: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    config.update(value)
                else:
                    config[name] = value
            object.__setattr__(self, "_config", None)  # mark: inner __init__ calls do not record
        init(self, *args, **kwargs)
        if outermost:
            # a validated value stored under the argument's own name (e.g. ``self.gamma = float(gamma)``) wins
            object.__setattr__(self, "_config", {k: self.__dict__.get(k, v) for k, v in config.items()})

    return wrapper


class RegistrationMethod(nn.Module, ABC):
    """Abstract base class of every registration method (see the module docstring for the contract).

    Subclasses implement :meth:`forward` and :meth:`training_step` (a subclass without them cannot be built:
    ``TypeError``), set ``name`` and ``trained_steps``, and call ``super().__init__(ndim)``. Their constructor
    arguments are recorded when they are built (:meth:`config`); a subclass that stores a validated value under the
    argument's own name as a plain attribute (``self.T = check_count(T, "T")``) has that value recorded. A subclass that sets its own
    ``name`` is registered, so that :meth:`from_checkpoint` can build it by that name.

    Attributes:
        name: short name used in tables and checkpoints (``"voxelmorph"``, ``"deqreg"``, ...).
        ndim: 2 or 3.
        trained_steps: the number of steps used in training (1 for one-step methods); ``steps=None`` means it.
    """

    name: str = "method"
    trained_steps: int = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _capture_config(cls.__dict__["__init__"])  # type: ignore[method-assign]
        name = cls.__dict__.get("name")
        if isinstance(name, str) and not inspect.isabstract(cls):
            known = _REGISTRY.get(name)
            # the first class of a name keeps it (a test's look-alike does not replace a library method), except
            # for the same class defined again (a module reloaded)
            if known is None or (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__):
                _REGISTRY[name] = cls

    def __init__(self, ndim: int) -> None:
        super().__init__()
        if "_config" not in self.__dict__:  # built as RegistrationMethod(ndim) by a subclass without __init__
            object.__setattr__(self, "_config", {"ndim": ndim})
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim = ndim

    @abstractmethod
    def forward(self, fixed: Tensor, moving: Tensor, steps: int | None = None,
                return_states: bool = False) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (both ``(B, 1, *spatial)``): ``disp`` ``(B, ndim, *spatial)`` in voxels.
        ``steps``: see the module docstring (``None``: the trained number of steps)."""

    @abstractmethod
    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                      backward: Backward = Tensor.backward) -> dict[str, float]:
        """Compute the method's training loss on a batch, call ``backward`` on it, return floats (``loss`` at
        least)."""

    def config(self) -> dict:
        """The constructor arguments (``ndim`` included), recorded when the method was built, so that
        ``type(method)(**method.config())`` and a checkpoint rebuild it. A new dict each call."""
        return dict(self.__dict__.get("_config") or {"ndim": self.ndim})

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | Mapping[str, Any], device: str | torch.device | None = None,
                        **overrides: Any) -> "RegistrationMethod":
        """Build the method a checkpoint holds: the class registered under its ``name``, built with its stored
        ``config`` (``overrides`` replace entries), its weights loaded, in eval mode.

        Args:
            path: a checkpoint file (any format version, :mod:`deqreg_lite.checkpoints`) or a folder holding
                ``last.pt``, or a checkpoint dict already read by :func:`~deqreg_lite.checkpoints.load_checkpoint`.
            device: where the method goes (default the CPU).
            overrides: constructor options that replace the stored ones (e.g. ``tol`` of a DEQ).
        Raises:
            FileNotFoundError: no file there.
            ValueError: the file is corrupt, not a checkpoint, holds no config, names a method that is not
                defined, or (when called on a subclass, e.g. ``DEQReg.from_checkpoint``) a method of another class
                (the message names the file).
            TypeError: an override the method does not take.
        """
        if isinstance(path, Mapping):
            ckpt, path = upgrade_checkpoint(path), "<checkpoint dict>"
        else:
            ckpt = load_checkpoint(path, "cpu")
        name = ckpt["name"]
        if ckpt.get("config") is None:
            raise ValueError(f"checkpoint {path} holds no method config ({name}.config() was not available when "
                             "it was saved); build the method yourself and load ckpt['model'] into it")
        if name not in _REGISTRY:
            raise ValueError(f"checkpoint {path} holds a {name!r} model, which is not a defined method; known: "
                             f"{sorted(_REGISTRY)} (import the module that defines it first)")
        target = _REGISTRY[name]
        if not issubclass(target, cls):
            raise ValueError(f"checkpoint {path} holds a {name!r} model ({target.__name__}), not a {cls.__name__}")
        config = dict(ckpt["config"])
        ndim = config.pop("ndim", ckpt.get("ndim"))
        valid = [p for p in inspect.signature(target.__init__).parameters if p not in ("self", "ndim")]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(f"{name} got unknown option(s) {unknown}; it takes {valid}")
        config.update(overrides)
        method = target(ndim, **config)
        method.load_state_dict(ckpt["model"])
        return method.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
