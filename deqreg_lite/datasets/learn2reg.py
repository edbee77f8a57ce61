"""Learn2Reg displacement files: the submission format of the challenge, written and read back.

A file ``disp_{fixed4}_{moving4}.nii.gz`` (or ``.npz`` with key ``arr_0``) holds a ``(*spatial, 3)`` float array
in **voxels**, channels in array-axis order, mapping the fixed grid into the moving image:
``warped = map_coordinates(moving, identity + disp.transpose(3, 0, 1, 2), order=1)``. That is exactly
:func:`deqreg_lite.warp.warp`'s convention, so the values are stored unchanged (only moved channel-last).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._checks import check_options
from ._nifti import load_array

__all__ = ["save_l2r_disp", "load_l2r_disp"]


def _case_number(sample_id: str) -> str:
    """The 4-digit case number of an id such as ``OASIS_0395``, ``NLST_0101_0000`` or ``0395``."""
    groups = re.findall(r"\d+", str(sample_id))
    if not groups:
        raise ValueError(f"cannot find a case number in the id {sample_id!r}")
    # NLST ids end in the _0000/_0001 image index: the case is the group before it
    number = groups[-2] if len(groups) > 1 and re.search(r"_000[01]$", str(sample_id)) else groups[-1]
    return f"{int(number):04d}"


def save_l2r_disp(disp: Tensor, folder: str | Path, fixed_id: str, moving_id: str, fmt: str = "nii.gz") -> Path:
    """Write a displacement in Learn2Reg's submission convention (see the module docstring); return the file's path.

    Args:
        disp: ``(1, 3, D, H, W)`` or ``(3, D, H, W)`` displacement in voxels.
        folder: output folder (created).
        fixed_id, moving_id: sample ids; their 4-digit case numbers name the file.
        fmt: ``"nii.gz"`` (float32, identity affine: Learn2Reg reads the array as stored) or ``"npz"``.
    """
    check_options(fmt, ("nii.gz", "npz"), "fmt")
    d = disp.detach().float().cpu()
    if d.dim() == 5 and d.shape[0] == 1:
        d = d[0]
    if d.dim() != 4 or d.shape[0] != 3:
        raise ValueError(f"disp must be (1, 3, D, H, W) or (3, D, H, W) for a Learn2Reg file, got {tuple(disp.shape)}")
    arr = d.permute(1, 2, 3, 0).contiguous().numpy()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"disp_{_case_number(fixed_id)}_{_case_number(moving_id)}.{fmt}"
    if fmt == "npz":
        np.savez_compressed(path, arr_0=arr)
    else:
        import nibabel as nib

        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def load_l2r_disp(path: str | Path) -> Tensor:
    """Read a Learn2Reg displacement file back as a float32 ``(1, 3, D, H, W)`` tensor in voxels.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a NIfTI file that cannot be read (corrupt or truncated; the message names the file, as every
            dataset loader's does), or an array that is not ``(D, H, W, 3)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no displacement file at {path}")
    arr = np.load(path)["arr_0"] if path.name.endswith(".npz") else load_array(path)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path} holds an array of shape {arr.shape}; expected (D, H, W, 3)")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(3, 0, 1, 2)[None]
