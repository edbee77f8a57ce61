import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lookalike import make_nlst, write_nifti  # noqa: E402

from deqreg_lite.datasets.nlst import NLST, normalise_nlst_name, read_keypoints  # noqa: E402



@pytest.fixture
def nlst(tmp_path):
    return make_nlst(tmp_path / "NLST")


@pytest.mark.filterwarnings("ignore:NLST. mapped the misspelt")
def test_train_skips_missing_case_and_val_cases(nlst):
    with pytest.warns(UserWarning, match="NLST_0033"):
        ds = NLST(nlst, split="train")
    assert ds.cases == ["NLST_0001", "NLST_0002", "NLST_0003"] and ds.skipped == ["NLST_0033"]
    s = ds[0]
    assert s["fixed"].shape == s["moving"].shape == (1, 1, 12, 14, 10) and s["fixed"].dtype == torch.float32
    assert float(s["fixed"].min()) >= 0.0 and float(s["fixed"].max()) <= 1.0
    assert s["fixed_mask"].dtype == torch.bool and s["moving_mask"].shape == (1, 1, 12, 14, 10)
    assert s["spacing"] == (1.5, 1.5, 1.5) and s["ids"] == ("NLST_0001_0000", "NLST_0001_0001")
    # headerless CSVs with varying row counts; keypoints as (N, 3) float32
    rows = [ds[i]["fixed_kp"].shape[0] for i in range(len(ds))]
    assert rows == [5, 1, 7] and ds[1]["moving_kp"].shape == (1, 3) and s["fixed_kp"].dtype == torch.float32
    ref = np.loadtxt(nlst / "keypointsTr/NLST_0001_0000.csv", delimiter=",")
    assert np.allclose(s["fixed_kp"].numpy(), ref, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="none of its files"):
        NLST(nlst, split="train", missing="raise")


def test_val_maps_typo_and_hu_window(nlst):
    with pytest.warns(UserWarning, match="NLST_00101"):
        ds = NLST(nlst, split="val", hu_window=(-1000, 500))
    assert ds.cases == ["NLST_0101", "NLST_0102"]
    s = ds[0]
    import nibabel as nib
    raw = np.asanyarray(nib.load(str(nlst / "imagesTr/NLST_0101_0000.nii.gz")).dataobj).astype(np.float32)
    assert np.allclose(s["fixed"][0, 0].numpy(), (np.clip(raw, -1000, 500) + 1000) / 1500, atol=1e-6)
    assert s["fixed_kp"].shape == s["moving_kp"].shape
    assert normalise_nlst_name("./imagesTr/NLST_0007_0001.nii.gz") == ("NLST_0007", "NLST_0007_0001.nii.gz")


def test_resize_scales_keypoints_and_masks_stay_bool(nlst):
    with pytest.warns(UserWarning):
        full = NLST(nlst, split="train")[0]
    with pytest.warns(UserWarning):
        small = NLST(nlst, split="train", size=(23, 27, 19))[0]
    assert small["fixed"].shape == (1, 1, 23, 27, 19) and small["fixed_mask"].dtype == torch.bool
    f = torch.tensor([22 / 11, 26 / 13, 18 / 9])
    assert torch.allclose(small["fixed_kp"], full["fixed_kp"] * f, atol=1e-5)
    assert small["spacing"] == pytest.approx((0.75, 0.75, 0.75))
    # keypoints still mark the same physical place: kp * spacing is unchanged
    sp_f, sp_s = torch.tensor(full["spacing"]), torch.tensor(small["spacing"])
    assert torch.allclose(full["moving_kp"] * sp_f, small["moving_kp"] * sp_s, atol=1e-4)


def test_read_keypoints_edge_cases(tmp_path):
    (tmp_path / "e.csv").write_text("")
    assert read_keypoints(tmp_path / "e.csv").shape == (0, 3)
    (tmp_path / "one.csv").write_text("1.5,2,3\n")
    assert read_keypoints(tmp_path / "one.csv").tolist() == [[1.5, 2.0, 3.0]]
    (tmp_path / "bad.csv").write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match="3 columns"):
        read_keypoints(tmp_path / "bad.csv")


