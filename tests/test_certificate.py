"""The convergence certificate: deq.spectral_radius against torch.linalg.eigvals, and DEQReg's certificate option."""
import math

import pytest
import torch
from torch import nn

from deqreg_lite.config import seed_everything
from deqreg_lite.deq import SpectralRadius, _jvp_operator, spectral_radius
from deqreg_lite.methods.deqreg import CERTIFICATE_ITERS, DEQReg
from deqreg_lite.methods.resolution import HalfResolution

F64 = torch.float64


def linear(A: torch.Tensor):
    """z -> z A^T for a batch of vectors (B, n): the Jacobian is A for every sample."""
    return lambda z: z @ A.T


def with_eigenvalues(values, seed=0) -> torch.Tensor:
    """A non-symmetric real matrix V diag(values) V^-1 (real eigenvalues ``values``, non-orthogonal eigenvectors)."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.eye(len(values), dtype=F64) + 0.4 * torch.randn(len(values), len(values), generator=gen, dtype=F64)
    return V @ torch.diag(torch.tensor(values, dtype=F64)) @ torch.linalg.inv(V)


def dominant(A: torch.Tensor) -> complex:
    eig = torch.linalg.eigvals(A)
    return complex(eig[int(eig.abs().argmax())])


def test_symmetric_matrix():
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(6, 6, generator=gen, dtype=F64)
    A = (M + M.T) / 6
    lam = dominant(A)
    r = spectral_radius(linear(A), torch.zeros(3, 6, dtype=F64), iters=200, tol=1e-8)
    assert isinstance(r, SpectralRadius) and len(r) == 3 and r.iterations == 200
    assert r.trace.shape == (200, 3) and r.rayleigh_trace.shape == (200, 3)
    assert torch.allclose(r.value, torch.full((3,), abs(lam), dtype=F64), atol=1e-6)
    assert torch.allclose(r.rayleigh, torch.full((3,), lam.real, dtype=F64), atol=1e-6)
    assert r.settled.all()


@pytest.mark.parametrize("values", [[0.8, 0.5, -0.3, 0.2, 0.05],     # real positive dominant, non-symmetric
                                    [-0.9, 0.5, 0.3, -0.1, 0.0],     # negative dominant eigenvalue
                                    [1.006, 0.7, -0.4, 0.3, 0.1]])   # just above 1: not a contraction
def test_non_symmetric_real_dominant(values):
    A = with_eigenvalues(values)
    lam = dominant(A)
    assert abs(lam.imag) < 1e-9 and lam.real == pytest.approx(values[0])
    r = spectral_radius(linear(A), torch.zeros(2, 5, dtype=F64), iters=150)
    assert r.value.tolist() == pytest.approx([abs(lam.real)] * 2, abs=1e-6)
    assert r.rayleigh.tolist() == pytest.approx([lam.real] * 2, abs=1e-6)  # the sign
    assert r.settled.all()


def test_plus_minus_pair_and_complex_pair_give_the_modulus():
    # symmetric with eigenvalues +0.9 and -0.9: the norm ratio is |lambda|, the Rayleigh quotient is not lambda
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=F64))
    A = Q @ torch.diag(torch.tensor([0.9, -0.9, 0.3, 0.1], dtype=F64)) @ Q.T
    r = spectral_radius(linear(A), torch.zeros(1, 4, dtype=F64), iters=100)
    assert float(r.value) == pytest.approx(0.9, abs=1e-6) and bool(r.settled)
    assert abs(float(r.rayleigh)) < 0.9 - 1e-3
    # a normal matrix with a complex dominant pair 0.9 e^{+-i 1}: the norm ratio is 0.9, the Rayleigh quotient is
    # 0.9 cos(1)
    c, s = 0.9 * math.cos(1.0), 0.9 * math.sin(1.0)
    A = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 0.2]], dtype=F64)
    assert abs(dominant(A)) == pytest.approx(0.9)
    r = spectral_radius(linear(A), torch.zeros(1, 3, dtype=F64), iters=100)
    assert float(r.value) == pytest.approx(0.9, abs=1e-6)
    assert float(r.rayleigh) == pytest.approx(c, abs=1e-6)


class TanhMap(nn.Module):
    """z -> tanh(W z + b) per sample, each sample with its own bias (so the Jacobians differ)."""

    def __init__(self, n=6, B=3, seed=1):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        values = [1.3, -0.6, 0.5, 0.3, -0.2, 0.1][:n]
        self.W = nn.Parameter(with_eigenvalues(values, seed=seed))
        self.b = nn.Parameter(0.2 * torch.randn(B, n, generator=gen, dtype=F64))

    def forward(self, z):
        return torch.tanh(z @ self.W.T + self.b[:z.shape[0]])


def test_nonlinear_map_against_the_exact_jacobian():
    f = TanhMap()
    z = 0.3 * torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    r = spectral_radius(f, z, iters=300, tol=1e-9)
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda x: f(z.clone().index_copy(0, torch.tensor([i]), x[None]))[i],
                                               z[i])
        eig = torch.linalg.eigvals(J)
        lam = complex(eig[int(eig.abs().argmax())])
        second = float(eig.abs().sort(descending=True).values[1])
        assert abs(lam.imag) < 1e-9 and second < abs(lam) - 0.05  # a real, separated dominant eigenvalue
        assert float(r.value[i]) == pytest.approx(abs(lam), abs=1e-5)
        assert float(r.rayleigh[i]) == pytest.approx(lam.real, abs=1e-5)
    assert r.settled.all()
    assert all(p.grad is None for p in f.parameters())


def test_batch_members_do_not_influence_each_other_and_no_grad_is_fine():
    f = TanhMap()
    z = 0.3 * torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        together = spectral_radius(f, z, iters=25)
    alone = spectral_radius(f, z[:1], iters=25)
    assert torch.allclose(together.trace[:, 0], alone.trace[:, 0], atol=1e-12, rtol=0)
    assert torch.allclose(together.rayleigh_trace[:, 0], alone.rayleigh_trace[:, 0], atol=1e-12, rtol=0)


def test_trace_settling_and_zero_jacobian():
    r = spectral_radius(lambda z: torch.zeros_like(z) + 1.0, torch.zeros(2, 3), iters=5)
    assert r.value.tolist() == [0.0, 0.0] and r.settled.all()
    r = spectral_radius(linear(torch.eye(3, dtype=F64) * 0.5), torch.zeros(1, 3, dtype=F64), iters=3, window=3)
    assert not r.settled.any()  # fewer than window + 1 steps: cannot say
    A = with_eigenvalues([0.9, 0.89, 0.1])  # a tiny gap: still moving after 10 steps
    r = spectral_radius(linear(A), torch.zeros(1, 3, dtype=F64), iters=10, tol=1e-9)
    assert not bool(r.settled)
    assert torch.equal(r.value, r.trace[-1])


def test_rejects_bad_input_and_unknown_options():
    f = linear(torch.eye(3))
    z = torch.zeros(2, 3)
    with pytest.raises(TypeError):
        spectral_radius(f, z, iterations=3)
    for bad in (dict(iters=0), dict(iters=2.0), dict(tol=-1.0), dict(tol=float("nan")), dict(window=0),
                dict(seed=-1), dict(tol=True)):
        with pytest.raises(ValueError):
            spectral_radius(f, z, **bad)
    for bad_z in (torch.zeros(2, 3, dtype=torch.long), torch.tensor(1.0), torch.zeros(0, 3),
                  torch.tensor([[0.0, float("nan"), 0.0]]), [[0.0, 0.0, 0.0]]):
        with pytest.raises(ValueError):
            spectral_radius(f, bad_z)
    with pytest.raises(ValueError, match="same shape"):
        spectral_radius(lambda z: z[:, :2], z)
    with pytest.raises(ValueError):
        spectral_radius("not a map", z)


# ---------------------------------------------------------------------------------------------------------------
# DEQReg's certificate
# ---------------------------------------------------------------------------------------------------------------
def perturbed_deqreg(T=6):
    """A DEQReg whose update is far from zero (a fresh one predicts ~0, so its Jacobian is ~I)."""
    seed_everything(0)
    m = DEQReg(2, T=T, S=0)
    with torch.no_grad():
        m.net.head.weight.normal_(0, 0.05)
    return m.eval()


def pair(B=2, size=(16, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, *size, generator=gen), torch.rand(B, 1, *size, generator=gen)


def test_jvp_of_the_update_map_equals_the_exact_jacobian():
    m = perturbed_deqreg()
    fixed, moving = pair(B=1, size=(16, 16))
    g = m.update_map(fixed, moving)
    z = 0.5 * torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    J = torch.autograd.functional.jacobian(g, z).reshape(z.numel(), z.numel())
    v = torch.randn_like(z)
    assert torch.allclose(_jvp_operator(g, z)(v).flatten(), J @ v.flatten(), atol=1e-5)


def test_deqreg_certificate_option():
    m = perturbed_deqreg()
    fixed, moving = pair()
    with torch.no_grad():
        plain = m(fixed, moving)
        cert = m(fixed, moving, certificate=True)
    assert torch.equal(plain.disp, cert.disp)
    assert "spectral_radius" not in plain.info  # off by default
    info = cert.info
    assert len(info["spectral_radius"]) == 2 and len(info["spectral_settled"]) == 2
    assert len(info["spectral_rayleigh"]) == 2 and info["spectral_iters"] == CERTIFICATE_ITERS
    assert len(info["spectral_trace"]) == 2 and len(info["spectral_trace"][0]) == CERTIFICATE_ITERS
    assert all(math.isfinite(v) and v > 0 for v in info["spectral_radius"])
    # the estimate is the one of the update map at the returned field, pair by pair
    for i in range(2):
        r = spectral_radius(m.update_map(fixed[i:i + 1], moving[i:i + 1]), cert.disp[i:i + 1],
                            iters=CERTIFICATE_ITERS)
        assert info["spectral_radius"][i] == pytest.approx(float(r.value), rel=1e-4)
    # the convergence record, per pair and batch-wide
    assert len(info.sample_residual) == 2 and len(info.sample_converged) == 2
    assert info["residual"] == max(info.sample_residual)
    assert info.converged == all(info.sample_converged)
    with pytest.raises(ValueError, match="certificate"):
        m(fixed, moving, certificate="yes")
    with pytest.raises(TypeError):
        m(fixed, moving, spectral=True)


def test_half_resolution_passes_the_certificate_on():
    m = perturbed_deqreg()
    fixed, moving = pair(B=1, size=(32, 32))
    with torch.no_grad():
        res = HalfResolution(m)(fixed, moving, certificate=True)
    assert len(res.info["spectral_radius"]) == 1 and res.info["internal_size"] == (16, 16)


# ------------------------------------------------------------------------------- the damped solve (recipe option)
def test_damped_solve_has_the_same_fixed_points_and_iterates_the_damped_map():
    """``DEQ(solver_tau=d)`` iterates ``z <- d f(z) + (1 - d) z``: on a linear map with eigenvalue -1.5 the plain
    iteration diverges while the damped one (d = 0.5: eigenvalue 1 - 0.5 * 2.5 = -0.25) converges to the same
    fixed point that f has."""
    from deqreg_lite.deq import DEQ
    A = with_eigenvalues([-1.5, 0.3, 0.1])
    b = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    f = lambda z: z @ A.T + b
    z_true = torch.linalg.solve(torch.eye(3, dtype=F64) - A, b[0])
    with torch.no_grad():
        plain, _, pinfo = DEQ(max_iter=60, tol=1e-8, on_diverge="flag")(f, torch.zeros(1, 3, dtype=F64))
        damped, _, dinfo = DEQ(max_iter=60, tol=1e-8, on_diverge="flag", solver_tau=0.5)(
            f, torch.zeros(1, 3, dtype=F64))
    assert dinfo.converged and torch.allclose(damped[0], z_true, atol=1e-6)
    assert not pinfo.converged
    # the residual is f's, ||f(z) - z|| / ||f(z)||, whatever the damping
    assert dinfo.residual <= 1e-8
    for bad in (0.0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="solver_tau"):
            DEQ(solver_tau=bad)
    with pytest.raises(ValueError, match="solver_tau"):
        DEQ(solver="broyden", solver_tau=0.5)


def test_deqreg_damping_iteration_map_and_certificate():
    m = perturbed_deqreg()
    fixed, moving = pair(B=1, size=(16, 16))
    z = 0.3 * torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    damped = DEQReg(2, damping=0.5)
    damped.load_state_dict(m.state_dict())
    assert m.iteration_map(fixed, moving)(z).equal(m.update_map(fixed, moving)(z))  # damping 1: h = g
    with torch.no_grad():
        g, h = damped.update_map(fixed, moving)(z), damped.iteration_map(fixed, moving)(z)
    assert torch.allclose(h, 0.5 * g + 0.5 * z, atol=1e-6)
    with torch.no_grad():
        res = damped(fixed, moving, certificate=True)
    # the certificate is the iteration map's: its Jacobian is 0.5 I + 0.5 dg/dphi
    r = spectral_radius(damped.iteration_map(fixed, moving), res.disp, iters=CERTIFICATE_ITERS)
    assert res.info["spectral_radius"][0] == pytest.approx(float(r.value), rel=1e-4)
    # the config round-trips (checkpoints rebuild the damped model)
    assert damped.config()["damping"] == 0.5
    with pytest.raises(ValueError, match="solver_tau"):
        DEQReg(2, damping=0.0)


def test_jacobian_penalty_estimates_the_mean_squared_singular_value():
    """On the untrained (near-zero update) model, h(phi) = phi + d * UNet(...) ~ phi, so the estimate is ~1;
    averaged over probes, it equals ||J||_F^2 / n of the exact Jacobian."""
    m = DEQReg(2, damping=0.5, jac_weight=1.0)
    m.net.head.weight.data.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    fixed, moving = pair(B=1, size=(16, 16))
    z = 0.3 * torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(4))
    h = m.iteration_map(fixed, moving)
    J = torch.autograd.functional.jacobian(h, z).reshape(z.numel(), z.numel())
    exact = float(J.pow(2).sum() / z.numel())
    torch.manual_seed(0)
    est = sum(float(m.jacobian_penalty(fixed, moving, z).detach()) for _ in range(200)) / 200
    assert est == pytest.approx(exact, rel=0.1)
    assert 0.1 < exact < 10


def test_training_step_with_the_jacobian_penalty_back_propagates_it():
    from deqreg_lite.methods import RegistrationLoss
    fixed, moving = pair(B=1, size=(16, 16))
    torch.manual_seed(0)
    plain = DEQReg(2, T=4, S=1, damping=0.5)
    pen = DEQReg(2, T=4, S=1, damping=0.5, jac_weight=2.0)
    pen.load_state_dict(plain.state_dict())
    loss = RegistrationLoss(lam=1.0)
    torch.manual_seed(1)
    a = plain.training_step(fixed, moving, loss)
    torch.manual_seed(1)
    b = pen.training_step(fixed, moving, loss)
    assert "jac_fro2" in b and "jac_fro2" not in a
    assert b["loss"] == pytest.approx(a["loss"] + 2.0 * b["jac_fro2"], rel=1e-5)
    ga = torch.cat([p.grad.flatten() for p in plain.parameters()])
    gb = torch.cat([p.grad.flatten() for p in pen.parameters()])
    assert not torch.allclose(ga, gb)  # the penalty reached the parameters
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="jac_weight"):
            DEQReg(2, jac_weight=bad)


def test_leak_makes_the_untrained_map_a_contraction():
    """A fresh DEQReg predicts ~0, so g ~ identity (rho ~ 1); with leak 0.5 and damping 0.5 the iteration map is
    ~ (1 - 0.25) I: rho ~ 0.75, and g(phi) = phi + UNet(...) - leak * phi exactly."""
    fixed, moving = pair(B=1, size=(16, 16))
    z = 0.3 * torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    plain = DEQReg(2)
    torch.manual_seed(0)
    leaky = DEQReg(2, damping=0.5, leak=0.5)
    with torch.no_grad():
        assert torch.allclose(leaky.update_map(fixed, moving)(z), plain.update_map(fixed, moving)(z) - 0.5 * z)
    r_plain = spectral_radius(plain.iteration_map(fixed, moving), z, iters=20)
    r_leaky = spectral_radius(leaky.iteration_map(fixed, moving), z, iters=20)
    assert float(r_plain.value) == pytest.approx(1.0, abs=1e-3)
    assert float(r_leaky.value) == pytest.approx(0.75, abs=1e-3)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="leak"):
            DEQReg(2, leak=bad)


def test_jacobian_penalty_aimed_by_power_iteration_estimates_rho_squared_and_hinges():
    m = DEQReg(2, damping=0.5, jac_weight=1.0, jac_power=40)
    m.net.head.weight.data.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    fixed, moving = pair(B=1, size=(16, 16))
    z = 0.3 * torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(4))
    rho = float(spectral_radius(m.iteration_map(fixed, moving), z, iters=60).value)
    torch.manual_seed(0)
    aimed = float(m.jacobian_penalty(fixed, moving, z).detach())
    assert aimed ** 0.5 == pytest.approx(rho, rel=0.03)
    plain = DEQReg(2, damping=0.5, jac_weight=1.0)
    plain.load_state_dict(m.state_dict())
    torch.manual_seed(0)
    assert float(plain.jacobian_penalty(fixed, moving, z).detach()) < aimed  # the mean is below the top
    hinged = DEQReg(2, damping=0.5, jac_weight=1.0, jac_power=40, jac_target=0.5)
    hinged.load_state_dict(m.state_dict())
    torch.manual_seed(0)
    assert float(hinged.jacobian_penalty(fixed, moving, z).detach()) == pytest.approx(max(aimed - 0.25, 0), abs=1e-4)
    with pytest.raises(ValueError, match="jac_power"):
        DEQReg(2, jac_power=-1)


def test_inject_moving_feeds_the_unwarped_moving_image_and_round_trips():
    """``inject_moving=True``: the U-Net gets ``[If, Im o phi, phi, Im]`` (3 + ndim channels), so at phi = 0 the
    update map differs from the paper's only through the extra channel's weights; the option is recorded in the
    config (a checkpoint rebuilds it) and checked."""
    fixed, moving = pair(B=1, size=(16, 16))
    z = 0.3 * torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    m = DEQReg(2, inject_moving=True)
    assert m.net.in_channels == 5 and DEQReg(2).net.in_channels == 4
    seen = []
    hook = m.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.no_grad():
        m.update_map(fixed, moving)(z)
    hook.remove()
    assert seen[0].shape[1] == 5
    assert torch.equal(seen[0][:, 4:], moving) and torch.equal(seen[0][:, :1], fixed)
    assert torch.equal(seen[0][:, 2:4], z)
    rebuilt = DEQReg(**m.config())
    rebuilt.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.update_map(fixed, moving)(z), m.update_map(fixed, moving)(z))
    assert DEQReg(2).config()["inject_moving"] is False
    with pytest.raises(ValueError, match="inject_moving"):
        DEQReg(2, inject_moving=1)
