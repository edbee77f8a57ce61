"""The DEQ layer: IFT and phantom gradients against closed forms and torchdeq, memory, states, GraDIRN-style maps."""
import math

import pytest
import torch
from torch import nn

from deqreg_lite.memory import SavedBytes
from deqreg_lite.deq import DEQ, DEQInfo, LazyState, correction_backward, correction_loss, phantom, state_steps
from deqreg_lite.losses import Objective
from deqreg_lite.solvers import SolverDivergedError, fixed_point, solve
from deqreg_lite.warp import warp

F64 = torch.float64


class TanhLayer(nn.Module):
    """z -> tanh(W z + U x + b), a contraction for ||W||_2 < 1, with a closed-form Jacobian."""

    def __init__(self, n=6, p=3, norm=0.5, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(n, n, generator=gen, dtype=F64)
        self.W = nn.Parameter(norm * w / torch.linalg.matrix_norm(w, 2))
        self.U = nn.Parameter(torch.randn(n, p, generator=gen, dtype=F64) / p ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=gen, dtype=F64))
        self.x = torch.randn(2, p, generator=gen, dtype=F64)
        self.c = torch.randn(2, n, generator=gen, dtype=F64)  # the loss is L(z) = sum(c * z)

    def forward(self, z):
        return torch.tanh(z @ self.W.T + self.x @ self.U.T + self.b)

    def loss(self, z):
        return (self.c * z).sum()

    def z0(self):
        return torch.zeros_like(self.c)

    def ift_reference(self):
        """dL/dtheta = dL/dz (I - J)^-1 dg/dtheta, with J = diag(1 - z*^2) W, by an explicit inverse."""
        with torch.no_grad():
            z, info = fixed_point(self, self.z0(), max_iter=1000, tol=1e-15)
            s = 1 - z ** 2                                                   # tanh' at the fixed point
            eye = torch.eye(len(self.b), dtype=F64)
            v = torch.stack([torch.linalg.inv(eye - s[i, :, None] * self.W).T @ self.c[i] for i in range(2)])
            sv = s * v
            return {"W": sv.T @ z, "U": sv.T @ self.x, "b": sv.sum(0)}

    def grads(self):
        g = {k: getattr(self, k).grad.clone() for k in ("W", "U", "b")}
        self.zero_grad()
        return g


def rel_err(a, b):
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def deq_grads(layer, **options):
    layer.zero_grad()
    z, states, info = DEQ(**options)(layer, layer.z0())
    correction_loss(layer.loss, z, states).backward()
    return layer.grads(), info


# ----------------------------------------------------------------------------------------------- gradients
def test_ift_gradient_equals_the_explicit_inverse():
    layer = TanhLayer()
    g, info = deq_grads(layer, grad="ift", max_iter=300, tol=1e-14, ift_tol=1e-14, ift_max_iter=300)
    assert rel_err(g, layer.ift_reference()) < 1e-6
    assert info.backward is not None and info.backward.converged and info.grad_nfe == 1


def test_ift_gradient_agrees_with_finite_differences():
    layer = TanhLayer(n=4, p=2)
    g, _ = deq_grads(layer, grad="ift", max_iter=300, tol=1e-14, ift_tol=1e-14, ift_max_iter=300)
    eps = 1e-6
    with torch.no_grad():
        for name in ("W", "b"):
            param = getattr(layer, name)
            fd = torch.zeros_like(param)
            for i in range(param.numel()):
                old = param.view(-1)[i].item()
                values = []
                for sign in (1, -1):
                    param.view(-1)[i] = old + sign * eps
                    values.append(layer.loss(fixed_point(layer, layer.z0(), max_iter=1000, tol=1e-15)[0]))
                param.view(-1)[i] = old
                fd.view(-1)[i] = (values[0] - values[1]) / (2 * eps)
            assert (fd - g[name]).norm() < 1e-7 * g[name].norm() + 1e-9, name


