"""Learn2Reg displacement files live on the datasets floor; they read NIfTI through the checked loader."""
import gzip

import pytest
import torch

import deqreg_lite.datasets as datasets
import deqreg_lite.evaluate as ev
from deqreg_lite.datasets.learn2reg import _case_number, load_l2r_disp, save_l2r_disp


def test_the_same_functions_from_datasets_and_evaluate():
    assert datasets.save_l2r_disp is ev.save_l2r_disp is save_l2r_disp
    assert datasets.load_l2r_disp is ev.load_l2r_disp is load_l2r_disp
    assert (_case_number("OASIS_0395"), _case_number("NLST_0101_0000"), _case_number("7")) == ("0395", "0101", "0007")


def test_a_corrupt_file_gives_the_error_that_names_it(tmp_path):
    path = save_l2r_disp(torch.zeros(1, 3, 4, 5, 6), tmp_path, "1", "2")
    assert load_l2r_disp(path).shape == (1, 3, 4, 5, 6)
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(ValueError, match="disp_0001_0002.nii.gz is not a readable NIfTI image"):
        load_l2r_disp(path)
    path.write_bytes(path.read_bytes()[:10])  # a truncated gzip stream
    with pytest.raises(ValueError, match="disp_0001_0002.nii.gz"):
        load_l2r_disp(path)
    with pytest.raises(FileNotFoundError, match="no displacement file"):
        load_l2r_disp(tmp_path / "disp_0003_0004.nii.gz")


def test_a_field_of_the_wrong_shape_is_refused(tmp_path):
    import nibabel as nib
    import numpy as np

    path = tmp_path / "disp_0001_0002.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), str(path))
    with pytest.raises(ValueError, match=r"expected \(D, H, W, 3\)"):
        load_l2r_disp(path)
