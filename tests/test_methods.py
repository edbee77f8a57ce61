"""The learned methods: one interface, steps at test time, no_grad, training steps, gradients and memory."""

import pytest
import torch

from deqreg_lite.datasets.synthetic import synthetic_pair
from deqreg_lite.deq import DEQ, correction_loss
from deqreg_lite.losses import diffusion, lncc
from deqreg_lite.memory import SavedBytes
from deqreg_lite.methods import (METHODS, DEQReg, DEQReg12, GraDIRN, RegistrationLoss, RegistrationMethod, RIIR,
                                 Unrolling, build_method, deqreg12)
from deqreg_lite.methods.riir import riir_weights
from deqreg_lite.result import RegistrationResult
from deqreg_lite.warp import warp

# small trained-step counts: these tests are about mechanics, not quality
SMALL = {"voxelmorph": {}, "unrolling": {"T": 2}, "unrolling_ml": {"levels": 2, "steps_per_level": 2},
         "gradirn": {"levels": 2, "steps_per_level": 2}, "riir": {"T": 2}, "deqreg": {"T": 4, "S": 1},
         "deqreg12": {"T": 3}}
ITERATIVE = [n for n in METHODS if n != "voxelmorph"]


def build(name, ndim=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_method(name, ndim, **{**SMALL[name], **kwargs})


def first_conv(method):
    return next(m for m in method.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))).weight


# ------------------------------------------------------------------------------------------- the interface
@pytest.mark.parametrize("name", list(METHODS))
def test_forward_2d_under_no_grad(name, pair2d):
    fixed, moving = pair2d
    method = build(name)
    assert isinstance(method, RegistrationMethod) and method.name == name
    with torch.no_grad():
        res = method(fixed, moving)
    assert isinstance(res, RegistrationResult)
    assert res.disp.shape == (1, 2, 32, 32) and torch.isfinite(res.disp).all() and not res.disp.requires_grad
    assert res.states == [] and res.info["steps"] == method.trained_steps and res.time > 0
    assert res.info["nfe"] >= res.info["steps"]
    if name != "voxelmorph":
        assert len(res.info["residuals"]) == res.info["steps"]


@pytest.mark.parametrize("name", ITERATIVE)
@pytest.mark.parametrize("steps", [1, 5])
def test_steps_at_test_time(name, steps, pair2d):
    fixed, moving = pair2d
    method = build(name)
    with torch.no_grad():
        res = method(fixed, moving, steps=steps, return_states=True)
    assert res.info["steps"] == steps and len(res.states) == steps and res.state_steps == list(range(1, steps + 1))
    assert len(res.info["residuals"]) == steps == len(res.trace["residual"])
    assert all(s.shape == res.disp.shape for s in res.states)
    assert torch.equal(res.states[-1], res.disp)  # the result after exactly `steps` steps


@pytest.mark.parametrize("name", ["voxelmorph", "deqreg", "unrolling", "unrolling_ml", "gradirn", "riir"])
def test_forward_3d(name, pair3d):
    fixed, moving = pair3d
    method = build(name, ndim=3)
    with torch.no_grad():
        res = method(fixed, moving, steps=None if name == "voxelmorph" else 2, return_states=True)
    assert res.disp.shape == (1, 3, 16, 16, 16) and torch.isfinite(res.disp).all()
    assert len(res.states) == res.info["steps"] == (1 if name == "voxelmorph" else 2)


def test_voxelmorph_is_one_step(pair2d):
    fixed, moving = pair2d
    method = build("voxelmorph")
    with torch.no_grad():
        assert method(fixed, moving, steps=1).info["steps"] == 1
        with pytest.raises(ValueError, match="one-step"):
            method(fixed, moving, steps=2)


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_inputs(name, pair2d):
    fixed, moving = pair2d
    method = build(name)
    with torch.no_grad():
        for steps in (0, -1, 1.5, True, "3"):
            with pytest.raises(ValueError, match="steps"):
                method(fixed, moving, steps=steps)
        with pytest.raises(ValueError, match="same shape"):
            method(fixed, moving[..., :16])
        with pytest.raises(ValueError, match="one channel"):
            method(fixed.expand(1, 2, 32, 32), moving.expand(1, 2, 32, 32))
        with pytest.raises(ValueError, match="2D method"):
            method(fixed[..., None], moving[..., None])
        with pytest.raises(ValueError, match="NaN"):
            method(fixed, torch.full_like(moving, float("nan")))
    with pytest.raises(ValueError, match="same shape"):
        method.training_step(fixed, moving[..., :16], RegistrationLoss())


