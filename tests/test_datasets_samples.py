"""The shipped samples (data/samples): contents, ground truth, size budget and error messages."""
import numpy as np
import pytest
import torch

from deqreg_lite.config import samples_dir
from deqreg_lite.datasets import apply_intensity_change, available_samples, load_sample
from deqreg_lite.warp import warp

SHAPES = {"brain2d": (160, 192), "brain3d": (96, 96, 96)}
BUDGET_BYTES = 3_600_000  # "about 3 MB" for the samples, plus the 0.3 MB test set brain2d_test.npz and its licences


def jacobian_det(disp: torch.Tensor) -> np.ndarray:
    """det(I + grad disp) by central differences (numpy.gradient); disp (1, ndim, *spatial) in voxels."""
    d = disp[0].double().cpu().numpy()
    n = d.shape[0]
    grad = np.stack([np.stack(np.gradient(d[i]), 0) for i in range(n)], 0)  # grad[i, j] = d disp_i / d x_j
    jac = grad + np.eye(n).reshape(n, n, *([1] * n))
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


@pytest.fixture(scope="module")
def samples():
    return {name: load_sample(name) for name in SHAPES}


def test_available_samples_lists_all():
    names = available_samples()
    # lung3d: tests/test_datasets_lung.py; brain2d_test: tests/test_datasets_test_brains.py
    assert set(names) == set(SHAPES) | {"lung3d", "brain2d_test"}
    assert all(isinstance(desc, str) and desc for desc in names.values())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_sample_shapes_dtypes_ranges(samples, name):
    s = samples[name]
    shape = SHAPES[name]
    for key in ("fixed", "moving"):
        assert s[key].shape == (1, 1, *shape) and s[key].dtype == torch.float32
        assert float(s[key].min()) >= 0.0 and float(s[key].max()) <= 1.0
        assert float(s[key].max()) > 0.9  # scaled by the 99.5th percentile, then clipped
        assert 0.1 < float((s[key] > 0.05).float().mean()) < 0.9  # a brain, with background around it
    for key in ("fixed_seg", "moving_seg"):
        assert s[key].shape == (1, 1, *shape) and s[key].dtype == torch.int64
        assert set(torch.unique(s[key]).tolist()) == {0, 1, 2, 3}  # every label present in both segs
    assert s["labels"] == [1, 2, 3]
    assert s["label_names"] == {1: "CSF", 2: "GM", 3: "WM"}
    assert isinstance(s["spacing"], tuple) and len(s["spacing"]) == len(shape)
    assert all(isinstance(v, float) and 0.5 < v < 3.0 for v in s["spacing"])
    assert len(s["ids"]) == 2 and all(isinstance(i, str) for i in s["ids"])
    # the label maps follow the images: background where the image is dark, tissue where it is bright
    assert float(s["fixed"][s["fixed_seg"] == 0].mean()) < 0.1
    assert float(s["fixed"][s["fixed_seg"] == 3].mean()) > float(s["fixed"][s["fixed_seg"] == 1].mean())


def test_brain2d_is_an_inter_subject_pair(samples):
    s = samples["brain2d"]
    assert s["ids"] == ("mni152_2009a", "dipy_t1")
    assert "true_disp" not in s
    f, m = s["fixed_seg"][0, 0].numpy(), s["moving_seg"][0, 0].numpy()
    brain_dice = 2 * np.sum((f > 0) & (m > 0)) / (np.sum(f > 0) + np.sum(m > 0))
    assert brain_dice > 0.9  # the bounding-box pre-alignment overlaps the brains
    wm_dice = 2 * np.sum((f == 3) & (m == 3)) / (np.sum(f == 3) + np.sum(m == 3))
    assert 0.3 < wm_dice < 0.95  # comparable anatomy, but a real registration problem
    # superior at the top: the top rows hold less brain than the middle rows
    assert (f[:20] > 0).mean() < (f[70:90] > 0).mean()


def test_brain3d_ground_truth_is_exact(samples):
    s = samples["brain3d"]
    disp = s["true_disp"]
    assert disp.shape == (1, 3, 96, 96, 96) and disp.dtype == torch.float32
    assert 0.5 < float(disp.pow(2).mean().sqrt()) < 5.0
    # moving_seg = warp(fixed_seg, true_disp) exactly
    assert torch.equal(warp(s["fixed_seg"], disp, mode="nearest"), s["moving_seg"])
    # moving = intensity change of warp(fixed, true_disp), up to the uint8 rounding of moving
    warped = warp(s["fixed"], disp)
    rebuilt = apply_intensity_change(warped, **s["intensity_change"])
    assert float((rebuilt - s["moving"]).abs().max()) <= 0.5 / 255 + 1e-5
    # without the (mild) intensity change it is still nearly the same image
    assert np.corrcoef(warped.ravel().numpy(), s["moving"].ravel().numpy())[0, 1] > 0.99
    assert float(jacobian_det(disp).min()) > 0.0  # a diffeomorphism


def test_samples_fit_the_size_budget_and_carry_licences():
    folder = samples_dir()
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < BUDGET_BYTES, f"data/samples holds {total / 1e6:.2f} MB"
    text = (folder / "LICENSES.md").read_text(encoding="utf-8")
    for needle in ("McConnell Brain", "McGill University", "nilearn developers", "dipy developers",
                   "python data/build_samples.py"):
        assert needle in text


def test_load_sample_unknown_name():
    with pytest.raises(ValueError, match="brain2d.*brain3d|brain3d.*brain2d"):
        load_sample("brain4d")


def test_load_sample_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQREG_SAMPLES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="build_samples.py"):
        load_sample("brain2d")


def test_load_sample_rejects_unknown_options():
    with pytest.raises(TypeError):
        load_sample("brain2d", dtype=torch.float64)
