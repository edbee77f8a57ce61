import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lookalike import make_l2r_oasis, make_neurite_oasis, write_nifti  # noqa: E402

from deqreg_lite.datasets.oasis import LABEL_PRESETS, OASIS, neurite_split_sizes  # noqa: E402



@pytest.fixture
def l2r(tmp_path):
    return make_l2r_oasis(tmp_path / "OASIS")


@pytest.fixture(scope="module")
def neurite(tmp_path_factory):
    return make_neurite_oasis(tmp_path_factory.mktemp("n") / "neurite-oasis")


def test_l2r_val_pairs_follow_json(l2r):
    ds = OASIS(l2r, split="val", size=None)
    assert len(ds) == 2
    s = ds[0]
    assert s["ids"] == ("OASIS_0395", "OASIS_0396") and ds[1]["ids"] == ("OASIS_0396", "OASIS_0397")
    assert s["fixed"].shape == (1, 1, 12, 14, 10) and s["fixed"].dtype == torch.float32
    assert 0.0 <= float(s["fixed"].min()) and float(s["moving"].max()) <= 1.0  # clipped
    assert s["fixed_seg"].dtype == torch.int64 and s["moving_seg"].shape == (1, 1, 12, 14, 10)
    assert s["fixed_mask"].dtype == torch.bool and s["spacing"] == (1.0, 1.0, 1.0)
    assert s["labels"] == list(range(1, 36))
    raw = np.asanyarray(__import__("nibabel").load(str(l2r / "labelsTr/OASIS_0395_0000.nii.gz")).dataobj)
    assert np.array_equal(s["fixed_seg"][0, 0].numpy(), raw)  # arrays as stored


def test_l2r_train_excludes_val_subjects_and_csv(l2r):
    ds = OASIS(l2r, split="train", size=None)
    assert ds.subjects == [f"OASIS_{i:04d}" for i in (1, 2, 3, 4, 5)]
    assert len(ds) == 4 and [p[0]["id"] for p in ds.pairs][:2] == ["OASIS_0001", "OASIS_0002"]
    assert all(not s.startswith("OASIS_039") for p in ds.pairs for s in (p[0]["id"], p[1]["id"]))
    assert len(ds.skipped) == 2 and all(s.endswith(".csv") for s in ds.skipped)
    rnd = OASIS(l2r, split="train", size=None, pairs="random", n_pairs=6, seed=3)
    assert len(rnd) == 6 and all(a["id"] != b["id"] for a, b in rnd.pairs)
    again = OASIS(l2r, split="train", size=None, pairs="random", n_pairs=6, seed=3)
    assert [(a["id"], b["id"]) for a, b in rnd.pairs] == [(a["id"], b["id"]) for a, b in again.pairs]


def test_l2r_test_split_has_only_csv_entries(l2r):
    with pytest.raises(ValueError, match="csv"):
        OASIS(l2r, split="test")


def test_l2r_resize_keeps_integer_labels(l2r):
    ds = OASIS(l2r, split="val", size=(6, 7, 5))
    s = ds[0]
    assert s["fixed"].shape == (1, 1, 6, 7, 5) and s["fixed_seg"].shape == (1, 1, 6, 7, 5)
    assert s["fixed_seg"].dtype == torch.int64 and s["fixed_mask"].dtype == torch.bool
    full = OASIS(l2r, split="val", size=None)[0]
    assert set(s["fixed_seg"].unique().tolist()) <= set(full["fixed_seg"].unique().tolist())
    assert s["spacing"] == pytest.approx((11 / 5, 13 / 6, 9 / 4))
    # corners aligned: corner voxels are kept
    assert s["fixed_seg"][0, 0, -1, -1, -1] == full["fixed_seg"][0, 0, -1, -1, -1]
    assert OASIS(l2r, split="val")[0]["fixed"].shape == (1, 1, 128, 128, 128)  # default "auto" = paper size


def test_neurite_2d_and_3d(neurite):
    ds2 = OASIS(neurite, layout="neurite", ndim=2, split="train")
    assert neurite_split_sizes(8) == (5, 1, 2) and len(ds2) == 4
    s = ds2[0]
    assert s["fixed"].shape == (1, 1, 16, 20) and s["fixed_seg"].dtype == torch.int64
    assert s["labels"] == LABEL_PRESETS["seg24"] and "fixed_mask" not in s
    assert s["ids"] == ("OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1")
    s = OASIS(neurite, layout="neurite", ndim=2, size=(8, 10), labels="vxm30", split="train")[0]
    assert s["fixed"].shape == (1, 1, 8, 10) and s["labels"] == LABEL_PRESETS["vxm30"]
    ds3 = OASIS(neurite, layout="neurite", ndim=3, size=None, split="train")
    assert ds3[0]["fixed"].shape == (1, 1, 12, 14, 10) and ds3[0]["labels"] == list(range(1, 36))
    test = OASIS(neurite, layout="neurite", ndim=2, split="test")
    assert test.subjects == ["OASIS_OAS1_0007_MR1", "OASIS_OAS1_0008_MR1"] and len(test) == 1
    with pytest.raises(ValueError, match="pairs"):  # val has 1 subject here: no pairs
        OASIS(neurite, layout="neurite", ndim=2, split="val")