def test_odd_sizes_and_batches_work():
    """The U-Nets pad any size to a multiple of 16; a batch of 2 runs per sample."""
    fixed, moving = torch.rand(2, 1, 20, 24), torch.rand(2, 1, 20, 24)
    for name in METHODS:
        with torch.no_grad():
            res = build(name)(fixed, moving)
        assert res.disp.shape == (2, 2, 20, 24)


def test_build_method_errors_and_config_round_trip():
    with pytest.raises(ValueError, match="deqreg12"):
        build_method("elastix", 2)
    with pytest.raises(TypeError, match="max_iter"):
        build_method("deqreg", 2, max_iter=10)
    with pytest.raises(TypeError, match="T"):
        build_method("voxelmorph", 2, T=3)
    with pytest.raises(ValueError, match="ndim"):
        build_method("unrolling", 4)
    for bad in (dict(T=0), dict(S=-1), dict(tau=0.0), dict(solver="newton"), dict(gamma=-1.0), dict(tol=-1.0)):
        with pytest.raises(ValueError):
            DEQReg(2, **bad)
    with pytest.raises(ValueError):
        GraDIRN(2, levels=0)
    for name in METHODS:
        method = build(name, seed=3)
        clone = build_method(method.name, **method.config())
        clone.load_state_dict(method.state_dict())  # same parameters, same shapes
        assert clone.config() == method.config()
    assert deqreg12(2).config()["T"] == 12 and DEQReg12(2).S == 0 and DEQReg12.name == "deqreg12"
    assert DEQReg(2).config() == dict(ndim=2, T=48, S=3, gamma=0.5, K=3, tau=0.5, solver="fixed_point", tol=1e-3,
                                      damping=1.0, jac_weight=0.0, jac_eps=1e-2, leak=0.0,
                                      jac_power=0, jac_target=0.0, checkpoint_phantom=False,
                                      inject_moving=False)
    assert Unrolling(2).T == 3 and RIIR(2).T == 6 and GraDIRN(2).trained_steps == 3


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", list(METHODS))
def test_training_step_gives_gradients(name, pair2d):
    fixed, moving = pair2d
    method = build(name)
    calls = []

    def backward(loss):
        calls.append(float(loss.detach()))
        loss.backward()

    out = method.training_step(fixed, moving, RegistrationLoss(), backward)
    assert all(isinstance(v, float) for v in out.values())
    assert torch.isfinite(torch.tensor(out["loss"])) and out["loss"] == pytest.approx(sum(calls), rel=1e-5)
    assert len(calls) == (1 + method.S if isinstance(method, DEQReg) else 1)
    for pname, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert first_conv(method).grad.abs().sum() > 0
    if name == "gradirn":
        assert method.rho.grad.abs().sum() > 0


def test_deqreg_training_step_equals_eq9_correction_loss(pair2d):
    """One term at a time, through the trainer's backward, gives the gradients of Eq. 9 as one scalar."""
    fixed, moving = pair2d
    method = build("deqreg", T=6, S=2, tol=0.0)
    loss_fn = RegistrationLoss()
    out = method.training_step(fixed, moving, loss_fn)
    ours = [p.grad.clone() for p in method.parameters()]
    method.zero_grad()
    deq = DEQ(solver="fixed_point", max_iter=6, tol=0.0, K=3, tau=0.5, n_states=2)
    z, states, _ = deq(method.update_map(fixed, moving), torch.zeros(1, 2, 32, 32))
    total = correction_loss(lambda d: loss_fn(fixed, moving, d), z, states, gamma=0.5)
    total.backward()
    assert out["loss"] == pytest.approx(float(total.detach()), rel=1e-5)
    for a, p in zip(ours, method.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-9 + 1e-4 * float(p.grad.abs().max()))


