"""The deep-equilibrium machinery of DEQReg (Sec. 2.2-2.3): solve ``z* = f(z*)`` without a graph, then attach one.

``DEQ(...)(f, z0)`` returns ``(z_star, states, info)``:

1. **Forward solve** (Eq. 5), under ``torch.no_grad()``, with a solver of :mod:`deqreg_lite.solvers`. The
   solver's relative tolerance, lowest-residual policy and divergence checks apply **per sample** (see there): a
   sample's answer does not depend on the other samples of its batch.
2. **Gradient** (``grad=``), only when grad mode is on:

   * ``"phantom"`` (Eq. 7-8): ``K`` damped steps ``z <- tau f(z) + (1 - tau) z`` from ``z*.detach()`` with the
     graph on (:func:`phantom`). The same convention as torchdeq's ``grad=K, tau=tau``: equal gradients.
   * ``"ift"`` (Eq. 6): one call ``f(z*)`` with the graph on, and a backward hook that replaces the incoming
     gradient ``g`` by the solution of ``y = g + J_f(z*)^T y`` (fixed-point iteration, options ``ift_tol`` and
     ``ift_max_iter``); ``info.backward`` holds that solve's :class:`~deqreg_lite.solvers.SolverInfo` after
     ``backward()``.
   * ``"bptt"``: plain fixed-point iteration with the graph through every step, for comparisons. Memory
     grows linearly with the steps; the other two modes are flat in ``max_iter``.

   Under ``torch.no_grad()`` nothing is attached: ``z_star`` is the solver's answer, the states are the detached
   iterates (plain tensors, even with ``lazy_states``) and ``info.grad_nfe == 0``. **The same when the solve
   diverged** (``on_diverge="flag"`` and ``info.diverged``, for any sample; grad modes ``"phantom"`` and
   ``"ift"``): re-applying ``f`` for a gradient near a diverging iterate gives NaN/inf, which would reach every
   parameter, so nothing is attached and ``z_star`` is the solver's finite answer (per sample, see
   :mod:`deqreg_lite.solvers`), without a graph: check ``info.diverged`` before ``backward()``.
   Otherwise, with grad on, ``z_star`` is the output of the gradient steps (``K`` more damped steps, or one more
   call of ``f``), as in torchdeq. The output never depends on ``z0`` through the graph: an equilibrium forgets
   its start.
3. **States** (Eq. 9): ``n_states = S`` iterates of the forward trajectory ``z_0, z_1, ...`` (the solver's
   inputs) at the fixed steps ``t_s = (s + 1) * max_iter // (S + 1)``, ``s = 0..S-1`` (12, 24, 36 for
   ``max_iter=48, S=3``), each with its own phantom gradient (``K`` damped steps from ``z_t.detach()``; in
   ``"bptt"`` mode the iterate itself, inside the BPTT graph). **Always exactly S states**: when the solver
   stops before step ``t_s`` (it converged), the state is the solver's answer, which is where the trajectory
   would have stayed; ``info.state_steps`` then says ``info.nstep`` and ``info.n_padded`` counts them. In a batch
   whose samples stop at different steps, a sample that stopped before ``t_s`` is frozen at its answer, so its
   state is its answer too (as alone); ``state_steps``/``n_padded`` describe the batch loop.

Memory of the states. Eager states (the default) hold ``S`` phantom graphs of ``K`` steps each, all alive until
``backward()``: ``(S + 1) K`` calls of ``f`` in memory at once. With ``lazy_states=True`` each state is a
:class:`LazyState` that builds its graph only when called, and :func:`correction_backward` back-propagates the
terms of Eq. 9 one at a time, so at most two graphs (``z*``'s and one state's) are alive at once. Both give the
same gradients. Within one graph, ``checkpoint=True`` keeps only the input of each of the ``K`` steps and runs each
step again in the backward (:func:`phantom`): about one call of ``f``'s activations instead of ``K``, for ``K``
more calls of ``f`` per graph.

An update map that computes a similarity gradient inside itself (GraDIRN-style, with
:meth:`deqreg_lite.losses.Objective.grad`) works in every mode and under ``torch.no_grad()``; pass
``create_graph=torch.is_grad_enabled()`` so that ``J_f`` includes the similarity's Hessian (IFT needs it).

``backend="torchdeq"`` runs the same options through torchdeq 0.1.0's ``get_deq(core="sliced", ...)``, for
cross-checks; see :meth:`DEQ._forward_torchdeq` for the differences.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ._checks import check_bool, check_int, check_options
from .memory import recompute_context
from .solvers import Map, SolverDivergedError, SolverInfo, _check_z0, fixed_point, residuals, solve
from .solvers import solver_options as _options_of

__all__ = ["DEQ", "DEQInfo", "LazyState", "phantom", "check_checkpoint", "correction_loss", "correction_backward", "state_steps",
           "SpectralRadius", "spectral_radius"]

State = Union[Tensor, "LazyState"]
_GRADS = ("phantom", "ift", "bptt")
_BACKENDS = ("lite", "torchdeq")
_DEQ_CONTROLLED = ("max_iter", "tol", "tau", "callback", "track_graph")  # set by the DEQ, not solver options
_TORCHDEQ_SOLVERS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


@dataclass
class DEQInfo(SolverInfo):
    """The forward solver's :class:`~deqreg_lite.solvers.SolverInfo`, plus what the DEQ added.

    Attributes:
        grad_nfe: calls of ``f`` with the graph on, made inside ``deq(f, z0)`` (``K`` per phantom gradient,
            1 for IFT; ``nfe`` counts the solver's calls only). Lazy states call ``f`` later, uncounted.
        state_steps: the trajectory step of each state (``nstep`` for a state padded with the answer; with
            ``backend="torchdeq"``, the solver calls made before the state was taken).
        n_padded: how many states were padded because the solver stopped early.
        backward: the IFT backward solve's info, filled in by ``backward()`` (``grad="ift"`` only).
    """

    grad_nfe: int = 0
    state_steps: list[int] = field(default_factory=list)
    n_padded: int = 0
    backward: Optional[SolverInfo] = None


def check_checkpoint(value: object, name: str = "checkpoint") -> bool:
    """``value`` if it is a bool; ``ValueError`` otherwise (``_checks.check_bool`` under the option's name)."""
    return check_bool(value, name)


def _damped(f: Map, tau: float) -> Map:
    """One phantom step ``z -> tau * f(z) + (1 - tau) * z`` (``f`` itself when ``tau = 1``)."""
    if tau == 1.0:
        return f
    return lambda z: tau * f(z) + (1.0 - tau) * z


def phantom(f: Map, z: Tensor, K: int, tau: float, checkpoint: bool = False) -> Tensor:
    """Phantom gradient (Eq. 7-8): ``K`` damped steps ``z <- tau * f(z) + (1 - tau) * z`` from ``z.detach()``.

    Run with grad mode on, the result carries the graph of the ``K`` steps (and nothing of ``z``'s history).
    ``K`` steps here are ``K`` calls of ``f`` (Eq. 8 sums over the ``K`` points ``phi^0 .. phi^(K-1)``), the
    same count as torchdeq's ``grad=K``.

    **Activation checkpointing** (``checkpoint=True``): each step runs inside
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, so the graph keeps only each step's input
    ``(B, ...)`` (and what ``f`` closes over, which is alive anyway: images, parameters); each step is run again in
    the backward, just before its own backward, and its activations live only then. The memory of the graph
    drops from ``K`` calls of ``f`` to one call plus ``K`` inputs, for ``K`` more forward calls of ``f`` in the
    backward. The values and the gradients are the same (the same operations in the same order; the RNG state is
    restored for the recomputation, so a random ``f`` draws the same numbers). ``f`` is therefore called ``2K``
    times: side effects in ``f`` (a call counter, a list it appends to) happen again in the backward. Measured on
    DEQReg (S = 3, K = 3, T = 48, batch 1; the CPU's saved-for-backward peak, ``benchmarks/memory_vs_steps.py``):
    55.5 -> 18.9 MiB at 2D 128x128 (2.89x -> 0.98x VoxelMorph's) and 97.4 -> 33.8 MiB at 3D 32^3 (2.82x -> 0.98x),
    for a training step 1.19x and 1.20x as long (process CPU time, the 48 solver calls included). One recomputed
    call of ``f`` is the floor of per-step checkpointing. Under ``torch.no_grad()`` the option changes nothing. The
    first checkpointed step of a process also pays a one-off import inside torch (``torch._dynamo``: 3 s here).

    Args:
        f: the map ``(B, ...) -> (B, ...)``.
        z: ``(B, ...)`` start, usually the fixed point.
        K: number of steps, >= 1.
        tau: damping in ``(0, 1]``.
        checkpoint: recompute each step in the backward instead of keeping its activations (bool).
    Returns:
        ``(B, ...)``.
    Raises:
        ValueError: ``checkpoint`` not a bool.
    """
    check_checkpoint(checkpoint)
    step = _damped(f, tau)
    z = z.detach()
    if checkpoint and torch.is_grad_enabled():
        for _ in range(K):
            z = torch.utils.checkpoint.checkpoint(step, z, use_reentrant=False, context_fn=recompute_context)
        return z
    for _ in range(K):
        z = step(z)
    return z


class LazyState:
    """A sampled trajectory state whose phantom-gradient graph is built only when the state is called.

    Attributes:
        z: the detached iterate ``(B, ...)`` (for plots and metrics).
        step: its step in the forward trajectory.
        checkpoint: whether its phantom steps are checkpointed (:func:`phantom`).
    """

    def __init__(self, f: Map, z: Tensor, step: int, K: int, tau: float, checkpoint: bool = False) -> None:
        self.f, self.z, self.step, self.K, self.tau = f, z.detach(), step, K, tau
        self.checkpoint = check_checkpoint(checkpoint)

    def __call__(self) -> Tensor:
        """Run the ``K`` damped steps with the graph on; returns ``(B, ...)``."""
        return phantom(self.f, self.z, self.K, self.tau, self.checkpoint)

    def __repr__(self) -> str:
        ck = ", checkpoint=True" if self.checkpoint else ""
        return f"LazyState(step={self.step}, shape={tuple(self.z.shape)}, K={self.K}, tau={self.tau}{ck})"


def state_steps(max_iter: int, n_states: int) -> list[int]:
    """The trajectory steps ``(s + 1) * max_iter // (n_states + 1)``, ``s = 0..n_states-1``, where states are taken."""
    return [(s + 1) * max_iter // (n_states + 1) for s in range(n_states)]


def _value(state: State) -> Tensor:
    return state() if callable(state) else state


def correction_loss(loss_fn: Callable[[Tensor], Tensor], z_star: Tensor, states: Sequence[State],
                    gamma: float = 0.5) -> Tensor:
    """Eq. 9: ``L(z*) + gamma * sum_t L(z_t)`` over the sampled states, as one scalar to back-propagate.

    Args:
        loss_fn: ``(B, ...) -> scalar`` (e.g. the registration loss of a displacement).
        z_star: ``(B, ...)`` the DEQ's output.
        states: tensors ``(B, ...)`` or :class:`LazyState` (called here, so all graphs end up alive together).
        gamma: weight of the state terms (the paper: 0.5).
    Returns:
        A scalar tensor.
    """
    total = loss_fn(z_star)
    for state in states:
        total = total + gamma * loss_fn(_value(state))
    return total


def correction_backward(loss_fn: Callable[[Tensor], Tensor], z_star: Tensor, states: Sequence[State],
                        gamma: float = 0.5) -> Tensor:
    """Back-propagate Eq. 9 one term at a time; return the loss value (detached scalar).

    Gives the same gradients as ``correction_loss(...).backward()``. With :class:`LazyState` states, each state's
    graph is built, back-propagated and freed before the next, so memory holds ``z*``'s graph plus one state's
    instead of all of them. Graph parts shared by the terms (an encoder upstream of ``f``) are kept until the last
    term, ``L(z*)``, which is back-propagated last without ``retain_graph``.
    """
    total = z_star.new_zeros(())
    for state in states:
        loss = gamma * loss_fn(_value(state))
        loss.backward(retain_graph=True)
        total = total + loss.detach()
        del loss  # frees this state's graph before the next is built
    loss = loss_fn(z_star)
    loss.backward()
    return total + loss.detach()


class DEQ(nn.Module):
    """Deep equilibrium layer: ``z_star, states, info = DEQ(...)(f, z0)``. Holds options only (no parameters).

    Args:
        solver: forward solver, ``"fixed_point"``, ``"anderson"`` or ``"broyden"`` (``"bptt"`` needs
            ``"fixed_point"``). It runs undamped unless ``solver_tau < 1``; ``tau`` is the phantom gradient's damping.
        max_iter: most solver steps ``T`` (the paper: 48).
        tol: relative tolerance of the forward solve.
        grad: ``"phantom"``, ``"ift"`` or ``"bptt"`` (see the module docstring).
        K: phantom-gradient steps (for ``z*`` with ``grad="phantom"``, and for every state).
        tau: phantom-gradient damping in ``(0, 1]`` (the paper: ``(0, 1)``, value not given; torchdeq's
            default is 1).
        n_states: number ``S`` of sampled trajectory states for Eq. 9 (0: none).
        solver_tau: damping of the forward solve in ``(0, 1]``: the solver iterates
            ``z <- solver_tau * f(z) + (1 - solver_tau) * z`` (``"fixed_point"``, ``"anderson"``; ``"broyden"`` takes
            only 1). The fixed points are those of ``f``; ``solver_tau = tau`` makes the solve iterate the same damped
            map that the phantom gradient unrolls.
        lazy_states: return the states as :class:`LazyState` (memory-lean, with :func:`correction_backward`).
        checkpoint: activation checkpointing of the phantom steps (of ``z*`` and of every state; see
            :func:`phantom`): only each step's input is kept, and each step is recomputed in the backward, so a
            ``K``-step graph holds about one call of ``f`` instead of ``K``, for ``K`` more calls of ``f`` in the
            backward. Same values and gradients. Needs ``grad="phantom"`` or ``"ift"`` (whose states are phantom
            graphs) and ``backend="lite"``. Default off.
        backend: ``"lite"`` (this module) or ``"torchdeq"`` (torchdeq 0.1.0, for cross-checks).
        ift_tol, ift_max_iter: relative tolerance and step limit of the IFT backward solve.
        **solver_options: options of the chosen solver, e.g. ``m``, ``lam`` (Anderson), ``return_policy``,
            ``on_diverge``, ``diverge_factor``, ``growth_window``, ``max_abs`` (see :mod:`deqreg_lite.solvers`).
            Unknown names raise ``TypeError``.
    """

    def __init__(self, *, solver: str = "fixed_point", max_iter: int = 48, tol: float = 1e-3,
                 grad: str = "phantom", K: int = 3, tau: float = 0.5, n_states: int = 0, lazy_states: bool = False,
                 solver_tau: float = 1.0, backend: str = "lite", ift_tol: float = 1e-6, ift_max_iter: int = 100,
                 checkpoint: bool = False, **solver_options) -> None:
        super().__init__()
        check_options(grad, _GRADS, "grad")
        check_options(backend, _BACKENDS, "backend")
        check_checkpoint(checkpoint)
        if checkpoint and (grad == "bptt" or backend == "torchdeq"):
            raise ValueError(f"checkpoint=True checkpoints the library's phantom steps: it needs grad 'phantom' or "
                             f"'ift' and backend 'lite', got grad={grad!r}, backend={backend!r}")
        valid = [o for o in _options_of(solver) if o not in _DEQ_CONTROLLED]
        unknown = sorted(set(solver_options) - set(valid))
        if unknown:
            raise TypeError(f"DEQ got unknown option(s) {unknown}; solver {solver!r} takes {valid}, and the DEQ "
                            f"itself: solver, max_iter, tol, grad, K, tau, n_states, lazy_states, solver_tau, backend, "
                            f"ift_tol, ift_max_iter, checkpoint")
        for name, value, low in (("max_iter", max_iter, 1), ("K", K, 1), ("n_states", n_states, 0),
                                 ("ift_max_iter", ift_max_iter, 1)):
            check_int(value, name, low)
        for name, value in (("tol", tol), ("ift_tol", ift_tol)):
            if not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau!r}")
        if isinstance(solver_tau, bool) or not isinstance(solver_tau, (int, float)) or not 0 < solver_tau <= 1:
            raise ValueError(f"solver_tau must be in (0, 1], got {solver_tau!r}")
        if solver_tau != 1 and (solver == "broyden" or backend == "torchdeq" or grad == "bptt"):
            raise ValueError(f"solver_tau < 1 needs solver 'fixed_point' or 'anderson', backend 'lite' and grad "
                             f"'phantom' or 'ift'; got solver={solver!r}, backend={backend!r}, grad={grad!r}")
        if grad == "bptt" and solver != "fixed_point":
            raise ValueError(f"grad='bptt' back-propagates through plain fixed-point steps; it needs "
                             f"solver='fixed_point', got {solver!r}")
        if backend == "torchdeq":
            if grad == "bptt":
                raise ValueError("backend='torchdeq' supports grad='phantom' and 'ift', not 'bptt'")
            if lazy_states:
                raise ValueError("lazy_states=True needs backend='lite' (torchdeq builds every state's graph)")
            if n_states and max_iter < n_states + 1:
                raise ValueError(f"backend='torchdeq' splits max_iter into n_states + 1 slices; max_iter must be "
                                 f">= {n_states + 1}, got {max_iter}")
        self.solver, self.max_iter, self.tol, self.grad = solver, max_iter, float(tol), grad
        self.K, self.tau, self.n_states, self.lazy_states = K, float(tau), n_states, bool(lazy_states)
        self.backend, self.ift_tol, self.ift_max_iter = backend, float(ift_tol), ift_max_iter
        self.solver_tau = float(solver_tau)
        self.checkpoint = checkpoint
        self.solver_options = dict(solver_options)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.solver_options.items())
        return (f"solver={self.solver!r}, max_iter={self.max_iter}, tol={self.tol:g}, grad={self.grad!r}, "
                f"K={self.K}, tau={self.tau:g}, n_states={self.n_states}, lazy_states={self.lazy_states}, "
                f"solver_tau={self.solver_tau:g}, " + ("checkpoint=True, " if self.checkpoint else "") +
                f"backend={self.backend!r}{opts}")

    def forward(self, f: Map, z0: Tensor) -> tuple[Tensor, list[State], DEQInfo]:
        """Solve ``z* = f(z*)`` from ``z0`` and attach the gradient.

        Args:
            f: the update map ``(B, ...) -> (B, ...)``, e.g. a closure over the images and a network.
            z0: ``(B, ...)`` start, finite (e.g. zeros for a displacement ``(B, ndim, *spatial)``).
        Returns:
            ``z_star`` ``(B, ...)``; ``states``, a list of exactly ``n_states`` tensors ``(B, ...)`` (or
            :class:`LazyState`); and a :class:`DEQInfo`.
        """
        _check_z0(z0)
        if self.backend == "torchdeq":
            return self._forward_torchdeq(f, z0)
        graph = torch.is_grad_enabled()
        wanted = state_steps(self.max_iter, self.n_states)
        kept: dict[int, Tensor] = {}

        def keep(k: int, z: Tensor) -> None:
            if k in wanted:
                kept[k] = z

        opts = dict(max_iter=self.max_iter, tol=self.tol, callback=keep, **self.solver_options)
        if self.solver_tau != 1.0:
            opts["tau"] = self.solver_tau
        bptt = self.grad == "bptt" and graph
        if bptt:
            z_solved, sinfo = fixed_point(f, z0, track_graph=True, **opts)
        else:
            z_solved, sinfo = solve(f, z0, self.solver, **opts)
        info = DEQInfo(**{fl.name: getattr(sinfo, fl.name) for fl in dataclasses.fields(SolverInfo)})
        z_star = z_solved
        if info.diverged and graph and not bptt:
            # f misbehaves near these iterates: re-applying it for a gradient gives NaN/inf (the phantom steps
            # restart from the answer), and a NaN in one sample would reach every parameter's gradient. So a
            # diverged solve comes back like one under no_grad: the solver's finite answer, detached states.
            graph = False
        if bptt:
            info.grad_nfe = info.nfe
        elif graph and self.grad == "phantom":
            z_star, info.grad_nfe = phantom(f, z_solved, self.K, self.tau, self.checkpoint), self.K
        elif graph and self.grad == "ift":
            z_star, info.grad_nfe = self._attach_ift(f, z_solved, info), 1

        states: list[State] = []
        for t in wanted:
            z_t = kept.get(t)
            info.state_steps.append(t if z_t is not None else info.nstep)
            if z_t is None:  # the solver stopped before step t: the trajectory stays at its answer
                info.n_padded += 1
                z_t = z_solved
            if not graph or bptt:
                states.append(z_t)
            elif self.lazy_states:
                states.append(LazyState(f, z_t, info.state_steps[-1], self.K, self.tau, self.checkpoint))
            else:
                states.append(phantom(f, z_t, self.K, self.tau, self.checkpoint))
                info.grad_nfe += self.K
        return z_star, states, info

    def _attach_ift(self, f: Map, z_solved: Tensor, info: DEQInfo) -> Tensor:
        """IFT (Eq. 6): ``f(z*)`` with the graph on, whose incoming gradient ``g`` is replaced by the solution of
        ``y = g + J_f(z*)^T y``; the solve's info goes to ``info.backward``. The hook is re-entrant safe (it does
        nothing during its own solve, whose vector-Jacobian products pass through the same tensor)."""
        z = z_solved.detach().requires_grad_(True)
        fz = f(z)
        if not fz.requires_grad:
            return fz
        busy = [False]
        opts = {k: v for k, v in self.solver_options.items() if k in ("on_diverge", "diverge_factor")}

        def vjp(y: Tensor) -> Tensor:
            (jt_y,) = torch.autograd.grad(fz, z, y, retain_graph=True, allow_unused=True)
            return torch.zeros_like(y) if jt_y is None else jt_y

        def hook(g: Tensor) -> Optional[Tensor]:
            if busy[0]:
                return None
            busy[0] = True
            try:
                y, info.backward = fixed_point(lambda y: vjp(y) + g, torch.zeros_like(g),
                                               max_iter=self.ift_max_iter, tol=self.ift_tol, **opts)
            finally:
                busy[0] = False
            return y

        fz.register_hook(hook)
        return fz

    # ------------------------------------------------------------------------------------------------ torchdeq
    def _forward_torchdeq(self, f: Map, z0: Tensor) -> tuple[Tensor, list[State], DEQInfo]:
        """The same call through torchdeq 0.1.0 (``get_deq(core="sliced", f_stop_mode="rel", ...)``).

        Differences from ``backend="lite"``, all torchdeq's design:

        * ``core="sliced"`` with ``n_states = S + 1``: the ``max_iter`` steps are cut into ``S + 1`` slices of
          ``max_iter // (S + 1)``; after each, torchdeq applies the phantom gradient and the next slice resumes
          from its output. The states are the first ``S`` outputs and ``z_star`` the last one, so there are always
          ``S`` states (core ``"indexing"`` truncates them when the solver stops early).
        * torchdeq runs in training mode even under ``torch.no_grad()``, so the values do not depend on grad mode.
        * The traces are rebuilt here from the calls its solver makes (torchdeq's own cover the last slice only
          and start with a 1e8 placeholder); ``nfe`` counts those calls and ``grad_nfe`` the others. torchdeq
          picks the lowest-residual iterate per sample; ``best_step`` is the latest such step of the batch.
        * Divergence (NaN/inf and blow-up, not the growth check nor ``max_abs``) is checked on the rebuilt
          batch-maximum traces after the solve (torchdeq itself never stops on it); the ``sample_*`` fields stay empty.
        """
        from torchdeq import get_deq

        S = self.n_states
        opts = dict(self.solver_options)
        policy = opts.pop("return_policy", "lowest")
        on_diverge, factor = opts.pop("on_diverge", "raise"), opts.pop("diverge_factor", 1e3)
        opts.pop("growth_window", None)  # the growth check and the bound are this library's; torchdeq has none
        opts.pop("max_abs", None)
        check_options(policy, ("lowest", "last"), "return_policy")
        check_options(on_diverge, ("raise", "flag"), "on_diverge")
        if self.solver == "broyden" and "m" in opts:
            opts["LBFGS_thres"] = opts.pop("m")
        if policy == "last":
            opts["return_final"] = True
        deq = get_deq(core="sliced", f_solver=_TORCHDEQ_SOLVERS[self.solver], f_max_iter=self.max_iter,
                      f_tol=self.tol, f_stop_mode="rel", grad=self.K, tau=self.tau, ift=self.grad == "ift",
                      n_states=S + 1 if S else 1, b_solver="fixed_point_iter", b_max_iter=self.ift_max_iter,
                      b_tol=self.ift_tol, b_stop_mode="rel")
        info = DEQInfo(solver=self.solver, returned=policy)
        phase = {"solving": False, "slice_start": 0, "open": True}
        slice_ends: list[int] = []

        def counted(z: Tensor) -> Tensor:
            fz = f(z)
            if not phase["solving"]:
                info.grad_nfe += phase["open"]  # not counted: torchdeq's IFT calls f again in backward()
                return fz
            with torch.no_grad():
                a, r = residuals(fz, z)
            info.abs_trace.append(float(a.max()))
            info.rel_trace.append(float(r.max()))
            info.nfe += 1
            return fz

        solver_fn = deq.f_solver

        def solver_wrapper(*args, **kwargs):
            phase["solving"], phase["slice_start"] = True, len(info.rel_trace)
            try:
                return solver_fn(*args, **kwargs)
            finally:
                phase["solving"] = False
                slice_ends.append(len(info.rel_trace))

        deq.f_solver = solver_wrapper
        deq.train(True)
        z_out, tinfo = deq(counted, z0, solver_kwargs=opts)
        phase["open"] = False
        z_star, states = z_out[-1], list(z_out[:-1])
        info.nstep = len(info.rel_trace)
        last = info.rel_trace[phase["slice_start"]:]
        info.converged = bool(last) and min(last) <= self.tol
        info.best_step = phase["slice_start"] + int(tinfo["nstep"].max()) - 1
        info.state_steps = slice_ends[:S]  # solver calls done before each state was taken
        first = info.abs_trace[0] if info.abs_trace else 0.0
        for k, a in enumerate(info.abs_trace):
            if not math.isfinite(a) or (first > 0 and a > factor * first):
                if on_diverge == "raise" or not torch.isfinite(z_star).all():
                    raise SolverDivergedError(f"torchdeq {self.solver}", k, a, "NaN/inf or a blow-up")
                info.diverged = True
                break
        return z_star, states, info


# ---------------------------------------------------------------------------------------------------------------
# the convergence certificate: the dominant eigenvalue of the update map's Jacobian
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SpectralRadius:
    """What :func:`spectral_radius` estimated, per sample of the batch (all tensors detached, float64, CPU).

    Attributes:
        value: ``(B,)`` the estimate of the spectral radius ``rho(J)``: the norm growth ratio ``||J v|| / ||v||``
            of the last power-iteration step (``v`` the previous step's normalised product).
        rayleigh: ``(B,)`` the Rayleigh quotient ``<v, J v> / <v, v>`` of the last step: the dominant eigenvalue
            *with its sign* when that eigenvalue is real and simple.
        trace: ``(iterations, B)`` ``value`` after each step (the ``k``-th row after ``k + 1`` products).
        rayleigh_trace: ``(iterations, B)`` ``rayleigh`` after each step.
        iterations: Jacobian-vector products made per sample.
        settled: ``(B,)`` bool: the last ``window`` steps each changed ``value`` by at most ``tol`` (and it is
            finite); ``False`` when there were not ``window + 1`` steps.
        tol, window: the settling rule used.
    """

    value: Tensor
    rayleigh: Tensor
    trace: Tensor
    rayleigh_trace: Tensor
    iterations: int
    settled: Tensor
    tol: float
    window: int

    def __len__(self) -> int:
        return int(self.value.shape[0])


def _jvp_operator(f: Map, z: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> J_f(z) v`` by the double-vjp trick: ``g(u) = J^T u`` is built once with ``create_graph=True``; it is
    linear in ``u``, so the vjp of ``g`` with cotangent ``v`` is ``J v``. Works wherever ``f`` has second
    derivatives (the library's warp does, on the CPU too), unlike ``torch.func.jvp``, for which ``grid_sample``
    has no forward-mode rule in torch 2.x."""
    z = z.detach().requires_grad_(True)
    y = f(z)
    if not isinstance(y, Tensor) or y.shape != z.shape:
        raise ValueError(f"f must map z {tuple(z.shape)} to a tensor of the same shape, got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    if not y.requires_grad:  # f does not depend on z (or on anything differentiable): J = 0
        return lambda v: torch.zeros_like(v)
    u = torch.zeros_like(y, requires_grad=True)
    (jt_u,) = torch.autograd.grad(y, z, u, create_graph=True, allow_unused=True)
    if jt_u is None or not jt_u.requires_grad:  # J^T u does not depend on u: J = 0
        return lambda v: torch.zeros_like(v)

    def jvp(v: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(jt_u, u, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if out is None else out.detach()
    return jvp


def spectral_radius(f: Map, z: Tensor, *, iters: int = 30, tol: float = 1e-3, window: int = 3,
                    seed: int = 0) -> SpectralRadius:
    """Power-iteration estimate of the dominant eigenvalue (by modulus) of ``J = df/dz`` at ``z``, per sample.

    The convergence certificate of a fixed point ``z* = f(z*)``: fixed-point iteration converges near ``z*`` when
    the spectral radius ``rho(J(z*)) < 1`` (the map is a contraction there) and drifts away when it is above 1.

    Power iteration: ``v_0`` a random unit vector (the same for every sample, drawn from ``seed``), then
    ``w_k = J v_{k-1}`` (one Jacobian-vector product, by the double-vjp trick; ``torch.func.jvp`` has no rule for
    ``grid_sample``), ``value_k = ||w_k|| / ||v_{k-1}||``, ``rayleigh_k = <v_{k-1}, w_k>``, ``v_k = w_k / ||w_k||``.
    Norms and inner products are taken per sample (over all dimensions but the first), so for a map that treats
    the samples of its batch independently (block-diagonal ``J``) each sample's estimate is that of the sample
    alone.

    What the estimate means, for a real Jacobian:

    * a real, simple dominant eigenvalue ``lambda`` (``|lambda|`` above every other modulus): ``v_k`` tends to its
      eigenvector, ``value -> |lambda|`` and ``rayleigh -> lambda`` (sign included), at the rate
      ``|lambda_2 / lambda|``;
    * a ``+-lambda`` pair (e.g. a symmetric ``J`` with eigenvalues ``0.9`` and ``-0.9``): ``value`` tends to
      ``|lambda|`` when the two eigenvectors are orthogonal (a symmetric ``J``), while ``rayleigh`` settles
      anywhere between ``-|lambda|`` and ``|lambda|`` (it depends on ``v_0``);
    * a complex pair ``r e^{+-i theta}``: ``v_k`` rotates in a plane, ``value`` oscillates around ``r`` (exactly
      ``r`` only for a normal ``J``) and usually does not settle; ``rayleigh`` means nothing then.

    So ``value`` estimates ``rho(J)``; ``settled`` says whether it stopped moving, and ``|rayleigh|`` close to
    ``value`` says that the dominant eigenvalue is real with the sign of ``rayleigh``. The estimate approaches
    ``rho`` from the dominant component of ``v_0``; a ``v_0`` with no such component is practically impossible.
    ``settled`` judges the last steps only: when the second eigenvalue is close to the first, the estimate creeps
    by less than ``tol`` a step and still moves (the shipped DEQReg's map on ``brain2d``: 1.0046, 1.0051 and 1.0072
    after 20, 30 and 60 products, settled at each); more ``iters`` tell.

    Args:
        f: the map ``(B, ...) -> (B, ...)`` (e.g. :meth:`DEQReg.update_map <deqreg_lite.methods.deqreg.DEQReg.
            update_map>`), differentiable twice in ``z``; called once, with grad enabled (also inside
            ``torch.no_grad()``); no parameter's ``.grad`` is touched.
        z: ``(B, ...)`` the point, finite floating point (e.g. a fixed point ``z*``).
        iters: Jacobian-vector products per sample, >= 1 (20-30 gave estimates stable to about 0.01 on DEQReg's
            maps).
        tol: settling tolerance on ``value`` (absolute: the eigenvalue's units), finite >= 0.
        window: number of last steps whose changes must each be <= ``tol``, >= 1.
        seed: seed of the start vector.
    Returns:
        a :class:`SpectralRadius`.
    Raises:
        ValueError: bad ``z`` (not a floating tensor ``(B, ...)``, non-finite), ``f(z)`` not of ``z``'s shape, or a
            bad ``iters``/``tol``/``window``/``seed``. Unknown options are Python's ``TypeError``.
    """
    if not callable(f):
        raise ValueError(f"f must be a callable (B, ...) -> (B, ...), got {type(f).__name__}")
    if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() < 1 or z.shape[0] < 1 or z.numel() == 0:
        raise ValueError(f"z must be a non-empty floating-point tensor (B, ...), got "
                         f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}"
                         f"{' of dtype ' + str(z.dtype) if isinstance(z, Tensor) else ''}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"z must be finite, got {int((~torch.isfinite(z)).sum())} NaN/inf values")
    iters = check_int(iters, "iters", 1)
    window = check_int(window, "window", 1)
    seed = check_int(seed, "seed", 0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    B = z.shape[0]
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(z.shape[1:], generator=gen, dtype=torch.float64)
    v = (v / v.norm()).to(dtype=z.dtype, device=z.device).expand_as(z).contiguous()
    norm = lambda x: x.double().flatten(1).norm(dim=1)  # (B,)
    values, rayleighs = [], []
    with torch.enable_grad():
        jvp = _jvp_operator(f, z)
        for _ in range(iters):
            w = jvp(v)
            nw = norm(w)
            values.append(nw.cpu())  # ||v|| = 1
            rayleighs.append((v.double() * w.double()).flatten(1).sum(dim=1).cpu())
            scale = torch.where(nw > 0, nw, torch.ones_like(nw)).to(z.dtype)
            v = torch.where((nw > 0).view(B, *[1] * (z.dim() - 1)), w / scale.view(B, *[1] * (z.dim() - 1)), v)
    trace, rtrace = torch.stack(values), torch.stack(rayleighs)
    if iters > window:
        change = (trace[-window:] - trace[-window - 1:-1]).abs().amax(dim=0)
        settled = (change <= tol) & torch.isfinite(trace[-1])
    else:
        settled = torch.zeros(B, dtype=torch.bool)
    return SpectralRadius(value=trace[-1].clone(), rayleigh=rtrace[-1].clone(), trace=trace, rayleigh_trace=rtrace,
                          iterations=iters, settled=settled, tol=float(tol), window=window)