def test_neurite_split_sizes():
    assert neurite_split_sizes(414) == (300, 30, 84)
    tr, va, te = neurite_split_sizes(100)
    assert (tr, va, te) == (73, 7, 20)
    with pytest.raises(ValueError):
        neurite_split_sizes(3)


def test_missing_root_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQREG_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="DEQREG_DATA_DIR") as e:
        OASIS()
    assert "Learn2Reg" in str(e.value) and "OASIS" in str(e.value)
    with pytest.raises(FileNotFoundError, match="neurite-oasis"):
        OASIS(layout="neurite")


def test_malformed_json_lists_missing_keys(l2r):
    meta = json.loads((l2r / "OASIS_dataset.json").read_text())
    del meta["registration_val"], meta["training"]
    (l2r / "OASIS_dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="registration_val") as e:
        OASIS(l2r, split="val")
    assert "training" in str(e.value)
    (l2r / "OASIS_dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        OASIS(l2r)


def test_missing_files_listed_all_at_once(l2r):
    (l2r / "labelsTr/OASIS_0001_0000.nii.gz").unlink()
    (l2r / "imagesTr/OASIS_0003_0000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="2 file") as e:
        OASIS(l2r, split="train")
    assert "OASIS_0001" in str(e.value) and "OASIS_0003" in str(e.value)


def test_mismatched_shapes(l2r):
    write_nifti(l2r / "labelsTr/OASIS_0395_0000.nii.gz", np.zeros((12, 14, 9), np.uint8))
    with pytest.raises(ValueError, match="mismatched shapes"):
        OASIS(l2r, split="val", size=None)[0]
    write_nifti(l2r / "imagesTr/OASIS_0397_0000.nii.gz", np.zeros((11, 14, 10), np.float32))
    write_nifti(l2r / "labelsTr/OASIS_0397_0000.nii.gz", np.zeros((11, 14, 10), np.uint8))
    write_nifti(l2r / "masksTr/OASIS_0397_0000.nii.gz", np.zeros((11, 14, 10), np.uint8))
    with pytest.raises(ValueError, match="fixed .* moving"):
        OASIS(l2r, split="val", size=None)[1]


def test_bad_options(l2r):
    with pytest.raises(ValueError, match="layout"):
        OASIS(l2r, layout="x")
    with pytest.raises(ValueError, match="neurite"):
        OASIS(l2r, ndim=2)
    with pytest.raises(ValueError, match="preset"):
        OASIS(l2r, labels="nope")
    with pytest.raises(ValueError, match="size"):
        OASIS(l2r, size=(4, 4))


def test_root_may_be_the_folder_above_an_archives_top_folder(tmp_path):
    make_l2r_oasis(tmp_path / "download" / "OASIS")
    ds = OASIS(tmp_path / "download", split="val", size=None)
    assert ds.root == tmp_path / "download" / "OASIS" and len(ds) == 2


def test_a_0_255_volume_is_rescaled_with_a_warning_not_clipped_to_ones(l2r):
    """Before: clamp(0, 1) made every voxel >= 1 of a 0..255 volume a 1 (99.94% ones here), silently."""
    rng = np.random.default_rng(1)
    path = l2r / "imagesTr/OASIS_0395_0000.nii.gz"
    vol = np.rint(rng.uniform(0.0, 255.0, size=(12, 14, 10))).astype(np.float32)
    write_nifti(path, vol)
    with pytest.warns(UserWarning, match=r"OASIS_0395_0000.nii.gz: intensities span \[0, 255\], not \[0, 1\]; "
                                         r"rescaled min-max"):
        s = OASIS(l2r, split="val", size=None)[0]
    x = s["fixed"][0, 0].numpy()
    assert float((x == 1.0).mean()) < 0.01
    np.testing.assert_allclose(x, (vol - vol.min()) / (vol.max() - vol.min()), atol=1e-6)
    bad = vol.copy()
    bad[0, 0, 0] = np.nan
    write_nifti(path, bad)
    with pytest.raises(ValueError, match=r"OASIS_0395_0000.nii.gz.*1 NaN or inf"):
        OASIS(l2r, split="val", size=None)[0]