def test_scaled_backward_scales_gradients(pair2d):
    fixed, moving = pair2d
    grads = []
    for scale in (1.0, 4.0):
        method = build("deqreg")
        method.training_step(fixed, moving, RegistrationLoss(), lambda loss: (scale * loss).backward())
        grads.append(first_conv(method).grad)
    assert torch.allclose(grads[1], 4 * grads[0], rtol=1e-4)


@pytest.mark.parametrize("name", ["voxelmorph", "unrolling", "unrolling_ml"])
def test_a_few_adamw_steps_lower_the_loss(name, pair2d):
    fixed, moving = pair2d
    method = build(name)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        losses.append(method.training_step(fixed, moving, RegistrationLoss())["loss"])
        opt.step()
    assert min(losses[-3:]) < losses[0] - 0.01


# ------------------------------------------------------------------------------------------------ DEQReg
def test_deqreg_steps_are_plain_fixed_point_iterations(pair2d):
    fixed, moving = pair2d
    method = build("deqreg", T=5)
    g = method.update_map(fixed, moving)
    with torch.no_grad():
        phi = torch.zeros(1, 2, 32, 32)
        for _ in range(3):
            phi = g(phi)
        res = method(fixed, moving, steps=3)
    assert torch.equal(res.disp, phi) and res.info["nfe"] == 3 and not res.info["converged"]
    # with grad on, the value is the same and the phantom gradient is attached
    res_grad = method(fixed, moving, steps=3)
    assert res_grad.disp.requires_grad and torch.equal(res_grad.disp.detach(), phi)
    res_grad.disp.square().sum().backward()
    assert first_conv(method).grad.abs().sum() > 0


def test_deqreg_residuals_are_the_solvers_trace(pair2d):
    fixed, moving = pair2d
    method = build("deqreg", T=4)
    deq = DEQ(solver="fixed_point", max_iter=4, tol=1e-3)
    with torch.no_grad():
        _, _, info = deq(method.update_map(fixed, moving), torch.zeros(1, 2, 32, 32))
        res = method(fixed, moving, return_states=True)
    assert res.info["residuals"] == info.rel_trace and res.info["nfe"] == info.nfe == len(res.states)


def test_deqreg_anderson_runs_exactly_the_steps_asked(pair2d):
    fixed, moving = pair2d
    method = build("deqreg", solver="anderson")
    with torch.no_grad():
        res = method(fixed, moving, steps=7, return_states=True)
    assert res.info["steps"] == res.info["nfe"] == len(res.states) == 7 and res.info["solver"] == "anderson"
    assert torch.equal(res.states[-1], res.disp)


def test_similarity_gradient_methods_under_no_grad(pair2d):
    fixed, moving = pair2d
    for method in (build("gradirn"), build("riir")):
        with torch.no_grad():
            res = method(fixed, moving, steps=3)
        assert torch.isfinite(res.disp).all() and not res.disp.requires_grad
        assert all(p.grad is None for p in method.parameters())
    # GraDIRN's gradient step moves the field even with an untrained (near-zero) network
    assert build("gradirn")(fixed, moving).disp.abs().max() > 0.1


# -------------------------------------------------------------------------------------------- memory
def saved(name, pair, **kwargs):
    fixed, moving = pair
    method = build(name, **kwargs)
    with SavedBytes() as mem:
        method.training_step(fixed, moving, RegistrationLoss())
    return mem


def test_deqreg_memory_is_flat_in_T_and_in_S(pair2d):
    short, long = (saved("deqreg", pair2d, T=T, S=S, tol=0.0) for T, S in ((4, 0), (24, 0)))
    assert short.total == long.total > 0 and short.peak == long.peak > 0
    s3 = saved("deqreg", pair2d, T=8, S=3, tol=0.0)
    # S = 3 builds four K-step graphs (4x the bytes saved in all) but one at a time: the same peak as S = 0
    assert s3.total == pytest.approx(4 * short.total, rel=0.02)
    assert s3.peak <= 1.05 * short.peak


