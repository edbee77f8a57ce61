"""Classical gradient-descent registration (Eq. 2) on a pair with a known deformation."""
import pytest
import torch

from conftest import smooth_field
from deqreg_lite.classical import RegistrationDivergedError, register
from deqreg_lite.metrics import dice, folding_percent
from deqreg_lite.warp import integrate_velocity, warp


@pytest.fixture(scope="module")
def pair():
    gen = torch.Generator().manual_seed(1)
    shape = (64, 64)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = ((yy - 32) ** 2 + (xx - 32) ** 2).sqrt()
    seg = (r < 22).long() + (r < 12).long()  # two nested discs: labels 1 and 2
    image = torch.tensor([0.0, 0.5, 1.0])[seg].float()[None, None]
    image = torch.nn.functional.avg_pool2d(image, 3, 1, 1)
    disp = integrate_velocity(smooth_field(shape, 2.5, gen, coarse=4).float())
    moving = warp(image, disp)
    moving_seg = warp(seg[None, None], disp, mode="nearest")
    return image, moving, seg[None, None], moving_seg


@pytest.mark.parametrize("optimizer,lr", [("adam", None), ("gd", None)])
def test_register_lowers_energy_and_raises_dice(pair, optimizer, lr):
    fixed, moving, fixed_seg, moving_seg = pair
    result = register(fixed, moving, lam=1.0, iterations=80, optimizer=optimizer, lr=lr, device="cpu")
    e = result.trace["energy"]
    assert len(e) == 80 and e[-1] < e[0] - 0.05
    assert set(result.trace) == {"energy", "similarity", "regulariser"}
    before = dice(fixed_seg, moving_seg, [1, 2]).mean()
    after = dice(fixed_seg, warp(moving_seg, result.disp, mode="nearest"), [1, 2]).mean()
    assert after > before + 0.03
    assert folding_percent(result.disp).item() < 0.5
    assert result.disp.shape == (1, 2, 64, 64) and result.time > 0


def test_gd_is_eq2(pair):
    """One plain GD step equals disp - lr * N * dE/ddisp, by hand."""
    from deqreg_lite.losses import Objective

    fixed, moving = pair[0], pair[1]
    result = register(fixed, moving, lam=0.5, iterations=1, optimizer="gd", lr=0.1, device="cpu")
    zero = torch.zeros(1, 2, 64, 64)
    grad = Objective("lncc", "diffusion", 0.5).grad(fixed, moving, zero)
    assert torch.allclose(result.disp, -0.1 * 64 * 64 * grad, atol=1e-6)


def test_multires_records_states_and_calls_back(pair):
    fixed, moving = pair[0], pair[1]
    seen = []
    result = register(fixed, moving, iterations=[10, 10], levels=2, record_every=5, device="cpu",
                      callback=lambda it, d, terms: seen.append((it, d.shape, terms["energy"])))
    assert len(result.trace["energy"]) == 20 and len(seen) == 20
    assert seen[0][1] == (1, 2, 32, 32) and seen[-1][1] == (1, 2, 64, 64)
    assert result.state_steps == [0, 5, 10] and len(result.states) == 3
    assert result.info["iterations"] == [10, 10]
    assert torch.equal(result.warp(moving), warp(moving, result.disp))


def test_three_d_runs():
    gen = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 16, 16, 16, generator=gen)
    moving = warp(fixed, smooth_field((16, 16, 16), 1.0, gen, coarse=3).float())
    result = register(fixed, moving, iterations=5, device="cpu")
    assert result.disp.shape == (1, 3, 16, 16, 16)
    assert result.trace["energy"][-1] < result.trace["energy"][0]


def test_divergence_and_bad_inputs(pair):
    fixed, moving = pair[0], pair[1]
    with pytest.raises(RegistrationDivergedError, match="lower lr"):
        register(fixed, moving, optimizer="gd", lr=1e4, iterations=50, device="cpu")
    with pytest.raises(ValueError, match="optimizer"):
        register(fixed, moving, optimizer="sgd")
    with pytest.raises(ValueError, match="same shape"):
        register(fixed, moving[..., :-1])
    with pytest.raises(ValueError, match="NaN"):
        register(fixed, torch.full_like(moving, float("nan")))
    with pytest.raises(ValueError, match="iterations"):
        register(fixed, moving, iterations=[5], levels=2)
    with pytest.raises(TypeError):
        register(fixed, moving, step_size=0.1)


@pytest.mark.parametrize("lam", [float("inf"), float("nan"), -1.0])
def test_lam_must_be_finite_and_non_negative(pair, lam):
    """lam=inf used to end in 'energy became nan ... lower lr', which blamed the wrong option."""
    fixed, moving, _, _ = pair
    with pytest.raises(ValueError, match=r"lam must be a finite number >= 0.*got"):
        register(fixed, moving, lam=lam, iterations=1, device="cpu")
    with pytest.raises(TypeError, match="lam must be a number"):
        register(fixed, moving, lam="1", iterations=1, device="cpu")


@pytest.mark.parametrize("shape", [(1, 32), (32, 1), (1, 16, 16)])
def test_a_one_voxel_axis_is_rejected(shape):
    """It used to come back silently with a displacement of the wrong shape ((1, 2, 2, 32) for a (1, 32) image)."""
    img = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="at least 2 voxels"):
        register(img, img, iterations=1, device="cpu")


def test_register_dtypes_float64_stays_float64_and_others_warn():
    """Two float64 images register in float64; uint8, int and float16 images are converted with a warning that says
    how to normalise (they used to be converted silently)."""
    import warnings as _w

    from deqreg_lite.datasets.synthetic import synthetic_pair

    p = synthetic_pair((24, 24), seed=0, strength=1.0)
    f, m = p["fixed"], p["moving"]
    res64 = register(f.double(), m.double(), iterations=5, device="cpu")
    res32 = register(f, m, iterations=5, device="cpu")
    assert res64.disp.dtype == torch.float64 and res32.disp.dtype == torch.float32
    assert float((res64.disp - res32.disp.double()).abs().max()) < 1e-3
    for bad in ((f * 255).round().to(torch.uint8), (f * 255).round().to(torch.int64), f.half()):
        with pytest.warns(UserWarning, match="converted to float32"):
            register(bad, bad, iterations=1, device="cpu")
    with _w.catch_warnings():
        _w.simplefilter("error")
        register(f, m, iterations=1, device="cpu")
