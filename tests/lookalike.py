"""Generators of tiny look-alike dataset trees (Learn2Reg OASIS, neurite-oasis, NLST) with the known quirks.

Reusable by any test: ``make_l2r_oasis(tmp_path / "OASIS")`` etc. Arrays are tiny and random; the files follow
the real names, JSON keys and quirks documented in the OASIS and NLST loaders' docstrings.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np


def write_nifti(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))
    return path


def _brain(rng: np.random.Generator, shape: Sequence[int], n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    img = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
    img.flat[0], img.flat[1] = 1.02, -0.01  # a little outside [0, 1], as real "about [0, 1]" data
    seg = rng.integers(0, n_labels + 1, size=shape).astype(np.uint8)
    return img, seg


def make_l2r_oasis(root: Path, subjects: Sequence[int] = (1, 2, 3, 4, 5, 395, 396, 397),
                   val_pairs: Sequence[tuple[int, int]] = ((395, 396), (396, 397)),
                   shape: Sequence[int] = (12, 14, 10), n_test_csv: int = 2, seed: int = 0) -> Path:
    """A Learn2Reg OASIS task-3 tree: validation subjects also under ``training``, test entries ending ``.csv``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    training = []
    for s in subjects:
        name = f"OASIS_{s:04d}_0000.nii.gz"
        img, seg = _brain(rng, shape, 35)
        write_nifti(root / "imagesTr" / name, img)
        write_nifti(root / "labelsTr" / name, seg)
        write_nifti(root / "masksTr" / name, (seg > 0).astype(np.uint8))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "mask": f"./masksTr/{name}"})
    test = [{"image": f"./imagesTs/OASIS_{415 + i:04d}_0000.csv"} for i in range(n_test_csv)]
    training += [{"image": f"./imagesTs/OASIS_{500 + i:04d}_0000.csv", "label": "./labelsTs/x.csv"}
                 for i in range(n_test_csv)]
    meta = {
        "name": "OASIS", "release": "1.1", "pairings": "unpaired", "tensorImageShape": {"0": list(shape)},
        "numTraining": len(subjects), "training": training, "test": test,
        "registration_test": [{"fixed": t["image"], "moving": t["image"]} for t in test],
        "registration_val": [{"fixed": f"./imagesTr/OASIS_{a:04d}_0000.nii.gz",
                              "moving": f"./imagesTr/OASIS_{b:04d}_0000.nii.gz"} for a, b in val_pairs],
    }
    (root / "OASIS_dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def make_neurite_oasis(root: Path, n_subjects: int = 8, shape3d: Sequence[int] = (12, 14, 10),
                       shape2d: Sequence[int] = (16, 20), seed: int = 0) -> Path:
    """A neurite-oasis tree: ``subjects.txt``, 3D ``aligned_*`` and 2D ``slice_*`` (stored ``H x W x 1``)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    names = [f"OASIS_OAS1_{i + 1:04d}_MR1" for i in range(n_subjects)]
    for n in names:
        img, seg = _brain(rng, shape3d, 35)
        write_nifti(root / n / "aligned_norm.nii.gz", img)
        write_nifti(root / n / "aligned_seg35.nii.gz", seg)
        img2, seg2 = _brain(rng, shape2d, 24)
        write_nifti(root / n / "slice_norm.nii.gz", img2[..., None])
        write_nifti(root / n / "slice_seg24.nii.gz", seg2[..., None])
    (root / "subjects.txt").write_text("\n".join(names) + "\n")
    (root / "seg35_labels.txt").write_text("0 Unknown 0 0 0 0\n1 Left-Cerebral-White-Matter 245 245 245 0\n")
    return root


def make_nlst(root: Path, train_cases: Sequence[int] = (1, 2, 3, 33), val_cases: Sequence[int] = (101, 102),
              shape: Sequence[int] = (12, 14, 10), missing: Sequence[int] = (33,), typo: bool = True,
              kp_rows: Sequence[int] = (5, 1, 7, 3, 4, 6), seed: int = 0) -> Path:
    """An NLST tree with the quirks: keypoint entries ``.nii.gz`` (files ``.csv``), validation cases listed in
    ``training_paired_images``, missing cases (no files at all), the ``NLST_00101`` typo, headerless CSVs with
    varying row counts (``kp_rows[i % len]`` rows for the i-th case written)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    all_cases = list(dict.fromkeys([*train_cases, *val_cases]))
    training = []
    written = 0
    for c in all_cases:
        for ch in ("0000", "0001"):
            name = f"NLST_{c:04d}_{ch}"
            training.append({"image": f"./imagesTr/{name}.nii.gz", "mask": f"./masksTr/{name}.nii.gz",
                             "keypoints": f"./keypointsTr/{name}.nii.gz"})
        if c in missing:
            continue
        n = kp_rows[written % len(kp_rows)]
        written += 1
        kp = rng.uniform(0, np.array(shape) - 1, size=(n, 3))
        for ch, off in (("0000", 0.0), ("0001", 0.5)):
            name = f"NLST_{c:04d}_{ch}"
            write_nifti(root / "imagesTr" / f"{name}.nii.gz",
                        rng.uniform(-1200, 800, size=shape).astype(np.int16))
            mask = np.zeros(shape, np.uint8)
            mask[2:-2, 2:-2, 2:-2] = 1
            write_nifti(root / "masksTr" / f"{name}.nii.gz", mask)
            (root / "keypointsTr").mkdir(parents=True, exist_ok=True)
            np.savetxt(root / "keypointsTr" / f"{name}.csv", np.clip(kp + off, 0, np.array(shape) - 1),
                       delimiter=",", fmt="%.6f")

    def pair(c: int, typo_here: bool = False) -> dict:
        fixed = f"NLST_{c:05d}_0000" if typo_here else f"NLST_{c:04d}_0000"
        return {"fixed": f"./imagesTr/{fixed}.nii.gz", "moving": f"./imagesTr/NLST_{c:04d}_0001.nii.gz"}

    meta = {
        "name": "NLST", "release": "0.91", "pairings": "paired", "tensorImageShape": {"0": list(shape)},
        "numTraining": len(training), "training": training,
        "training_paired_images": [pair(c) for c in all_cases],  # validation cases listed too (quirk)
        "registration_val": [pair(c, typo and i == 0 and c >= 100) for i, c in enumerate(val_cases)],
    }
    (root / "NLST_dataset.json").write_text(json.dumps(meta, indent=1))
    return root
