"""CUDA: every shipped method gives the CPU's displacement on a GPU, and AMP training steps stay finite.

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
