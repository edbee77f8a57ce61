"""Fixed-point solvers: find ``z*`` with ``z* = f(z*)``. Plain (damped) iteration, Anderson and Broyden.

Conventions shared by every solver
----------------------------------
* ``f`` maps a tensor ``(B, ...)`` to a tensor of the same shape. The solvers run under ``torch.no_grad()``, so
  ``f`` may be a network: no graph is built (only :func:`fixed_point` has ``track_graph=True``, for BPTT).
* **Step k** calls ``f`` once, at the solver's current input ``z_k``: ``fz_k = f(z_k)``. Its residual is
  ``||fz_k - z_k||`` and its relative residual ``||fz_k - z_k|| / (||fz_k|| + 1e-9)``, both per sample (L2 norm
  over all non-batch axes). ``info.abs_trace[k]`` and ``info.rel_trace[k]`` hold the **maximum over the batch**,
  so a batch counts as converged only when every sample has.
* **Stop rule.** ``tol`` is **relative**: the solver stops after the first step with ``rel_trace[k] <= tol``.
  (An absolute tolerance on the norm of a whole field depends on its size and is never reached; it is
  torchdeq's default.)
* **Which iterate comes back.** Step k's candidate answer is ``fz_k``: it costs nothing more and, for a
  contraction, it is closer to ``z*`` than ``z_k``. By default (``return_policy="lowest"``, like torchdeq) the
  solver returns the candidate of the step with the lowest relative residual; ``return_policy="last"`` returns
  the last one. ``info.best_step`` says which step that was, ``info.returned`` which policy applied.
* **Divergence.** A NaN or inf, or a residual above ``diverge_factor`` times the first one, raises
  :class:`SolverDivergedError` (``on_diverge="raise"``, the default). With ``on_diverge="flag"`` the solver stops,
  sets ``info.diverged = True`` and returns the finite candidate with the lowest residual (``z0`` itself, with
  ``best_step = -1``, when no step gave a finite one). A NaN never comes back silently.
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

from ._checks import check_finite, check_options

__all__ = ["SolverDivergedError", "SolverInfo", "fixed_point", "anderson", "broyden", "solve", "solver_options",
           "SOLVERS"]

EPS = 1e-9  # added to ||f(z)|| in the relative residual
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
    """What a solver did.

    Attributes:
        solver: the solver's name.
        abs_trace: ``||f(z_k) - z_k||`` per step (maximum over the batch).
        rel_trace: ``||f(z_k) - z_k|| / (||f(z_k)|| + 1e-9)`` per step (maximum over the batch).
        nstep: number of steps done (``len(rel_trace)``).
        nfe: number of calls of ``f``, counted by the solver.
        converged: whether a step reached ``rel_trace[k] <= tol``.
        returned: ``"lowest"`` or ``"last"``: the policy that chose the returned iterate.
        best_step: the step whose candidate ``f(z_k)`` was returned (-1: ``z0`` itself came back).
        diverged: whether the solver stopped on a NaN/inf or a blow-up (only with ``on_diverge="flag"``).
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

    @property
    def residual(self) -> float:
        """Relative residual of the step whose candidate was returned (NaN when ``z0`` came back)."""
        return self.rel_trace[self.best_step] if self.best_step >= 0 else math.nan


