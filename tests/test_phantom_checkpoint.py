"""Activation checkpointing of the phantom steps (issue 12): ``phantom(..., checkpoint=True)``, ``DEQ(checkpoint=)``,
``DEQReg(checkpoint_phantom=)``: the same values and gradients, less memory saved for backward, and the option's
validation and round trip through configs and checkpoints.

Gradient tolerance: relative 1e-6 of each parameter gradient's largest entry, float32 (float64 where stated). On the
CPU the two paths run the same operations in the same order, and the gradients came out bitwise equal.
"""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deqreg_lite.deq import DEQ, LazyState, correction_backward, correction_loss, phantom
from deqreg_lite.evaluate import training_memory
from deqreg_lite.losses import Objective
from deqreg_lite.memory import SavedBytes, recompute_context
from deqreg_lite.methods import DEQReg, DEQReg12, RegistrationLoss, RegistrationMethod, build_method
from deqreg_lite.train import save_checkpoint
from deqreg_lite.warp import warp

RTOL = 1e-6


def assert_grads_close(a, b, rtol=RTOL):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x is not None and y is not None
        scale = float(y.abs().max())
        assert float((x - y).abs().max()) <= rtol * max(scale, 1e-30), (float((x - y).abs().max()), scale)


class ConvMap(nn.Module):
    """z -> a z + conv([z, image o z]): a small update map that closes over an image and a network, like DEQReg's
    (``a = 1``, a residual update); ``a = 0.5`` makes it a contraction, as the IFT backward solve needs."""

    def __init__(self, ndim=2, size=12, batch=2, dtype=torch.float32, dropout=0.0, a=1.0):
        super().__init__()
        self.a = a
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        gen = torch.Generator().manual_seed(0)
        self.image = torch.rand(batch, 1, *[size] * ndim, generator=gen, dtype=dtype)
        self.net = nn.Sequential(conv(ndim + 1, 8, 3, padding=1), nn.Tanh(), nn.Dropout(dropout),
                                 conv(8, ndim, 3, padding=1)).to(dtype)

    def forward(self, z):
        return self.a * z + 0.1 * self.net(torch.cat([z, warp(self.image, z)], 1))


def grads_of(module):
    out = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return out


# ------------------------------------------------------------------------------------------------ phantom
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("K, tau", [(1, 0.5), (3, 0.5), (3, 1.0)])
def test_phantom_checkpoint_gives_the_same_value_and_gradients(ndim, K, tau):
    f = ConvMap(ndim, size=10 if ndim == 3 else 16, batch=2)
    z = 0.3 * torch.randn(2, ndim, *[10 if ndim == 3 else 16] * ndim, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for ck in (False, True):
        out = phantom(f, z, K, tau, checkpoint=ck)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(grads_of(f))
    assert torch.equal(outs[0], outs[1])
    assert_grads_close(grads[1], grads[0])


def test_phantom_checkpoint_under_no_grad_is_the_plain_steps():
    f = ConvMap()
    z = torch.zeros(2, 2, 12, 12)
    with torch.no_grad():
        a, b = phantom(f, z, 3, 0.5), phantom(f, z, 3, 0.5, checkpoint=True)
    assert torch.equal(a, b) and not b.requires_grad


def test_checkpointed_steps_are_recomputed_with_the_same_random_numbers():
    """Dropout inside the map: the recomputation restores the RNG state, so the gradient is the unchecked one's
    (DEQReg's U-Net itself has no dropout and no batch norm: nothing random, no running statistics)."""
    f = ConvMap(dropout=0.3).train()
    z = 0.2 * torch.randn(2, 2, 12, 12, generator=torch.Generator().manual_seed(2))
    grads = []
    for ck in (False, True):
        torch.manual_seed(5)
        phantom(f, z, 3, 0.5, checkpoint=ck).square().mean().backward()
        grads.append(grads_of(f))
    assert_grads_close(grads[1], grads[0])
    unet = DEQReg(2).net
    assert not any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase))
                   for m in unet.modules())


def test_saved_bytes_count_what_a_checkpoint_recomputes():
    x = torch.rand(1000, requires_grad=True)  # 4000 bytes per float32 tensor

    def chain(v):
        for _ in range(3):
            v = torch.tanh(v)  # tanh saves its output
        return v

    with SavedBytes() as mem:
        y = checkpoint(chain, x, use_reentrant=False, context_fn=recompute_context)
        assert mem.now == 4000  # the input only
        y.sum().backward()
    assert mem.peak == 4000 + 3 * 4000 and mem.now <= 4000  # the three recomputed outputs were counted
    with SavedBytes() as blind:  # without the context, the recomputation is invisible to the hooks
        checkpoint(chain, x, use_reentrant=False).sum().backward()
    assert blind.peak == 4000
    checkpoint(chain, x, use_reentrant=False, context_fn=recompute_context).sum().backward()  # no counter: fine


