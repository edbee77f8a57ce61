"""Rebuild the shipped lung sample ``data/samples/lung3d.npz`` (and its NLST-style keypoint CSVs) from a real chest CT.

Run from anywhere (needs pip, numpy, scipy, torch and the installed ``deqreg_lite``)::

    python data/build_lung_sample.py                  # downloads the pyradiomics 3.0.1 sdist (34 MB) to a temp folder
    python data/build_lung_sample.py --source DIR     # reuse (or fill) a folder holding pyradiomics-3.0.1.tar.gz

The source archive is only *read* (``tarfile``), never built or installed; the NRRD file is decoded by the small
reader below (no pynrrd needed). Everything is deterministic (fixed seeds, pinned sha256 of the input).

What it writes (into ``data/samples`` beside this script):

* ``lung3d.npz``: ``data/lung2_image.nrrd`` of pyradiomics 3.0.1 (a chest CT, 512 x 512 x 61 at 0.627 x 0.627 x 5
  mm, NRRD space LPS; lung2 rather than lung1 because its scan covers the diaphragm), resampled to ``SHAPE`` at
  ``SPACING`` mm isotropic (trilinear, in-plane Gaussian anti-aliasing). Array axes: **axis 0 superior ->
  inferior** (axial slices, apex first), **axis 1 anterior -> posterior**, **axis 2 patient right -> left**; so
  ``fixed[k]`` is an axial slice in the usual radiological display (anterior up, patient right on the left).
  HU are clipped to ``HU_WINDOW`` and mapped linearly to [0, 1] (stored as uint8), as NLST is used.

  - ``fixed_seg``: a lung mask (HU < ``LUNG_HU`` inside the body: air components that touch the in-plane border
    are outside air and dropped, the large remaining components kept, then a closing and a slice-wise hole
    filling so that vessels are inside). It is also the registration mask (as NLST's ``masksTr``).
  - ``true_disp``: a synthetic *exhale*, a smooth diffeomorphism (scaling and squaring of a stationary velocity,
    :func:`deqreg_lite.warp.integrate_velocity`): a superior-inferior component that grows from 0 at the lung
    apex to ``DIAPHRAGM_MM`` at the diaphragm and below (diaphragm motion), a smaller antero-posterior
    component (``CHEST_WALL_MM`` at the front of the chest wall, 0 at the back), both tapered by a broad in-plane
    Gaussian, plus a small smooth random velocity (seed ``NOISE_SEED``). To keep the file small only the velocity
    is stored (``velocity``, float16, on a ``VELOCITY_GRID`` grid, in fine voxels);
    :func:`deqreg_lite.datasets.samples.lung_disp_from_velocity` (trilinear upsampling + 7 squarings) gives
    ``true_disp``, here and in ``load_sample``.
  - ``moving = warp(fixed, true_disp)`` and ``moving_seg = warp(fixed_seg, true_disp, mode="nearest")`` are not
    stored either: ``load_sample("lung3d")`` computes them (from the stored uint8 ``fixed``). No intensity noise.
  - ``fixed_kp``: ``N_KEYPOINTS`` points inside the (eroded) fixed lung mask at high image-gradient voxels
    (random among the top ``KP_TOP_PERCENT`` %, seed ``KP_SEED``, at least ``KP_MIN_DIST`` voxels apart), with a
    sub-voxel jitter. ``moving_kp``: where they are in ``moving``. Because ``moving(y) = fixed(y + true_disp(y))``,
    the fixed point ``p`` is at the moving point ``q`` with ``q + true_disp(q) = p``, i.e. ``q = p + w`` where
    ``w = -true_disp(p + w)`` (the inverse deformation at ``p``); ``w`` is found by fixed-point iteration with
    trilinear sampling of the stored ``true_disp`` (as ``grid_sample``), to ``INVERSE_TOL`` voxels.
    So the exact registration ``u`` (``warp(moving, u) ~ fixed``) is the inverse of ``true_disp`` and has
    TRE ~ 0 on these keypoints. The inverse field itself is not stored.
* ``lung3d_keypoints/LUNG_0001_0000.csv`` (fixed) and ``LUNG_0001_0001.csv`` (moving): the keypoints as NLST
  keypoint files: no header, one point per row, 3 floats, 0-based voxel indices in array-axis order; row i of
  ``_0000`` matches row i of ``_0001``.
* a section of ``LICENSES.md`` (pyradiomics' BSD-3 licence, provenance), replaced in place if present, appended
  otherwise; the rest of the file is kept.
"""
from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from deqreg_lite.datasets.synthetic import random_velocity
from deqreg_lite.datasets.samples import lung_disp_from_velocity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_samples import read_tar_members as _read_tar_members  # noqa: E402
from build_samples import update_licenses as _update_licenses  # noqa: E402  (one home for the LICENSES.md sections)

