"""Rebuild the shipped samples in ``data/samples`` from the nilearn and dipy wheels on PyPI.

Run from anywhere (needs pip, numpy, scipy, nibabel, torch and the installed ``deqreg_lite``)::

    python data/build_samples.py                   # downloads two wheels (about 22 MB) to a temporary folder
    python data/build_samples.py --wheels DIR      # reuse (or fill) a folder of wheels, e.g. to rebuild offline
    python data/build_samples.py --preview /tmp/samples.png   # also draw the samples

It writes, deterministically (fixed slice, fixed seeds):

* ``brain2d.npz``: an inter-subject 2D pair at 160 x 192 (rows x columns; superior at the top, columns from the
  subject's left to right for the template; both slices in the same display orientation). ``fixed`` is coronal
  slice ``MNI_CORONAL_INDEX`` of the MNI ICBM152 2009a T1 template, ``moving`` is dipy's T1 coronal slice of
  another brain. Each is cropped to its own brain bounding box (plus a small margin) and resized to 160 x 192:
  that bounding-box normalisation is the rough affine pre-alignment (a per-axis scale and a shift), so what is
  left to register is the nonlinear part. Tissue labels 1 CSF, 2 GM, 3 WM (0 is background): for the template
  they come from its GM/WM probability maps; for the dipy slice they are an approximate *derived* label, a
  3-class k-means of the (lightly smoothed) intensities inside the brain mask.
* ``brain3d.npz``: the template resampled to 96^3 at 2 mm isotropic (the whole brain fits), with the same tissue
  labels, as ``fixed``/``fixed_seg``; ``moving``/``moving_seg`` are the same volume warped by a random smooth
  diffeomorphism ``true_disp`` (``deqreg_lite.datasets.synthetic.random_deformation``), followed by a mild random
  gamma and bias-field change of the intensities.
* ``LICENSES.md``: the notices that must travel with the data (McGill's for the template, nilearn's and dipy's
  BSD-3 licences, copied from the wheels) and how the files were derived.

Array conventions: images are uint8 (intensity * 255, intensities scaled to [0, 1] by the 99.5th percentile
inside the brain, then clipped); labels are uint8; ``spacing`` is mm per voxel along each array axis.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

from deqreg_lite.datasets.synthetic import random_deformation, random_intensity_change
from deqreg_lite.warp import warp

# ---------------------------------------------------------------------------------------------------------------
# pinned sources
# ---------------------------------------------------------------------------------------------------------------
NILEARN_VERSION = "0.14.1"
DIPY_VERSION = "1.12.1"
# dipy's wheels are platform-specific but all hold the same data file, so pin one platform: the download then
# works from any machine and any Python version.
PIP_PLATFORM = ["--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--implementation", "cp",
                "--abi", "cp311"]
MNI_MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
DIPY_MEMBER = "dipy/data/files/t1_coronal_slice.npy"
NILEARN_LICENSE = f"nilearn-{NILEARN_VERSION}.dist-info/licenses/LICENSE"
DIPY_LICENSE = f"dipy-{DIPY_VERSION}.dist-info/LICENSE"
# sha256 of the extracted members (checked, so that a rebuild reads exactly the same inputs)
SHA256 = {
    MNI_MEMBER.format("t1"): "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    MNI_MEMBER.format("gm"): "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    MNI_MEMBER.format("wm"): "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    DIPY_MEMBER: "6ae15c125c97e11e1ba478ff252c1774d2c31db242a8a61daa93e7b43c873c7b",
}

# ---------------------------------------------------------------------------------------------------------------
# sample settings
# ---------------------------------------------------------------------------------------------------------------
OUT_2D = (160, 192)
# Coronal index into the 197 x 233 x 189 (RAS, 1 mm) template, i.e. MNI y = index - 134 mm. Chosen as the best
# match to the dipy slice: it maximises the correlation of the two bounding-box-normalised slices over
# indices 95..135 (a clear peak, 0.86) and, checked by eye, both cut through the bodies of the lateral
# ventricles, the thalamus and the temporal lobes.
MNI_CORONAL_INDEX = 119
MARGIN_2D = 4  # voxels of background kept around the brain bounding box
DIPY_SPACING = (1.0, 1.0)  # dipy's slice is "about 1 mm"
SMOOTH_FOR_KMEANS = 0.7  # pixels; Gaussian smoothing before the k-means of the dipy slice

OUT_3D = (96, 96, 96)
SPACING_3D = 2.0  # mm; the template brain's largest extent (181 mm, anterior-posterior) fits in 96 * 2 mm
DEFORM_SEED_3D = 2024
DEFORM_STRENGTH_3D = 1.5  # RMS velocity in voxels (3 mm)
DEFORM_SMOOTHNESS_3D = 10.0  # voxels
INTENSITY_SEED_3D = 2025
DISP_QUANTUM = 1.0 / 32.0  # voxels: true_disp is rounded to multiples of this, which float16 stores exactly
# (1/32 voxel = 0.06 mm; a finer quantum compresses worse: 1/128 would need 3 MB instead of 1.6 MB)

LABELS = np.array([1, 2, 3], dtype=np.uint8)
LABEL_NAMES = np.array(["CSF", "GM", "WM"])
PERCENTILE = 99.5

MCGILL_NOTICE = """\
Copyright (C) 1993-2004 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and
its documentation for any purpose and without fee is hereby granted,
provided that the above copyright notice appear in all copies.  The
authors and McGill University make no representations about the
suitability of this software for any purpose.  It is provided "as
is" without express or implied warranty.  The authors are not
responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of
this software package."""


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
def fetch_wheels(folder: Path) -> tuple[Path, Path]:
    """Return the nilearn and dipy wheels in ``folder``, downloading them with pip when missing."""
    folder.mkdir(parents=True, exist_ok=True)

    def find() -> tuple[list[Path], list[Path]]:
        return (sorted(folder.glob(f"nilearn-{NILEARN_VERSION}-*.whl")),
                sorted(folder.glob(f"dipy-{DIPY_VERSION}-*.whl")))

    nl, dp = find()
    if not nl or not dp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PIP_PLATFORM,
               "-d", str(folder), f"nilearn=={NILEARN_VERSION}", f"dipy=={DIPY_VERSION}"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        nl, dp = find()
    if not nl or not dp:
        raise FileNotFoundError(f"could not find nilearn-{NILEARN_VERSION} and dipy-{DIPY_VERSION} wheels in {folder}")
    return nl[0], dp[0]


def read_members(wheel: Path, names: list[str]) -> dict[str, bytes]:
    """Read files from a wheel (a zip archive) and check their sha256 when pinned."""
    out = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in names:
            data = zf.read(name)
            digest = hashlib.sha256(data).hexdigest()
            expected = SHA256.get(name)
            if expected is not None and digest != expected:
                raise RuntimeError(f"{name} in {wheel.name} has sha256 {digest}, expected {expected}")
            out[name] = data
    return out


def read_tar_members(archive: Path, names: list[str], sha256: dict, *, require_pin: bool = False) -> dict[str, bytes]:
    """Read files from a ``.tar.gz`` source archive and check each against its sha256 in ``sha256`` (unpinned names
    are read unchecked, or refused with ``require_pin``)."""
    out = {}
    with tarfile.open(archive, "r:gz") as tf:
        for name in names:
            f = tf.extractfile(name)
            if f is None:
                raise FileNotFoundError(f"{name} not in {archive}")
            data = f.read()
            digest = hashlib.sha256(data).hexdigest()
            expected = sha256[name] if require_pin else sha256.get(name)
            if expected is not None and digest != expected:
                raise RuntimeError(f"{name} in {archive.name} has sha256 {digest}, expected {expected}")
            out[name] = data
    return out


def load_nifti(data: bytes) -> np.ndarray:
    """A gzipped NIfTI file's voxels as float32 (nibabel, from memory)."""
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    if nib.aff2axcodes(img.affine) != ("R", "A", "S"):
        raise RuntimeError(f"expected an RAS template, got {nib.aff2axcodes(img.affine)}")
    return np.asarray(img.dataobj, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# image helpers
# ---------------------------------------------------------------------------------------------------------------
def brain_mask(image: np.ndarray) -> np.ndarray:
    """Mask of a skull-stripped image: its non-zero voxels, holes filled, largest connected component."""
    mask = ndi.binary_fill_holes(image > 0)
    lab, n = ndi.label(mask)
    if n > 1:
        mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return mask


def scale_intensities(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Divide by the 99.5th percentile inside the mask and clip to [0, 1]."""
    return np.clip(image / np.percentile(image[mask], PERCENTILE), 0.0, 1.0).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n))
                 for i, n in zip(idx, mask.shape))


def crop_resize(image: np.ndarray, box: tuple[slice, ...], out_shape: tuple[int, ...], order: int = 1) -> np.ndarray:
    """Crop to ``box`` and resize to ``out_shape`` (pixel edges aligned, zero outside)."""
    sub = image[box]
    zoom = [o / s for o, s in zip(out_shape, sub.shape)]
    out = ndi.zoom(sub, zoom, order=order, grid_mode=True, mode="grid-constant", cval=0.0)
    assert out.shape == tuple(out_shape), (out.shape, out_shape)
    return out.astype(np.float32)


def tissue_labels_from_probs(gm: np.ndarray, wm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """0 outside ``mask``; inside, the argmax of (CSF = 1 - GM - WM, GM, WM) + 1, so 1 CSF, 2 GM, 3 WM."""
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    lab = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    return np.where(mask, lab, 0).astype(np.uint8)


def kmeans_1d(values: np.ndarray, k: int = 3, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1D k-means (Lloyd), centres started at evenly spaced percentiles; labels sorted by centre."""
    centres = np.percentile(values, np.linspace(10, 90, k)).astype(np.float64)
    for _ in range(iterations):
        lab = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        new = np.array([values[lab == i].mean() if np.any(lab == i) else centres[i] for i in range(k)])
        if np.allclose(new, centres, rtol=0, atol=1e-9):
            break
        centres = new
    order = np.argsort(centres)
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[lab], centres[order]


def derived_tissue_labels(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Approximate *derived* tissue labels of a stored uint8 slice (not a manual or atlas segmentation).

    A 3-class k-means (:func:`kmeans_1d`) of the intensities inside ``mask``, after a Gaussian smoothing of
    ``SMOOTH_FOR_KMEANS`` pixels: darkest class 1 (CSF), middle 2 (GM), brightest 3 (WM); 0 outside ``mask``.
    """
    smooth = ndi.gaussian_filter(image.astype(np.float32) / 255.0, SMOOTH_FOR_KMEANS)
    classes, _ = kmeans_1d(smooth[mask].astype(np.float64))
    seg = np.zeros(image.shape, dtype=np.uint8)
    seg[mask] = classes.astype(np.uint8) + 1
    return seg


# ---------------------------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------------------------
def build_2d(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, dipy_slice: np.ndarray) -> dict[str, np.ndarray]:
    """The 2D inter-subject pair; see the module docstring."""
    # Fixed: coronal slice of the RAS template, rotated so that rows run superior -> inferior, columns L -> R.
    f_t1, f_gm, f_wm = (np.rot90(v[:, MNI_CORONAL_INDEX, :]) for v in (t1, gm / 255.0, wm / 255.0))
    f_mask = brain_mask(f_t1)
    f_box = bounding_box(f_mask, MARGIN_2D)
    # Rough affine pre-alignment: each brain's bounding box (plus margin) is mapped onto the same 160 x 192 grid.
    fixed = crop_resize(scale_intensities(f_t1, f_mask), f_box, OUT_2D)
    f_mask_r = crop_resize(f_mask.astype(np.float32), f_box, OUT_2D) > 0.5
    fixed_seg = tissue_labels_from_probs(crop_resize(f_gm, f_box, OUT_2D), crop_resize(f_wm, f_box, OUT_2D),
                                         f_mask_r)
    # Moving: dipy's slice is stored with the superior side up already.
    m_img = dipy_slice.astype(np.float32)
    m_mask = brain_mask(m_img)
    m_box = bounding_box(m_mask, MARGIN_2D)
    moving = to_uint8(crop_resize(scale_intensities(m_img, m_mask), m_box, OUT_2D))
    m_mask_r = crop_resize(m_mask.astype(np.float32), m_box, OUT_2D) > 0.5
    # Approximate derived labels (see derived_tissue_labels). Partial volume at the brain's edge and deep grey
    # matter (thalamus, labelled GM in the template's maps) are where they differ most from the template's.
    moving_seg = derived_tissue_labels(moving, m_mask_r)

    f_size = [s.stop - s.start for s in f_box]
    m_size = [s.stop - s.start for s in m_box]
    return {
        "fixed": to_uint8(fixed), "moving": moving, "fixed_seg": fixed_seg, "moving_seg": moving_seg,
        # mm per pixel of the fixed grid (1 mm template voxels, box size / 160 x 192); moving_spacing likewise
        "spacing": np.array([n / o for n, o in zip(f_size, OUT_2D)], dtype=np.float32),
        "moving_spacing": np.array([n * s / o for n, s, o in zip(m_size, DIPY_SPACING, OUT_2D)], dtype=np.float32),
        "labels": LABELS, "label_names": LABEL_NAMES,
        "ids": np.array(["mni152_2009a", "dipy_t1"]),
        "axes": np.array("rows: superior -> inferior, columns: left -> right (template); coronal slices"),
        "mni_coronal_index": np.array(MNI_CORONAL_INDEX, dtype=np.int16),
    }


def resample_3d(volume: np.ndarray, centre: np.ndarray, prefilter: float) -> np.ndarray:
    """Sample a 1 mm volume on a 96^3 grid of SPACING_3D mm centred on ``centre`` (voxel coordinates)."""
    if prefilter > 0:
        volume = ndi.gaussian_filter(volume, prefilter)  # anti-aliasing before downsampling
    axes = [c + (np.arange(n) - (n - 1) / 2.0) * SPACING_3D for c, n in zip(centre, OUT_3D)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    return ndi.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0).astype(np.float32)


def build_3d(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> dict[str, np.ndarray]:
    """The 3D template sample and its known random deformation; see the module docstring."""
    # Reorient RAS (x, y, z) to (y: posterior -> anterior, z: superior -> inferior, x: left -> right), so that
    # fixed[k] is a coronal slice shown like brain2d.
    def reorient(v: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(v, (1, 2, 0))[:, ::-1, :])

    t1, gm, wm = reorient(t1), reorient(gm / 255.0), reorient(wm / 255.0)
    mask = brain_mask(t1)
    idx = np.nonzero(mask)
    lo = np.array([i.min() for i in idx], dtype=np.float64)
    hi = np.array([i.max() for i in idx], dtype=np.float64)
    if np.any(hi - lo + 1 > np.array(OUT_3D) * SPACING_3D):
        raise RuntimeError(f"brain extent {hi - lo + 1} mm does not fit in {OUT_3D} x {SPACING_3D} mm")
    centre = (lo + hi) / 2.0
    sigma = (SPACING_3D - 1.0) / 2.0
    t1_r = resample_3d(scale_intensities(t1, mask), centre, sigma)
    mask_r = resample_3d(mask.astype(np.float32), centre, 0.0) > 0.5
    fixed_seg = tissue_labels_from_probs(resample_3d(gm, centre, sigma), resample_3d(wm, centre, sigma), mask_r)
    fixed = to_uint8(t1_r)

    # Known deformation, rounded so that float16 stores it exactly; moving is computed from the stored
    # (uint8) fixed image, so that the shipped arrays satisfy the relation up to the uint8 rounding of moving.
    disp = random_deformation(OUT_3D, strength=DEFORM_STRENGTH_3D, smoothness=DEFORM_SMOOTHNESS_3D,
                              seed=DEFORM_SEED_3D)
    disp = torch.round(disp / DISP_QUANTUM) * DISP_QUANTUM
    if float(disp.abs().max()) >= 2048 * DISP_QUANTUM:  # float16 holds integers up to 2048 exactly
        raise RuntimeError(f"true_disp reaches {2048 * DISP_QUANTUM} voxels; float16 would round it")
    fixed_t = torch.from_numpy(fixed.astype(np.float32) / 255.0)[None, None]
    warped = warp(fixed_t, disp)
    change = random_intensity_change(warped, seed=INTENSITY_SEED_3D, gamma_std=0.1, bias_strength=0.1,
                                     bias_grid=4)
    moving_seg = warp(torch.from_numpy(fixed_seg.astype(np.int64))[None, None], disp, mode="nearest")
    return {
        "fixed": fixed, "moving": to_uint8(change.image[0, 0].numpy()),
        "fixed_seg": fixed_seg, "moving_seg": moving_seg[0, 0].numpy().astype(np.uint8),
        "true_disp": disp[0].numpy().astype(np.float16),
        "moving_gamma": change.gamma.numpy().astype(np.float32),
        "moving_bias_coarse": change.bias_coarse.numpy().astype(np.float32),
        "spacing": np.full(3, SPACING_3D, dtype=np.float32),
        "labels": LABELS, "label_names": LABEL_NAMES,
        "ids": np.array(["mni152_2009a", "mni152_2009a_deformed"]),
        "axes": np.array("axis 0: posterior -> anterior, axis 1: superior -> inferior, axis 2: left -> right"),
    }


# ---------------------------------------------------------------------------------------------------------------
# licences
# ---------------------------------------------------------------------------------------------------------------
def licenses_text(nilearn_license: str, dipy_license: str) -> str:
    return f"""# Licences and provenance of the shipped samples

The files in this folder are small derived images. Rebuild them, exactly, with

    python data/build_samples.py

which downloads `nilearn=={NILEARN_VERSION}` and `dipy=={DIPY_VERSION}` with
`python -m pip download --no-deps --only-binary=:all: ...`, reads the files below from the wheels (zip
archives, no install) and derives the samples. This file is written by that script.

## What was derived, and how

| file | source files | derivation |
|---|---|---|
| `brain2d.npz` `fixed`, `fixed_seg` | nilearn: `{MNI_MEMBER.format("{t1,gm,wm}")}` | coronal slice {MNI_CORONAL_INDEX} (MNI y = {MNI_CORONAL_INDEX - 134} mm) of the MNI ICBM152 2009a T1; cropped to the brain bounding box + {MARGIN_2D} px, resized to 160 x 192, intensities / 99.5th percentile, uint8. Labels: argmax of CSF (1 - GM - WM), GM and WM probabilities inside the brain mask. |
| `brain2d.npz` `moving`, `moving_seg` | dipy: `{DIPY_MEMBER}` | same crop, resize and scaling; labels are an approximate 3-class k-means of the intensities inside the brain mask (not a manual or atlas segmentation). |
| `brain3d.npz` | nilearn: the same three template files | template reoriented, resampled to 96^3 at 2 mm, tissue labels as above; `moving` is a known random smooth diffeomorphic warp of `fixed` (`true_disp`: scaling and squaring of a Gaussian-smoothed random velocity, RMS {DEFORM_STRENGTH_3D} voxels, smoothness {DEFORM_SMOOTHNESS_3D:g} voxels, seed {DEFORM_SEED_3D}, rounded to 1/{round(1 / DISP_QUANTUM)} voxel) followed by a random gamma and bias field (seed {INTENSITY_SEED_3D}). |

## MNI ICBM152 2009a template (fixed images of `brain2d.npz`, all of `brain3d.npz`)

ICBM 2009a Nonlinear Symmetric template, as redistributed by nilearn
(<http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009>). References: V. Fonov, A. C. Evans,
R. C. McKinstry, C. R. Almli, D. L. Collins, *Unbiased nonlinear average age-appropriate brain templates from
birth to adulthood*, NeuroImage 47 (2009) S102; V. Fonov et al., *Unbiased average age-appropriate atlases for
pediatric studies*, NeuroImage 54 (2011) 313-327; D. L. Collins et al., *ANIMAL+INSECT: improved cortical
structure segmentation*, IPMI 1999.

The template's notice (the `COPYING` file of the original archive `mni_icbm152_nlin_sym_09a_nifti.zip`; the
nilearn wheel does not carry it), which must appear in all copies:

```text
{MCGILL_NOTICE}
```

## nilearn (BSD-3-Clause), from `{NILEARN_LICENSE}`

```text
{nilearn_license.strip()}
```

## dipy (BSD-3-Clause), from `{DIPY_LICENSE}` (moving images of `brain2d.npz`)

```text
{dipy_license.strip()}
```
"""


# ---------------------------------------------------------------------------------------------------------------
# preview
# ---------------------------------------------------------------------------------------------------------------
def preview(s2: dict, s3: dict, path: Path) -> None:
    """Draw both samples into one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 4, figsize=(16, 12))
    seg_kw = {"vmin": 0, "vmax": 3, "cmap": "viridis", "interpolation": "nearest"}
    ax[0, 0].imshow(s2["fixed"], cmap="gray")
    ax[0, 0].set_title(f"brain2d fixed (MNI coronal {MNI_CORONAL_INDEX})")
    ax[0, 1].imshow(s2["fixed_seg"], **seg_kw)
    ax[0, 1].set_title("fixed_seg (0 bg, 1 CSF, 2 GM, 3 WM)")
    ax[0, 2].imshow(s2["moving"], cmap="gray")
    ax[0, 2].set_title("brain2d moving (dipy)")
    ax[0, 3].imshow(s2["moving_seg"], **seg_kw)
    ax[0, 3].set_title("moving_seg (k-means)")
    c = OUT_3D[0] // 2
    for row, (img, seg, name) in enumerate([(s3["fixed"], s3["fixed_seg"], "fixed"),
                                            (s3["moving"], s3["moving_seg"], "moving")], start=1):
        ax[row, 0].imshow(img[c], cmap="gray")
        ax[row, 0].set_title(f"brain3d {name} coronal {c}")
        ax[row, 1].imshow(seg[c], **seg_kw)
        ax[row, 2].imshow(img[:, :, OUT_3D[2] // 2].T, cmap="gray")
        ax[row, 2].set_title("sagittal (anterior right)")
        ax[row, 3].imshow(img[::-1, OUT_3D[1] // 2, :], cmap="gray")
        ax[row, 3].set_title("axial (anterior up)")
    ax[2, 1].contour(np.linalg.norm(s3["true_disp"][:, c].astype(np.float32), axis=0), colors="r", linewidths=0.5)
    ax[2, 1].set_title("moving_seg + |true_disp| contours")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
def update_licenses(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the section between the markers ``begin`` and ``end`` of ``LICENSES.md`` in place (the build scripts of
    the other samples each own one), or append it; keep the rest of the file."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Licences and provenance of the shipped samples\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + (("\n" + tail) if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "samples",
                        help="output folder (default: data/samples beside this script)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="folder holding (or receiving) the two wheels; default: a temporary folder")
    parser.add_argument("--preview", type=Path, default=None, help="also write a PNG of the samples there")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(min(4, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        nl_wheel, dp_wheel = fetch_wheels(args.wheels if args.wheels is not None else Path(tmp))
        nl = read_members(nl_wheel, [MNI_MEMBER.format(k) for k in ("t1", "gm", "wm")] + [NILEARN_LICENSE])
        dp = read_members(dp_wheel, [DIPY_MEMBER, DIPY_LICENSE])
    t1, gm, wm = (load_nifti(nl[MNI_MEMBER.format(k)]) for k in ("t1", "gm", "wm"))
    dipy_slice = np.load(io.BytesIO(dp[DIPY_MEMBER]), allow_pickle=False)

    s2 = build_2d(t1, gm, wm, dipy_slice)
    s3 = build_3d(t1, gm, wm)

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "brain2d.npz", **s2)
    np.savez_compressed(args.out / "brain3d.npz", **s3)
    lic = args.out / "LICENSES.md"
    text = licenses_text(nl[NILEARN_LICENSE].decode(), dp[DIPY_LICENSE].decode())
    other = "<!-- lung3d: begin"  # the section that data/build_lung_sample.py maintains: keep it
    if lic.is_file() and other in lic.read_text(encoding="utf-8"):
        text = text.rstrip("\n") + "\n\n" + other + lic.read_text(encoding="utf-8").split(other, 1)[1]
    lic.write_text(text, encoding="utf-8")
    if args.preview is not None:
        preview(s2, s3, args.preview)
        print(f"preview: {args.preview}")

    for name, s in (("brain2d", s2), ("brain3d", s3)):
        fr = [float(np.mean(s["fixed_seg"][s["fixed_seg"] > 0] == i)) for i in LABELS]
        mr = [float(np.mean(s["moving_seg"][s["moving_seg"] > 0] == i)) for i in LABELS]
        print(f"{name}: shape {s['fixed'].shape}, spacing {[round(float(v), 3) for v in s['spacing']]} mm, "
              f"label fractions fixed {np.round(fr, 3).tolist()} moving {np.round(mr, 3).tolist()}")
    total = 0
    for path in sorted(args.out.iterdir()):
        if path.is_file():
            total += path.stat().st_size
            print(f"{path.stat().st_size / 1e3:9.1f} kB  {path}")
    print(f"{total / 1e6:9.3f} MB  total, built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
