"""The shipped test set of real unseen brains (data/samples/brain2d_test.npz), its loader, and the builder's pure
functions (data/build_test_brains.py) on phantoms, without downloads."""
import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deqreg_lite.datasets import TEST_PAIR_KEYS, load_sample, sample_path, unseen_brain_pairs

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (160, 192)
TRAINING_IDS = {"mni152_2009a", "dipy_t1"}


@pytest.fixture(scope="module")
def data():
    with np.load(sample_path("brain2d_test"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_test_brains", ROOT / "data" / "build_test_brains.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_test_brains", module)
    spec.loader.exec_module(module)
    return module


def unit_slice(img: np.ndarray) -> np.ndarray:
    """A slice cropped to its non-zero bounding box and resized to 160 x 192 (as the builders do), float."""
    rows, cols = np.nonzero(img > 0)
    sub = torch.from_numpy(img[rows.min():rows.max() + 1, cols.min():cols.max() + 1].astype(np.float32))
    return F.interpolate(sub[None, None], size=SHAPE, mode="bilinear", align_corners=False)[0, 0].numpy()


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------------------------------------------- stored arrays
def test_file_shapes_dtypes_and_labels(data):
    n_s, n_p = data["images"].shape[:2]
    assert data["images"].shape == (n_s, n_p, *SHAPE) and data["images"].dtype == np.uint8
    assert data["segs"].shape == data["images"].shape and data["segs"].dtype == np.uint8
    assert data["masks"].shape == data["images"].shape and data["masks"].dtype == bool
    assert data["spacing"].shape == (n_s, n_p, 2) and np.all((data["spacing"] > 0.5) & (data["spacing"] < 1.5))
    assert data["labels"].tolist() == [1, 2, 3] and data["label_names"].tolist() == ["CSF", "GM", "WM"]
    for s, p in itertools.product(range(n_s), range(n_p)):
        seg = data["segs"][s, p]
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}
        assert np.array_equal(seg > 0, data["masks"][s, p])  # labelled exactly inside the brain mask
        img = data["images"][s, p].astype(np.float32) / 255.0
        # the labels follow the intensities: CSF darkest, WM brightest
        means = [img[seg == k].mean() for k in (1, 2, 3)]
        assert means[0] < means[1] < means[2]


def test_slices_are_brains_with_background(data):
    images, masks = data["images"].astype(np.float32) / 255.0, data["masks"]
    frac = masks.mean(axis=(2, 3))
    assert np.all((frac > 0.4) & (frac < 0.85)), frac  # a brain filling its bounding box, background around it
    for img, m in zip(images.reshape(-1, *SHAPE), masks.reshape(-1, *SHAPE)):
        assert img.max() > 0.95  # scaled by the 99.5th percentile, then clipped (and resized)
        assert img[m].mean() > 0.4 and img[~m].mean() < 0.02  # skull-stripped: nothing outside the brain


def test_subjects_pairs_and_planes(data):
    subjects = data["subjects"].tolist()
    n_s, n_p = data["images"].shape[:2]
    assert len(subjects) == n_s >= 3 and len(set(subjects)) == n_s
    assert not TRAINING_IDS & set(subjects)
    assert len(data["sources"]) == len(data["brain_masks"]) == n_s
    pairs = [tuple(r) for r in data["pairs"].tolist()]
    assert len(pairs) >= 20 and len(set(pairs)) == len(pairs)
    assert all(f != m for _, f, m in pairs)  # no pair within one subject
    assert set(pairs) == {(p, f, m) for p in range(n_p) for f in range(n_s) for m in range(n_s) if f != m}
    for s in range(n_s):  # planes of one subject at least 10 mm apart, inside the brain, posterior to anterior
        assert np.all(np.diff(data["plane_mm"][s]) >= 10.0), data["plane_mm"][s]
        assert np.all(np.diff(data["plane_index"][s]) >= 10)
        assert np.all((data["plane_fraction"][s] > 0.3) & (data["plane_fraction"][s] < 0.7))
        assert np.allclose(data["plane_fraction"][s], data["fractions"], atol=0.01)  # matched planes


def test_test_subjects_are_not_the_training_subjects(data):
    """No test slice equals or closely correlates with brain2d's slices or any coronal slice of the template."""
    tests = [unit_slice(img.astype(np.float32)) for img in data["images"].reshape(-1, *SHAPE)]
    brain2d = load_sample("brain2d")
    training = [unit_slice(brain2d[k][0, 0].numpy()) for k in ("fixed", "moving")]
    template = load_sample("brain3d")["fixed"][0, 0].numpy()  # axis 0: posterior -> anterior coronal slices
    training += [unit_slice(sl) for sl in template if (sl > 0.05).sum() > 1500]
    assert len(training) > 50
    worst = max(corr(t, r) for t in tests for r in training)
    assert worst < 0.98, worst
    # and the test subjects are three different brains: no two slices of different subjects are near-identical
    n_s, n_p = data["images"].shape[:2]
    by = np.array(tests).reshape(n_s, n_p, -1)
    cross = max(corr(by[a, p], by[b, p]) for p in range(n_p) for a in range(n_s) for b in range(a + 1, n_s))
    assert cross < 0.98, cross


# ------------------------------------------------------------------------------------------------------- loader
def test_loader_items_match_the_sample_dicts():
    items = unseen_brain_pairs()
    assert len(items) == 30
    names = set()
    for it in items:
        assert set(it) == set(TEST_PAIR_KEYS)
        for k in ("fixed", "moving"):
            assert it[k].shape == (1, 1, *SHAPE) and it[k].dtype == torch.float32
            assert 0.0 <= float(it[k].min()) and float(it[k].max()) <= 1.0
        for k in ("fixed_seg", "moving_seg"):
            assert it[k].shape == (1, 1, *SHAPE) and it[k].dtype == torch.int64
        for k in ("fixed_mask", "moving_mask"):
            assert it[k].shape == (1, 1, *SHAPE) and it[k].dtype == torch.bool
        assert it["labels"] == [1, 2, 3] and it["label_names"] == {1: "CSF", 2: "GM", 3: "WM"}
        assert it["fixed_subject"] != it["moving_subject"]
        assert it["ids"] == (f"{it['fixed_subject']}_p{it['plane']}", f"{it['moving_subject']}_p{it['plane']}")
        assert len(it["spacing"]) == 2 and all(isinstance(v, float) for v in it["spacing"])
        names.add(it["name"])
    assert len(names) == len(items)
    small = unseen_brain_pairs(size=(80, 96))
    assert small[0]["fixed"].shape == (1, 1, 80, 96) and small[0]["fixed_seg"].dtype == torch.int64
    assert small[0]["spacing"] == pytest.approx(tuple(2 * v for v in items[0]["spacing"]))


def test_load_sample_points_to_the_loader():
    with pytest.raises(ValueError, match="unseen_brain_pairs"):
        load_sample("brain2d_test")


def test_loader_missing_file_says_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQREG_SAMPLES_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="build_test_brains.py"):
        unseen_brain_pairs()