# ---------------------------------------------------------------------------------------------------------------
# pinned source
# ---------------------------------------------------------------------------------------------------------------
PYRADIOMICS_VERSION = "3.0.1"
SDIST = f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz"
ROOT = f"pyradiomics-{PYRADIOMICS_VERSION}"
IMAGE_MEMBER = f"{ROOT}/data/lung2_image.nrrd"
LICENSE_MEMBER = f"{ROOT}/LICENSE.txt"
SHA256 = {IMAGE_MEMBER: "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651"}

# ---------------------------------------------------------------------------------------------------------------
# sample settings
# ---------------------------------------------------------------------------------------------------------------
SHAPE = (96, 96, 96)  # (superior -> inferior, anterior -> posterior, right -> left)
SPACING = 3.0  # mm, isotropic
HU_WINDOW = (-1000.0, 500.0)
LUNG_HU = -400.0
KEEP_FRACTION = 0.1  # keep air components at least this fraction of the largest (both lungs, trachea)
DIAPHRAGM_MM = 15.0  # superior-inferior velocity at and below the diaphragm
CHEST_WALL_MM = 4.5  # antero-posterior velocity at the front of the chest
TAPER_SIGMA = 40.0  # voxels, in-plane Gaussian taper of the breathing velocity
NOISE_STRENGTH = 0.4  # voxels, RMS of the random velocity
NOISE_SMOOTHNESS = 12.0  # voxels
NOISE_SEED = 3001
VELOCITY_GRID = (24, 24, 24)  # coarse grid of the stored velocity (12 mm nodes)
N_KEYPOINTS = 200
KP_SEED = 3002
KP_TOP_PERCENT = 20.0
KP_MIN_DIST = 4.0  # voxels
KP_ERODE = 1  # voxels of erosion of the lung mask before sampling keypoints
INVERSE_TOL = 1e-5  # voxels
CASE = "LUNG_0001"

LICENSE_BEGIN = "<!-- lung3d: begin (written by data/build_lung_sample.py) -->"
LICENSE_END = "<!-- lung3d: end -->"


