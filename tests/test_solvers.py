"""Fixed-point solvers: convergence, counting, tolerance and return policies, divergence, options."""
import math

import pytest
import torch

from deqreg_lite.solvers import (SOLVERS, SolverDivergedError, SolverInfo, anderson, broyden, fixed_point, solve,
                                 solver_options)

F64 = torch.float64


def tanh_map(n=16, batch=3, norm=0.8, seed=0):
    """A contraction z -> tanh(W z + x) with ||W||_2 = norm."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=gen, dtype=F64)
    w = norm * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(batch, n, generator=gen, dtype=F64)
    return (lambda z: torch.tanh(z @ w.T + x)), torch.zeros(batch, n, dtype=F64)


def ill_conditioned_map(n=32, rho=0.99, seed=0):
    """A linear contraction z -> A z + b, A symmetric with eigenvalues spread over [0, rho]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.linspace(0, rho, n, dtype=F64)) @ q.T
    b = torch.randn(1, n, generator=gen, dtype=F64)
    return (lambda z: z @ a.T + b), torch.zeros(1, n, dtype=F64), torch.linalg.solve(torch.eye(n, dtype=F64) - a, b[0])


class Counter:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_converges_on_a_contraction(name):
    f, z0 = tanh_map()
    z, info = solve(f, z0, name, max_iter=300, tol=1e-10)
    assert isinstance(info, SolverInfo) and info.converged and not info.diverged
    assert info.rel_trace[-1] <= 1e-10
    ref, _ = fixed_point(f, z0, max_iter=2000, tol=1e-14)
    assert torch.allclose(z, ref, atol=1e-8)
    assert not z.requires_grad


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("max_iter, tol", [(7, 0.0), (300, 1e-8)])
def test_nfe_counts_calls_and_traces_have_one_entry_per_step(name, max_iter, tol):
    f, z0 = tanh_map()
    counted = Counter(f)
    _, info = solve(counted, z0, name, max_iter=max_iter, tol=tol)
    assert info.nfe == counted.calls
    assert len(info.abs_trace) == len(info.rel_trace) == info.nstep == info.nfe
    assert info.nstep == max_iter if tol == 0 else info.nstep < max_iter
    assert 0 <= info.best_step < info.nstep


def test_traces_are_batch_max_of_the_per_sample_residuals():
    f, z0 = tanh_map(batch=4)
    z1 = f(z0)  # step 1 of plain iteration
    _, info = fixed_point(f, z0, max_iter=2, tol=0)
    fz1 = f(z1)
    res = (fz1 - z1).norm(dim=1)
    assert info.abs_trace[1] == pytest.approx(float(res.max()), rel=1e-12)
    assert info.rel_trace[1] == pytest.approx(float((res / (fz1.norm(dim=1) + 1e-9)).max()), rel=1e-12)


def test_anderson_needs_fewer_steps_than_plain_iteration_when_ill_conditioned():
    f, z0, z_true = ill_conditioned_map()
    _, plain = fixed_point(f, z0, max_iter=5000, tol=1e-6)
    z, acc = anderson(f, z0, m=6, lam=1e-10, max_iter=5000, tol=1e-6)
    _, bro = broyden(f, z0, max_iter=5000, tol=1e-6, m=20)
    assert plain.converged and acc.converged and bro.converged
    assert acc.nstep * 5 < plain.nstep and bro.nstep * 5 < plain.nstep
    assert (z[0] - z_true).norm() < 1e-3 * z_true.norm()  # error <= residual x 1/(1 - rho)


def test_anderson_lam_is_absolute_like_torchdeq():
    """lam regularises G G^T in squared-residual units: once residuals are tiny, lam=1e-4 turns the mixing into
    an average and slows Anderson down (torchdeq behaves the same). Documented, and pinned here."""
    f, z0, _ = ill_conditioned_map()
    _, big = anderson(f, z0, m=6, lam=1e-4, max_iter=5000, tol=1e-6)
    _, small = anderson(f, z0, m=6, lam=1e-10, max_iter=5000, tol=1e-6)
    assert small.nstep * 3 < big.nstep


def test_tolerance_is_relative_and_scale_free():
    f, z0, _ = ill_conditioned_map()
    scale = 1e6
    g = lambda z: scale * f(z / scale)  # the same problem in other units
    for name in SOLVERS:
        opts = {"lam": 0.0} if name == "anderson" else {}  # Anderson's lam is absolute (see above)
        _, a = solve(f, z0, name, max_iter=3000, tol=1e-4, **opts)
        _, b = solve(g, z0, name, max_iter=3000, tol=1e-4, **opts)
        assert a.converged and b.converged and a.nstep == b.nstep, name
        # it stops at the first step at or below tol
        assert a.rel_trace[-1] <= 1e-4 and all(r > 1e-4 for r in a.rel_trace[:-1])


