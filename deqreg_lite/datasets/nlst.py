"""NLST lung CT pairs (Learn2Reg release 0.91): inspiration/expiration pairs with lung masks and keypoints.

The data is not shipped. Put it under ``$DEQREG_DATA_DIR/NLST`` (``NLST_dataset.json``, ``imagesTr``,
``masksTr``, ``keypointsTr``) or pass ``root=``. Case ``NLST_XXXX``: fixed ``NLST_XXXX_0000`` (baseline),
moving ``NLST_XXXX_0001`` (follow-up); mask ``masksTr/<name>.nii.gz``; keypoints ``keypointsTr/<name>.csv``.

Splits: ``"val"`` = the JSON's ``registration_val`` pairs (0101-0110); ``"train"`` = ``training_paired_images``
minus every case that appears in ``registration_val`` (quirk: they are listed in both), duplicates dropped.

Quirks handled:

* the ``keypoints`` entries of the JSON end in ``.nii.gz`` while the files are ``.csv``: keypoint paths are always
  taken as ``.csv`` (from the ``training`` entry when it exists, else derived from the image name);
* a case whose files are *all* absent (``NLST_0033`` in one public copy) is skipped with a ``UserWarning``
  (``missing="raise"`` makes it an error); a case with only *some* files absent is an error that lists them all;
* the typo ``NLST_00101`` (five digits) is mapped to ``NLST_0101`` with a ``UserWarning``;
* keypoint CSVs have no header and a varying number of rows (0-based voxel indices in array-axis order; row ``i``
  of ``_0000`` matches row ``i`` of ``_0001``; an empty file gives ``(0, 3)``); unequal row counts are an error.

Images: HU clipped to ``hu_window`` then mapped linearly to [0, 1]; arrays as stored (orientation headers are not
trusted); spacing 1.5 mm. A volume whose values already lie in [0, 1] (not HU: a CT in HU spans about -1000 to
+1000) is used as stored, with a ``UserWarning`` naming the file, since the window would squash it to a constant
~0.67; NaN/inf voxels are a ``ValueError``.

Keypoints: a row holding NaN/inf, or a keypoint outside its stored volume (any coordinate outside
``[-0.5, n - 0.5]``), is a ``ValueError`` that names the file and says how many rows. With ``size``, images are resampled trilinearly, masks by nearest neighbour (corners
aligned) and keypoints scaled by ``(m - 1) / (n - 1)`` per axis; spacing follows.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import UNIT_RANGE_TOL, check_keypoints, check_options
from ..config import data_dir
from ._nifti import (check_files, find_root, check_shapes, load_array, missing_root_error, normalise_size, read_json,
                     resize_image, resize_label, scale_factors, scaled_spacing)

__all__ = ["NLST", "read_keypoints", "normalise_nlst_name"]

NLST_SOURCE = "the Learn2Reg challenge (NLST task, release 0.91) at learn2reg.grand-challenge.org"
_NAME_RE = re.compile(r"NLST_(\d+)_(\d{4})")


def normalise_nlst_name(path: str) -> tuple[str, str]:
    """``(case, file name)`` for a JSON path, mapping typos such as ``NLST_00101_0000`` to ``NLST_0101_0000``.

    Returns the case id (``"NLST_0101"``) and the canonical image file name (``"NLST_0101_0000.nii.gz"``).
    """
    name = Path(str(path)).name
    m = _NAME_RE.search(name)
    if not m:
        raise ValueError(f"cannot read an NLST case from {path!r}; expected a name like NLST_0001_0000.nii.gz")
    num = int(m.group(1))
    case = f"NLST_{num:04d}"
    if m.group(1) != f"{num:04d}":
        warnings.warn(f"NLST: mapped the misspelt name {name!r} to {case}_{m.group(2)} (known typo of a public "
                      f"copy)", UserWarning, stacklevel=3)
    return case, f"{case}_{m.group(2)}.nii.gz"


def read_keypoints(path: str | Path) -> np.ndarray:
    """A headerless keypoint CSV as float32 ``(N, 3)`` (0-based voxel indices in array-axis order).

    ``ValueError`` naming the file and how many rows when a row holds NaN or inf (:class:`NLST` also checks that
    every keypoint lies inside its volume)."""
    path = Path(path)
    text = path.read_text().strip()
    if not text:
        return np.zeros((0, 3), dtype=np.float32)
    try:
        kp = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: expected a headerless CSV of 3 numbers per row ({exc})") from exc
    if kp.shape[1] != 3:
        raise ValueError(f"{path}: expected 3 columns per row, got {kp.shape[1]}")
    check_keypoints(torch.from_numpy(kp), None, "keypoints", where=str(path))  # NaN / inf rows
    return kp.astype(np.float32)


class NLST(Dataset):
    """NLST pairs as sample dicts.

    Args:
        root: the folder holding ``NLST_dataset.json`` (default ``$DEQREG_DATA_DIR/NLST``).
        split: ``"train"`` or ``"val"``.
        size: spatial size to resample to, or ``None`` (default) for the stored 224 x 192 x 224.
        hu_window: ``(low, high)`` HU clip before normalising to [0, 1].
        spacing: stored voxel size in mm (1.5 isotropic).
        missing: ``"warn"`` (skip cases whose files are all absent) or ``"raise"``.
    Item keys: ``fixed``, ``moving`` (float32 ``(1, 1, D, H, W)`` in [0, 1]), ``fixed_mask``, ``moving_mask``
    (bool ``(1, 1, D, H, W)``, lung masks), ``fixed_kp``, ``moving_kp`` (float32 ``(N, 3)`` voxel indices at the
    returned size), ``spacing``, ``ids`` (``("NLST_0101_0000", "NLST_0101_0001")``), ``case``, ``labels`` (``[]``:
    no segmentations). Attributes: ``cases``, ``skipped`` (missing cases), ``root``.
    """

    def __init__(self, root: str | Path | None = None, split: str = "train", size: Sequence[int] | None = None,
                 hu_window: tuple[float, float] = (-1000.0, 500.0), spacing: float = 1.5,
                 missing: str = "warn") -> None:
        check_options(split, ("train", "val"), "split")
        check_options(missing, ("warn", "raise"), "missing")
        lo, hi = (float(v) for v in hu_window)
        if not hi > lo:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {hu_window}")
        self.split, self.hu_window, self.size = split, (lo, hi), normalise_size(size, 3)
        self.stored_spacing = (float(spacing),) * 3
        self.root = find_root(Path(root).expanduser() if root is not None else data_dir() / "NLST",
                              "NLST_dataset.json")
        js = self.root / "NLST_dataset.json"
        if not js.is_file():
            raise missing_root_error("NLST", self.root, "NLST_dataset.json", NLST_SOURCE, "NLST")
        meta = read_json(js, ["training_paired_images", "registration_val"])

        # paths of masks / keypoints from the `training` entries, keyed by canonical image name
        extra: dict[str, dict] = {}
        for entry in meta.get("training", []) or []:
            if isinstance(entry, dict) and "image" in entry:
                _, name = normalise_nlst_name(entry["image"])
                extra[name] = entry

        def cases_of(key: str) -> list[str]:
            out = []
            for i, p in enumerate(meta[key]):
                if not isinstance(p, dict) or "fixed" not in p or "moving" not in p:
                    raise ValueError(f"{js} is malformed: {key}[{i}] must hold 'fixed' and 'moving', got {p!r}")
                cf, _ = normalise_nlst_name(p["fixed"])
                cm, _ = normalise_nlst_name(p["moving"])
                if cf != cm:
                    raise ValueError(f"{js}: {key}[{i}] pairs different cases {cf} and {cm}")
                out.append(cf)
            return list(dict.fromkeys(out))

        val = cases_of("registration_val")
        cases = val if split == "val" else [c for c in cases_of("training_paired_images") if c not in set(val)]
        self.skipped: list[str] = []
        self.cases: list[str] = []
        self._files: list[dict] = []
        partial: list[Path] = []
        for case in cases:
            files = {}
            for side, ch in (("fixed", "0000"), ("moving", "0001")):
                name = f"{case}_{ch}.nii.gz"
                e = extra.get(name, {})
                files[side] = self.root / "imagesTr" / name
                mask = e.get("mask")
                files[f"{side}_mask"] = self.root / (mask if mask else f"masksTr/{name}")
                kp = e.get("keypoints")
                kp = re.sub(r"\.nii(\.gz)?$", ".csv", kp) if kp else f"keypointsTr/{case}_{ch}.csv"
                files[f"{side}_kp"] = self.root / kp
            present = [p.is_file() for p in files.values()]
            if not any(present):
                if missing == "raise":
                    raise FileNotFoundError(f"NLST case {case} is listed in {js} but none of its files exist "
                                            f"(e.g. {files['fixed']})")
                warnings.warn(f"NLST: case {case} is listed in {js.name} but absent from {self.root}; skipped "
                              f"(a known gap of one public copy is NLST_0033)", UserWarning, stacklevel=2)
                self.skipped.append(case)
                continue
            partial += [p for p, ok in zip(files.values(), present) if not ok]
            self.cases.append(case)
            self._files.append(files)
        check_files(partial, f"NLST (split={split!r}) under {self.root}")
        if not self.cases:
            raise FileNotFoundError(f"NLST (split={split!r}): none of the {len(cases)} listed cases has files "
                                    f"under {self.root}/imagesTr")

    def __len__(self) -> int:
        return len(self.cases)

    def _image(self, arr: np.ndarray, where: Path) -> torch.Tensor:
        x = np.asarray(arr, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"NLST {where}: the image holds {int((~np.isfinite(x)).sum())} NaN or inf values")
        vmin, vmax = float(x.min()), float(x.max())
        if vmin >= -UNIT_RANGE_TOL and vmax <= 1.0 + UNIT_RANGE_TOL:
            # already normalised, not HU: the HU window would map it to a near-constant ~0.67 image
            warnings.warn(f"NLST {where}: intensities span [{vmin:.4g}, {vmax:.4g}], which is [0, 1], not HU; used "
                          f"as stored (clipped to [0, 1]) instead of applying hu_window={self.hu_window}",
                          UserWarning, stacklevel=3)
            x = np.clip(x, 0.0, 1.0)
        else:
            lo, hi = self.hu_window
            x = (np.clip(x, lo, hi) - lo) / (hi - lo)
        return resize_image(torch.from_numpy(x)[None, None], self.size).contiguous()

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        case, files = self.cases[index], self._files[index]
        arrays = {k: load_array(files[k], 3) for k in ("fixed", "moving", "fixed_mask", "moving_mask")}
        check_shapes({f"{k} ({files[k].name})": v for k, v in arrays.items()}, f"NLST case {case}")
        kps = {k: read_keypoints(files[k]) for k in ("fixed_kp", "moving_kp")}
        if len(kps["fixed_kp"]) != len(kps["moving_kp"]):
            raise ValueError(f"NLST case {case}: {files['fixed_kp'].name} has {len(kps['fixed_kp'])} rows but "
                             f"{files['moving_kp'].name} has {len(kps['moving_kp'])}; rows must correspond")
        stored = arrays["fixed"].shape
        for k in ("fixed_kp", "moving_kp"):
            check_keypoints(torch.from_numpy(kps[k]), stored, "keypoints", where=str(files[k]))
        new = self.size if self.size is not None else stored
        factors = torch.from_numpy(scale_factors(stored, new).astype(np.float32))
        sample: dict = {"case": case, "ids": (f"{case}_0000", f"{case}_0001"), "labels": [],
                        "spacing": scaled_spacing(self.stored_spacing, stored, new)}
        for side in ("fixed", "moving"):
            sample[side] = self._image(arrays[side], files[side])
            mask = torch.from_numpy(np.asarray(arrays[f"{side}_mask"]) > 0)[None, None]
            sample[f"{side}_mask"] = resize_label(mask, self.size).contiguous()
            sample[f"{side}_kp"] = torch.from_numpy(kps[f"{side}_kp"]) * factors
        return sample

    def __repr__(self) -> str:
        return f"NLST(split={self.split!r}, pairs={len(self)}, size={self.size}, root={str(self.root)!r})"
