"""Fixed-point solvers: find ``z*`` with ``z* = f(z*)``. Plain (damped) iteration, Anderson and Broyden.

Conventions shared by every solver
----------------------------------
* ``f`` maps a tensor ``(B, ...)`` to a tensor of the same shape. The solvers run under ``torch.no_grad()``, so
  ``f`` may be a network: no graph is built (only :func:`fixed_point` has ``track_graph=True``, for BPTT).
* **Step k** calls ``f`` once, at the solver's current input ``z_k``: ``fz_k = f(z_k)``. Its residual is
  ``||fz_k - z_k||`` and its relative residual ``||fz_k - z_k|| / (||fz_k|| + 1e-9)``, both per sample (L2 norm
  over all non-batch axes). ``info.abs_trace[k]`` and ``info.rel_trace[k]`` hold the **maximum over the samples
  still running at step k**; the per-sample outcome is in ``info.sample_*`` (lists of length ``B``).
* **Every sample is solved on its own** (as torchdeq's ``batch_masked_mixing`` does): each sample stops
  (freezes) after its first step with relative residual ``<= tol``, or when it diverges; from then on its input
  stays at its answer, its history (Anderson, Broyden) is left alone, and nothing of it is recorded. The loop ends
  when every sample has stopped, or after ``max_iter`` steps. A sample's answer, stop step and divergence verdict
  are the ones it gets alone in a batch of one (``f`` must treat samples independently, as a network without
  batch statistics does).
* **Stop rule.** ``tol`` is **relative**. (An absolute tolerance on the norm of a whole field depends on its size
  and is never reached; it is torchdeq's default.)
* **Which iterate comes back**, per sample. Step k's candidate answer is ``fz_k``: it costs nothing more and,
  for a contraction, it is closer to ``z*`` than ``z_k``. By default (``return_policy="lowest"``, like torchdeq)
  a sample gets the candidate of its step with the lowest relative residual; ``return_policy="last"`` gives its
  last one. A sample that **diverged** gets, under either policy, its finite candidate with the lowest
  *absolute* residual (``z0`` itself, with step -1, when it has none): on an expanding map the relative residual
  shrinks as the norm grows (``z -> 1.05 z + 1``: from 1 towards 0.048), so it would pick the most diverged
  iterate, while the absolute residual picks the least diverged one. ``info.sample_best_step`` says which step.
* **Divergence**, per sample, judged while it runs. (a) A NaN or inf; (b) a residual above ``diverge_factor``
  times the sample's first one (a blow-up); (c) **growth**: at step ``k >= 2 w`` (``w = growth_window``,
  default 16), with ``M_j`` the largest norm ``||f(z_i)||`` for ``i <= j``: the norm rose 1.25x over each of the last two windows,
  ``||f(z_k)|| >= 1.25 M_{k-w}`` and ``M_{k-w} >= 1.25 M_{k-2w}``, while the residual made no progress: its
  minimum over the last ``w`` steps is still at least 0.9 times its minimum up to step ``k - w``. (Maxima and
  minima, so that one spike, as quasi-Newton steps make, or a bounded wandering, as Anderson's on a map without a
  fixed point, is no verdict; two windows, so that the approach from ``z0 = 0`` to a bounded orbit is none
  either: DEQReg-12 run past its 12 trained steps on synthetic pairs oscillates with a flat residual near 130
  while its norm rises from 130 to 200 in 12 steps, then to 246 in 180.) (c) catches slow expansions that never
  reach (b): ``z -> 1.05 z + 1`` at step 32 (its residual grows 1.05x a step, 1000x only after 142 steps) and a
  drift ``z -> z + c`` at step 32. A contraction's residual shrinks at its rate ``rho`` a step, so (c) leaves
  alone every contraction with ``rho < 0.9 ** (1 / 16) = 0.9934`` (the ``rho = 0.99`` linear maps of the
  tests) and the shipped DEQReg models on brain2d and synthetic pairs (up to 192 steps). A contraction slower
  than that whose norm still rises 25% per 16 steps is flagged: pass ``growth_window=0`` (off) or a longer
  window for it. (d) **A bound**, when the caller knows one: an entry of ``f(z_k)`` larger than ``max_abs`` in
  magnitude (default ``inf``: none). No trace rule tells a slow drift towards an absurd "fixed point" from a
  slow contraction (the shipped DEQReg fed 0..255 images: its residual falls 0.8x per 16 steps while its norm
  rises 1.1x, towards displacements of ~10^4 voxels); a bound does: DEQReg passes the image size, since no
  displacement moves a voxel farther than that.
  ``on_diverge="raise"`` (the default) raises :class:`SolverDivergedError` at the first diverged sample; with
  ``on_diverge="flag"`` that sample stops, ``info.diverged`` and ``info.sample_diverged[i]`` are set, and the
  others run on. A NaN never comes back silently.
* ``callback(k, z_k)``, when given, is called with the input of every step before ``f`` is applied. The solver
  never modifies ``z_k`` in place afterwards, so the callback may keep it (the DEQ samples its states that way).

Every solver returns ``(z, info)`` with ``info`` a :class:`SolverInfo`. :func:`solve` picks a solver by name and
rejects options it does not know.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from ._checks import check_finite, check_int, check_options

__all__ = ["SolverDivergedError", "SolverInfo", "fixed_point", "anderson", "broyden", "solve", "solver_options",
           "SOLVERS", "residuals", "rel_residual", "Map", "EPS"]

EPS = 1e-9  # added to ||f(z)|| in the relative residual
GROWTH_WINDOW = 16     # the growth check compares two windows of this many steps (0 turns it off)
GROWTH_NORM = 1.25     # ... flags a sample whose largest ||f(z)|| rose >= 1.25 x over each of the two windows
GROWTH_RESIDUAL = 0.9  # ... while min(residual over the last window) >= 0.9 x min(residual before it)
#: an update map ``z -> f(z)``, ``(B, ...)`` to ``(B, ...)`` (the one declaration; :mod:`deqreg_lite.deq` uses it).
Map = Callable[[Tensor], Tensor]
Callback = Optional[Callable[[int, Tensor], None]]


class SolverDivergedError(RuntimeError):
    """A solver met a NaN/inf or a residual that blew up. ``step`` and ``residual`` say where and how much."""

    def __init__(self, solver: str, step: int, residual: float, reason: str) -> None:
        self.step, self.residual = step, residual
        super().__init__(f"{solver} diverged at step {step}: {reason} (residual ||f(z) - z|| = {residual:.4g}). "
                         f"Pass on_diverge='flag' to get the best finite iterate back instead.")


@dataclass
class SolverInfo:
    """What a solver did. Batch-level fields summarise the per-sample ones (lists of length ``B``).

    Attributes:
        solver: the solver's name.
        abs_trace: ``||f(z_k) - z_k||`` per step, maximum over the samples still running at step ``k``.
        rel_trace: ``||f(z_k) - z_k|| / (||f(z_k)|| + 1e-9)`` per step, the same maximum.
        nstep: steps the loop ran (``len(rel_trace)``): until every sample had stopped, or ``max_iter``; the
            largest of ``sample_nstep``.
        nfe: calls of ``f``, counted by the solver. Each call evaluates the whole batch (stopped samples too, at
            their frozen answer), so ``nfe == nstep`` for every solver here.
        converged: whether **every** sample reached its tolerance (``sample_converged`` says which did).
        returned: ``"lowest"`` or ``"last"``: the requested policy (a diverged sample always gets its
            lowest-absolute-residual candidate, see the module docstring).
        best_step: the largest of ``sample_best_step`` (-1 only when every sample got ``z0`` back).
        diverged: whether **any** sample diverged (only with ``on_diverge="flag"``; ``sample_diverged`` says which).
        sample_nstep: per sample, the steps it ran before it stopped (converged, diverged or ``max_iter``).
        sample_converged: per sample, whether it reached ``rel <= tol``.
        sample_diverged: per sample, whether it diverged (NaN/inf, blow-up or growth).
        sample_best_step: per sample, the step whose candidate ``f(z_k)`` came back (-1: ``z0`` itself).
        sample_residual: per sample, the relative residual of the returned candidate (NaN for ``z0``).
        sample_abs_residual: per sample, its absolute residual ``||f(z_k) - z_k||`` (NaN for ``z0``).
    """

    solver: str
    abs_trace: list[float] = field(default_factory=list)
    rel_trace: list[float] = field(default_factory=list)
    nstep: int = 0
    nfe: int = 0
    converged: bool = False
    returned: str = "lowest"
    best_step: int = -1
    diverged: bool = False
    sample_nstep: list[int] = field(default_factory=list)
    sample_converged: list[bool] = field(default_factory=list)
    sample_diverged: list[bool] = field(default_factory=list)
    sample_best_step: list[int] = field(default_factory=list)
    sample_residual: list[float] = field(default_factory=list)
    sample_abs_residual: list[float] = field(default_factory=list)

    @property
    def residual(self) -> float:
        """The largest relative residual of the returned candidates over the batch (NaN when a sample got ``z0``
        back, or before the solve finished)."""
        if not self.sample_residual:
            return math.nan
        return math.nan if any(math.isnan(r) for r in self.sample_residual) else max(self.sample_residual)


@torch.no_grad()
def residuals(new: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
    """The absolute and relative residual of a step, per sample: ``||new - old||`` and
    ``||new - old|| / (||new|| + EPS)`` (``EPS = 1e-9``), L2 norms over all non-batch axes, two ``(B,)`` tensors in
    the dtype of ``new``. The one definition of the library's residual: the solvers' ``abs_trace`` / ``rel_trace``,
    the torchdeq path of :class:`deqreg_lite.deq.DEQ` and the learned methods' traces all use it. ``new`` is
    ``f(z)`` (the newer iterate), ``old`` is ``z``; both ``(B, ...)``."""
    b = new.shape[0]
    abs_res = (new - old).reshape(b, -1).norm(dim=1)
    return abs_res, abs_res / (new.reshape(b, -1).norm(dim=1) + EPS)


def rel_residual(new: Tensor, old: Tensor) -> float:
    """The largest relative residual over the batch, ``max_b ||new - old|| / (||new|| + 1e-9)`` (see
    :func:`residuals`), as a Python float: one entry of a ``rel_trace``."""
    return float(residuals(new, old)[1].max())


def _check_z0(z0: Tensor) -> None:
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor of shape (B, ...), got {type(z0).__name__}")
    if z0.dim() < 1 or z0.numel() == 0:
        raise ValueError(f"z0 must have shape (B, ...) with at least one element, got {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise ValueError(f"z0 must be a floating-point tensor, got {z0.dtype}")
    check_finite(z0, "z0")


class _Run:
    """The bookkeeping every solver shares, **per sample**: call ``f``, record residuals, keep each sample's
    candidates, stop (freeze) each sample on its own, judge divergence per sample (module docstring)."""

    def __init__(self, name: str, f: Map, z0: Tensor, max_iter: int, tol: float, return_policy: str,
                 on_diverge: str, diverge_factor: float, callback: Callback, growth_window: int,
                 max_abs: float = math.inf) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        _check_z0(z0)
        check_int(max_iter, "max_iter", 1)
        if not (isinstance(tol, (int, float)) and 0 <= tol < math.inf):
            raise ValueError(f"tol must be a finite number >= 0 (a relative tolerance), got {tol!r}")
        check_options(return_policy, ("lowest", "last"), "return_policy")
        check_options(on_diverge, ("raise", "flag"), "on_diverge")
        if not diverge_factor > 1:
            raise ValueError(f"diverge_factor must be > 1, got {diverge_factor!r}")
        check_int(growth_window, "growth_window", 0, hint=" (0 turns the growth check off)")
        if isinstance(max_abs, bool) or not isinstance(max_abs, (int, float)) or not max_abs > 0:
            raise ValueError(f"max_abs must be a number > 0 (math.inf: no bound), got {max_abs!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        self.max_abs = float(max_abs)
        self.f, self.z0, self.max_iter, self.tol = f, z0, max_iter, float(tol)
        self.on_diverge, self.diverge_factor, self.callback = on_diverge, float(diverge_factor), callback
        self.growth_window = growth_window
        self.policy = return_policy
        self.info = SolverInfo(solver=name, returned=return_policy)
        b, dev = z0.shape[0], z0.device
        inf = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
        self.active = torch.ones(b, dtype=torch.bool, device=dev)    # still iterating
        self.conv = torch.zeros(b, dtype=torch.bool, device=dev)
        self.div = torch.zeros(b, dtype=torch.bool, device=dev)
        self.nstep = torch.zeros(b, dtype=torch.long, device=dev)
        self.first = torch.zeros(b, dtype=torch.float64, device=dev)  # each sample's step-0 residual
        self.hist_abs: list[Tensor] = []   # per step, (B,): residuals, for the growth check
        self.hist_min: list[Tensor] = []   # running minimum of the residual
        self.hist_max: list[Tensor] = []   # running maximum of the norm ||f(z_k)||
        # candidates per sample: (value, step, relative residual, absolute residual)
        self.low_rel = [z0, torch.full((b,), -1, device=dev), inf.clone(), inf.clone()]
        self.low_abs = [z0, torch.full((b,), -1, device=dev), inf.clone(), inf.clone()]
        self.last = [z0, torch.full((b,), -1, device=dev), inf.clone(), inf.clone()]
        self.frozen = z0  # a stopped sample's input from then on: its answer
        self.done = False

    def _bview(self, mask: Tensor, like: Tensor) -> Tensor:
        return mask.view(-1, *([1] * (like.dim() - 1)))

    def _take(self, mask: Tensor, new: list, old: list) -> list:
        """Per sample, ``new`` where ``mask`` else ``old`` (no graph op when the mask is uniform: BPTT's memory)."""
        if bool(mask.all()):
            return list(new)
        if not bool(mask.any()):
            return old
        return [torch.where(self._bview(mask, old[0]), new[0], old[0])] + \
               [torch.where(mask, n, o) for n, o in zip(new[1:], old[1:])]

    def step(self, k: int, z: Tensor) -> Tensor:
        """Step ``k``: call ``f`` at ``z``, record the residuals, update each running sample, return ``f(z)``."""
        if self.callback is not None:
            self.callback(k, z)
        fz = self.f(z)
        self.info.nfe += 1
        if not isinstance(fz, Tensor) or fz.shape != z.shape:
            got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
            raise ValueError(f"f must return a tensor shaped like z0 {tuple(z.shape)}, got {got}")
        info, act = self.info, self.active
        with torch.no_grad():
            batch = z.shape[0]
            abs_res, rel_res = residuals(fz, z)
            norm = fz.reshape(batch, -1).norm(dim=1)
            rel_res = rel_res.double()
            abs_res, norm = abs_res.double(), norm.double()
            info.abs_trace.append(float(abs_res[act].max()))
            info.rel_trace.append(float(rel_res[act].max()))
            info.nstep = k + 1
            self.nstep = torch.where(act, k + 1, self.nstep)
            if k == 0:
                self.first = abs_res
            self.hist_abs.append(abs_res)
            self.hist_min.append(abs_res if k == 0 else torch.minimum(self.hist_min[-1], abs_res))
            self.hist_max.append(norm if k == 0 else torch.maximum(self.hist_max[-1], norm))
            finite = torch.isfinite(abs_res) & torch.isfinite(rel_res)
            blow = (self.first > 0) & (abs_res > self.diverge_factor * self.first)
            grow = torch.zeros_like(act)
            w = self.growth_window
            if w and k >= 2 * w:
                recent = torch.stack(self.hist_abs[k - w + 1:]).amin(dim=0)  # min over the last w steps
                grow = ((recent >= GROWTH_RESIDUAL * self.hist_min[k - w])
                        & (norm >= GROWTH_NORM * self.hist_max[k - w])
                        & (self.hist_max[k - w] >= GROWTH_NORM * self.hist_max[k - 2 * w]))
            if self.max_abs < math.inf:
                big = fz.detach().reshape(batch, -1).abs().amax(dim=1) > self.max_abs
                grow = grow | big
            nonfinite, blow, grow = act & ~finite, act & finite & blow, act & finite & grow
            bad = nonfinite | blow | grow
            good = act & ~bad
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            if self.on_diverge == "raise":
                if nonfinite[i]:
                    reason = "f(z) holds NaN or inf"
                elif blow[i]:
                    reason = (f"the residual grew above {self.diverge_factor:g} x the first one "
                              f"({float(self.first[i]):.4g})")
                elif self.max_abs < math.inf and float(fz[i].detach().abs().max()) > self.max_abs:
                    reason = f"an entry of f(z) exceeds max_abs = {self.max_abs:g} in magnitude"
                else:
                    reason = (f"the iterate's norm rose {GROWTH_NORM:g}x above its earlier maximum in each of the "
                              f"last two windows of {w} steps while the residual did not fall below "
                              f"{GROWTH_RESIDUAL:g}x its earlier minimum (a slow expansion; growth_window=0 turns "
                              f"this check off)")
                where = f" (sample {i} of {batch})" if batch > 1 else ""
                raise SolverDivergedError(info.solver, k, float(abs_res[i]), reason + where)
        new = [fz, torch.full_like(self.nstep, k), rel_res, abs_res]
        self.last = self._take(good, new, self.last)
        self.low_rel = self._take(good & (rel_res < self.low_rel[2]), new, self.low_rel)
        self.low_abs = self._take(good & (abs_res < self.low_abs[3]), new, self.low_abs)
        conv = good & (rel_res <= self.tol)
        self.conv, self.div = self.conv | conv, self.div | bad
        stop = conv | bad if k + 1 < self.max_iter else act
        if bool(stop.any()):
            self.active = act & ~stop
            self.frozen = torch.where(self._bview(stop, fz), self._answer()[0], self.frozen)
        self.done = not bool(self.active.any())
        return fz

    def hold(self, z_next: Tensor) -> Tensor:
        """The next input: ``z_next`` for running samples, the answer for stopped ones (they are frozen)."""
        if bool(self.active.all()):
            return z_next
        frozen = self.frozen.reshape(z_next.shape)
        return torch.where(self._bview(self.active, z_next), z_next, frozen)

    def _answer(self) -> list:
        """Per sample: the lowest-absolute-residual finite candidate if it diverged (``z0`` if none), else the
        candidate of the policy (lowest relative residual, or last)."""
        chosen = self.last if self.policy == "last" else self.low_rel
        return self._take(self.div, self.low_abs, chosen)

    def finish(self) -> tuple[Tensor, SolverInfo]:
        z, steps, rel, abs_ = self._answer()
        info = self.info
        info.converged, info.diverged = bool(self.conv.all()), bool(self.div.any())
        info.sample_nstep = self.nstep.tolist()
        info.sample_converged = self.conv.tolist()
        info.sample_diverged = self.div.tolist()
        info.sample_best_step = steps.tolist()
        none = steps < 0
        info.sample_residual = torch.where(none, math.nan, rel).tolist()
        info.sample_abs_residual = torch.where(none, math.nan, abs_).tolist()
        info.best_step = int(steps.max())
        return z, info


def _check_tau(tau: float) -> None:
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")


def fixed_point(f: Map, z0: Tensor, max_iter: int = 50, tol: float = 1e-3, tau: float = 1.0, *,
                return_policy: str = "lowest", on_diverge: str = "raise", diverge_factor: float = 1e3,
                growth_window: int = GROWTH_WINDOW, max_abs: float = math.inf,
                callback: Callback = None,
                track_graph: bool = False) -> tuple[Tensor, SolverInfo]:
    """Plain fixed-point iteration, damped when ``tau < 1``: ``z <- tau * f(z) + (1 - tau) * z``.

    Args:
        f: the map, ``(B, ...) -> (B, ...)``.
        z0: ``(B, ...)`` start, finite.
        max_iter: most steps (= calls of ``f``).
        tol: relative tolerance on ``||f(z) - z|| / ||f(z)||`` (every sample).
        tau: damping in ``(0, 1]``.
        return_policy, on_diverge, diverge_factor, growth_window, max_abs, callback: see the module docstring.
        track_graph: build the autograd graph through every step (backpropagation through time). Only the
            DEQ's ``grad="bptt"`` mode needs it; the residual bookkeeping stays outside the graph.
    Returns:
        ``(z, info)``: ``z`` ``(B, ...)`` and a :class:`SolverInfo`.
    """
    _check_tau(tau)
    run = _Run("fixed_point", f, z0, max_iter, tol, return_policy, on_diverge, diverge_factor, callback,
               growth_window, max_abs)
    with torch.set_grad_enabled(track_graph and torch.is_grad_enabled()):
        z = z0
        for k in range(max_iter):
            fz = run.step(k, z)
            if run.done:
                break
            z = run.hold(fz if tau == 1.0 else tau * fz + (1.0 - tau) * z)
    return run.finish()


def anderson(f: Map, z0: Tensor, m: int = 6, lam: float = 1e-4, max_iter: int = 50, tol: float = 1e-3,
             tau: float = 1.0, *, return_policy: str = "lowest", on_diverge: str = "raise",
             diverge_factor: float = 1e3, growth_window: int = GROWTH_WINDOW, max_abs: float = math.inf,
             callback: Callback = None) -> tuple[Tensor, SolverInfo]:
    """Anderson acceleration: the next input mixes the last ``m`` images ``f(z_i)``.

    With ``G_i = f(z_i) - z_i`` (flattened per sample), the weights ``alpha`` minimise
    ``||sum_i alpha_i G_i||^2 + lam * ||alpha||^2`` subject to ``sum_i alpha_i = 1``, whose solution is
    ``alpha = A^-1 1 / (1^T A^-1 1)`` with ``A = G G^T + lam I``. Then
    ``z_next = tau * sum_i alpha_i f(z_i) + (1 - tau) * sum_i alpha_i z_i``. With one stored pair this is a plain
    (damped) step, so step 1 is ``z_1 = f(z_0)`` for ``tau = 1``, as in torchdeq. Each sample of the batch gets
    its own weights.

    Memory: ``2 * m`` copies of the state (the history), plus one for the residuals of the mixing.

    Args:
        f, z0, max_iter, tol, tau: as in :func:`fixed_point`.
        m: history length, >= 1.
        lam: Tikhonov regularisation of the mixing problem, >= 0.
        return_policy, on_diverge, diverge_factor, growth_window, max_abs, callback: see the module docstring.
    Returns:
        ``(z, info)``.
    """
    _check_tau(tau)
    check_int(m, "m", 1)
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    run = _Run("anderson", f, z0, max_iter, tol, return_policy, on_diverge, diverge_factor, callback,
               growth_window, max_abs)
    with torch.no_grad():
        batch = z0.shape[0]
        xs = z0.new_zeros(batch, m, z0[0].numel())  # inputs z_i (a ring buffer; the order does not matter)
        fs = torch.zeros_like(xs)                    # images f(z_i)
        z = z0
        for k in range(max_iter):
            fz = run.step(k, z)
            if run.done:
                break
            run_b = run.active.view(batch, 1)  # a stopped sample's history is left alone (it is frozen)
            xs[:, k % m] = torch.where(run_b, z.reshape(batch, -1), xs[:, k % m])
            fs[:, k % m] = torch.where(run_b, fz.reshape(batch, -1), fs[:, k % m])
            n = min(k + 1, m)
            g = fs[:, :n] - xs[:, :n]                                      # (B, n, D)
            eye = torch.eye(n, dtype=z0.dtype, device=z0.device)
            a = g @ g.transpose(1, 2) + lam * eye
            a = torch.where(run_b.view(batch, 1, 1), a, eye)  # stopped samples: a harmless system, result unused
            alpha = torch.linalg.solve(a, z0.new_ones(batch, n, 1))       # (B, n, 1)
            alpha = (alpha / alpha.sum(dim=1, keepdim=True)).transpose(1, 2)  # (B, 1, n)
            z_next = (alpha @ fs[:, :n]).squeeze(1)
            if tau != 1.0:
                z_next = tau * z_next + (1.0 - tau) * (alpha @ xs[:, :n]).squeeze(1)
            z = run.hold(z_next.view_as(z0))
    return run.finish()


def broyden(f: Map, z0: Tensor, max_iter: int = 50, tol: float = 1e-3, m: int = 10, *,
            return_policy: str = "lowest", on_diverge: str = "raise", diverge_factor: float = 1e3,
            growth_window: int = GROWTH_WINDOW, max_abs: float = math.inf,
            callback: Callback = None) -> tuple[Tensor, SolverInfo]:
    """Limited-memory ("good") Broyden's method on the root problem ``g(z) = f(z) - z = 0``.

    ``H`` approximates the inverse Jacobian of ``g``; it starts at ``-I`` (so step 1 is ``z_1 = f(z_0)``) and is
    stored as ``H = -I + sum_i u_i v_i^T`` with at most ``m`` pairs. A step is ``z <- z - H g(z)``; then, with
    ``s = z_new - z`` and ``y = g(z_new) - g(z)``, the Sherman-Morrison form of Broyden's update gives
    ``u = (s - H y) / (s^T H y)`` and ``v = H^T s``. Each sample has its own ``H``. No line search.

    Args:
        f, z0, max_iter, tol: as in :func:`fixed_point`.
        m: number of rank-one updates kept, >= 1. When the memory is full, ``H`` restarts from ``-I`` (plus the
            newest update): dropping only the oldest update, as torchdeq's ``LBFGS_thres`` does, diverged on an
            ill-conditioned linear test map, where restarting converged.
        return_policy, on_diverge, diverge_factor, growth_window, max_abs, callback: see the module docstring.
    Returns:
        ``(z, info)``.
    """
    check_int(m, "m", 1)
    run = _Run("broyden", f, z0, max_iter, tol, return_policy, on_diverge, diverge_factor, callback,
               growth_window, max_abs)
    with torch.no_grad():
        batch = z0.shape[0]
        us: list[Tensor] = []  # each (B, D)
        vs: list[Tensor] = []

        def h_times(x: Tensor) -> Tensor:    # H x
            return -x + sum((u * (v * x).sum(1, keepdim=True) for u, v in zip(us, vs)), torch.zeros_like(x))

        def ht_times(x: Tensor) -> Tensor:   # H^T x
            return -x + sum((v * (u * x).sum(1, keepdim=True) for u, v in zip(us, vs)), torch.zeros_like(x))

        z = z0.reshape(batch, -1)
        g = run.step(0, z0).reshape(batch, -1) - z
        for k in range(1, max_iter):
            if run.done:
                break
            z_new = run.hold(z - h_times(g))  # stopped samples stay where they stopped (s = 0 for them)
            s = z_new - z
            g_new = run.step(k, z_new.view_as(z0)).reshape(batch, -1) - z_new
            if run.done:
                break
            y = g_new - g
            hy = h_times(y)
            denom = (s * hy).sum(1, keepdim=True)
            ok = denom.abs() > 1e-30
            u, v = torch.where(ok, (s - hy) / torch.where(ok, denom, torch.ones_like(denom)), 0.0), ht_times(s)
            if len(us) == m:  # memory full: restart from H = -I, keeping only the newest update
                us.clear(), vs.clear()
            us.append(u), vs.append(v)
            z, g = z_new, g_new
    return run.finish()


SOLVERS: dict[str, Callable[..., tuple[Tensor, SolverInfo]]] = {
    "fixed_point": fixed_point, "anderson": anderson, "broyden": broyden}


def solver_options(solver: str) -> tuple[str, ...]:
    """The option names that ``solver`` accepts (everything but ``f`` and ``z0``)."""
    check_options(solver, tuple(SOLVERS), "solver")
    return tuple(p for p in inspect.signature(SOLVERS[solver]).parameters if p not in ("f", "z0"))


def solve(f: Map, z0: Tensor, solver: str = "fixed_point", **options) -> tuple[Tensor, SolverInfo]:
    """Solve ``z = f(z)`` with the solver named ``solver`` (``"fixed_point"``, ``"anderson"`` or ``"broyden"``).

    Args:
        f: the map ``(B, ...) -> (B, ...)``.
        z0: ``(B, ...)`` start.
        solver: the solver's name.
        **options: that solver's options (see :func:`solver_options`).
    Returns:
        ``(z, info)`` as returned by the solver.
    Raises:
        ValueError: for an unknown solver name. TypeError: for an option the solver does not take.
    """
    valid = solver_options(solver)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for solver {solver!r}; valid options: {list(valid)}")
    return SOLVERS[solver](f, z0, **options)