def test_missing_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQREG_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DEQREG_DATA_DIR") as e:
        NLST()
    assert "NLST" in str(e.value) and "Learn2Reg" in str(e.value)


def test_malformed_json(nlst):
    meta = json.loads((nlst / "NLST_dataset.json").read_text())
    del meta["registration_val"]
    (nlst / "NLST_dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="registration_val"):
        NLST(nlst)
    meta["registration_val"] = [{"fixed": "./imagesTr/NLST_0101_0000.nii.gz"}]
    (nlst / "NLST_dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="moving"):
        NLST(nlst, split="val")


def test_partial_files_listed(nlst):
    (nlst / "keypointsTr/NLST_0002_0001.csv").unlink()
    (nlst / "masksTr/NLST_0003_0000.nii.gz").unlink()
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="2 file") as e:
        NLST(nlst, split="train")
    assert "NLST_0002_0001.csv" in str(e.value) and "NLST_0003_0000.nii.gz" in str(e.value)


def test_mismatched_shapes_and_rows(nlst):
    write_nifti(nlst / "masksTr/NLST_0101_0001.nii.gz", np.zeros((12, 14, 9), np.uint8))
    with pytest.warns(UserWarning):
        ds = NLST(nlst, split="val")
    with pytest.raises(ValueError, match="mismatched shapes"):
        ds[0]
    np.savetxt(nlst / "keypointsTr/NLST_0102_0001.csv", np.zeros((2, 3)), delimiter=",")
    with pytest.raises(ValueError, match="rows"):
        ds[1]


@pytest.mark.filterwarnings("ignore:NLST")
def test_nan_or_outside_keypoints_name_the_file_and_the_count(nlst):
    kp_file = nlst / "keypointsTr/NLST_0001_0001.csv"
    good = np.loadtxt(kp_file, delimiter=",", ndmin=2)
    nan = good.copy()
    nan[[1, 3], 0] = np.nan
    np.savetxt(kp_file, nan, delimiter=",", fmt="%.6f")
    with pytest.raises(ValueError, match=r"NLST_0001_0001.csv: 2 of 5 keypoints hold NaN"):
        read_keypoints(kp_file)
    with pytest.raises(ValueError, match=r"NLST_0001_0001.csv: 2 of 5 keypoints hold NaN"):
        NLST(nlst, split="train")[0]
    out = good.copy()
    out[2] = [12.0, 3.0, 3.0]  # axis 0 has 12 voxels: index 12 is outside
    out[4] = [1.0, -2.0, 3.0]
    np.savetxt(kp_file, out, delimiter=",", fmt="%.6f")
    with pytest.raises(ValueError, match=r"NLST_0001_0001.csv: 2 of 5 keypoints lie outside the volume "
                                         r"\(12, 14, 10\)"):
        NLST(nlst, split="train")[0]


@pytest.mark.filterwarnings("ignore:NLST. mapped the misspelt")
@pytest.mark.filterwarnings("ignore:NLST. case NLST_0033")
def test_an_already_normalised_volume_is_not_squashed_by_the_hu_window(nlst):
    """Before: a [0, 1] volume went through the HU window and came out as a constant 0.667 image."""
    rng = np.random.default_rng(2)
    vol = rng.uniform(0.0, 1.0, size=(12, 14, 10)).astype(np.float32)
    write_nifti(nlst / "imagesTr/NLST_0001_0000.nii.gz", vol)
    with pytest.warns(UserWarning, match=r"NLST_0001_0000.nii.gz: intensities span.*not HU; used as stored"):
        s = NLST(nlst, split="train")[0]
    np.testing.assert_allclose(s["fixed"][0, 0].numpy(), vol, atol=1e-6)
