"""Mixed precision in the trainer: the amp modes, bfloat16 autocast on the CPU for every method, the loss of a bf16
step against float32's, and the mode in checkpoints and on resume. (CUDA bf16 / fp16 steps: tests/test_cuda.py.)"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from deqreg_lite import train as tr
from deqreg_lite.config import seed_everything
from deqreg_lite.datasets import brain_pairs
from deqreg_lite.datasets.synthetic import synthetic_pair
from deqreg_lite.losses import Objective
from deqreg_lite.methods import METHODS, build_method
from deqreg_lite.nets import UNet

#: A bf16 training step's loss must match float32's to this relative tolerance (a quarter of bfloat16's unit
#: roundoff, 2**-8 = 3.9e-3). Measured on this file's cases: 3.3e-5 (VoxelMorph 2D 32x32), 3.9e-5 (3D 16^3), 1.2e-4
#: (DEQReg 2D 32x32). Before warp sampled a bfloat16 displacement in float32: 1.5e-3 and 1.2e-3 for VoxelMorph.
LOSS_RTOL = 1e-3
#: ... and the gradients point the same way: cosine similarity of all parameter gradients (measured >= 0.9997).
GRAD_COS = 0.99
#: Small, fast settings (CPU bf16 convolutions are slow without bfloat16 units); the paper's in the method's defaults.
FAST = {"deqreg": dict(T=6, S=1, K=2, tol=0.0), "deqreg12": dict(T=4)}


def _loss():
    return Objective("lncc", "diffusion", lam=1.0)


def _pair(spatial):
    if len(spatial) == 2:
        p = synthetic_pair(spatial, seed=3, strength=1.5)
        return p["fixed"], p["moving"]
    gen = torch.Generator().manual_seed(0)

    def img():
        return F.interpolate(torch.rand(1, 1, *[s // 4 for s in spatial], generator=gen), size=spatial,
                             mode="trilinear", align_corners=True)
    return img(), img()


def _method(name, ndim, head_std=0.5):
    """``name`` with the last convolution of every U-Net scaled up, so the untrained displacement is O(1) voxel
    (the default near-zero init would make any precision agree)."""
    seed_everything(0)
    m = build_method(name, ndim, **FAST.get(name, {}))
    for mod in m.modules():
        if isinstance(mod, UNet):
            torch.nn.init.normal_(mod.head.weight, std=head_std)
    return m


# ---------------------------------------------------------------------------------------------------------------
# the modes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp", [False, None, "off"])
def test_off_values(amp):
    assert tr.resolve_amp(amp, "cpu") == "off"


@pytest.mark.parametrize("bad", ["bogus", "BF16", "float16", "bfloat16", 1, 0, "", "on"])
def test_unknown_values_are_rejected_with_the_choices(bad):
    with pytest.raises(ValueError) as e:
        tr.resolve_amp(bad, "cpu")
    assert all(c in str(e.value) for c in tr.AMP_CHOICES)
    with pytest.raises(ValueError, match="amp must be one of"):
        tr.Trainer(build_method("voxelmorph", 2), _loss(), brain_pairs("train", 1, (32, 32)), amp=bad,
                   device="cpu", progress=False)


def test_cpu_modes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tr.resolve_amp("auto", "cpu") == "off"  # auto: float32 on the CPU, silently
        assert tr.resolve_amp("bf16", "cpu") == "bf16"
    with pytest.warns(UserWarning, match="fp16.*float32"):
        assert tr.resolve_amp("fp16", "cpu") == "off"
    with pytest.warns(UserWarning, match="amp=True needs a CUDA device"):
        assert tr.resolve_amp(True, "cpu") == "off"


@pytest.mark.parametrize("native", [True, False])
def test_cuda_modes(native, monkeypatch):
    """The CUDA choices, with the GPU's bf16 support faked (no GPU needed: only the decision is tested)."""
    monkeypatch.setattr(tr, "_cuda_bf16", lambda device: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a fake GPU")
    want = "bf16" if native else "fp16"
    assert tr.resolve_amp("auto", "cuda") == want and tr.resolve_amp(True, "cuda:0") == want
    assert tr.resolve_amp("fp16", "cuda") == "fp16" and tr.resolve_amp("off", "cuda") == "off"
    if native:
        assert tr.resolve_amp("bf16", "cuda") == "bf16"
    else:
        with pytest.warns(UserWarning, match="emulated"):
            assert tr.resolve_amp("bf16", "cuda") == "bf16"


def test_trainer_attributes_on_the_cpu():
    data = brain_pairs("train", 1, (32, 32))
    t = tr.Trainer(build_method("voxelmorph", 2), _loss(), data, amp="bf16", device="cpu", progress=False)
    assert (t.amp_mode, t.amp, t.scaler) == ("bf16", True, None)
    assert t.options()["amp_mode"] == "bf16" and t.options()["amp"] is True
    t = tr.Trainer(build_method("voxelmorph", 2), _loss(), data, device="cpu", progress=False)
    assert (t.amp_mode, t.amp, t.scaler) == ("off", False, None)  # the default is unchanged: float32


# ---------------------------------------------------------------------------------------------------------------
# bf16 against float32 on the CPU
# ---------------------------------------------------------------------------------------------------------------
def _trainer_step(method, fixed, moving, amp):
    t = tr.Trainer(method, _loss(), {"fixed": fixed, "moving": moving}, amp=amp, device="cpu", progress=False)
    seed_everything(0)
    stats = t._forward_backward({"fixed": fixed, "moving": moving})
    grad = torch.cat([p.grad.flatten() for p in method.parameters() if p.grad is not None])
    return stats["loss"], grad


@pytest.mark.parametrize("name, spatial", [("voxelmorph", (32, 32)), ("voxelmorph", (16, 16, 16)),
                                           ("deqreg", (32, 32))])
def test_bf16_step_matches_float32(name, spatial):
    fixed, moving = _pair(spatial)
    method = _method(name, len(spatial))
    with torch.no_grad():
        assert float(method(fixed, moving).disp.abs().max()) > 0.3  # a displacement that moves the image
    loss32, grad32 = _trainer_step(method, fixed, moving, "off")
    loss16, grad16 = _trainer_step(method, fixed, moving, "bf16")
    assert grad16.dtype == torch.float32 and torch.isfinite(grad16).all()
    assert loss16 == pytest.approx(loss32, rel=LOSS_RTOL), f"{name}: bf16 loss {loss16} vs float32 {loss32}"
    cos = float(F.cosine_similarity(grad32, grad16, dim=0))
    assert cos > GRAD_COS, f"{name}: gradient cosine {cos:.4f}"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_under_cpu_bf16_autocast(name):
    """grid_sample, LNCC, the RIIR GRU, GraDIRN's similarity gradients, DEQReg's phantom steps: finite loss and
    gradients, and every parameter gets one."""
    fixed, moving = _pair((32, 32))
    method = _method(name, 2, head_std=0.05).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = method.training_step(fixed, moving, _loss(), backward=torch.Tensor.backward)
    assert torch.isfinite(torch.tensor(float(stats["loss"])))
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_warp_samples_a_half_precision_displacement_in_float32():
    """A bfloat16 identity grid rounds positions by up to 0.25 voxel at 128 voxels; warp must not use one."""
    from deqreg_lite.warp import warp

    image = torch.linspace(0, 1, 128).view(1, 1, 1, 128).expand(1, 1, 4, 128).contiguous()
    disp = torch.zeros(1, 2, 4, 128, dtype=torch.bfloat16)
    out = warp(image, disp)
    assert out.dtype == torch.float32 and torch.equal(out, warp(image, disp.float()))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------
def test_checkpoint_records_the_mode_and_resume_keeps_it(tmp_path):
    data = brain_pairs("train", 3, (32, 32))
    common = dict(iterations=4, checkpoint_dir=tmp_path / "run", device="cpu", progress=False, lr=1e-3)

    def trainer(**kw):
        seed_everything(0)
        return tr.Trainer(build_method("voxelmorph", 2), _loss(), data, **{**common, **kw})

    straight = trainer(amp="bf16", checkpoint_dir=tmp_path / "straight")
    straight.fit()
    first = trainer(amp="bf16")
    first.fit(until=2)
    ckpt = tr.load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["trainer"]["amp_mode"] == "bf16" and ckpt["trainer"]["amp"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same mode: no warning
        resumed = trainer(amp="bf16").resume()
    assert resumed.amp_mode == "bf16"
    resumed.fit()
    assert tr.load_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["amp_mode"] == "bf16"
    # bf16 on the CPU is deterministic: 2 + resume + 2 equals 4 straight, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(resumed.method.parameters(), straight.method.parameters()))
    with pytest.warns(UserWarning, match="amp='bf16'.*amp='off'"):
        trainer(amp="off").resume()


def test_old_checkpoints_read_as_float32_or_fp16():
    assert tr._checkpoint_amp({"amp": False}) == "off" and tr._checkpoint_amp({"amp": True}) == "fp16"
    assert tr._checkpoint_amp({"amp": True, "amp_mode": "bf16"}) == "bf16"
    assert tr._checkpoint_amp(None) is None and tr._checkpoint_amp({}) is None