def test_lowest_residual_policy():
    steps = torch.tensor([1.0, 0.01, 0.5, 0.2], dtype=F64)  # call k moves z by steps[k]: residuals 1, 0.01, 0.5, 0.2

    def run(**kw):
        calls = [0]

        def f(z):
            calls[0] += 1
            return z + steps[calls[0] - 1]

        return fixed_point(f, torch.full((1, 1), 10.0, dtype=F64), max_iter=4, tol=0, **kw)

    z_low, low = run()
    z_last, last = run(return_policy="last")
    assert low.best_step == 1 and low.returned == "lowest" and z_low.item() == pytest.approx(11.01)
    assert low.residual == min(low.rel_trace) == pytest.approx(0.01 / 11.01)
    assert last.best_step == 3 and last.returned == "last" and z_last.item() == pytest.approx(11.71)


def test_damped_iteration():
    f, z0 = tanh_map(batch=1)
    z1, _ = fixed_point(f, z0, max_iter=1, tol=0, return_policy="last")
    assert torch.equal(z1, f(z0))
    seen = []
    fixed_point(f, z0, max_iter=3, tol=0, tau=0.5, callback=lambda k, z: seen.append(z))
    assert torch.allclose(seen[1], 0.5 * f(z0) + 0.5 * z0) and torch.equal(seen[0], z0)
    z, info = fixed_point(f, z0, max_iter=500, tol=1e-10, tau=0.5)
    assert info.converged and torch.allclose(f(z), z, atol=1e-8)


def test_anderson_matches_torchdeq():
    from torchdeq.solver import anderson_solver
    f, z0 = tanh_map(n=20, batch=2, norm=0.95)
    for m in (2, 5):
        z, _ = anderson(f, z0, m=m, lam=1e-4, max_iter=12, tol=0, return_policy="last")
        zt, _, _ = anderson_solver(f, z0, m=m, lam=1e-4, max_iter=12, tol=0, stop_mode="rel", return_final=True)
        assert (z - zt).abs().max() < 1e-12
    f, z0 = tanh_map(n=20, batch=1, norm=0.95)
    z, info = anderson(f, z0, m=5, lam=1e-4, max_iter=50, tol=1e-8)
    zt, _, tinfo = anderson_solver(f, z0, m=5, lam=1e-4, max_iter=50, tol=1e-8, stop_mode="rel")
    assert (z - zt).abs().max() < 1e-6
    assert info.best_step == int(tinfo["nstep"]) - 1  # torchdeq's nstep is the 1-based lowest step


@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 3, 4, 5, 2)])
def test_any_shape(shape):
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(*shape, generator=gen)
    f = lambda z: 0.5 * torch.sin(z) + c
    for name in SOLVERS:
        z, info = solve(f, torch.zeros(shape), name, max_iter=200, tol=1e-6)
        assert z.shape == shape and info.converged, name


@pytest.mark.parametrize("name, f", [("fixed_point", lambda z: 2.0 * z + 1.0),
                                     ("fixed_point", lambda z: z * z + 2.0),  # no real fixed point
                                     ("broyden", lambda z: z * z + 2.0)])
def test_non_contractive_map_raises_or_flags(name, f):
    z0 = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(SolverDivergedError, match=r"at step \d+.*residual"):
        solve(f, z0, name, max_iter=100, tol=1e-6)
    z, info = solve(f, z0, name, max_iter=100, tol=1e-6, on_diverge="flag")
    assert info.diverged and not info.converged and info.returned == "lowest"
    assert torch.isfinite(z).all() and info.best_step >= 0


def test_anderson_on_a_map_without_fixed_point_stays_bounded_and_unconverged():
    # Anderson (a root finder) solves z = 2z + 1; on z = z^2 + 2 it wanders without blowing up
    z, info = anderson(lambda z: z * z + 2.0, torch.zeros(2, 4, dtype=F64), max_iter=100, tol=1e-6)
    assert not info.converged and not info.diverged and torch.isfinite(z).all() and info.residual > 1e-3


@pytest.mark.parametrize("name", list(SOLVERS))
def test_nan_raises_and_flag_returns_a_finite_iterate(name):
    calls = [0]

    def f(z):
        calls[0] += 1
        return 0.5 * torch.tanh(z) + 1.0 if calls[0] < 4 else z * math.nan

    z0 = torch.zeros(1, 3)
    with pytest.raises(SolverDivergedError, match="step 3"):
        solve(f, z0, name, max_iter=10, tol=0)
    calls[0] = 0
    z, info = solve(f, z0, name, max_iter=10, tol=0, on_diverge="flag")
    assert info.diverged and torch.isfinite(z).all() and info.nstep == 4 and info.best_step <= 2


