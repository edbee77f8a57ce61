"""The one result type that every registration method returns, and its typed record of what the method did."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from torch import Tensor

from .warp import warp

__all__ = ["RegistrationResult", "MethodInfo"]


@dataclass(eq=False)
class MethodInfo(MutableMapping):
    """What a registration method did (``result.info``): a typed record that also reads like the dict it replaces.

    Typed fields (``None``: the method does not report it; such a field is then absent from the mapping view):

    Attributes:
        steps: iterations run (1 for one-step methods; for DEQReg the solver steps of the batch loop, the most
            of any pair; for GraDIRN the steps at the finest level).
        nfe: network calls (function evaluations).
        residuals: the relative residual trace, one float per step (``||phi_{t+1} - phi_t|| / ||phi_{t+1}||``;
            for DEQReg the solver's ``||g(phi) - phi|| / ||g(phi)||``, max over the pairs still running); an empty
            list for a one-step method. Stored here only: ``result.trace["residual"]`` reads this list.
        converged: every pair reached the tolerance (solvers only).
        diverged: some pair diverged (solvers only).
        sample_steps, sample_converged, sample_diverged, sample_best_step, sample_residual: per pair (lists of
            length ``B``), where the method solves each pair on its own (DEQReg).
        extras: method-specific values (e.g. ``best_step``, ``abs_residuals``, ``solver`` for DEQReg,
            ``coarse_residuals`` for GraDIRN, ``internal_size`` and ``factor`` for :class:`HalfResolution
            <deqreg_lite.methods.resolution.HalfResolution>`, the options of a classical run).

    Mapping view: ``info["steps"]``, ``info.get("nfe")``, ``"converged" in info``, ``dict(info)`` and
    ``info["key"] = value`` work over the typed fields that are set and the extras together (an unknown key is
    stored in ``extras``), so code written for the former ``dict`` keeps running. ``len``/iteration cover the
    same keys: the typed fields first, then the extras.
    """

    steps: Optional[int] = None
    nfe: Optional[int] = None
    residuals: Optional[list[float]] = None
    converged: Optional[bool] = None
    diverged: Optional[bool] = None
    sample_steps: Optional[list[int]] = None
    sample_converged: Optional[list[bool]] = None
    sample_diverged: Optional[list[bool]] = None
    sample_best_step: Optional[list[int]] = None
    sample_residual: Optional[list[float]] = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def typed_keys(cls) -> tuple[str, ...]:
        """The names of the typed fields (``extras`` excluded)."""
        return tuple(f.name for f in fields(cls) if f.name != "extras")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "MethodInfo":
        """A record from a dict: known keys fill the typed fields, every other key goes to ``extras``."""
        if isinstance(values, MethodInfo):
            return values.copy()
        typed = cls.typed_keys()
        info = cls(**{k: v for k, v in values.items() if k in typed})
        info.extras.update({k: v for k, v in values.items() if k not in typed})
        return info

    def copy(self) -> "MethodInfo":
        """A shallow copy (the lists are shared, the ``extras`` dict is new)."""
        out = MethodInfo(**{k: getattr(self, k) for k in self.typed_keys()})
        out.extras.update(self.extras)
        return out

    # -- the mapping view -------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in self.typed_keys():
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.extras[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self.typed_keys():
            setattr(self, key, value)
        else:
            self.extras[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self.typed_keys():
            if getattr(self, key) is None:
                raise KeyError(key)
            setattr(self, key, None)
        else:
            del self.extras[key]

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self.typed_keys() if getattr(self, k) is not None)
        yield from self.extras

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.items())
        return f"MethodInfo({inner})"


class _Trace(MutableMapping):
    """``result.trace``: the per-iteration curves; ``"residual"`` reads (and writes) ``result.info.residuals``, so
    the residual trace is stored once. Like :class:`MethodInfo`, it compares equal to any mapping with the same
    items (``Mapping.__eq__``) and is unhashable."""

    def __init__(self, curves: dict[str, list[float]], info: MethodInfo) -> None:
        self._curves = curves
        self._info = info

    def __getitem__(self, key: str) -> list[float]:
        if key == "residual":
            if self._info.residuals is None:
                raise KeyError(key)
            return self._info.residuals
        return self._curves[key]

    def __setitem__(self, key: str, value: list[float]) -> None:
        if key == "residual":
            self._info.residuals = value
        else:
            self._curves[key] = value

    def __delitem__(self, key: str) -> None:
        if key == "residual":
            if self._info.residuals is None:
                raise KeyError(key)
            self._info.residuals = None
        else:
            del self._curves[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._curves
        if self._info.residuals is not None:
            yield "residual"

    def __len__(self) -> int:
        return len(self._curves) + (self._info.residuals is not None)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


@dataclass
class RegistrationResult:
    """What a registration method returns.

    Attributes:
        disp: ``(B, ndim, *spatial)`` displacement in voxels (fixed grid -> moving image).
        states: intermediate displacements ``[(B, ndim, *spatial), ...]`` when asked for, else an empty list.
        state_steps: the iteration index of each entry of ``states``.
        trace: per-iteration curves, e.g. ``{"energy": [...], "similarity": [...], "regulariser": [...]}`` of a
            classical run; ``trace["residual"]`` is ``info.residuals`` (the same list, stored once), present when
            the method reports residuals. A ``"residual"`` entry passed in is moved to ``info.residuals`` when
            that is unset.
        info: a :class:`MethodInfo` (steps, nfe, residuals, converged, diverged, per-pair fields, extras); a
            plain dict passed in is converted (:meth:`MethodInfo.from_mapping`).
        time: wall-clock seconds of the registration.
    """

    disp: Tensor
    states: list[Tensor] = field(default_factory=list)
    state_steps: list[int] = field(default_factory=list)
    trace: Union[dict[str, list[float]], _Trace] = field(default_factory=dict)
    info: Union[MethodInfo, dict[str, Any]] = field(default_factory=MethodInfo)
    time: float = 0.0

    def __post_init__(self) -> None:
        self.info = MethodInfo.from_mapping(self.info) if not isinstance(self.info, MethodInfo) else self.info
        curves = dict(self.trace.items())
        residual = curves.pop("residual", None)
        if residual is not None and self.info.residuals is None:
            self.info.residuals = list(residual)
        self.trace = _Trace(curves, self.info)

    def warp(self, image: Tensor, mode: str = "bilinear") -> Tensor:
        """Warp ``image`` ``(B, C, *spatial)`` with this result's displacement (``mode="nearest"`` for labels)."""
        return warp(image, self.disp.to(image.device), mode=mode)