@pytest.mark.parametrize("tau, tol_at_16", [(1.0, 1e-8), (0.5, 1e-3)])
def test_phantom_gradient_approaches_ift_as_K_grows(tau, tol_at_16):
    layer = TanhLayer()
    ref = layer.ift_reference()
    errors = [rel_err(deq_grads(layer, grad="phantom", K=K, tau=tau, max_iter=300, tol=1e-14)[0], ref)
              for K in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < tol_at_16 and errors[0] > 0.1


def test_bptt_gradient_equals_ift_at_convergence():
    layer = TanhLayer()
    g, info = deq_grads(layer, grad="bptt", max_iter=300, tol=1e-14)
    assert rel_err(g, layer.ift_reference()) < 1e-8 and info.grad_nfe == info.nfe


@pytest.mark.parametrize("K, tau", [(1, 1.0), (3, 0.5), (5, 0.8)])
def test_phantom_gradient_equals_torchdeq(K, tau):
    from torchdeq import get_deq
    layer = TanhLayer()
    mine, _ = deq_grads(layer, grad="phantom", K=K, tau=tau, max_iter=100, tol=1e-12)
    via_backend, _ = deq_grads(layer, grad="phantom", K=K, tau=tau, max_iter=100, tol=1e-12, backend="torchdeq")
    tdeq = get_deq(core="sliced", f_solver="fixed_point_iter", f_max_iter=100, f_tol=1e-12, f_stop_mode="rel",
                   grad=K, tau=tau)
    z_out, _ = tdeq(layer, layer.z0())
    layer.loss(z_out[-1]).backward()
    theirs = layer.grads()
    assert rel_err(mine, theirs) < 1e-6 and rel_err(via_backend, theirs) < 1e-12


def test_ift_matches_the_torchdeq_backend():
    layer = TanhLayer()
    opts = dict(grad="ift", max_iter=300, tol=1e-13, ift_tol=1e-13, ift_max_iter=300)
    mine, _ = deq_grads(layer, **opts)
    theirs, info = deq_grads(layer, backend="torchdeq", **opts)
    assert rel_err(mine, theirs) < 1e-6 and info.grad_nfe == 1


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_lite_and_torchdeq_backends_agree_on_the_solution(solver):
    layer = TanhLayer(norm=0.9)
    opts = dict(m=5, lam=1e-12) if solver == "anderson" else dict(m=20)
    with torch.no_grad():
        z1, _, a = DEQ(solver=solver, max_iter=60, tol=1e-10, **opts)(layer, layer.z0())
    z2, _, b = DEQ(solver=solver, max_iter=60, tol=1e-10, backend="torchdeq", **opts)(layer, layer.z0())
    assert (z1 - z2).abs().max() < 1e-6
    assert a.converged and b.converged and b.nfe == b.nstep == len(b.rel_trace)


# ------------------------------------------------------------------------------------------------- states
@pytest.mark.parametrize("backend", ["lite", "torchdeq"])
@pytest.mark.parametrize("S", [1, 3, 5])
def test_exactly_S_states_when_the_solver_converges_at_step_1(backend, S):
    c = nn.Parameter(torch.randn(2, 3, dtype=F64))
    f = lambda z: c + 0.0 * z  # converges at once: f(z) = c
    z, states, info = DEQ(n_states=S, max_iter=48, tau=1.0, backend=backend)(f, torch.zeros(2, 3, dtype=F64))
    assert len(states) == S == len(info.state_steps)
    assert info.converged and info.nstep <= 2 * (S + 1)
    for s in states:
        assert torch.allclose(s, c) and s.requires_grad
    correction_loss(lambda z: z.square().sum(), z, states, gamma=0.5).backward()
    assert torch.allclose(c.grad, 2 * c * (1 + 0.5 * S))  # tau=1: the phantom gradient of a constant map is exact
    if backend == "lite":
        assert info.n_padded == S and info.state_steps == [info.nstep] * S


def test_states_are_equally_spaced_phantom_steps_from_the_trajectory():
    layer = TanhLayer(norm=0.99)
    T, S, K, tau = 48, 3, 2, 0.5
    z, states, info = DEQ(n_states=S, max_iter=T, tol=0.0, K=K, tau=tau)(layer, layer.z0())
    assert info.state_steps == state_steps(T, S) == [12, 24, 36] and info.n_padded == 0
    traj = [layer.z0()]
    with torch.no_grad():
        for _ in range(36):
            traj.append(layer(traj[-1]))
    for t, s in zip(info.state_steps, states):
        assert torch.allclose(s, phantom(layer, traj[t], K, tau), atol=1e-14)
    assert info.grad_nfe == K * (S + 1)


def test_lazy_states_give_the_same_gradients():
    layer = TanhLayer(norm=0.9)
    opts = dict(n_states=3, max_iter=30, tol=0.0, K=3, tau=0.7)
    eager, _ = deq_grads(layer, **opts)
    z, states, info = DEQ(lazy_states=True, **opts)(layer, layer.z0())
    assert all(isinstance(s, LazyState) for s in states) and info.grad_nfe == 3
    total = correction_backward(layer.loss, z, states, gamma=0.5)
    lazy = layer.grads()
    assert rel_err(lazy, eager) < 1e-12
    z, states, _ = DEQ(**opts)(layer, layer.z0())
    assert torch.allclose(total, correction_loss(layer.loss, z, states, gamma=0.5).detach())


def test_correction_loss_is_eq_9():
    z_star = torch.tensor([1.0, 2.0])
    states = [torch.tensor([3.0]), lambda: torch.tensor([4.0])]
    loss = correction_loss(lambda z: z.sum() ** 2, z_star, states, gamma=0.25)
    assert loss.item() == pytest.approx(9 + 0.25 * (9 + 16))


# ------------------------------------------------------------------------------------------------- memory
class ConvMap(nn.Module):
    """A small convolutional update z -> z + net(z, image), damped to a contraction."""

    def __init__(self, size=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 2, 3, padding=1))
        self.image = torch.rand(1, 1, size, size)

    def forward(self, z):
        return 0.5 * z + 0.1 * self.net(torch.cat([z, self.image], 1))


