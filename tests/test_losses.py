"""lncc against a naive sliding-window loop; diffusion, mse; Objective energy and grad."""
import itertools

import numpy as np
import pytest
import torch

from conftest import smooth_field, smooth_image
from deqreg_lite.losses import LNCC, LNCC_EPS, Diffusion, Objective, diffusion, lncc, mse


def naive_lncc_map(a: np.ndarray, b: np.ndarray, win: int, eps: float) -> np.ndarray:
    """Correlation in every window, zero padding, each local variance floored by ``eps`` times the image's global
    variance (+ 1e-6 of its mean square), written as plainly as possible."""
    r = win // 2
    pa, pb = np.pad(a, r), np.pad(b, r)
    fa = eps * (a.var() + 1e-6 * (a * a).mean())
    fb = eps * (b.var() + 1e-6 * (b * b).mean())
    out = np.zeros_like(a)
    for idx in itertools.product(*[range(s) for s in a.shape]):
        sl = tuple(slice(i, i + win) for i in idx)
        wa, wb = pa[sl].ravel(), pb[sl].ravel()
        cov = (wa * wb).mean() - wa.mean() * wb.mean()
        va = max((wa * wa).mean() - wa.mean() ** 2, 0.0)
        vb = max((wb * wb).mean() - wb.mean() ** 2, 0.0)
        out[idx] = np.clip(cov / np.sqrt((va + fa) * (vb + fb)), -1, 1)
    return out


@pytest.mark.parametrize("shape,win", [((12, 15), 5), ((12, 15), 3), ((7, 8, 9), 5)])
def test_lncc_matches_naive_loop(shape, win, rng):
    a = smooth_image(shape, rng)
    b = 0.6 * a + 0.4 * smooth_image(shape, rng)
    ours = lncc(a, b, win=win, reduction="none")[0, 0].numpy()
    ref = naive_lncc_map(a[0, 0].numpy(), b[0, 0].numpy(), win, LNCC_EPS)
    np.testing.assert_allclose(ours, ref, atol=1e-8)
    assert abs(lncc(a, b, win=win).item() - ref.mean()) < 1e-8


def test_lncc_sign_and_range(rng):
    a = smooth_image((20, 20), rng)
    assert lncc(a, a).item() == pytest.approx(1.0, abs=1e-4)
    assert lncc(a, -a).item() == pytest.approx(-1.0, abs=1e-3)
    # invariant to affine intensity changes away from the zero-padded border
    inner = lncc(a, 2 * a + 3, reduction="none")[..., 2:-2, 2:-2]
    assert inner.min().item() == pytest.approx(1.0, abs=1e-3)
    b = smooth_image((20, 20), rng)
    assert -1 <= lncc(a, b).item() <= 1
    assert lncc(a, b).item() < lncc(a, a).item()


def test_lncc_eps_is_relative_to_the_image_variance(rng):
    """The floor scales with each image: a uniform intensity scale changes nothing (was: an absolute 1e-8)."""
    a = smooth_image((16, 18), rng)
    b = 0.5 * a + 0.5 * smooth_image((16, 18), rng)
    for c in (1e-6, 1e-3, 1e3):
        np.testing.assert_allclose(lncc(c * a, b, reduction="none"), lncc(a, b, reduction="none"), atol=1e-12)
    assert LNCC().eps == LNCC_EPS == 1e-5
    # a larger floor lowers |cc| where the local variance is small, never raises it
    assert (lncc(a, b, eps=0.2, reduction="none").abs() <= lncc(a, b, reduction="none").abs() + 1e-15).all()


def test_lncc_finite_on_flat_patches(rng):
    flat = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    b = smooth_image((16, 16), rng).requires_grad_(True)
    value = lncc(flat, b)
    value.backward()
    assert torch.isfinite(value) and value.item() == 0.0
    assert torch.isfinite(b.grad).all()
    assert lncc(flat, flat).item() == 0.0
    half = smooth_image((16, 16), rng)
    half[..., :8] = 0.5  # a flat region next to texture
    assert torch.isfinite(lncc(half, b.detach(), reduction="none")).all()


def test_mse_and_diffusion_against_numpy(rng):
    a, b = smooth_image((9, 10), rng), smooth_image((9, 10), rng)
    assert mse(a, b).item() == pytest.approx(((a - b) ** 2).mean().item())
    disp = smooth_field((9, 10, 11), 2.0, rng)
    d = disp.numpy()
    ref = np.mean([np.mean(np.diff(d, axis=ax) ** 2) for ax in (2, 3, 4)])
    assert diffusion(disp).item() == pytest.approx(ref, rel=1e-12)
    assert diffusion(torch.full((1, 2, 5, 6), 3.0)).item() == 0.0  # translations cost nothing
    assert Diffusion()(disp).item() == diffusion(disp).item()
    assert LNCC(win=5)(a, b).item() == lncc(a, b).item()


@pytest.mark.parametrize("similarity", ["lncc", "mse"])
def test_objective_grad_matches_finite_differences(similarity, rng):
    fixed = smooth_image((10, 11), rng)
    moving = smooth_image((10, 11), rng)
    disp = smooth_field((10, 11), 0.7, rng)
    obj = Objective(similarity, "diffusion", lam=0.5)
    g = obj.grad(fixed, moving, disp)
    direction = torch.randn(disp.shape, generator=rng, dtype=torch.float64)
    h = 1e-6
    fd = (obj.energy(fixed, moving, disp + h * direction) - obj.energy(fixed, moving, disp - h * direction)) / (2 * h)
    assert (g * direction).sum().item() == pytest.approx(fd.item(), rel=1e-5)


def test_objective_terms_and_no_grad(rng):
    fixed, moving = smooth_image((10, 11), rng), smooth_image((10, 11), rng)
    disp = smooth_field((10, 11), 0.7, rng)
    obj = Objective(lam=2.0)
    energy, sim, reg = obj.terms(fixed, moving, disp)
    assert energy.item() == pytest.approx(sim.item() + 2.0 * reg.item())
    assert sim.item() == pytest.approx(1 - lncc(fixed, __import__("deqreg_lite").warp.warp(moving, disp)).item())
    with torch.no_grad():
        g = obj.grad(fixed, moving, disp)
    assert g.shape == disp.shape and not g.requires_grad
    # create_graph gives a differentiable gradient (second order through grid_sample)
    d = disp.clone().requires_grad_(True)
    g2 = obj.grad(fixed, moving, d, create_graph=True)
    assert g2.requires_grad
    g2.square().sum().backward()
    assert torch.isfinite(d.grad).all()
    custom = Objective(lambda f, w: (f - w).abs().mean(), lambda d: d.square().mean(), lam=0.1)
    assert torch.isfinite(custom.energy(fixed, moving, disp))
    assert "lncc" in repr(obj)


def test_bad_inputs_raise(rng):
    a = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        lncc(a, torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="odd"):
        lncc(a, a, win=4)
    with pytest.raises(ValueError, match="NaN"):
        lncc(a, torch.full_like(a, float("nan")))
    for eps in (0.0, -1e-5, float("inf"), "1e-5"):
        with pytest.raises(ValueError, match="eps"):
            lncc(a, a, eps=eps)
    with pytest.raises(ValueError, match="similarity"):
        Objective("ncc")
    with pytest.raises(ValueError, match="lam"):
        Objective(lam=-1)
    with pytest.raises(TypeError):
        Objective(lamda=1.0)
    with pytest.raises(ValueError, match="same shape"):
        Objective().energy(a, torch.rand(1, 1, 8, 9), torch.zeros(1, 2, 8, 8))