# ---------------------------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------------------------
def fetch_sdist(folder: Path) -> Path:
    """The pyradiomics source archive in ``folder``, downloaded with pip when missing (no build, no install)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SDIST
    if not path.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "-d", str(folder), f"pyradiomics=={PYRADIOMICS_VERSION}"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    if not path.is_file():
        raise FileNotFoundError(f"could not find {SDIST} in {folder}")
    return path


def read_members(archive: Path, names: list[str]) -> dict[str, bytes]:
    """Files of the source archive, checked against :data:`SHA256` (``build_samples.read_tar_members``)."""
    return _read_tar_members(archive, names, SHA256)


_NRRD_TYPES = {"short": "i2", "int16": "i2", "signed short": "i2", "ushort": "u2", "unsigned short": "u2",
               "int": "i4", "int32": "i4", "float": "f4", "double": "f8", "uchar": "u1", "unsigned char": "u1"}


def read_nrrd(data: bytes) -> tuple[np.ndarray, dict[str, str]]:
    """A minimal NRRD reader (attached header, raw or gzip encoding).

    Returns the array in NumPy (C) order, i.e. with the NRRD axes reversed: ``array[k, j, i]`` is the voxel at
    NRRD index ``(i, j, k)``, whose position is ``origin + i * dir0 + j * dir1 + k * dir2``.
    """
    if not data.startswith(b"NRRD"):
        raise ValueError("not an NRRD file")
    end = data.index(b"\n\n")
    header: dict[str, str] = {}
    for line in data[:end].decode("ascii").splitlines()[1:]:
        if not line or line.startswith("#"):
            continue
        key, value = line.split(":", 1)
        header[key.strip()] = value.lstrip("=").strip()
    body = data[end + 2:]
    sizes = [int(s) for s in header["sizes"].split()]
    encoding = header.get("encoding", "raw")
    if encoding in ("gzip", "gz"):
        body = gzip.decompress(body)
    elif encoding != "raw":
        raise ValueError(f"unsupported NRRD encoding {encoding!r}")
    dtype = np.dtype(_NRRD_TYPES[header["type"]]).newbyteorder("<" if header.get("endian", "little") == "little"
                                                                    else ">")
    arr = np.frombuffer(body, dtype=dtype, count=int(np.prod(sizes))).reshape(sizes[::-1])
    return arr.astype(dtype.newbyteorder("=")), header


def _vectors(text: str) -> np.ndarray:
    return np.array([[float(v) for v in part.strip("() ").split(",")] for part in text.split(")")
                     if part.strip()], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------------------------------------------
def resample(hu: np.ndarray, header: dict[str, str]) -> np.ndarray:
    """Resample the CT (HU) to ``SHAPE`` at ``SPACING`` mm in the (S->I, A->P, R->L) orientation."""
    if header.get("space") != "left-posterior-superior":
        raise RuntimeError(f"expected NRRD space LPS, got {header.get('space')!r}")
    dirs = _vectors(header["space directions"])  # rows: NRRD axes i (x), j (y), k (z)
    origin = _vectors(header["space origin"])[0]
    if not np.allclose(dirs, np.diag(np.diag(dirs))) or np.any(np.diag(dirs) <= 0):
        raise RuntimeError(f"expected axis-aligned LPS directions, got {dirs}")
    step = np.diag(dirs)  # mm per voxel along L, P, S
    vol = hu.astype(np.float32)  # array axes (k: S, j: P, i: L)
    # anti-aliasing in-plane (0.63 mm -> 3 mm); none along z (5 mm -> 3 mm is an upsampling)
    sig = max((SPACING / step[0] - 1.0) / 2.0, 0.0)
    vol = ndi.gaussian_filter(vol, (0.0, sig, sig))
    # Centre: superior-inferior and left-right on the lung's bounding box, antero-posterior on the body's.
    lung = _lung_components(vol < LUNG_HU)
    body = _largest(vol >= LUNG_HU)
    li, bi = np.nonzero(lung), np.nonzero(body)
    centre_idx = np.array([(li[0].min() + li[0].max()) / 2, (bi[1].min() + bi[1].max()) / 2,
                           (li[2].min() + li[2].max()) / 2])  # (k, j, i)
    centre_mm = origin + centre_idx[::-1] * step  # (L, P, S) in mm
    n0, n1, n2 = SHAPE
    # axis 0: superior -> inferior; the lungs reach the top of the scan, so the grid starts at the top slice at
    # the highest (nothing above the scan, where padding would join the lungs to the outside air)
    top_mm = min(centre_mm[2] + (n0 - 1) / 2 * SPACING, origin[2] + (hu.shape[0] - 1) * step[2])
    s_mm = top_mm - np.arange(n0) * SPACING
    p_mm = centre_mm[1] + (np.arange(n1) - (n1 - 1) / 2) * SPACING  # axis 1: anterior -> posterior
    l_mm = centre_mm[0] + (np.arange(n2) - (n2 - 1) / 2) * SPACING  # axis 2: right -> left
    kk, jj, ii = np.meshgrid((s_mm - origin[2]) / step[2], (p_mm - origin[1]) / step[1],
                             (l_mm - origin[0]) / step[0], indexing="ij")
    out = ndi.map_coordinates(vol, np.stack([kk, jj, ii]), order=1, mode="nearest")
    return out.astype(np.float32)


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == np.argmax(sizes)


def _lung_components(air: np.ndarray) -> np.ndarray:
    """Air inside the body: components of ``air`` not touching the in-plane border (axes 1 and 2), keeping those at
    least ``KEEP_FRACTION`` of the largest. The superior/inferior faces are not used (the lungs may reach them)."""
    lab, _ = ndi.label(air)
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(),
                                       lab[:, :, -1].ravel()]))
    sizes = np.bincount(lab.ravel())
    sizes[border] = 0
    sizes[0] = 0
    keep = np.nonzero(sizes >= KEEP_FRACTION * sizes.max())[0]
    return np.isin(lab, keep)


def lung_mask(hu: np.ndarray) -> np.ndarray:
    mask = _lung_components(hu < LUNG_HU)
    mask = ndi.binary_closing(mask, structure=ndi.generate_binary_structure(3, 1), iterations=2, border_value=0)
    mask = np.stack([ndi.binary_fill_holes(s) for s in mask])  # vessels and nodules inside each axial slice
    return _lung_components(mask)  # drop bits the closing detached or attached at the border


def to_unit(hu: np.ndarray) -> np.ndarray:
    lo, hi = HU_WINDOW
    return np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# deformation and keypoints
# ---------------------------------------------------------------------------------------------------------------
def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def exhale_velocity(mask: np.ndarray) -> torch.Tensor:
    """The synthetic exhale's stationary velocity on the coarse grid ``VELOCITY_GRID`` (1, 3, *VELOCITY_GRID), in
    voxels of the fine grid; ``true_disp = lung_disp_from_velocity(velocity, SHAPE)``, and
    ``moving(y) = fixed(y + true_disp(y))``.

    In the moving (exhale) image the diaphragm is higher and the front of the chest further back, so a moving point
    samples the fixed (inhale) image further down (+axis 0) and further forward (-axis 1).
    """
    idx = np.nonzero(mask)
    top, bottom = float(idx[0].min()), float(idx[0].max())
    front, back = float(idx[1].min()), float(idx[1].max())
    c1, c2 = (idx[1].min() + idx[1].max()) / 2.0, (idx[2].min() + idx[2].max()) / 2.0
    # fine-grid coordinates of the coarse nodes (corners aligned, as the trilinear upsampling)
    axes = [np.linspace(0.0, n - 1.0, m) for n, m in zip(SHAPE, VELOCITY_GRID)]
    x0, x1, x2 = np.meshgrid(*axes, indexing="ij")
    taper = np.exp(-((x1 - c1) ** 2 + (x2 - c2) ** 2) / (2.0 * TAPER_SIGMA ** 2))
    si = _smoothstep((x0 - top) / (bottom - top)) * (DIAPHRAGM_MM / SPACING)
    ap = -(1.0 - _smoothstep((x1 - front) / (back - front))) * (CHEST_WALL_MM / SPACING)
    v = np.stack([si * taper, ap * taper, np.zeros_like(si)])
    vel = torch.from_numpy(v.astype(np.float32))[None]
    scale = (VELOCITY_GRID[0] - 1) / (SHAPE[0] - 1)
    vel = vel + random_velocity(VELOCITY_GRID, strength=NOISE_STRENGTH, smoothness=NOISE_SMOOTHNESS * scale,
                                seed=NOISE_SEED)
    return vel.to(torch.float16).to(torch.float32)  # float16-exact, stored as float16


def warp_jacobian_min(disp: torch.Tensor) -> float:
    """Smallest det(I + grad disp) (central differences) of a (1, 3, D, H, W) displacement."""
    d = disp[0].double().numpy()
    grad = np.stack([np.stack(np.gradient(d[i]), 0) for i in range(3)], 0) + np.eye(3).reshape(3, 3, 1, 1, 1)
    return float(np.linalg.det(np.moveaxis(grad, (0, 1), (-2, -1))).min())


def sample_linear(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear samples (border values outside, as ``grid_sample``'s border padding) of ``field`` (C, *spatial)
    at ``points`` (N, 3) voxel coordinates; returns (N, C) in float64."""
    pts = np.clip(points, 0.0, np.array(field.shape[1:], dtype=np.float64) - 1.0).T
    return np.stack([ndi.map_coordinates(f, pts, order=1, mode="nearest") for f in field.astype(np.float64)], 1)