def saved_in_one_step(T, **options):
    """Bytes saved for backward while building the loss of one training step, and checks the step runs."""
    f = ConvMap()
    with SavedBytes() as mem:
        z, states, _ = DEQ(max_iter=T, tol=0.0, **options)(f, torch.zeros(1, 2, 16, 16))
        loss = correction_loss(lambda d: d.square().mean(), z, states)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f.parameters())
    return mem.total


@pytest.mark.parametrize("options", [dict(grad="phantom", K=3), dict(grad="ift"),
                                     dict(grad="phantom", K=2, n_states=2), dict(grad="ift", n_states=2)])
def test_saved_bytes_do_not_grow_with_T(options):
    assert saved_in_one_step(1, **options) == saved_in_one_step(100, **options) > 0


def test_bptt_saved_bytes_grow_linearly_with_T():
    b5, b10, b20 = (saved_in_one_step(T, grad="bptt") for T in (5, 10, 20))
    per_step = (b10 - b5) / 5
    assert per_step > 0 and b20 - b10 == 2 * (b10 - b5)
    # one BPTT step saves what one phantom step saves: one call of f
    assert per_step == saved_in_one_step(3, grad="phantom", K=2) - saved_in_one_step(3, grad="phantom", K=1)


def test_lazy_states_keep_fewer_graphs_alive():
    def peak(lazy):
        f = ConvMap()
        with SavedBytes() as mem:
            z, states, _ = DEQ(max_iter=12, tol=0.0, K=3, n_states=3, lazy_states=lazy)(f, torch.zeros(1, 2, 16, 16))
            correction_backward(lambda d: d.square().mean(), z, states)
        return mem.peak

    eager, lazy = peak(False), peak(True)
    assert lazy < 0.6 * eager  # z*'s graph + one state's, against z*'s + all three states'