def test_unrolling_memory_grows_with_T(pair2d):
    b2, b4, b8 = (saved("unrolling", pair2d, T=T).peak for T in (2, 4, 8))
    assert b2 < b4 < b8 and (b8 - b4) == pytest.approx(2 * (b4 - b2), rel=0.05)


# ---------------------------------------------------------------------------------------------- the loss
def test_registration_loss(pair2d):
    fixed, moving = pair2d
    disp = torch.randn(1, 2, 32, 32) * 0.5
    for lam in (0.1, 1.0):
        expected = 1 - lncc(fixed, warp(moving, disp), win=5) + lam * diffusion(disp)
        assert torch.allclose(RegistrationLoss(lam=lam)(fixed, moving, disp), expected)
    assert RegistrationLoss().lam == 1.0
    for bad in (dict(lam=-1.0), dict(win=4), dict(dice_weight=-0.5)):
        with pytest.raises(ValueError):
            RegistrationLoss(**bad)
    p = synthetic_pair((32, 32), seed=1, n_labels=4)
    plain = RegistrationLoss()
    assert plain.with_segs(p["fixed_seg"], p["moving_seg"]) is plain
    with_dice = RegistrationLoss(dice_weight=1.0).with_segs(p["fixed_seg"], p["moving_seg"])
    zero = torch.zeros(1, 2, 32, 32, requires_grad=True)
    value = with_dice(p["fixed"], p["moving"], zero)
    base = float(plain(p["fixed"], p["moving"], zero).detach())
    assert base < float(value.detach()) < base + 1
    value.backward()
    assert zero.grad.abs().sum() > 0


def test_riir_weights_are_the_papers_unnormalised_w_t():
    """Eq. 4's ``w_t = 10**((t-1)/(T-1))`` as the paper gives them, from 1 to 10 (they used to be normalised to sum
    to 1)."""
    w = riir_weights(6)
    assert w == pytest.approx([10 ** (k / 5) for k in range(6)]) and w[0] == 1.0 and w[-1] == pytest.approx(10.0)
    assert sum(w) == pytest.approx(25.3874, rel=1e-4) and riir_weights(1) == [1.0]
    with pytest.raises(ValueError, match="T"):
        riir_weights(0)


@pytest.mark.parametrize("T", [1, 3])
def test_riir_training_step_is_eq4_by_hand(T, pair2d):
    """``training_step``'s loss is ``L(phi_T) + sum_t w_t L(phi_t)``, recomputed here from the states of a forward
    pass (same weights, same pair), and its gradients are that scalar's. Before issue 10 it was
    ``sum_t w_t L(phi_t) / sum_t w_t``: for T = 3 about 4.6x smaller (w = 1, 3.16, 10 over 14.16, no L(phi_T))."""
    fixed, moving = pair2d
    method = build("riir", T=T)
    torch.nn.init.normal_(method.head.weight, std=0.1)  # steps that move: per-step losses that differ
    loss_fn = RegistrationLoss()
    out = method.training_step(fixed, moving, loss_fn)
    ours = [p.grad.clone() for p in method.parameters()]
    method.zero_grad()
    _, phis, _ = method._iterate(fixed, moving, T, keep=True)  # phi_1 .. phi_T with their graph
    assert len(phis) == T
    w = [10.0 ** ((t - 1) / (T - 1)) if T > 1 else 1.0 for t in range(1, T + 1)]
    losses = [loss_fn(fixed, moving, p) for p in phis]
    if T > 1:  # so that a wrong weighting (reversed, uniform) would show
        assert max(abs(float(a.detach() - b.detach())) for a, b in zip(losses, losses[1:])) > 1e-3
    by_hand = losses[-1] + sum(wt * lt for wt, lt in zip(w, losses))
    assert out["loss"] == pytest.approx(float(by_hand.detach()), rel=1e-6)
    assert out["loss_final"] == pytest.approx(float(losses[-1].detach()), rel=1e-6)
    by_hand.backward()
    for a, p in zip(ours, method.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-5, atol=1e-12 + 1e-5 * float(p.grad.abs().max()))
    old_loss = sum(wt * float(lt.detach()) for wt, lt in zip(w, losses)) / sum(w)
    assert out["loss"] > 1.9 * old_loss  # the old normalised sum is not what is computed