def _check_z0(z0: Tensor) -> None:
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor of shape (B, ...), got {type(z0).__name__}")
    if z0.dim() < 1 or z0.numel() == 0:
        raise ValueError(f"z0 must have shape (B, ...) with at least one element, got {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise ValueError(f"z0 must be a floating-point tensor, got {z0.dtype}")
    check_finite(z0, "z0")


class _Run:
    """The bookkeeping every solver shares: call ``f``, record residuals, keep the best candidate, stop, diverge."""

    def __init__(self, name: str, f: Map, z0: Tensor, max_iter: int, tol: float, return_policy: str,
                 on_diverge: str, diverge_factor: float, callback: Callback) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        _check_z0(z0)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        if not (isinstance(tol, (int, float)) and 0 <= tol < math.inf):
            raise ValueError(f"tol must be a finite number >= 0 (a relative tolerance), got {tol!r}")
        check_options(return_policy, ("lowest", "last"), "return_policy")
        check_options(on_diverge, ("raise", "flag"), "on_diverge")
        if not diverge_factor > 1:
            raise ValueError(f"diverge_factor must be > 1, got {diverge_factor!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        self.f, self.z0, self.max_iter, self.tol = f, z0, max_iter, float(tol)
        self.on_diverge, self.diverge_factor, self.callback = on_diverge, float(diverge_factor), callback
        self.info = SolverInfo(solver=name, returned=return_policy)
        self.lowest: tuple[int, float, Tensor] | None = None  # (step, rel residual, candidate)
        self.last: tuple[int, float, Tensor] | None = None
        self.done = False

    def step(self, k: int, z: Tensor) -> Tensor:
        """Step ``k``: call ``f`` at ``z``, record the residuals, and return ``f(z)``."""
        if self.callback is not None:
            self.callback(k, z)
        fz = self.f(z)
        self.info.nfe += 1
        if not isinstance(fz, Tensor) or fz.shape != z.shape:
            got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
            raise ValueError(f"f must return a tensor shaped like z0 {tuple(z.shape)}, got {got}")
        with torch.no_grad():
            batch = z.shape[0]
            abs_res = (fz - z).reshape(batch, -1).norm(dim=1)
            rel_res = abs_res / (fz.reshape(batch, -1).norm(dim=1) + EPS)
            abs_max, rel_max = float(abs_res.max()), float(rel_res.max())
        info = self.info
        info.abs_trace.append(abs_max)
        info.rel_trace.append(rel_max)
        info.nstep = k + 1
        if not (math.isfinite(abs_max) and math.isfinite(rel_max)):
            self._diverge(k, abs_max, "f(z) holds NaN or inf")
        elif k > 0 and info.abs_trace[0] > 0 and abs_max > self.diverge_factor * info.abs_trace[0]:
            self._diverge(k, abs_max, f"the residual grew above {self.diverge_factor:g} x the first one "
                                      f"({info.abs_trace[0]:.4g})")
        else:
            self.last = (k, rel_max, fz)
            if self.lowest is None or rel_max < self.lowest[1]:
                self.lowest = (k, rel_max, fz)
            if rel_max <= self.tol:
                info.converged, self.done = True, True
        if k + 1 >= self.max_iter:
            self.done = True
        return fz

    def _diverge(self, k: int, residual: float, reason: str) -> None:
        if self.on_diverge == "raise":
            raise SolverDivergedError(self.info.solver, k, residual, reason)
        self.info.diverged, self.info.returned, self.done = True, "lowest", True

    def finish(self) -> tuple[Tensor, SolverInfo]:
        chosen = self.last if self.info.returned == "last" else self.lowest
        if chosen is None:  # no finite step at all: hand back the (finite) start
            return self.z0, self.info
        self.info.best_step = chosen[0]
        return chosen[2], self.info


def _check_tau(tau: float) -> None:
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")


def fixed_point(f: Map, z0: Tensor, max_iter: int = 50, tol: float = 1e-3, tau: float = 1.0, *,
                return_policy: str = "lowest", on_diverge: str = "raise", diverge_factor: float = 1e3,
                callback: Callback = None, track_graph: bool = False) -> tuple[Tensor, SolverInfo]:
    """Plain fixed-point iteration, damped when ``tau < 1``: ``z <- tau * f(z) + (1 - tau) * z``.

    Args:
        f: the map, ``(B, ...) -> (B, ...)``.
        z0: ``(B, ...)`` start, finite.
        max_iter: most steps (= calls of ``f``).
        tol: relative tolerance on ``||f(z) - z|| / ||f(z)||`` (every sample).
        tau: damping in ``(0, 1]``.
        return_policy, on_diverge, diverge_factor, callback: see the module docstring.
        track_graph: build the autograd graph through every step (backpropagation through time). Only the
            DEQ's ``grad="bptt"`` mode needs it; the residual bookkeeping stays outside the graph.
    Returns:
        ``(z, info)``: ``z`` ``(B, ...)`` and a :class:`SolverInfo`.
    """
    _check_tau(tau)
    run = _Run("fixed_point", f, z0, max_iter, tol, return_policy, on_diverge, diverge_factor, callback)
    with torch.set_grad_enabled(track_graph and torch.is_grad_enabled()):
        z = z0
        for k in range(max_iter):
            fz = run.step(k, z)
            if run.done:
                break
            z = fz if tau == 1.0 else tau * fz + (1.0 - tau) * z
    return run.finish()


def anderson(f: Map, z0: Tensor, m: int = 6, lam: float = 1e-4, max_iter: int = 50, tol: float = 1e-3,
             tau: float = 1.0, *, return_policy: str = "lowest", on_diverge: str = "raise",
             diverge_factor: float = 1e3, callback: Callback = None) -> tuple[Tensor, SolverInfo]:
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
        return_policy, on_diverge, diverge_factor, callback: see the module docstring.
    Returns:
        ``(z, info)``.
    """
    _check_tau(tau)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    run = _Run("anderson", f, z0, max_iter, tol, return_policy, on_diverge, diverge_factor, callback)
    with torch.no_grad():
        batch = z0.shape[0]
        xs = z0.new_zeros(batch, m, z0[0].numel())  # inputs z_i (a ring buffer; the order does not matter)
        fs = torch.zeros_like(xs)                    # images f(z_i)
        z = z0
        for k in range(max_iter):
            fz = run.step(k, z)
            if run.done:
                break
            xs[:, k % m], fs[:, k % m] = z.reshape(batch, -1), fz.reshape(batch, -1)
            n = min(k + 1, m)
            g = fs[:, :n] - xs[:, :n]                                      # (B, n, D)
            a = g @ g.transpose(1, 2) + lam * torch.eye(n, dtype=z0.dtype, device=z0.device)
            alpha = torch.linalg.solve(a, z0.new_ones(batch, n, 1))       # (B, n, 1)
            alpha = (alpha / alpha.sum(dim=1, keepdim=True)).transpose(1, 2)  # (B, 1, n)
            z_next = (alpha @ fs[:, :n]).squeeze(1)
            if tau != 1.0:
                z_next = tau * z_next + (1.0 - tau) * (alpha @ xs[:, :n]).squeeze(1)
            z = z_next.view_as(z0)
    return run.finish()


def broyden(f: Map, z0: Tensor, max_iter: int = 50, tol: float = 1e-3, m: int = 10, *,
            return_policy: str = "lowest", on_diverge: str = "raise", diverge_factor: float = 1e3,
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
        return_policy, on_diverge, diverge_factor, callback: see the module docstring.
    Returns:
        ``(z, info)``.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    run = _Run("broyden", f, z0, max_iter, tol, return_policy, on_diverge, diverge_factor, callback)
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
            s = -h_times(g)
            z_new = z + s
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