def test_phantom_checkpoint_keeps_one_step_of_activations():
    f = ConvMap(batch=1, size=32)
    z = torch.zeros(1, 2, 32, 32)

    def peak(K, ck):
        with SavedBytes() as mem:
            phantom(f, z, K, 0.5, checkpoint=ck).square().mean().backward()
        f.zero_grad()
        return mem.peak

    plain3, plain1, ck3 = peak(3, False), peak(1, False), peak(3, True)
    assert ck3 < 0.6 * plain3
    assert ck3 >= 0.9 * plain1  # the recomputed step's activations are counted: one step's, at least


# ------------------------------------------------------------------------------------------------ DEQ
@pytest.mark.parametrize("grad", ["phantom", "ift"])
@pytest.mark.parametrize("lazy", [False, True])
def test_deq_checkpoint_gives_the_same_gradients(grad, lazy):
    f = ConvMap(dtype=torch.float64, a=0.5)
    loss = lambda d: d.square().mean()  # noqa: E731
    results = []
    for ck in (False, True):
        z, states, info = DEQ(grad=grad, max_iter=10, tol=0.0, K=2, tau=0.5, n_states=2, lazy_states=lazy,
                              checkpoint=ck)(f, torch.zeros(2, 2, 12, 12, dtype=torch.float64))
        if lazy:
            assert all(isinstance(s, LazyState) and s.checkpoint is ck for s in states)
            value = correction_backward(loss, z, states)
        else:
            value = correction_loss(loss, z, states)
            value.backward()
        results.append((float(value.detach()), z.detach(), grads_of(f), info.grad_nfe))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert results[0][3] == results[1][3]
    assert_grads_close(results[1][2], results[0][2])


def test_deq_checkpoint_with_a_gradient_inside_the_map():
    """A GraDIRN-style map computes a similarity gradient inside itself (autograd.grad with create_graph)."""
    gen = torch.Generator().manual_seed(0)
    img = nn.functional.avg_pool2d(torch.rand(1, 1, 12, 12, generator=gen), 3, 1, 1)
    moving = warp(img, torch.full((1, 2, 12, 12), 0.4))
    objective, conv = Objective("mse", lam=0.05), nn.Conv2d(2, 2, 3, padding=1)

    def f(z):
        g = objective.grad(img, moving, z, create_graph=torch.is_grad_enabled())
        return 0.5 * z + 0.2 - 100.0 * g + conv(z)

    grads = []
    for ck in (False, True):
        z, states, _ = DEQ(max_iter=8, tol=0.0, n_states=1, checkpoint=ck)(f, torch.zeros(1, 2, 12, 12))
        correction_loss(lambda d: objective.energy(img, moving, d), z, states).backward()
        grads.append(grads_of(conv))
    assert_grads_close(grads[1], grads[0])


def test_deq_checkpoint_under_no_grad_attaches_nothing():
    f = ConvMap()
    with torch.no_grad():
        a, sa, _ = DEQ(max_iter=5, tol=0.0, n_states=2)(f, torch.zeros(2, 2, 12, 12))
        b, sb, info = DEQ(max_iter=5, tol=0.0, n_states=2, checkpoint=True)(f, torch.zeros(2, 2, 12, 12))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa, sb)) and info.grad_nfe == 0
    assert not b.requires_grad


def test_bad_checkpoint_options_raise():
    for bad in (1, 0, "yes", None, 1.0):
        with pytest.raises(ValueError, match="checkpoint"):
            DEQ(checkpoint=bad)
        with pytest.raises(ValueError, match="checkpoint"):
            phantom(lambda z: z, torch.zeros(1, 2), 1, 0.5, checkpoint=bad)
        with pytest.raises(ValueError, match="checkpoint"):
            LazyState(lambda z: z, torch.zeros(1, 2), 3, 1, 0.5, checkpoint=bad)
        with pytest.raises(ValueError, match="checkpoint_phantom"):
            DEQReg(2, checkpoint_phantom=bad)
        with pytest.raises(ValueError, match="checkpoint_phantom"):
            DEQReg12(2, checkpoint_phantom=bad)
    with pytest.raises(ValueError, match="bptt"):
        DEQ(grad="bptt", checkpoint=True)
    with pytest.raises(ValueError, match="torchdeq"):
        DEQ(backend="torchdeq", checkpoint=True)
    assert "checkpoint=True" in repr(DEQ(checkpoint=True)) and "checkpoint" not in repr(DEQ())


