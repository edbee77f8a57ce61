"""Dice, HD95, Jacobian determinant, folding, SDlogJ and TRE on cases with known answers."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from conftest import smooth_field
from deqreg_lite.metrics import dice, folding_percent, hd95, jacobian_det, sample_disp, sd_log_jacobian, tre
from deqreg_lite.warp import identity


def affine_field(a: np.ndarray, shape, shift=0.3):
    x = identity(shape, dtype=torch.float64)
    return torch.einsum("ij,bj...->bi...", torch.as_tensor(a) - torch.eye(len(shape), dtype=torch.float64), x) + shift


@pytest.mark.parametrize("a", [np.array([[1.2, 0.3], [-0.1, 0.9]]), np.array([[0.5, 0.0], [0.0, -1.0]])])
def test_jacobian_det_affine_2d(a):
    jac = jacobian_det(affine_field(a, (12, 14)))
    assert jac.shape == (1, 12, 14)
    assert torch.allclose(jac, torch.full_like(jac, np.linalg.det(a)), atol=1e-12)


def test_jacobian_det_affine_3d():
    a = np.array([[1.1, 0.2, 0.0], [0.05, 0.9, -0.3], [0.1, 0.0, 1.3]])
    jac = jacobian_det(affine_field(a, (6, 7, 8)))
    assert torch.allclose(jac, torch.full_like(jac, np.linalg.det(a)), atol=1e-12)


def test_jacobian_det_channel_order():
    # disp_0 (array axis 0) grows along axis 1 only: a shear, determinant 1; a swap of channels would give 1 too,
    # so use a stretch of axis 0 that depends on axis 0: J = 1 + 0.5
    shape = (8, 9)
    x = identity(shape, dtype=torch.float64)
    disp = torch.zeros(1, 2, *shape, dtype=torch.float64)
    disp[:, 0] = 0.5 * x[:, 0]
    assert torch.allclose(jacobian_det(disp), torch.full((1, *shape), 1.5, dtype=torch.float64))
    disp2 = torch.zeros_like(disp)
    disp2[:, 1] = 0.5 * x[:, 0]  # shear: axis-1 motion grows along axis 0
    assert torch.allclose(jacobian_det(disp2), torch.ones(1, *shape, dtype=torch.float64))


def test_folding_percent():
    disp = affine_field(np.array([[-1.0, 0.0], [0.0, 1.0]]), (10, 10))  # a mirror folds every voxel
    assert folding_percent(disp).item() == 100.0
    assert folding_percent(torch.zeros(2, 2, 10, 10)).tolist() == [0.0, 0.0]
    mask = torch.zeros(1, 1, 10, 10)
    mask[..., :5, :] = 1
    assert folding_percent(disp, mask).item() == 100.0


def test_sd_log_jacobian_conventions(rng):
    a = np.array([[1.3, 0.0], [0.0, 1.0]])
    disp = affine_field(a, (12, 12))
    assert sd_log_jacobian(disp, "plain").item() == pytest.approx(0.0, abs=1e-6)
    assert sd_log_jacobian(disp, "l2r").item() == pytest.approx(0.0, abs=1e-6)
    # Learn2Reg: std(log(clip(J + 3))) over the crop [2:-2], written independently with numpy.gradient
    d = smooth_field((20, 22, 18), 2.0, rng)
    g = [np.gradient(d[0, i].numpy()) for i in range(3)]  # g[i][j] = d disp_i / d x_j
    m = np.stack([np.stack(g[i]) for i in range(3)]) + np.eye(3)[:, :, None, None, None]
    jac = np.linalg.det(np.moveaxis(m, (0, 1), (-2, -1)))
    ref = np.log(np.clip(jac + 3, 1e-9, 1e9))[2:-2, 2:-2, 2:-2].std()
    assert sd_log_jacobian(d, "l2r").item() == pytest.approx(ref, rel=1e-5)
    ref_plain = np.log(np.clip(np.abs(jac), 1e-9, 1e9)).std()
    assert sd_log_jacobian(d, "plain").item() == pytest.approx(ref_plain, rel=1e-5)
    with pytest.raises(ValueError, match="convention"):
        sd_log_jacobian(d, "learn2reg")


def square(shape, lo, hi, label=1):
    s = torch.zeros(1, 1, *shape, dtype=torch.long)
    s[(0, 0) + tuple(slice(a, b) for a, b in zip(lo, hi))] = label
    return s


def test_dice_hand_made():
    a = square((20, 20), (0, 0), (10, 10))  # 100 voxels
    b = square((20, 20), (5, 0), (15, 10))  # 100 voxels, 50 shared
    assert dice(a, b, [1]).tolist() == [[pytest.approx(0.5)]]
    assert dice(a, a, [1]).item() == 1.0
    c = a + 2 * square((20, 20), (12, 12), (14, 14))
    out = dice(c, c, [1, 2, 3])
    assert out.shape == (1, 3)
    assert out[0, :2].tolist() == [1.0, 1.0] and torch.isnan(out[0, 2])  # absent from both: NaN
    assert dice(a, torch.zeros_like(a), [1]).item() == 0.0


def brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    def surface(m):
        pts = []
        for idx in zip(*np.nonzero(m)):
            for ax in range(m.ndim):
                for step in (-1, 1):
                    n = list(idx)
                    n[ax] += step
                    if not (0 <= n[ax] < m.shape[ax]) or not m[tuple(n)]:
                        pts.append(idx)
                        break
                else:
                    continue
                break
        return np.array(sorted(set(pts)), dtype=float) * spacing

    sa, sb = surface(a), surface(b)
    d = cdist(sa, sb)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_single_points_and_brute_force():
    a = square((15, 15), (3, 4), (4, 5))
    b = square((15, 15), (7, 7), (8, 8))
    assert hd95(a, b, [1], spacing=(2.0, 1.0)).item() == pytest.approx(np.hypot(8.0, 3.0))
    rng = np.random.default_rng(0)
    for _ in range(3):
        lo = rng.integers(1, 6, size=3)
        a = square((14, 15, 13), lo, lo + rng.integers(3, 7, size=3))
        lo2 = lo + rng.integers(-2, 3, size=3)
        b = square((14, 15, 13), lo2, lo2 + rng.integers(3, 7, size=3))
        ref = brute_hd95(a[0, 0].numpy() == 1, b[0, 0].numpy() == 1, np.array([1.0, 1.5, 2.0]))
        assert hd95(a, b, [1], spacing=(1.0, 1.5, 2.0)).item() == pytest.approx(ref, rel=1e-6)
    assert hd95(a, a, [1]).item() == 0.0
    assert torch.isnan(hd95(a, a, [2])).all()


def test_tre_known_shift():
    disp = torch.zeros(1, 3, 10, 11, 12)
    disp[:, 0] = 2.0
    disp[:, 2] = -1.0
    kf = torch.tensor([[1.0, 2.0, 3.0], [4.5, 6.0, 7.25]])
    km = kf + torch.tensor([2.0, 0.0, -1.0])
    assert torch.allclose(tre(kf, km, disp, spacing=1.5), torch.zeros(2), atol=1e-6)
    assert torch.allclose(tre(kf, kf, disp, spacing=(1.0, 1.0, 2.0)), torch.full((2,), np.hypot(2.0, 2.0)))
    batched = tre(kf[None].expand(2, -1, -1), km[None].expand(2, -1, -1), disp.expand(2, -1, -1, -1, -1), 1.0)
    assert batched.shape == (2, 2)


def test_sample_disp_interpolates_linearly():
    shape = (9, 10)
    x = identity(shape, dtype=torch.float64)
    disp = 0.1 * x + 1.0  # linear field: interpolation is exact
    pts = torch.tensor([[[2.5, 3.25], [7.0, 0.5]]], dtype=torch.float64)
    assert torch.allclose(sample_disp(disp, pts), 0.1 * pts + 1.0)


def test_bad_inputs():
    a = square((10, 10), (0, 0), (5, 5))
    with pytest.raises(ValueError, match="same shape"):
        dice(a, square((10, 11), (0, 0), (5, 5)), [1])
    with pytest.raises(ValueError, match="integer"):
        dice(a.float(), a.float(), [1])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        hd95(a[0], a[0], [1])
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, [1], spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="NaN"):
        jacobian_det(torch.full((1, 2, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="must match"):
        tre(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(1, 2, 5, 5))
