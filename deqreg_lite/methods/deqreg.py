"""DEQReg: registration as a deep equilibrium model (Sec. 2.2-2.3, Eq. 5-9).

The update map is ``g(phi) = phi + UNet([If, Im o phi, phi])`` (Eq. 5; VoxelMorph's U-Net with ``2 + ndim`` inputs).

Training (:meth:`DEQReg.training_step`):

1. Solve ``phi* = g(phi*)`` from ``phi_0 = 0`` with :class:`~deqreg_lite.deq.DEQ` **under no_grad** (at most ``T``
   steps, relative tolerance ``tol``, the lowest-residual iterate), taking ``S`` trajectory states at steps
   ``(s + 1) T // (S + 1)`` (12, 24, 36 for ``T = 48, S = 3``; always exactly ``S``).
2. Eq. 9, ``L(phi*) + gamma * sum_s L(phi_s)``, every term with its own phantom gradient (Eq. 7-8: ``K`` damped
   steps ``phi <- tau g(phi) + (1 - tau) phi`` from the detached point). **Each term is built, back-propagated with
   ``backward`` and freed before the next** (states first, then ``phi*``): the algorithm of
   :func:`~deqreg_lite.deq.correction_backward` with lazy states, except that ``phi*``'s graph is built lazily too,
   so exactly one K-step graph is alive at any time (``correction_backward`` keeps ``phi*``'s alive throughout) and
   the trainer's ``backward`` (e.g. a scaled one under AMP) is used for every term. The terms' graphs share nothing
   but the parameters (leaves), so no ``retain_graph`` is needed; the gradients equal
   ``correction_loss(...).backward()``'s. Memory is flat in ``T`` and in ``S``.
3. With ``checkpoint_phantom=True``, the ``K`` steps of each term are checkpointed
   (:func:`~deqreg_lite.deq.phantom`): the graph keeps each step's input and recomputes the step (one U-Net call)
   in the backward, so the alive graph holds one U-Net call's activations instead of ``K``. The trade: on the CPU's
   saved-for-backward measure, T = 48, S = 3, K = 3, 2.89x VoxelMorph's memory becomes 0.98x at 2D 128x128 (2.82x
   -> 0.98x at 3D 32^3), and a training step takes 1.19x (1.20x) as long, the ``K (S + 1) = 12`` recomputed
   forward calls next to the 48 solver calls and the 12 phantom calls' forward and backward.

Inference (:meth:`DEQReg.forward`):

* ``forward(fixed, moving, steps, return_states, *, tol, policy)`` is one solve with ``max_iter=steps``, a
  relative tolerance ``tol`` and a return ``policy`` (``"lowest"``: the lowest-residual iterate; ``"last"``).
* ``steps=None``: the trained solve, as in training: ``steps=T``, ``tol=self.tol``, ``policy="lowest"``.
* ``steps=t``: **exactly t solver steps**: ``tol`` defaults to 0 and ``policy`` to ``"last"``; with the default
  ``solver="fixed_point"`` that is ``phi_t = g^t(0)``, the result after exactly ``t`` steps that a step sweep
  (Fig. 3) needs, comparable step for step with the unrolled methods. With ``solver="anderson"`` it is Anderson's
  ``t``-th candidate (``t`` network calls). Pass ``tol=`` / ``policy=`` to mix (e.g. ``steps=96, tol=1e-3,
  policy="lowest"``: the trained solve with a larger budget).
* The returned value never depends on grad mode: with grad on, the phantom gradient is attached without changing
  the value (``z + (p - p.detach())``, ``p`` the K phantom steps), so ``forward`` is differentiable too.
* **Every pair is solved on its own**: each stops at its own tolerance, gets its own lowest-residual iterate and
  its own divergence verdict (:mod:`deqreg_lite.solvers`), so a pair's displacement does not depend on the other
  pairs of its batch.
* ``info`` (a :class:`~deqreg_lite.result.MethodInfo`): ``steps`` (solver steps run by the batch loop, the most of
  any pair), ``nfe`` (solver network calls), ``residuals`` (the solver's relative residual trace
  ``||g(phi) - phi|| / ||g(phi)||``, max over the pairs still running), ``converged`` (every pair), ``diverged``
  (any pair), and per pair (lists of length ``B``): ``sample_steps``, ``sample_converged``, ``sample_diverged``,
  ``sample_best_step``, ``sample_residual`` (relative residual of the returned iterate); in ``info.extras``:
  ``abs_residuals``, ``best_step``, ``solver``, ``tol`` and ``policy`` (the options the solve ran with), and
  ``residual`` (the largest ``sample_residual``: the batch's final relative residual).
* ``certificate=True``: also the spectral-radius estimate of ``dg/dphi`` at the returned field, per pair, in
  ``info.extras["spectral_radius"]`` (:func:`~deqreg_lite.deq.spectral_radius`; see :meth:`DEQReg.forward`). States are the solver's
  candidates ``g(z_k)`` (``phi_1 .. phi_t`` for fixed-point iteration; a pair that stopped early repeats its
  answer there).
* Divergence (NaN, a residual 1000x the first, the growth check: the field's norm keeps rising while the
  residual makes no progress, or a displacement component beyond the image size, :meth:`DEQReg.max_disp`, as
  images in 0..255 instead of [0, 1] give) is flagged (``info["diverged"]``,
  ``info["sample_diverged"]``), not raised: that pair then gets its finite iterate with the lowest absolute
  residual, and no phantom gradient is attached (with grad on, the value would be NaN).

Defaults: ``solver="fixed_point"`` (the paper: "a fixed-point iteration strategy"; ``"anderson"`` reaches lower
residuals at the same Dice: measured on this project, a relative residual of 0.014 in 48 steps where plain
iteration reached 0.089), ``tau=0.5`` (the paper: in (0, 1), value not given), ``K=3``,
``tol=1e-3`` (relative; rarely reached in training, so training usually runs all ``T`` steps).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..deq import DEQ, phantom, spectral_radius
from ..nets import UNet
from .._checks import check_bool, check_options
from ..result import MethodInfo, RegistrationResult
from .base import Backward, LossFn, RegistrationMethod
from ._common import Clock, check_count, check_pair, check_steps, make_result, residual_step

__all__ = ["DEQReg", "DEQReg12", "deqreg12", "CERTIFICATE_ITERS"]

#: Jacobian-vector products of ``forward(..., certificate=True)``'s spectral-radius estimate (20-30 gave estimates
#: stable to about 0.01 on DEQReg's maps).
CERTIFICATE_ITERS = 30


def _batch_residual(sample_residual: list[float]) -> float:
    """The largest per-pair relative residual (NaN when some pair has none, i.e. returned its start)."""
    return float(torch.tensor(sample_residual, dtype=torch.float64).max()) if sample_residual else float("nan")


class DEQReg(RegistrationMethod):
    """Deep-equilibrium registration (see the module docstring).

    Args:
        ndim: 2 or 3.
        T: most solver steps in training and at test time with ``steps=None`` (the paper: 48).
        S: trajectory states in the Eq. 9 correction loss (the paper: 3; 0: none).
        gamma: weight of the state terms (the paper: 0.5).
        K: phantom-gradient steps (Eq. 7-8).
        tau: phantom-gradient damping in (0, 1].
        solver: ``"fixed_point"`` (default), ``"anderson"`` or ``"broyden"``.
        tol: relative tolerance of the solve in training and at test time with ``steps=None`` (the default of
            ``forward``'s ``tol``).
        damping: relaxation of the forward solve in ``(0, 1]``: the solver iterates the map
            ``h(phi) = phi + damping * (g(phi) - phi)`` (:meth:`iteration_map`), whose fixed points are ``g``'s.
            ``damping = tau`` makes the solve iterate the very map that the phantom gradient unrolls in training
            (the recipe of the retrained checkpoints; see ``benchmarks/recipes.py``). Default 1: the paper's
            undamped iteration. The residuals reported are always ``g``'s, ``||g(phi) - phi|| / ||g(phi)||``.
        jac_weight: weight of a Jacobian penalty added to the training loss (0: none): a one-probe Hutchinson
            estimate of ``||dh/dphi||_F^2 / n`` at ``phi*`` (``n`` the field's size, so a contraction in every
            direction keeps it below 1), from a finite-difference Jacobian-vector product
            ``(h(phi* + eps v) - h(phi*)) / eps`` with ``v`` standard normal and ``eps = jac_eps`` voxels (first
            derivatives only, so it also runs on CUDA builds without a double backward through ``grid_sample``).
            After Bai, Koltun and Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization" (2021).
        jac_eps: the finite-difference step of that product, in voxels.
        jac_power: aim the penalty at the dominant direction: ``v`` is first refined by this many power-iteration
            steps (``v <- J v / ||J v||``, finite-difference products without a graph), so the penalty estimates
            ``rho(dh/dphi)^2`` rather than the mean squared singular value (0: the plain Hutchinson probe).
        jac_target: penalise only the excess, ``relu(estimate - jac_target ** 2)`` (0: the whole estimate); e.g.
            0.8 leaves maps whose estimated spectral radius is below 0.8 alone.
        leak: a fixed restoring term in the update, ``g(phi) = phi + UNet([If, Im o phi, phi]) - leak * phi``
            (0: the paper's map). It makes the untrained map a contraction (``1 - damping * leak`` in every
            direction the network ignores), so a constant output no longer piles up over the ``T`` solver steps
            at the start of training; the network can still place the fixed point anywhere (it sees ``phi``).
        inject_moving: also feed the unwarped moving image, ``UNet([If, Im o phi, phi, Im])`` (``3 + ndim``
            inputs; default False, the paper's ``[If, Im o phi, phi]``): input injection, as every layer of the
            DEQ of Bai, Kolter and Koltun (2019) sees its input ``x``. With the paper's input the map sees the
            pair only through the current warp, so where ``Im o phi`` carries no signal it can pull a perturbed
            field back only towards zero (the leak) or not at all; with ``Im`` injected it can predict the whole
            field from the pair, as VoxelMorph does, and correct it from the warp (``benchmarks/results/recipes.md``).
        checkpoint_phantom: activation checkpointing of the ``K`` phantom steps of every Eq. 9 term (and of the
            phantom gradient that ``forward`` attaches with grad on): only each step's input is kept, and the step
            (one U-Net call) is run again in the backward (:func:`~deqreg_lite.deq.phantom`). The training memory
            drops from ``K`` U-Net calls' activations to one call's plus ``K`` displacement fields, for ``K (S + 1)``
            more forward calls per training step. Same losses and gradients. Measured (T = 48, S = 3, K = 3,
            batch 1, the CPU's saved-for-backward peak): 2.89x -> 0.98x VoxelMorph's at 2D 128x128 and 2.82x ->
            0.98x at 3D 32^3, for a training step 1.19x / 1.20x as long (``benchmarks/memory_vs_steps.py``).
            Default off.
    """

    name = "deqreg"

    def __init__(self, ndim: int, T: int = 48, S: int = 3, gamma: float = 0.5, K: int = 3, tau: float = 0.5,
                 solver: str = "fixed_point", tol: float = 1e-3, damping: float = 1.0, jac_weight: float = 0.0,
                 jac_eps: float = 1e-2, leak: float = 0.0, jac_power: int = 0, jac_target: float = 0.0,
                 checkpoint_phantom: bool = False, inject_moving: bool = False) -> None:
        super().__init__(ndim)
        self.inject_moving = check_bool(inject_moving, "inject_moving")
        self.checkpoint_phantom = check_bool(checkpoint_phantom, "checkpoint_phantom")
        self.jac_power = check_count(jac_power, "jac_power", low=0)
        for name, value in (("jac_weight", jac_weight), ("jac_eps", jac_eps), ("leak", leak),
                            ("jac_target", jac_target)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not jac_eps > 0:
            raise ValueError(f"jac_eps must be > 0 (voxels), got {jac_eps!r}")
        if leak > 1:
            raise ValueError(f"leak must be in [0, 1], got {leak!r}")
        self.jac_weight, self.jac_eps, self.leak = float(jac_weight), float(jac_eps), float(leak)
        self.jac_target = float(jac_target)
        self.T = self.trained_steps = check_count(T, "T")
        self.S = check_count(S, "S", low=0)
        self.K = check_count(K, "K")
        if not 0 <= gamma < math.inf:
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        self.gamma, self.tau, self.solver, self.tol = float(gamma), float(tau), solver, float(tol)
        # holds options only (no parameters, nothing in the state dict); validates solver, tau, damping and tol
        self.deq = DEQ(solver=solver, max_iter=T, tol=tol, grad="phantom", K=K, tau=tau, n_states=S,
                       on_diverge="flag", solver_tau=damping, checkpoint=checkpoint_phantom)
        self.damping = float(damping)
        self.net = UNet(ndim, (3 if inject_moving else 2) + ndim, ndim)

    def update_map(self, fixed: Tensor, moving: Tensor,
                   record: Optional[list[Tensor]] = None) -> Callable[[Tensor], Tensor]:
        """``g(phi) = phi + UNet([fixed, moving o phi, phi])`` (``- leak * phi`` with a leak; ``[.., moving]`` with
        ``inject_moving``) as a closure over the images (``(B, 1, *spatial)``); every output is appended to
        ``record`` when given."""
        leak = self.leak
        extra = moving if self.inject_moving else None

        def g(phi: Tensor) -> Tensor:
            out = residual_step(self.net, fixed, moving, phi, extra)
            if leak:
                out = out - leak * phi
            if record is not None:
                record.append(out.detach())
            return out
        return g

    def iteration_map(self, fixed: Tensor, moving: Tensor) -> Callable[[Tensor], Tensor]:
        """The map the solver iterates, ``h(phi) = phi + damping * (g(phi) - phi)`` (``g`` itself when
        ``damping = 1``), as a closure over the images; ``(B, ndim, *spatial) -> (B, ndim, *spatial)``. Its
        Jacobian's spectral radius is the convergence certificate (``forward(..., certificate=True)``)."""
        g, d = self.update_map(fixed, moving), self.damping
        if d == 1.0:
            return g
        return lambda phi: phi + d * (g(phi) - phi)

    @staticmethod
    def max_disp(fixed: Tensor) -> float:
        """The solver's bound on a displacement component, in voxels: the longest spatial axis of ``fixed``
        (a larger displacement moves every voxel out of the image; the solve is then flagged as diverged)."""
        return float(max(fixed.shape[2:]))

    def _zeros(self, fixed: Tensor) -> Tensor:
        return fixed.new_zeros(fixed.shape[0], self.ndim, *fixed.shape[2:])

    def forward(self, fixed: Tensor, moving: Tensor, steps: Optional[int] = None,
                return_states: bool = False, *, tol: Optional[float] = None,
                policy: Optional[str] = None, certificate: bool = False) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (``(B, 1, *spatial)``); ``disp`` ``(B, ndim, *spatial)`` in voxels.

        One solve, ``max_iter = steps``, with explicit options:

        * ``steps``: the most solver steps (``None``: the trained ``T``);
        * ``tol``: relative tolerance at which a pair stops (``0``: never stop early). Default: ``self.tol`` when
          ``steps`` is ``None``, else ``0``;
        * ``policy``: which iterate a pair returns, ``"lowest"`` (the lowest relative residual) or ``"last"``.
          Default: ``"lowest"`` when ``steps`` is ``None``, else ``"last"``.

        So ``steps=None`` is the trained solve, ``steps=T, tol=self.tol, policy="lowest"`` (as in
        :meth:`training_step`), and ``steps=t`` is exactly ``t`` steps, the last iterate (``phi_t = g^t(0)`` with
        the fixed-point solver), what a step sweep needs.

        * ``certificate``: also estimate, per pair, the spectral radius of the Jacobian of the map the solver
          iterates, :meth:`iteration_map` (``h = phi + damping (g - phi)``; ``g`` itself when ``damping = 1``), at
          the returned ``disp``, by :func:`~deqreg_lite.deq.spectral_radius`
          (``CERTIFICATE_ITERS`` = 30 Jacobian-vector products per pair, each about two network passes; off by
          default). It fills ``info.extras``: ``spectral_radius`` (per pair, the norm growth ratio
          ``||J v|| / ||v||``: below 1 means the map is a contraction near the returned point),
          ``spectral_rayleigh`` (per pair, the signed Rayleigh quotient), ``spectral_settled`` (per pair, the
          estimate changed by at most 1e-3 in its last 3 steps), ``spectral_iters`` and ``spectral_trace`` (per pair,
          the estimate after each product). The displacement is unchanged.

        The convergence record is always there: ``info.sample_residual`` / ``info.sample_converged`` per pair,
        ``info.extras["residual"]`` (the largest ``sample_residual``: the batch's final relative residual) and
        ``info.converged`` (every pair) batch-wide.
        """
        check_bool(certificate, "certificate")
        check_pair(fixed, moving, self.ndim, model=self)
        trained = steps is None
        n = check_steps(steps, self.T)
        if tol is None:
            tol = self.tol if trained else 0.0
        elif isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise ValueError(f"tol must be a finite number >= 0 (relative residual), got {tol!r}")
        if policy is None:
            policy = "lowest" if trained else "last"
        check_options(policy, ("lowest", "last"), "policy")
        clock = Clock(fixed)
        deq = DEQ(solver=self.solver, max_iter=n, tol=float(tol), grad="phantom", K=self.K,
                  tau=self.tau, on_diverge="flag", return_policy=policy, max_abs=self.max_disp(fixed),
                  solver_tau=self.damping)
        record: Optional[list[Tensor]] = [] if return_states else None
        with torch.no_grad():
            disp, _, dinfo = deq(self.update_map(fixed, moving, record), self._zeros(fixed))
        if torch.is_grad_enabled() and not dinfo.diverged and any(p.requires_grad for p in self.parameters()):
            p = phantom(self.update_map(fixed, moving), disp, self.K, self.tau, self.checkpoint_phantom)
            disp = disp + (p - p.detach())  # the phantom gradient, the solver's value
        states = record[:dinfo.nfe] if record is not None else []
        info = MethodInfo(steps=dinfo.nstep, nfe=dinfo.nfe, residuals=list(dinfo.rel_trace),
                          converged=dinfo.converged, diverged=dinfo.diverged,
                          sample_steps=list(dinfo.sample_nstep), sample_converged=list(dinfo.sample_converged),
                          sample_diverged=list(dinfo.sample_diverged),
                          sample_best_step=list(dinfo.sample_best_step),
                          sample_residual=list(dinfo.sample_residual),
                          extras={"abs_residuals": list(dinfo.abs_trace), "best_step": dinfo.best_step,
                                  "solver": self.solver, "tol": float(tol), "policy": policy,
                                  "residual": _batch_residual(dinfo.sample_residual)})
        if certificate:
            rho = spectral_radius(self.iteration_map(fixed, moving), disp.detach(), iters=CERTIFICATE_ITERS)
            info.extras.update({"spectral_radius": rho.value.tolist(), "spectral_rayleigh": rho.rayleigh.tolist(),
                                "spectral_settled": rho.settled.tolist(), "spectral_iters": rho.iterations,
                                "spectral_trace": rho.trace.T.tolist()})
        return make_result(disp, states, list(range(1, len(states) + 1)), info, clock.elapsed())

    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                      backward: Backward = Tensor.backward) -> dict[str, float]:
        """The Eq. 9 correction loss with phantom gradients, one term's graph alive at a time (module docstring).

        Returns ``loss`` (Eq. 9 total), ``loss_final`` (``L(phi*)``), ``nfe`` (solver calls), ``grad_nfe``
        (``K (S + 1)`` calls with a graph), ``steps``, ``residual`` (relative residual of ``phi*``),
        ``converged``, ``diverged``, ``n_padded`` (states padded with ``phi*`` after an early stop).
        """
        check_pair(fixed, moving, self.ndim, model=self)
        g = self.update_map(fixed, moving)
        deq = DEQ(solver=self.solver, max_iter=self.T, tol=self.tol, grad="phantom", K=self.K, tau=self.tau,
                  n_states=self.S, on_diverge="flag", max_abs=self.max_disp(fixed), solver_tau=self.damping)
        with torch.no_grad():
            z_star, states, dinfo = deq(g, self._zeros(fixed))

        def term(z: Tensor, weight: float) -> float:
            loss = loss_fn(fixed, moving, phantom(g, z, self.K, self.tau, self.checkpoint_phantom))
            if weight != 1.0:
                loss = weight * loss
            backward(loss)  # frees this term's graph before the next one is built
            return float(loss.detach())

        total = sum(term(z_t, self.gamma) for z_t in states)
        final = term(z_star, 1.0)
        extra: dict[str, float] = {}
        if self.jac_weight > 0 and not dinfo.diverged:
            jac = self.jacobian_penalty(fixed, moving, z_star)
            backward(self.jac_weight * jac)
            extra = {"jac_fro2": float(jac.detach())}
            total += self.jac_weight * extra["jac_fro2"]
        return {**extra, "loss": total + final, "loss_final": final, "nfe": float(dinfo.nfe),
                "grad_nfe": float(self.K * (len(states) + 1)), "steps": float(dinfo.nstep),
                "residual": float(dinfo.residual), "converged": float(dinfo.converged),
                "diverged": float(dinfo.diverged), "n_padded": float(dinfo.n_padded)}


    def jacobian_penalty(self, fixed: Tensor, moving: Tensor, z: Tensor) -> Tensor:
        """A penalty on the Jacobian of :meth:`iteration_map` at ``z`` (``(B, ndim, *spatial)``), averaged over the
        batch, with the graph to the parameters: ``r = ||h(z + eps v) - h(z)||^2 / (eps^2 ||v||^2)`` (a
        finite-difference Jacobian-vector product, ``eps = jac_eps`` voxels), then ``relu(r - jac_target^2)``.

        ``v`` is standard normal (a one-probe Hutchinson estimate: its expectation is the mean squared singular
        value, ``rho^2`` for a normal Jacobian whose eigenvalues all have modulus ``rho``), or, with ``jac_power =
        p > 0``, that vector after ``p`` power-iteration steps without a graph, so that ``r`` approaches
        ``rho(dh/dphi)^2`` from below. Returns a scalar tensor."""
        h = self.iteration_map(fixed, moving)
        z = z.detach()
        dims = tuple(range(1, z.dim()))
        v = torch.randn_like(z)
        if self.jac_power:
            with torch.no_grad():
                hz = h(z)
                for _ in range(self.jac_power):
                    w = h(z + self.jac_eps * v) - hz
                    v = w / w.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (z.dim() - 1)))
                    v = v * float(z[0].numel()) ** 0.5  # unit-variance entries, like the random probe
        dz = h(z + self.jac_eps * v) - h(z)
        ratio = dz.pow(2).sum(dims) / (self.jac_eps ** 2 * v.pow(2).sum(dims))
        if self.jac_target:
            ratio = torch.relu(ratio - self.jac_target ** 2)
        return ratio.mean()


class DEQReg12(DEQReg):
    """DEQReg-12 of the convergence analysis: ``T = 12`` solver steps and no state correction (``S = 0``)."""

    name = "deqreg12"

    def __init__(self, ndim: int, T: int = 12, S: int = 0, gamma: float = 0.5, K: int = 3, tau: float = 0.5,
                 solver: str = "fixed_point", tol: float = 1e-3, damping: float = 1.0, jac_weight: float = 0.0,
                 jac_eps: float = 1e-2, leak: float = 0.0, jac_power: int = 0, jac_target: float = 0.0,
                 checkpoint_phantom: bool = False, inject_moving: bool = False) -> None:
        super().__init__(ndim, T=T, S=S, gamma=gamma, K=K, tau=tau, solver=solver, tol=tol, damping=damping,
                         jac_weight=jac_weight, jac_eps=jac_eps, leak=leak, jac_power=jac_power,
                         jac_target=jac_target, checkpoint_phantom=checkpoint_phantom, inject_moving=inject_moving)


def deqreg12(ndim: int, **kwargs) -> DEQReg12:
    """``DEQReg12(ndim, **kwargs)``: DEQReg with ``T=12, S=0``."""
    return DEQReg12(ndim, **kwargs)
