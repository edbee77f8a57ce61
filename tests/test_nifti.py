"""Reading NIfTI files: a corrupt or truncated file gives an error that names it."""
import gzip

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from deqreg_lite.datasets._nifti import load_array  # noqa: E402


@pytest.fixture
def good(tmp_path):
    arr = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    paths = {}
    for ext in (".nii", ".nii.gz"):
        p = tmp_path / f"good{ext}"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
        paths[ext] = p
    return arr, paths


def test_reads_a_good_file(good):
    arr, paths = good
    for p in paths.values():
        assert np.array_equal(load_array(p, 3), arr)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_names_the_file(good, tmp_path, ext, damage):
    _, paths = good
    data = paths[ext].read_bytes()
    bad = tmp_path / f"bad_{damage}{ext}"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"this is not an image" * 50 if ext == ".nii" else gzip.compress(b"junk" * 100))
    else:
        bad.write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable NIfTI") as e:
        load_array(bad, 3)
    assert str(bad) in str(e.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_array(tmp_path / "missing.nii.gz", 3)