def invert_at(disp: np.ndarray, points: np.ndarray, tol: float = INVERSE_TOL, max_iter: int = 500
              ) -> np.ndarray:
    """``w`` with ``w = -disp(points + w)`` (fixed-point iteration); ``points + w`` is where ``points`` go."""
    w = -sample_linear(disp, points)
    for _ in range(max_iter):
        new = -sample_linear(disp, points + w)
        err = float(np.abs(new - w).max())
        w = new
        if err < tol:
            break
    else:
        raise RuntimeError(f"inverse did not converge (last change {err:.2e} voxels)")
    residual = float(np.abs(points + w + sample_linear(disp, points + w) - points).max())
    if residual > 10 * tol:
        raise RuntimeError(f"inverse residual {residual:.2e} voxels")
    return w


def keypoints(fixed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``N_KEYPOINTS`` high-gradient points inside the eroded mask (deterministic), sub-voxel jittered."""
    grad = ndi.gaussian_gradient_magnitude(fixed.astype(np.float64), 1.0)
    inner = ndi.binary_erosion(mask, iterations=KP_ERODE, border_value=0)
    cand = np.argwhere(inner)
    score = grad[inner]
    cand = cand[score >= np.percentile(score, 100.0 - KP_TOP_PERCENT)]
    rng = np.random.default_rng(KP_SEED)
    cand = cand[rng.permutation(len(cand))]
    chosen: list[np.ndarray] = []
    for c in cand:
        if all(np.sum((c - q) ** 2) >= KP_MIN_DIST ** 2 for q in chosen):
            chosen.append(c)
            if len(chosen) == N_KEYPOINTS:
                break
    if len(chosen) < N_KEYPOINTS:
        raise RuntimeError(f"only {len(chosen)} keypoints found")
    pts = np.array(chosen, dtype=np.float64)
    pts = pts[np.lexsort(pts.T[::-1])]  # sorted by axis 0, then 1, then 2
    return pts + rng.uniform(-0.45, 0.45, size=pts.shape)  # still rounds to a voxel of the mask


def write_csv(path: Path, points: np.ndarray) -> None:
    path.write_text("".join(f"{p[0]:.6f},{p[1]:.6f},{p[2]:.6f}\n" for p in points), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
def build(hu: np.ndarray, header: dict[str, str]) -> dict[str, np.ndarray]:
    hu_r = resample(hu, header)
    mask = lung_mask(hu_r)
    fixed = to_uint8(to_unit(hu_r))
    velocity = exhale_velocity(mask)
    disp_t = lung_disp_from_velocity(velocity, SHAPE)
    if float(warp_jacobian_min(disp_t)) <= 0:
        raise RuntimeError("the exhale folds")
    fixed_kp = keypoints(fixed, mask)
    moving_kp = fixed_kp + invert_at(disp_t[0].numpy().astype(np.float64), fixed_kp)
    # round-trip through the CSV text, so that npz and CSV hold the same numbers
    fixed_kp = np.round(fixed_kp, 6).astype(np.float32)
    moving_kp = np.round(moving_kp, 6).astype(np.float32)
    return {
        "fixed": fixed, "fixed_seg": mask.astype(np.uint8), "velocity": velocity[0].numpy().astype(np.float16),
        "fixed_kp": fixed_kp, "moving_kp": moving_kp,
        "spacing": np.full(3, SPACING, dtype=np.float32),
        "labels": np.array([1], dtype=np.uint8), "label_names": np.array(["lung"]),
        "ids": np.array(["pyradiomics_lung2", "pyradiomics_lung2_exhale"]),
        "axes": np.array("axis 0: superior -> inferior, axis 1: anterior -> posterior, axis 2: right -> left"),
        "hu_window": np.array(HU_WINDOW, dtype=np.float32),
    }


def license_section(license_text: str) -> str:
    return f"""{LICENSE_BEGIN}
## `lung3d.npz` and `lung3d_keypoints/`: pyradiomics {PYRADIOMICS_VERSION} chest CT (BSD-3-Clause)

Rebuild with `python data/build_lung_sample.py`, which downloads the source archive `{SDIST}` with
`python -m pip download --no-deps --no-binary :all: --no-build-isolation pyradiomics=={PYRADIOMICS_VERSION}`
and reads `{IMAGE_MEMBER.split('/', 1)[1]}` out of it (no build, no install).

| file | source file | derivation |
|---|---|---|
| `lung3d.npz` `fixed`, `fixed_seg` | pyradiomics: `data/lung2_image.nrrd` (chest CT, 512 x 512 x 61, 0.627 x 0.627 x 5 mm) | resampled to {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} at {SPACING:g} mm (axis 0 superior -> inferior, 1 anterior -> posterior, 2 right -> left); HU clipped to [{HU_WINDOW[0]:g}, {HU_WINDOW[1]:g}] and scaled to [0, 1], uint8. `fixed_seg`: a lung mask by thresholding (HU < {LUNG_HU:g} inside the body), closing and hole filling (not a manual segmentation). |
| `lung3d.npz` `velocity` (`moving`, `moving_seg`, `true_disp` are computed from it at load time) | the same | a synthetic exhale (not a real breathing pair): `moving = warp(fixed, true_disp)`, a smooth diffeomorphism (diaphragm motion up to {DIAPHRAGM_MM:g} mm, chest wall up to {CHEST_WALL_MM:g} mm, random smooth noise seed {NOISE_SEED}). |
| `lung3d.npz` `fixed_kp`, `moving_kp`; `lung3d_keypoints/{CASE}_000{{0,1}}.csv` | the same | {N_KEYPOINTS} generated keypoints in the lung mask and their exact images under the synthetic exhale. |

The pyradiomics archive does not state where its `lung1`/`lung2` test images come from (its `data/README.md`
describes them only as test cases for the feature baselines). The licence of the archive, from `{LICENSE_MEMBER.split('/', 1)[1]}`:

```text
{license_text.strip()}
```
{LICENSE_END}
"""


def update_licenses(path: Path, section: str) -> None:
    """This script's section of ``LICENSES.md`` (``build_samples.update_licenses``)."""
    _update_licenses(path, section, LICENSE_BEGIN, LICENSE_END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "samples",
                        help="output folder (default: data/samples beside this script)")
    parser.add_argument("--source", type=Path, default=None,
                        help=f"folder holding (or receiving) {SDIST}; default: a temporary folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        archive = fetch_sdist(args.source if args.source is not None else Path(tmp))
        members = read_members(archive, [IMAGE_MEMBER, LICENSE_MEMBER])
    hu, header = read_nrrd(members[IMAGE_MEMBER])
    s = build(hu, header)

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "lung3d.npz", **s)
    kp_dir = args.out / "lung3d_keypoints"
    kp_dir.mkdir(exist_ok=True)
    write_csv(kp_dir / f"{CASE}_0000.csv", s["fixed_kp"])
    write_csv(kp_dir / f"{CASE}_0001.csv", s["moving_kp"])
    update_licenses(args.out / "LICENSES.md", license_section(members[LICENSE_MEMBER].decode("utf-8")))

    d = lung_disp_from_velocity(torch.from_numpy(s["velocity"].astype(np.float32))[None], SHAPE).numpy()
    mag = np.linalg.norm((s["moving_kp"] - s["fixed_kp"]) * SPACING, axis=1)
    print(f"lung3d: shape {s['fixed'].shape}, spacing {SPACING} mm, lung fraction {s['fixed_seg'].mean():.3f}, "
          f"|true_disp| max {np.abs(d).max() * SPACING:.1f} mm, "
          f"{len(mag)} keypoints, identity TRE mean {mag.mean():.2f} mm (max {mag.max():.2f})")
    for path in [args.out / "lung3d.npz", *sorted(kp_dir.iterdir())]:
        print(f"{path.stat().st_size / 1e3:9.1f} kB  {path}")
    print(f"built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