def test_nan_on_the_first_call_returns_z0_when_flagged():
    z0 = torch.ones(1, 3)
    z, info = fixed_point(lambda z: z * math.nan, z0, on_diverge="flag")
    assert info.diverged and info.best_step == -1 and torch.equal(z, z0)


def test_bad_inputs_and_options():
    f, z0 = tanh_map()
    with pytest.raises(ValueError, match="NaN"):
        solve(f, torch.full((2, 3), math.nan))
    with pytest.raises(ValueError, match="floating"):
        solve(f, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"unknown option.*\['stop_mode'\].*valid options"):
        solve(f, z0, "anderson", stop_mode="rel")
    with pytest.raises(TypeError, match="unknown option"):
        solve(f, z0, "fixed_point", m=5)  # an Anderson option
    with pytest.raises(ValueError, match="solver must be one of"):
        solve(f, z0, "newton")
    with pytest.raises(ValueError, match="return_policy"):
        solve(f, z0, return_policy="best")
    with pytest.raises(ValueError, match="tau"):
        fixed_point(f, z0, tau=1.5)
    with pytest.raises(ValueError, match="shaped like z0"):
        solve(lambda z: z[:1], z0)
    assert "m" in solver_options("anderson") and "track_graph" in solver_options("fixed_point")


def test_solvers_build_no_graph_unless_asked():
    w = torch.tensor(0.5, requires_grad=True)
    f = lambda z: w * z + 1.0
    z, _ = fixed_point(f, torch.zeros(1, 2), max_iter=5, tol=0)
    assert not z.requires_grad
    z, _ = fixed_point(f, torch.zeros(1, 2), max_iter=5, tol=0, track_graph=True)
    assert z.requires_grad
    z.sum().backward()  # d/dw of the 5th iterate of z <- w z + 1 from 0: 1 + 2w + 3w^2 + 4w^3 per entry
    assert w.grad.item() == pytest.approx(2 * (1 + 2 * 0.5 + 3 * 0.25 + 4 * 0.125))


# ------------------------------------------------------------------------------------- slow divergence (growth)
def test_a_slow_expansion_is_flagged_and_its_least_diverged_iterate_comes_back():
    """z -> 1.05 z + 1: the residual grows only 1.05x a step (1000x after 142 steps), and the relative residual
    shrinks as the norm grows, so the old rule returned the most diverged iterate with diverged=False."""
    f, z0 = (lambda z: 1.05 * z + 1.0), torch.zeros(2, 3, dtype=F64)
    with pytest.raises(SolverDivergedError, match="norm rose"):
        fixed_point(f, z0, max_iter=50, tol=1e-3)
    z, info = fixed_point(f, z0, max_iter=50, tol=1e-3, on_diverge="flag")
    assert info.diverged and info.sample_diverged == [True, True] and not info.converged
    assert info.nstep == 33  # detected at step 32 (two windows of 16)
    assert info.sample_best_step == [0, 0] and torch.equal(z, f(z0))  # the lowest absolute residual: f(z0)
    # the drift z -> z + 1 (no fixed point, constant residual) too
    _, info = fixed_point(lambda z: z + 1.0, z0, max_iter=50, on_diverge="flag")
    assert info.diverged and info.nstep == 33


@pytest.mark.parametrize("rho", [0.9, 0.99])
def test_slow_contractions_are_not_flagged(rho):
    for f, z0 in ((lambda z: rho * z + 1.0, torch.zeros(1, 1, dtype=F64)), ill_conditioned_map(rho=rho)[:2]):
        z, info = fixed_point(f, z0, max_iter=3000, tol=1e-8)
        assert info.converged and not info.diverged
        assert torch.allclose(z, f(z), rtol=1e-6)


def test_growth_window_option():
    f, z0 = (lambda z: 1.05 * z + 1.0), torch.zeros(1, 3, dtype=F64)
    _, info = fixed_point(f, z0, max_iter=50, growth_window=0)  # off: only NaN/inf and the 1000x blow-up remain
    assert not info.diverged and info.nstep == 50
    _, info = fixed_point(f, z0, max_iter=50, growth_window=10, on_diverge="flag")
    assert info.diverged and info.nstep == 21
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="growth_window"):
            fixed_point(f, z0, growth_window=bad)
    assert "growth_window" in solver_options("anderson")


def test_lowest_policy_on_a_contraction_is_unchanged():
    """On maps that do not diverge, "lowest" still picks the lowest relative residual (torchdeq's rule)."""
    f, z0 = tanh_map(batch=3)
    z, info = fixed_point(f, z0, max_iter=30, tol=0)
    assert info.sample_best_step == [29, 29, 29] and not info.diverged and info.best_step == 29
    assert info.residual == max(info.sample_residual) == pytest.approx(info.rel_trace[-1])
    assert torch.equal(z, fixed_point(f, z0, max_iter=30, tol=0, return_policy="last")[0])
