"""Inputs outside the contract get a clear error (never a silent wrong number); missing structures score as failures.

Issue 8: missing structures in HD95, mask shapes, keypoints, image range and dtype for the learned methods and the
pretrained wrapper, and loaders given 0..255 volumes.
"""
from __future__ import annotations

import math

import pytest
import torch

from deqreg_lite.datasets.synthetic import synthetic_pair
from deqreg_lite.evaluate import pair_metrics
from deqreg_lite.methods import METHODS, RegistrationLoss, build_method
from deqreg_lite.metrics import folding_percent, hd95, max_distance, sd_log_jacobian, tre
from deqreg_lite.pretrained import HalfResolution

SMALL = {"voxelmorph": {}, "unrolling": {"T": 2}, "unrolling_ml": {"levels": 2, "steps_per_level": 2},
         "gradirn": {"levels": 2, "steps_per_level": 2},
         "riir": {"T": 2}, "deqreg": {"T": 3, "S": 1}, "deqreg12": {"T": 2}}


# ------------------------------------------------------------------------------------------- missing structures
def _segs():
    fixed = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    fixed[..., 4:12, 4:12] = 1
    fixed[..., 16:28, 8:20] = 2
    shifted = fixed.clone()
    shifted[fixed == 2] = 0
    shifted[..., 16:28, 15:27] = 2  # structure 2 off by 7 voxels (HD95 7 mm)
    wiped = fixed.clone()
    wiped[fixed == 2] = 0  # structure 2 wiped out
    return fixed, shifted, wiped


def test_wiping_out_a_structure_scores_worse_than_missing_it_by_7mm():
    """Before: the wiped-out structure was NaN, nanmean skipped it, and the pair's HD95 went from 3.5 to 0 mm."""
    fixed, shifted, wiped = _segs()
    assert hd95(fixed, shifted, [1, 2]).tolist() == [[0.0, 7.0]]
    worst = max_distance((32, 32))
    assert worst == pytest.approx(31 * math.sqrt(2))
    assert hd95(fixed, wiped, [1, 2])[0].tolist() == pytest.approx([0.0, worst])
    assert hd95(wiped, fixed, [1, 2])[0].tolist() == pytest.approx([0.0, worst])  # symmetric
    assert hd95(fixed, wiped, [1, 2], spacing=(2.0, 0.5))[0, 1].item() == pytest.approx(math.hypot(62, 15.5))
    zero = torch.zeros(1, 2, 32, 32)
    m_shift = pair_metrics({"fixed_seg": fixed, "moving_seg": shifted, "labels": [1, 2]}, zero)
    m_wiped = pair_metrics({"fixed_seg": fixed, "moving_seg": wiped, "labels": [1, 2]}, zero)
    assert m_shift["hd95"] == pytest.approx(3.5)
    assert m_wiped["hd95"] == pytest.approx(worst / 2) and m_wiped["hd95"] > m_shift["hd95"]
    assert m_wiped["dice_2"] == 0.0 and m_wiped["dice"] < m_shift["dice"]
    # a label absent from both maps stays excluded
    m_absent = pair_metrics({"fixed_seg": fixed, "moving_seg": fixed, "labels": [1, 2, 3]}, zero)
    assert m_absent["hd95"] == 0.0 and m_absent["dice"] == 1.0 and math.isnan(m_absent["dice_3"])


# ------------------------------------------------------------------------------------------- mask shapes
def _folding_disp(batch=1):
    disp = torch.zeros(batch, 2, 16, 20)
    disp[:, 1, :, 10:] = -3.0 * torch.arange(10.0)  # folds the right half
    return disp


def test_masks_must_be_b1_spatial():
    """Before: a (B, H, W) mask gave 800% folding here (mask[:, 0] took one row and broadcast)."""
    disp = _folding_disp()
    assert folding_percent(disp, torch.ones(1, 1, 16, 20)).item() == 50.0
    for bad in (torch.ones(1, 16, 20), torch.ones(2, 1, 16, 20), torch.ones(1, 1, 16, 19), torch.ones(1, 2, 16, 20)):
        with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\) = \(1, 1, 16, 20\).*got " +
                           str(tuple(bad.shape)).replace("(", r"\(").replace(")", r"\)")):
            folding_percent(disp, bad)
        with pytest.raises(ValueError, match="mask must have shape"):
            sd_log_jacobian(disp, mask=bad)
    with pytest.raises(TypeError, match="mask"):
        folding_percent(disp, [[1.0]])
    # bool, integer and float masks of the right shape work alike
    m = torch.zeros(1, 1, 16, 20, dtype=torch.bool)
    m[..., 10:] = True
    for mm in (m, m.long(), m.float()):
        assert folding_percent(disp, mm).item() == 100.0
    assert torch.isfinite(sd_log_jacobian(disp, mask=m.float()))