def test_evaluate_runs_on_test_pairs():
    from deqreg_lite.evaluate import evaluate
    from deqreg_lite.methods import identity_method
    from deqreg_lite.pretrained import load_pretrained

    items = unseen_brain_pairs()[:2]
    ident = evaluate(identity_method, items, memory=False)
    vxm = evaluate(load_pretrained("voxelmorph"), items, memory=False)
    for table in (ident, vxm):
        assert len(table) == 2
        for row in table.rows:
            assert 0.0 < row["dice"] < 1.0 and np.isfinite(row["hd95"]) and np.isfinite(row["sdlogj"])
    assert [r["pair"] for r in ident.rows] == [f"{it['ids'][1]}->{it['ids'][0]}" for it in items]
    assert all(r["folding_pct"] == 0.0 for r in ident.rows)


# ----------------------------------------------------------------------------- builder functions on phantoms
def head_phantom(n: int = 72, seed: int = 0):
    """A 'head': a brain sphere (radius 22: 'white matter' 100 inside radius 17, 'grey matter' 70 around it, a dark
    'ventricle' 30 inside radius 5) and a brighter scalp shell (150, radius 26 to 29) around it, separated by a dark
    gap; mild noise. Returns (volume, brain, shell, radius)."""
    grid = np.indices((n, n, n)).astype(np.float32) - (n - 1) / 2.0
    r = np.sqrt((grid ** 2).sum(axis=0))
    brain = r <= 22.0
    shell = (r >= 26.0) & (r <= 29.0)
    vol = np.select([r <= 5.0, r <= 17.0, brain, shell], [30.0, 100.0, 70.0, 150.0], 0.0)
    vol = vol + np.random.default_rng(seed).normal(0.0, 3.0, vol.shape)
    return np.clip(vol, 0.0, None).astype(np.float32), brain, shell, r


def test_extract_brain_keeps_the_brain_and_drops_the_shell(builder):
    vol, brain, shell, r = head_phantom()
    mask = builder.extract_brain(vol)
    assert builder.mask_dice(mask, brain) > 0.93
    assert not np.any(mask & ~brain) and r[brain & ~mask].min() > 20.0  # at most a partial-volume rim is lost
    assert not np.any(mask & shell)  # no scalp
    assert mask[36, 36, 36]  # the enclosed dark ventricle is inside


