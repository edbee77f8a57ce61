"""Running a method over pairs: :func:`evaluate` (a :class:`~.tables.Table` of per-pair metrics) and
:func:`step_sweep` (Dice and folding against the number of inference steps), both through one adapter,
:func:`as_method`; :func:`pair_metrics` scores one registered pair.

What a runner accepts as a method (:func:`as_method`):

* a :class:`~deqreg_lite.methods.base.RegistrationMethod` (an ``nn.Module``, learned or a baseline of
  :mod:`deqreg_lite.methods.baselines`): run in eval mode under ``no_grad`` on the device of its parameters (the
  samples' device when it has none), then put back in the mode it had;
* any callable ``f(fixed, moving, **options)`` returning a :class:`~deqreg_lite.result.RegistrationResult` or a
  displacement tensor ``(1, ndim, *spatial)`` (such as :func:`~deqreg_lite.methods.baselines.identity_method`):
  run with gradients enabled (classical registration needs them) on the samples' device.

Either is called with only the options asked for: ``steps=t`` when a step count is asked for, and
``return_states=True`` when states are (by :func:`step_sweep` with ``use_states=True``). So a callable
``f(fixed, moving)`` works with ``steps=None``, and asking it for steps (or states) is Python's ``TypeError``.
A table's method name is ``method.name``, else the function's ``__name__``.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_bool
from .._contexts import eval_mode
from ..datasets.learn2reg import save_l2r_disp
from ..methods.baselines import ELASTIX_INSTALL_HINT, elastix_method
from ..metrics import folding_percent, pair_metrics, seg_dice
from ..result import RegistrationResult
from .cost import sync, training_cost
from .stats import is_number, mean_std
from .tables import Table

__all__ = ["MethodCall", "as_method", "pair_metrics", "evaluate", "evaluate_elastix", "step_sweep",
           "DEFAULT_SWEEP_STEPS"]

#: the inference step counts of the convergence study (Fig. 3).
DEFAULT_SWEEP_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)


# ---------------------------------------------------------------------------------------------------------------
# metrics of one pair
# ---------------------------------------------------------------------------------------------------------------
def _step_metrics(sample: Mapping, disp: Tensor, labels: Sequence[int] | None) -> tuple[float, float]:
    """Mean Dice (NaN without segmentations) and folding % of one pair: the two numbers of a step sweep."""
    disp = disp.detach().float().cpu()
    seg = seg_dice(sample, disp, labels)
    d = float("nan") if seg is None else float(torch.nanmean(seg[1]))
    return d, float(folding_percent(disp)[0])


# ---------------------------------------------------------------------------------------------------------------
# the one adapter: a method or a callable -> the one call the runners make
# ---------------------------------------------------------------------------------------------------------------
def _method_name(method: Any) -> str:
    name = getattr(method, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(method, "__name__", type(method).__name__)


@dataclass(frozen=True)
class MethodCall:
    """A method made callable the one way the runners call it (built by :func:`as_method`).

    Attributes:
        method: what was given (a RegistrationMethod or a callable).
        name: ``method.name``, else its ``__name__``, else its type's name.
        module: the method when it is an ``nn.Module`` (switched to eval mode by the runners), else ``None``.
        device: where the pairs go: the ``device`` asked for, else the device of the module's first parameter or
            buffer; ``None`` (the samples' own device) for callables and modules without any.
    """

    method: Any
    name: str
    module: nn.Module | None
    device: torch.device | None

    @property
    def trainable(self) -> bool:
        """A module with parameters and a ``training_step`` (the baselines have no parameters)."""
        return (self.module is not None and hasattr(self.module, "training_step")
                and next(self.module.parameters(), None) is not None)

    @property
    def trained_steps(self) -> int | None:
        return getattr(self.method, "trained_steps", None)

    def pair(self, sample: Mapping) -> tuple[Tensor, Tensor]:
        """``(fixed, moving)`` of a sample dict, on :attr:`device` (as they are when it is ``None``)."""
        if self.device is None:
            return sample["fixed"], sample["moving"]
        return sample["fixed"].to(self.device), sample["moving"].to(self.device)

    @property
    def takes_certificate(self) -> bool:
        """Whether the method's ``forward`` (or the callable) declares a ``certificate`` option (DEQReg's; a
        wrapper such as :class:`~deqreg_lite.methods.resolution.HalfResolution` that passes ``**options`` on is
        asked about the method it wraps)."""
        return _declares(self.method, "certificate")

    def __call__(self, fixed: Tensor, moving: Tensor, steps: int | None = None,
                 return_states: bool = False, certificate: bool = False) -> RegistrationResult:
        """Register ``(fixed, moving)``; a module under ``no_grad``, a callable with gradients enabled.
        ``certificate=True`` is passed on only to a method that takes it (:attr:`takes_certificate`).

        Raises:
            TypeError: the method returned neither a RegistrationResult nor a tensor (or does not take an option
                that was asked for).
            ValueError: the displacement is not ``(B, ndim, *spatial)`` of ``fixed``.
        """
        options: dict[str, Any] = {}
        if steps is not None:
            options["steps"] = steps
        if return_states:
            options["return_states"] = True
        if certificate and self.takes_certificate:
            options["certificate"] = True
        with torch.no_grad() if self.module is not None else torch.enable_grad():
            out = self.method(fixed, moving, **options)
        if isinstance(out, Tensor):
            out = RegistrationResult(disp=out)
        if not isinstance(out, RegistrationResult):
            raise TypeError(f"{self.name} must return a RegistrationResult or a displacement tensor, got "
                            f"{type(out).__name__}")
        expected = (fixed.shape[0], fixed.dim() - 2, *fixed.shape[2:])
        if tuple(out.disp.shape) != expected:
            raise ValueError(f"{self.name} returned disp {tuple(out.disp.shape)}; expected {expected}")
        return out


def _declares(method: Any, option: str) -> bool:
    """Whether ``method`` (its ``forward`` for a module) names keyword ``option`` in its signature; behind a
    ``**options`` catch-all, whether the wrapped ``method.method`` does."""
    target = method.forward if isinstance(method, nn.Module) else method
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    if option in params and params[option].kind in (inspect.Parameter.KEYWORD_ONLY,
                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return True
    inner = getattr(method, "method", None)
    if inner is not None and inner is not method and any(p.kind is inspect.Parameter.VAR_KEYWORD
                                                         for p in params.values()):
        return _declares(inner, option)
    return False


def _certificate_columns(info: Mapping) -> dict[str, float]:
    """The convergence columns of one pair (batch 1) from a result's info, where the method reports them:
    ``residual`` (final relative residual of the returned field), ``converged`` (1.0 / 0.0) and
    ``spectral_radius`` (the estimate at the returned field, with ``certificate=True``)."""
    out: dict[str, float] = {}
    per_pair = info.get("sample_residual")
    if isinstance(per_pair, (list, tuple)) and len(per_pair) == 1 and is_number(per_pair[0]):
        out["residual"] = float(per_pair[0])
    conv = info.get("sample_converged")
    if isinstance(conv, (list, tuple)) and len(conv) == 1 and conv[0] is not None:
        out["converged"] = float(bool(conv[0]))
    elif isinstance(info.get("converged"), bool):
        out["converged"] = float(info["converged"])
    rho = info.get("spectral_radius")
    if isinstance(rho, (list, tuple)) and len(rho) == 1 and is_number(rho[0]):
        out["spectral_radius"] = float(rho[0])
    return out


def as_method(method: Any, device: str | torch.device | None = None) -> MethodCall:
    """The one call the runners make, for a RegistrationMethod or a plain callable (see the module docstring).

    Raises:
        TypeError: ``method`` is not callable.
    """
    if isinstance(method, MethodCall):
        return method if device is None else as_method(method.method, device)
    if not callable(method):
        raise TypeError(f"method must be a RegistrationMethod or a callable, got {type(method).__name__}")
    module = method if isinstance(method, nn.Module) else None
    if device is not None:
        dev: torch.device | None = torch.device(device)
    elif module is not None:
        dev = next((t.device for t in (*module.parameters(), *module.buffers())), None)
    else:
        dev = None
    return MethodCall(method=method, name=_method_name(method), module=module, device=dev)


# ---------------------------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------------------------
def _as_pairs(pairs: Any) -> list:
    if isinstance(pairs, Mapping):
        return [pairs]
    if hasattr(pairs, "__len__") and hasattr(pairs, "__getitem__"):
        items = [pairs[i] for i in range(len(pairs))]
    elif isinstance(pairs, Iterable):
        items = list(pairs)
    else:
        raise TypeError(f"pairs must be a sample dict or a sequence of them, got {type(pairs).__name__}")
    for i, s in enumerate(items):
        if not (isinstance(s, Mapping) and "fixed" in s and "moving" in s):
            raise TypeError(f"pairs[{i}] must be a sample dict with 'fixed' and 'moving', got {type(s).__name__}")
        if s["fixed"].shape[0] != 1:
            raise ValueError(f"pairs[{i}] has batch size {s['fixed'].shape[0]}; evaluate takes samples of batch 1 "
                             "(one pair each)")
    return items


def _pair_id(sample: Mapping, index: int) -> str:
    ids = sample.get("ids")
    if isinstance(ids, (tuple, list)) and len(ids) == 2 and all(isinstance(i, str) for i in ids):
        return f"{ids[1]}->{ids[0]}"
    return str(index)


def _progress(items: list, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not show, leave=False)


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------
def evaluate(method: Any, pairs: Any, steps: int | None = None, memory: bool = True,
             labels: Sequence[int] | None = None, *, loss_fn: Callable | None = None, hd95: bool = True,
             name: str | None = None, device: str | torch.device | None = None, progress: bool = False,
             disp_dir: str | Path | None = None, disp_format: str = "nii.gz", certificate: bool = False) -> Table:
    """Register every pair with ``method`` and score it.

    Args:
        method: a RegistrationMethod or a callable (see the module docstring).
        pairs: a sample dict, or a sequence / dataset of sample dicts of batch 1 (e.g.
            :func:`deqreg_lite.datasets.brain_pairs` ``("val")``).
        steps: inference steps (None: the method's own default, its trained count).
        memory: for a method with parameters to train (an ``nn.Module``; not the baselines), also measure one
            training step on the first pair (:func:`~.cost.training_cost`: ``memory_bytes``, ``memory_kind``,
            ``train_time_s`` in ``Table.info``).
        labels: label ids for Dice and HD95 (default: each sample's ``labels``).
        loss_fn: the training loss for the memory measurement (default ``1 - LNCC + 1.0 * diffusion``).
        hd95: compute HD95 (the slowest metric).
        name: the table's name (default the method's).
        device: where to run (default: the method's parameters' device; the samples' device for callables).
        progress: show a tqdm bar.
        disp_dir: also write each pair's displacement there as a Learn2Reg submission file
            (:func:`~deqreg_lite.datasets.learn2reg.save_l2r_disp`, ``disp_{fixed}_{moving}.nii.gz`` or ``.npz``,
            named from the sample's ``ids``).
        disp_format: ``"nii.gz"`` or ``"npz"``.
        certificate: pass ``certificate=True`` to methods that take it (DEQReg, also inside
            :class:`~deqreg_lite.methods.resolution.HalfResolution`; other methods run as without it), which adds
            the ``spectral_radius`` column (the estimate of the update map's spectral radius at the returned field;
            its time is inside ``time_s``).
    Returns:
        a :class:`~.tables.Table`; ``time_s`` is the wall time of the method's call (CUDA synchronised); on CUDA
        the first pair is run once untimed first, to warm up. Methods that report their convergence (DEQReg:
        ``info.sample_residual``, ``info.sample_converged``) get the per-pair columns ``residual`` (final
        relative residual) and ``converged`` (1.0 or 0.0), and ``spectral_radius`` with ``certificate=True``.
    """
    check_bool(certificate, "certificate")
    items = _as_pairs(pairs)
    call = as_method(method, device)
    dev = call.device
    table = Table(name=name or call.name, info={"steps": steps, "device": str(dev) if dev is not None else "cpu"})
    with eval_mode(call.module):
        if dev is not None and dev.type == "cuda" and items:
            call(*call.pair(items[0]), steps)
        for i, s in enumerate(_progress(items, f"evaluate {table.name}", progress)):
            fixed, moving = call.pair(s)
            sync(dev)
            t0 = time.perf_counter()
            result = call(fixed, moving, steps, certificate=certificate)
            sync(dev)
            elapsed = time.perf_counter() - t0
            row: dict = {"pair": _pair_id(s, i)}
            row.update(pair_metrics(s, result.disp, labels, with_hd95=hd95))
            row["time_s"] = elapsed
            for k in ("steps", "nfe"):
                v = result.info.get(k)
                if is_number(v):
                    row[k] = float(v)
            row.update(_certificate_columns(result.info))
            if disp_dir is not None:
                ids = s.get("ids") or (f"{2 * i:04d}", f"{2 * i + 1:04d}")
                row["disp_file"] = str(save_l2r_disp(result.disp, disp_dir, ids[0], ids[1], fmt=disp_format))
            table.rows.append(row)
        if memory and call.trainable and items:
            table.info.update(training_cost(call.module, *call.pair(items[0]), loss_fn))
    return table


def evaluate_elastix(pairs: Any, labels: Sequence[int] | None = None, **elastix_kwargs: Any) -> Table:
    """The elastix row: :func:`evaluate` of :func:`~deqreg_lite.methods.baselines.elastix_method`, or an empty
    :class:`~.tables.Table` whose ``note`` says "not installed (pip install itk-elastix)" when the package is
    missing (so a results table still lists it)."""
    try:
        method = elastix_method(**elastix_kwargs)
    except ImportError:
        return Table(name=elastix_kwargs.get("name", "elastix"), note=f"not installed ({ELASTIX_INSTALL_HINT})")
    return evaluate(method, pairs, labels=labels, memory=False)


# ---------------------------------------------------------------------------------------------------------------
# convergence: metrics against inference steps
# ---------------------------------------------------------------------------------------------------------------
def step_sweep(method: Any, pairs: Any, steps: Sequence[int] = DEFAULT_SWEEP_STEPS,
               labels: Sequence[int] | None = None, *, use_states: bool = True,
               device: str | torch.device | None = None, progress: bool = False) -> dict:
    """Dice and folding % at each number of inference steps (the paper's Fig. 3).

    Efficient path: each pair is registered once with ``max(steps)`` and ``return_states=True``; the state whose
    ``result.state_steps`` entry is ``t`` is the result after ``t`` steps. Step counts missing from
    ``state_steps`` (or all of them, with ``use_states=False`` or a method that returns no states) are run
    separately with ``steps=t``. Reading states assumes the state after ``t`` steps equals what a run with
    ``steps=t`` returns; for a solver that returns its lowest-residual iterate rather than the last one, pass
    ``use_states=False`` for exact numbers. A callable that does not take ``return_states`` needs
    ``use_states=False``.

    Returns:
        dict with ``method``, ``steps`` (sorted), ``dice``, ``dice_std``, ``folding_pct``, ``folding_pct_std``
        (lists over steps; mean and ddof=0 std over pairs), ``per_pair`` (``{"dice": [[...pairs] per step],
        "folding_pct": ...}``), ``trained_steps`` (the method's, if it has one), ``n_pairs`` and ``mode``
        (``"states"``, ``"runs"`` or ``"mixed"``: how the numbers were obtained).
    """
    steps = sorted({int(t) for t in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"steps must be integers >= 1, got {steps}")
    items = _as_pairs(pairs)
    call = as_method(method, device)
    per_dice = [[float("nan")] * len(items) for _ in steps]
    per_fold = [[float("nan")] * len(items) for _ in steps]
    used = set()
    with eval_mode(call.module):
        for i, s in enumerate(_progress(items, f"step sweep {call.name}", progress)):
            fixed, moving = call.pair(s)
            found: dict[int, Tensor] = {}
            if use_states:
                res = call(fixed, moving, steps[-1], return_states=True)
                found = {int(t): st for t, st in zip(res.state_steps, res.states) if int(t) in steps}
                if len(found) < len(steps) and steps[-1] not in found and len(res.states) == 0:
                    found[steps[-1]] = res.disp  # no states, but the max-step run itself is usable
            for j, t in enumerate(steps):
                if t in found:
                    disp = found[t]
                    used.add("states")
                else:
                    disp = call(fixed, moving, t).disp
                    used.add("runs")
                per_dice[j][i], per_fold[j][i] = _step_metrics(s, disp, labels)
    out: dict = {"method": call.name, "steps": steps, "n_pairs": len(items), "trained_steps": call.trained_steps,
                 "mode": "mixed" if len(used) > 1 else (used.pop() if used else "runs")}
    for key, per in (("dice", per_dice), ("folding_pct", per_fold)):
        ms = [mean_std(v) for v in per]
        out[key] = [m for m, _ in ms]
        out[f"{key}_std"] = [sd for _, sd in ms]
    out["per_pair"] = {"dice": per_dice, "folding_pct": per_fold}
    return out