# ---------------------------------------------------------------------------------------- GraDIRN-style map
class GradStep(nn.Module):
    """f(z) = 0.5 z + 0.25 - eta dE/dz + conv(z): a similarity gradient computed inside the update (GraDIRN-style).

    The 0.5 z + 0.25 pull (towards a half-voxel shift) makes the map a contraction and keeps the displacements off
    whole voxels, where bilinear warping has kinks (plain z - eta dE/dz oscillated there, never converging).
    """

    def __init__(self, dtype=torch.float32, size=16):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        img = torch.nn.functional.avg_pool2d(torch.rand(1, 1, size, size, generator=gen, dtype=dtype), 3, 1, 1)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size, dtype=dtype), torch.linspace(-1, 1, size, dtype=dtype),
                                indexing="ij")
        bump = torch.exp(-(xx ** 2 + yy ** 2) * 2)
        self.fixed, self.moving = img, warp(img, 0.5 + 0.3 * torch.stack([bump, -bump])[None])
        self.objective = Objective("mse", lam=0.05)
        self.eta = 300.0
        self.conv = nn.Conv2d(2, 2, 3, padding=1, dtype=dtype)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, z):
        g = self.objective.grad(self.fixed, self.moving, z, create_graph=torch.is_grad_enabled())
        return 0.5 * z + 0.25 - self.eta * g + self.conv(z)

    def loss(self, z):
        return self.objective.energy(self.fixed, self.moving, z)


@pytest.mark.parametrize("grad", ["phantom", "ift", "bptt"])
def test_gradirn_style_update_in_every_grad_mode(grad):
    f = GradStep()
    z0 = torch.zeros(1, 2, 16, 16)
    z, states, info = DEQ(grad=grad, max_iter=30, tol=1e-4, n_states=2)(f, z0)
    assert z.requires_grad and len(states) == 2 and info.converged
    correction_loss(f.loss, z, states).backward()
    assert torch.isfinite(f.conv.weight.grad).all() and f.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("grad", ["phantom", "ift", "bptt"])
def test_gradirn_style_update_under_no_grad(grad):
    f = GradStep()
    with torch.no_grad():
        z, states, info = DEQ(grad=grad, max_iter=30, tol=1e-4, n_states=2)(f, torch.zeros(1, 2, 16, 16))
        z_solver, _ = solve(f, torch.zeros(1, 2, 16, 16), max_iter=30, tol=1e-4)
    assert not z.requires_grad and not any(s.requires_grad for s in states) and info.grad_nfe == 0
    assert torch.equal(z, z_solver)  # no gradient machinery: the solver's answer


def test_gradirn_style_ift_gradient_agrees_with_finite_differences():
    f = GradStep(dtype=F64)
    z0 = torch.zeros(1, 2, 16, 16, dtype=F64)
    opts = dict(max_iter=100, tol=1e-12)
    z, _, info = DEQ(grad="ift", ift_tol=1e-12, ift_max_iter=100, **opts)(f, z0)
    f.loss(z).backward()
    assert info.converged and info.backward.converged
    analytic = f.conv.weight.grad.view(-1)[:3].clone()
    eps = 1e-5
    with torch.no_grad():
        for i in range(3):
            old, values = f.conv.weight.view(-1)[i].item(), []
            for sign in (1, -1):
                f.conv.weight.view(-1)[i] = old + sign * eps
                values.append(f.loss(DEQ(**opts)(f, z0)[0]))
            f.conv.weight.view(-1)[i] = old
            assert (values[0] - values[1]) / (2 * eps) == pytest.approx(analytic[i].item(), rel=1e-4, abs=1e-9)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_options_and_inputs():
    with pytest.raises(TypeError, match=r"unknown option.*\['stop_mode'\]"):
        DEQ(stop_mode="rel")
    with pytest.raises(TypeError, match="unknown option"):
        DEQ(solver="fixed_point", m=5)  # an Anderson option
    DEQ(solver="anderson", m=5, lam=1e-6, return_policy="last", on_diverge="flag")
    with pytest.raises(ValueError, match="grad must be one of"):
        DEQ(grad="jfb")
    with pytest.raises(ValueError, match="solver='fixed_point'"):
        DEQ(grad="bptt", solver="anderson")
    with pytest.raises(ValueError, match="bptt"):
        DEQ(grad="bptt", backend="torchdeq")
    with pytest.raises(ValueError, match="K must be"):
        DEQ(K=0)
    with pytest.raises(ValueError, match="NaN"):
        DEQ()(lambda z: z, torch.tensor([[1.0, math.nan]]))