def test_plane_indices_and_pairs(builder):
    _, brain, _, _ = head_phantom()
    idx, first, last = builder.plane_indices(brain)
    ys = np.nonzero(brain.any(axis=(0, 2)))[0]
    assert (first, last) == (ys[0], ys[-1])
    assert np.all(np.diff(idx) >= 3) and idx[0] > first and idx[-1] < last
    assert np.allclose((idx - first) / (last - first), builder.FRACTIONS, atol=0.5 / (last - first) + 1e-9)
    pairs = builder.ordered_pairs(3, 5)
    assert len(pairs) == 30 and np.all(pairs[:, 1] != pairs[:, 2])


def test_make_slice_crops_scales_and_labels_by_intensity(builder):
    yy, xx = np.indices((120, 110)) - np.array([60.0, 55.0])[:, None, None]
    r = np.sqrt(yy ** 2 + (xx * 1.2) ** 2)
    img = np.select([r < 12, r < 30, r < 45], [20.0, 120.0, 70.0], 0.0).astype(np.float32)  # CSF, WM, GM rings
    out = builder.make_slice(img, r < 45)
    assert out["image"].shape == SHAPE and out["image"].dtype == np.uint8 and out["image"].max() == 255
    seg = out["seg"]
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3} and np.array_equal(seg > 0, out["mask"])
    assert seg[80, 96] == 1 and seg[80, 96 + 50] == 3 and seg[80, 96 + 78] == 2  # centre CSF, ring WM, rim GM
    assert out["spacing"] == pytest.approx([(90 + 2 * 4) / 160, (2 * 45 / 1.2 + 2 * 4) / 192], rel=0.05)


def test_bias_field_removes_a_linear_gradient_and_keeps_tissue_contrast(builder):
    # a brain of concentric classes: ventricle (CSF) / white matter / grey matter / sulcal CSF
    n = 64
    r = np.sqrt(((np.indices((n, n, n)) - (n - 1) / 2.0) ** 2).sum(axis=0))
    brain = r <= 22.0
    vol = np.select([r <= 7.0, r <= 15.0, r <= 20.0, brain], [30.0, 100.0, 70.0, 30.0], 0.0)
    vol = (vol + np.random.default_rng(1).normal(0.0, 2.0, vol.shape)).clip(1.0, None).astype(np.float32)
    flat = builder.bias_field(vol, brain)  # no bias: no field (the concentric layout is not taken for one)
    assert np.all(np.abs(flat[brain] - 1.0) < 0.03) and np.all(flat[~brain] == 1.0)
    ramp = np.exp(0.5 * (np.indices(vol.shape)[2] - 31.5) / 31.5).astype(np.float32)  # x1.4 across the brain
    field = builder.bias_field(vol * ramp, brain)
    assert np.corrcoef(np.log(field[brain]), np.log(ramp[brain]))[0, 1] > 0.999
    ratio = (vol * ramp / field)[brain] / vol[brain]
    assert ratio.std() / ratio.mean() < 0.01  # the corrected volume is the original up to a constant


def test_symmetry_angles_undo_a_known_yaw_and_roll(builder):
    n = 64
    grid = np.indices((n, n, n)).astype(np.float32) - (n - 1) / 2.0
    x, y, z = grid
    body = ((x / 22) ** 2 + (y / 27) ** 2 + (z / 20) ** 2) <= 1.0
    vol = np.where(body, 100.0, 0.0)
    for sx in (-1, 1):  # mirror-symmetric in x, but not in y or z
        vol[((x - sx * 9) ** 2 + (y - 10) ** 2 + (z - 4) ** 2) <= 25] = 30.0
        vol[((x - sx * 12) ** 2 + (y + 12) ** 2 + (z + 6) ** 2) <= 16] = 160.0
    vol = vol.astype(np.float32)
    centre = np.full(3, (n - 1) / 2.0)
    turned = builder.resample_rotated(vol, builder.rotation(7.0, -5.0), centre, vol.shape)
    mask = builder.resample_rotated(body.astype(np.float32), builder.rotation(7.0, -5.0), centre, vol.shape) > 0.5
    yaw, roll = builder.symmetry_angles(turned, mask)
    # turned(c + R(yaw, roll) u) = vol(c + R(7, -5) R(yaw, roll) u): symmetric again for about R(-7, 5)
    assert abs(yaw + 7.0) <= 1.5 and abs(roll - 5.0) <= 1.5, (yaw, roll)