# ------------------------------------------------------------------------------------------------ DEQReg
def make_pair(ndim, batch=2, dtype=torch.float32):
    spatial = (20, 16) if ndim == 2 else (10, 8, 12)
    gen = torch.Generator().manual_seed(3)
    pool = nn.functional.avg_pool2d if ndim == 2 else nn.functional.avg_pool3d
    return tuple(pool(torch.rand(batch, 1, *spatial, generator=gen, dtype=dtype), 3, 1, 1) for _ in range(2))


def train_once(ndim, ck, tau, dtype=torch.float32, name="deqreg", **options):
    fixed, moving = make_pair(ndim, dtype=dtype)
    torch.manual_seed(0)
    method = build_method(name, ndim, T=5, K=3, tau=tau, tol=0.0, checkpoint_phantom=ck, **options).to(dtype)
    out = method.training_step(fixed, moving, RegistrationLoss())
    return out, grads_of(method)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_deqreg_training_step_same_values_and_gradients(ndim, tau):
    plain, g_plain = train_once(ndim, False, tau, S=2)
    ck, g_ck = train_once(ndim, True, tau, S=2)
    assert ck == plain  # every returned float identical
    assert_grads_close(g_ck, g_plain)


def test_deqreg_training_step_float64_and_deqreg12():
    plain, g_plain = train_once(2, False, 0.5, dtype=torch.float64)
    ck, g_ck = train_once(2, True, 0.5, dtype=torch.float64)
    assert ck == plain
    assert_grads_close(g_ck, g_plain, rtol=1e-12)
    plain, g_plain = train_once(2, False, 0.5, name="deqreg12")
    ck, g_ck = train_once(2, True, 0.5, name="deqreg12")
    assert ck == plain
    assert_grads_close(g_ck, g_plain)


def test_deqreg_forward_with_grad_on_attaches_the_same_gradient():
    fixed, moving = make_pair(2)
    outs = []
    for ck in (False, True):
        torch.manual_seed(0)
        method = DEQReg(2, T=4, K=2, tol=0.0, checkpoint_phantom=ck)
        disp = method(fixed, moving).disp
        disp.square().mean().backward()
        outs.append((disp.detach(), grads_of(method)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert_grads_close(outs[1][1], outs[0][1])


@pytest.mark.parametrize("ndim", [2, 3])
def test_deqreg_checkpoint_saves_less_for_backward(ndim):
    fixed, moving = make_pair(ndim, batch=1)
    peaks = {}
    for key, options in (("plain", dict(checkpoint_phantom=False)), ("ckpt", dict(checkpoint_phantom=True)),
                         ("vxm", None)):
        torch.manual_seed(0)
        method = build_method("voxelmorph", ndim) if options is None else \
            build_method("deqreg", ndim, T=3, S=2, K=3, tol=0.0, **options)
        peaks[key] = training_memory(method, fixed, moving, RegistrationLoss(), kind="saved")
    assert peaks["ckpt"] < 0.6 * peaks["plain"]
    assert peaks["ckpt"] <= 1.5 * peaks["vxm"]  # the goal, here at a toy size


def test_checkpoint_phantom_is_in_the_config_and_round_trips(tmp_path):
    method = DEQReg(2, T=3, checkpoint_phantom=True)
    assert method.config()["checkpoint_phantom"] is True and method.deq.checkpoint is True
    assert DEQReg(2).config()["checkpoint_phantom"] is False
    path = save_checkpoint(tmp_path / "ck.pt", method, rng=False)
    again = RegistrationMethod.from_checkpoint(path)
    assert again.checkpoint_phantom is True and again.config() == method.config()
    assert RegistrationMethod.from_checkpoint(path, checkpoint_phantom=False).checkpoint_phantom is False
    # a checkpoint saved before the option existed: its config lacks it, and it loads with the default (off)
    old = torch.load(path, weights_only=True)
    del old["config"]["checkpoint_phantom"]
    torch.save(old, tmp_path / "old.pt")
    assert RegistrationMethod.from_checkpoint(tmp_path / "old.pt").checkpoint_phantom is False