@pytest.mark.parametrize("backend", ["lite", "torchdeq"])
def test_non_contractive_map_raises_or_flags(backend):
    w = nn.Parameter(torch.tensor(2.0))
    f = lambda z: w * z + 1.0
    with pytest.raises(SolverDivergedError):
        DEQ(max_iter=40, backend=backend)(f, torch.zeros(1, 3))
    z, states, info = DEQ(max_iter=40, n_states=2, on_diverge="flag", backend=backend)(f, torch.zeros(1, 3))
    assert isinstance(info, DEQInfo) and info.diverged and torch.isfinite(z).all() and len(states) == 2


# ---------------------------------------------------------------------------------------- divergence, flagged
@pytest.mark.parametrize("grad", ["phantom", "ift"])
def test_flagged_divergence_with_grad_on_returns_the_finite_answer_without_a_graph(grad):
    """f turns NaN after its 4th call: the phantom steps re-applied f from the answer and returned NaN."""
    w = nn.Parameter(torch.tensor(0.5))
    calls = [0]

    def f(z):
        calls[0] += 1
        return w * torch.tanh(z) + 1.0 if calls[0] < 4 else z * math.nan

    z, states, info = DEQ(max_iter=10, grad=grad, n_states=2, on_diverge="flag")(f, torch.zeros(2, 3))
    assert info.diverged and info.sample_diverged == [True, True] and info.grad_nfe == 0
    assert torch.isfinite(z).all() and not z.requires_grad and len(states) == 2
    assert all(torch.isfinite(s).all() and not s.requires_grad for s in states)


class Expander(nn.Module):
    """A stand-in for DEQReg's U-Net that makes its update map g(phi) = 1.05 phi + 1 (a slow expansion)."""
    levels = 0

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, x):
        return self.scale * x[:, 2:] + 1.0


@pytest.mark.parametrize("grad_on", [False, True])
def test_deqreg_reports_a_slow_expansion_as_divergence(grad_on):
    from deqreg_lite.methods import build_method
    model = build_method("deqreg", ndim=2)
    model.net = Expander()
    fixed = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))  # bound 128: not reached by step 32
    with torch.set_grad_enabled(grad_on):
        out = model(fixed, fixed.flip(-1))
    assert out.info["diverged"] and out.info["sample_diverged"] == [True, True] and not out.info["converged"]
    assert out.info["steps"] < model.T and out.info["sample_steps"] == [33, 33]  # flagged at step 32 of 48
    assert torch.isfinite(out.disp).all() and out.disp.abs().max() <= 1.0 + 1e-6  # g(0): the least diverged


def test_deqreg_flags_images_in_0_255():
    """Unnormalised images (0..255) made the shipped DEQReg return displacements of ~10^4 voxels with
    diverged=False: its residual falls slowly, as a contraction's would, towards an absurd field. DEQReg bounds a
    displacement component by the image size. The solver path is called directly, as an input-range check in
    ``check_pair`` may reject such images first."""
    from deqreg_lite import load_pretrained, load_sample
    try:
        wrapper = load_pretrained("deqreg")
    except FileNotFoundError:
        pytest.skip("no shipped deqreg checkpoint")
    model, s = wrapper.method, load_sample("brain2d")
    small = [nn.functional.interpolate(s[k], size=(80, 96), mode="bilinear", align_corners=True)
             for k in ("fixed", "moving")]
    deq = DEQ(max_iter=model.T, tol=model.tol, on_diverge="flag", max_abs=model.max_disp(small[0]))
    with torch.no_grad():
        _, _, info = deq(model.update_map(*(255 * x for x in small)), model._zeros(small[0]))
        _, _, ok = deq(model.update_map(*small), model._zeros(small[0]))
        try:
            out = wrapper(255 * s["fixed"], 255 * s["moving"])
        except ValueError:  # an input-range check came first: fine too
            out = None
    assert info.diverged and info.sample_diverged == [True] and info.nstep == 1 and info.best_step == -1
    assert not ok.diverged and ok.nstep == model.T
    if out is not None:
        assert out.info["diverged"] and out.disp.abs().max() < 1.0  # the zero start came back
