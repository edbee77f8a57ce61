"""Synthetic data: seeded, SynthMorph-like label maps, diffeomorphic random warps, exact ground truth."""
import numpy as np
import pytest
import torch

from deqreg_lite.datasets import synthetic as syn
from deqreg_lite.warp import warp

SHAPES = [(64, 64), (24, 24, 24)]


def jacobian_det(disp: torch.Tensor) -> np.ndarray:
    """det(I + grad disp) by central differences (numpy.gradient); disp (1, ndim, *spatial) in voxels."""
    d = disp[0].double().cpu().numpy()
    n = d.shape[0]
    grad = np.stack([np.stack(np.gradient(d[i]), 0) for i in range(n)], 0)  # grad[i, j] = d disp_i / d x_j
    jac = grad + np.eye(n).reshape(n, n, *([1] * n))
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


@pytest.mark.parametrize("shape", SHAPES)
def test_label_map_is_seeded_and_rich(shape):
    a = syn.random_label_map(shape, seed=3)
    assert a.shape == (1, 1, *shape) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < 26
    assert len(torch.unique(a)) >= 20
    assert torch.equal(a, syn.random_label_map(shape, seed=3))
    assert not torch.equal(a, syn.random_label_map(shape, seed=4))
    assert torch.equal(a, syn.random_label_map(shape, seed=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("shape", SHAPES)
def test_intensities_are_seeded_in_range_and_follow_labels(shape):
    labels = syn.random_label_map(shape, n_labels=8, seed=0)
    img = syn.random_intensities(labels, seed=1, noise_std=0.0, blur_sigma=0.0, bias_strength=0.0)
    assert img.shape == labels.shape and img.dtype == torch.float32
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    for lab in torch.unique(labels):  # without noise, blur and bias, one intensity per label
        vals = img[labels == lab]
        assert float(vals.max() - vals.min()) < 1e-5
    noisy = syn.random_intensities(labels, seed=1)
    assert torch.equal(noisy, syn.random_intensities(labels, seed=1))
    assert not torch.equal(noisy, syn.random_intensities(labels, seed=2))
    assert float(noisy.min()) >= 0.0 and float(noisy.max()) <= 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_velocity_strength_is_its_rms(shape):
    v = syn.random_velocity(shape, strength=2.5, smoothness=6.0, seed=0, batch=2)
    assert v.shape == (2, len(shape), *shape)
    rms = v.pow(2).mean(dim=tuple(range(1, v.dim()))).sqrt()
    assert torch.allclose(rms, torch.full((2,), 2.5), rtol=1e-4)
    assert not torch.allclose(v[0], v[1])
    assert torch.count_nonzero(syn.random_velocity(shape, strength=0.0, seed=0)) == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_deformation_is_seeded_and_diffeomorphic(shape):
    d = syn.random_deformation(shape, strength=2.0, smoothness=8.0, seed=5)
    assert d.shape == (1, len(shape), *shape) and d.dtype == torch.float32
    assert torch.equal(d, syn.random_deformation(shape, strength=2.0, smoothness=8.0, seed=5))
    assert not torch.equal(d, syn.random_deformation(shape, strength=2.0, smoothness=8.0, seed=6))
    assert 1.0 < float(d.pow(2).mean().sqrt()) < 3.0
    for seed in range(3):
        d = syn.random_deformation(shape, strength=2.0, smoothness=8.0, seed=seed)
        assert jacobian_det(d).min() > 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_deform_sample_ground_truth_is_exact(shape):
    seg = syn.random_label_map(shape, seed=0)
    img = syn.random_intensities(seg, seed=0)
    out = syn.deform_sample(img, seg, strength=2.0, smoothness=8.0, seed=7)
    assert out.disp.shape == (1, len(shape), *shape)
    assert torch.equal(out.image, warp(img, out.disp))
    assert torch.equal(out.seg, warp(seg, out.disp, mode="nearest"))
    assert out.seg.dtype == torch.int64
    assert not torch.equal(out.seg, seg)
    image_only = syn.deform_sample(img, strength=2.0, smoothness=8.0, seed=7)
    assert image_only.seg is None and torch.equal(image_only.disp, out.disp)


def test_deform_sample_batch_gets_one_field_each():
    img = torch.rand(2, 1, 24, 28, generator=torch.Generator().manual_seed(0))
    out = syn.deform_sample(img, seed=0)
    assert out.image.shape == img.shape and out.disp.shape == (2, 2, 24, 28)
    assert not torch.allclose(out.disp[0], out.disp[1])


@pytest.mark.parametrize("shape", SHAPES)
def test_synthetic_pair(shape):
    s = syn.synthetic_pair(shape, seed=1)
    for key in ("fixed", "moving"):
        assert s[key].shape == (1, 1, *shape) and s[key].dtype == torch.float32
        assert 0.0 <= float(s[key].min()) and float(s[key].max()) <= 1.0
    for key in ("fixed_seg", "moving_seg"):
        assert s[key].shape == (1, 1, *shape) and s[key].dtype == torch.int64
    assert len(torch.unique(s["fixed_seg"])) >= 20
    assert s["labels"] == list(range(1, 26)) and len(s["label_names"]) == 25
    assert s["spacing"] == (1.0,) * len(shape) and len(s["ids"]) == 2
    assert torch.equal(s["moving_seg"], warp(s["fixed_seg"], s["true_disp"], mode="nearest"))
    assert not torch.equal(s["fixed"], s["moving"])
    again = syn.synthetic_pair(shape, seed=1)
    assert all(torch.equal(s[k], again[k]) for k in ("fixed", "moving", "fixed_seg", "moving_seg", "true_disp"))
    other = syn.synthetic_pair(shape, seed=2, mode="independent")
    assert "true_disp" not in other and not torch.equal(other["fixed_seg"], other["moving_seg"])


def test_intensity_change_roundtrip():
    img = torch.rand(1, 1, 16, 18, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(syn.apply_intensity_change(img, 1.0), img)
    out = syn.random_intensity_change(img, seed=3)
    assert torch.equal(out.image, syn.apply_intensity_change(img, out.gamma, out.bias_coarse))
    assert 0.0 <= float(out.image.min()) and float(out.image.max()) <= 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: syn.random_label_map((64,)), "2 .* or 3"),
    (lambda: syn.random_label_map((8, 8, 8, 8)), "2 .* or 3"),
    (lambda: syn.random_label_map((0, 16)), ">= 2"),
    (lambda: syn.random_label_map((16, 16), n_labels=1), "n_labels"),
    (lambda: syn.random_deformation((16, 16), strength=-1.0), "strength"),
    (lambda: syn.random_deformation((16, 16), smoothness=0.0), "smoothness"),
    (lambda: syn.synthetic_pair((16, 16), mode="pairs"), "mode"),
    (lambda: syn.random_intensities(torch.zeros(1, 1, 8, 8)), "integer"),
    (lambda: syn.deform_sample(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9, dtype=torch.int64)), "spatial"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_options_raise_type_error():
    with pytest.raises(TypeError):
        syn.random_label_map((16, 16), n_label=4)
    with pytest.raises(TypeError):
        syn.synthetic_pair((16, 16), 3)  # seed is keyword-only
