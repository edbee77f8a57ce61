"""CUDA: every shipped method gives the CPU's displacement on a GPU, AMP training steps stay finite, and the
trainer's bf16 and fp16 modes match float32 (loss and gradient direction), record their mode and resume with it.

Skipped without CUDA (CI and the developers' machines have none). Run on a GPU machine with the project on
``PYTHONPATH``: ``python -m pytest tests/test_cuda.py``. TF32 is switched off for the comparison, so the GPU computes
in true float32 like the CPU; the criterion is 0.05 voxel (issue 8).
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from deqreg_lite import load_sample  # noqa: E402
from deqreg_lite.datasets.synthetic import synthetic_pair  # noqa: E402
from deqreg_lite.losses import Objective  # noqa: E402
from deqreg_lite.methods import METHODS, build_method  # noqa: E402
from deqreg_lite.pretrained import PRETRAINED, load_pretrained  # noqa: E402

TOL_VOXELS = 0.05


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_cuda_matches_cpu(name):
    sample = load_sample("brain2d")
    fixed, moving = sample["fixed"], sample["moving"]
    with torch.no_grad():
        cpu = load_pretrained(name)(fixed, moving).disp
        gpu = load_pretrained(name, device="cuda")(fixed.cuda(), moving.cuda()).disp.cpu()
    err = float((cpu - gpu).abs().max())
    assert err <= TOL_VOXELS, f"{name}: CUDA and CPU displacements differ by {err:.4f} voxel"


@pytest.mark.parametrize("name", list(METHODS))
def test_amp_training_step_gives_finite_gradients(name):
    torch.manual_seed(0)
    pair = synthetic_pair((64, 64), seed=3, strength=1.5)
    fixed, moving = pair["fixed"].cuda(), pair["moving"].cuda()
    method = build_method(name, 2).cuda().train()
    loss_fn = Objective("lncc", "diffusion", lam=1.0).energy
    scaler = torch.amp.GradScaler("cuda")

    def backward(loss):
        with torch.autocast("cuda", enabled=False):
            scaler.scale(loss).backward()

    optimizer = torch.optim.AdamW(method.parameters())
    for _ in range(4):  # a float16 overflow at the initial loss scale is normal: the scaler lowers it and retries
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            stats = method.training_step(fixed, moving, loss_fn, backward=backward)
        scaler.unscale_(optimizer)
        grads = [p.grad for p in method.parameters() if p.requires_grad]
        if all(g is not None and torch.isfinite(g).all() for g in grads):
            break
        scaler.update()
    assert torch.isfinite(torch.as_tensor(float(stats["loss"])))
    assert grads and all(g is not None for g in grads), f"{name}: a parameter got no gradient"
    assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradients under AMP after 4 tries"
    assert any(float(g.abs().max()) > 0 for g in grads), f"{name}: all gradients are zero"


# ---------------------------------------------------------------------------------------------------------------
# the trainer's amp modes on a GPU (issue 12): bf16 (no scaler) and fp16 (GradScaler) steps, against float32
# ---------------------------------------------------------------------------------------------------------------
DEVICE = "cuda"
#: a bf16 / fp16 step's loss against float32's (TF32 off), relative; the CPU's bf16 test holds 1e-3 (tests/test_amp.py),
#: measured 3e-5 to 1.2e-4 there. GPU kernels order their sums differently: twice that here.
AMP_LOSS_RTOL = 2e-3


def _amp_method(name, head_std=0.5):
    """A small 2D ``name`` whose U-Net heads give an O(1)-voxel displacement (the near-zero default init would make
    every precision agree)."""
    from deqreg_lite.config import seed_everything
    from deqreg_lite.nets import UNet

    seed_everything(0)
    method = build_method(name, 2, **({"T": 6, "S": 1, "K": 2, "tol": 0.0} if name == "deqreg" else {}))
    for mod in method.modules():
        if isinstance(mod, UNet):
            torch.nn.init.normal_(mod.head.weight, std=head_std)
    return method


def test_auto_amp_is_bf16_where_the_gpu_supports_it():
    from deqreg_lite.train import resolve_amp

    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        native = torch.cuda.is_bf16_supported()
    assert resolve_amp("auto", DEVICE) == ("bf16" if native else "fp16")
    assert resolve_amp(True, DEVICE) == resolve_amp("auto", DEVICE)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["voxelmorph", "deqreg"])
def test_trainer_amp_steps_match_float32(name, mode):
    import torch.nn.functional as F

    from deqreg_lite import train as tr
    from deqreg_lite.config import seed_everything

    pair = synthetic_pair((64, 64), seed=3, strength=1.5)
    batch = {"fixed": pair["fixed"], "moving": pair["moving"]}
    method = _amp_method(name)
    out = {}
    for amp in ("off", mode):
        trainer = tr.Trainer(method, Objective("lncc", "diffusion", lam=1.0), batch, amp=amp, device=DEVICE,
                             progress=False)
        assert trainer.amp_mode == amp and (trainer.scaler is not None) == (amp == "fp16")
        if trainer.scaler is not None:  # no overflow at the first scale: this compares precision, not the scaler
            trainer.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
        seed_everything(0)
        stats = trainer._forward_backward(batch)
        if trainer.scaler is not None:
            trainer.scaler.unscale_(trainer.optimizer)  # the gradients as float32 would give them
        grads = [p.grad for p in method.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name} {amp}: non-finite gradients"
        out[amp] = stats["loss"], torch.cat([g.flatten() for g in grads]).float()
    (loss32, grad32), (loss_amp, grad_amp) = out["off"], out[mode]
    assert loss_amp == pytest.approx(loss32, rel=AMP_LOSS_RTOL), f"{name} {mode}: {loss_amp} vs float32 {loss32}"
    cos = float(F.cosine_similarity(grad32, grad_amp, dim=0))
    assert cos > 0.99, f"{name} {mode}: gradient cosine {cos:.4f} against float32"


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_trainer_amp_fit_records_the_mode_and_resumes(mode, tmp_path):
    from deqreg_lite import train as tr
    from deqreg_lite.config import seed_everything
    from deqreg_lite.datasets import brain_pairs

    data = brain_pairs("train", 4, (64, 64))
    common = dict(iterations=4, log_every=1, checkpoint_dir=tmp_path, device=DEVICE, progress=False, lr=1e-3,
                  amp=mode)
    seed_everything(0)
    trainer = tr.Trainer(_amp_method("voxelmorph", head_std=1e-5), Objective("lncc", "diffusion", lam=1.0), data,
                         **common)
    trainer.fit(until=2)
    ckpt = tr.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["trainer"]["amp_mode"] == mode
    assert (ckpt.get("scaler") is not None) == (mode == "fp16")  # bf16 needs no GradScaler
    seed_everything(0)
    resumed = tr.Trainer(_amp_method("voxelmorph", head_std=1e-5), Objective("lncc", "diffusion", lam=1.0), data,
                         **common).resume()
    assert resumed.amp_mode == mode
    history = resumed.fit()
    losses = [r["loss"] for r in history if r["split"] == "train"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert tr.load_checkpoint(tmp_path / "last.pt")["trainer"]["amp_mode"] == mode