# ------------------------------------------------------------------------------------------- keypoints
def test_tre_rejects_nan_and_outside_keypoints():
    disp = torch.zeros(1, 3, 8, 9, 10)
    kp = torch.tensor([[1.0, 2.0, 3.0], [7.0, 8.0, 9.0], [-0.5, 8.5, 9.5]])
    assert tre(kp, kp, disp).tolist() == [0.0, 0.0, 0.0]  # the corners of the volume are inside
    nan = kp.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"kp_fixed: 1 of 3 keypoints hold NaN"):
        tre(nan, kp, disp)
    with pytest.raises(ValueError, match=r"kp_moving: 1 of 3 keypoints hold NaN"):
        tre(kp, nan, disp)
    out = kp.clone()
    out[0, 0], out[2, 1] = 8.0, -1.0
    with pytest.raises(ValueError, match=r"kp_fixed: 2 of 3 keypoints lie outside the volume \(8, 9, 10\)"):
        tre(out, kp, disp)
    with pytest.raises(ValueError, match=r"\(N, 3\) or \(B, N, 3\)"):
        tre(kp[:, :2], kp[:, :2], disp)


# ------------------------------------------------------------------------------------------- learned methods
@pytest.fixture(scope="module")
def pair2d():
    p = synthetic_pair((16, 16), seed=1, strength=1.0)
    return p["fixed"], p["moving"]


def _build(name):
    torch.manual_seed(0)
    return build_method(name, 2, **SMALL[name])


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_reject_images_outside_unit_range_and_wrong_dtypes(name, pair2d):
    fixed, moving = pair2d
    method = _build(name)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"moving must hold intensities in \[0, 1\].*found values in "
                                             r"\[[\d.]+, [\d.]+\].*min-max.*HU"):
            method(fixed, moving * 255)
        with pytest.raises(ValueError, match=r"fixed must hold intensities.*\[-1000"):
            method(fixed * 1500 - 1000, moving)
        with pytest.raises(ValueError, match=r"fixed must be a floating-point image.*torch.uint8.*\.float\(\)"):
            method((fixed * 255).to(torch.uint8), (moving * 255).to(torch.uint8))
        with pytest.raises(ValueError, match=r"torch.int64.*\.float\(\)"):
            method(fixed, moving.long())
        for dt in (torch.float16, torch.float64):
            with pytest.raises(ValueError, match=rf"fixed has dtype {dt} but the model's parameters are "
                                                 r"torch.float32.*x.to\(torch.float32\)"):
                method(fixed.to(dt), moving.to(dt))
        with pytest.raises(ValueError, match="same dtype|moving has dtype"):
            method(fixed, moving.double())
        # tiny rounding outside [0, 1] is accepted
        res = method((fixed + 5e-4).clamp_max(1.0005), moving - 5e-4)
        assert torch.isfinite(res.disp).all()
    with pytest.raises(ValueError, match=r"intensities in \[0, 1\]"):
        method.training_step(fixed * 255, moving * 255, RegistrationLoss())
    with pytest.raises(ValueError, match="float64"):
        method.training_step(fixed.double(), moving.double(), RegistrationLoss())


@pytest.mark.parametrize("name", ["voxelmorph", "deqreg"])
def test_double_models_take_double_images(name, pair2d):
    fixed, moving = pair2d
    method = _build(name).double()
    with torch.no_grad():
        res = method(fixed.double(), moving.double())
        assert res.disp.dtype == torch.float64
        with pytest.raises(ValueError, match=r"torch.float32 but the model's parameters are torch.float64"):
            method(fixed, moving)


def test_half_resolution_wrapper_checks_before_resampling(pair2d):
    """The load_pretrained wrapper: before, uint8 failed inside F.interpolate and 0..255 registered silently."""
    fixed, moving = pair2d
    torch.manual_seed(0)
    model = HalfResolution(build_method("voxelmorph", 2))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"intensities in \[0, 1\].*found values in \[[\d.]+, 2"):
            model(fixed * 255, moving * 255)
        with pytest.raises(ValueError, match=r"uint8.*\.float\(\)"):
            model((fixed * 255).to(torch.uint8), (moving * 255).to(torch.uint8))
        with pytest.raises(ValueError, match="float64 but the model's parameters are torch.float32"):
            model(fixed.double(), moving.double())
        assert model(fixed, moving).disp.shape == (1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"intensities in \[0, 1\]"):
        model.training_step(fixed * 255, moving * 255, RegistrationLoss())


# ------------------------------------------------------------------------------------------- loaders
def test_sample_images_outside_unit_range_are_rescaled_with_a_warning():
    """samples._image: a non-uint8 array was clamped to [0, 1] (0..255 floats became almost all ones)."""
    import numpy as np

    from deqreg_lite.datasets.samples import _image

    arr = np.linspace(0.0, 255.0, 64, dtype=np.float32).reshape(8, 8)
    with pytest.warns(UserWarning, match=r"my.npz fixed: intensities span \[0, 255\].*rescaled min-max"):
        x = _image(arr, None, "my.npz fixed")
    torch.testing.assert_close(x[0, 0], torch.from_numpy(arr / 255.0))
    assert torch.equal(_image(np.full((4, 4), 1.02, np.float32), None)[0, 0], torch.ones(4, 4))  # overshoot: clip
    assert _image(np.array([[0, 255]], np.uint8), None)[0, 0].tolist() == [[0.0, 1.0]]  # uint8: x / 255
