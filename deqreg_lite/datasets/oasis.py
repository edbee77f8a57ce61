"""OASIS brain MRI pairs, from the Learn2Reg task-3 release (``layout="l2r"``) or neurite-oasis (``"neurite"``).

The data is not shipped (OASIS Data Use Agreement: cite OASIS and HyperMorph). Put it under
``$DEQREG_DATA_DIR/OASIS`` (Learn2Reg: ``OASIS_dataset.json``, ``imagesTr``, ``labelsTr``, ``masksTr``) or
``$DEQREG_DATA_DIR/neurite-oasis`` (``subjects.txt`` and one folder per subject), or pass ``root=``.

Pairs (``len()`` counts pairs; item ``i`` is one pair's sample dict):

* ``l2r``, ``split="val"``: the JSON's ``registration_val`` pairs, as listed (0395->0396 ... 0413->0414).
* ``l2r``, ``split="train"``: the ``training`` subjects **minus every subject that appears in**
  ``registration_val`` (quirk: they are also listed under ``training``), in JSON order; pairs are consecutive
  (``s0->s1, s1->s2, ...``) or, with ``pairs="random"``, ``n_pairs`` seeded random ordered pairs of distinct subjects.
* ``l2r``, ``split="test"``: the release's test entries point to ``.csv`` files (quirk), not images, so there are
  no test images; entries of ``registration_test`` (if any) that name ``.nii.gz`` files are used, ``.csv`` ones are
  skipped (listed in ``skipped``), and a ``ValueError`` is raised when nothing is left. Any ``training`` entry whose
  image ends in ``.csv`` is skipped the same way.
* ``neurite``: the subjects of ``subjects.txt`` in file order are split deterministically into train / val / test:
  the paper's 300 / 30 / 84 when there are at least 414 subjects (the first 300, the next 30, the rest), otherwise
  proportionally (``val = max(1, round(n * 30 / 414))``, ``test = max(1, round(n * 84 / 414))``, train the rest; at
  least 4 subjects). Pairs within a split are consecutive (or seeded random for ``pairs="random"``).
  ``ndim=2`` reads ``slice_norm`` / ``slice_seg24`` (160 x 192, labels 1..24), ``ndim=3`` reads ``aligned_norm`` /
  ``aligned_seg35`` (labels 1..35).

Labels. ``labels`` is a list of label values to evaluate, or a preset name of :data:`LABEL_PRESETS`. The default is
``"seg35"`` (1..35) in 3D and ``"seg24"`` (1..24) for the neurite 2D slices. ``"vxm30"`` holds the 30 FreeSurfer
*aseg* IDs that VoxelMorph evaluates on, probably the paper's "30 labels"; they only make sense for aseg-labelled
data. Both the Learn2Reg and the neurite seg35 maps use the compact 1..35 numbering, and the exact mapping between the
30 aseg IDs and seg35 values is not documented, so we do not guess one: with seg35 data use ``"seg35"`` (or your
own subset). The segmentations are returned as stored; ``labels`` only says which values count.

Images are used as stored (orientation headers are not trusted). Both releases store intensities in about [0, 1]:
values within [-0.05, 1.05] (the overshoot of preprocessed data) are clipped to [0, 1]. A volume outside that (e.g.
0..255) is rescaled min-max to [0, 1] with a ``UserWarning`` naming the file, never clipped
(:func:`deqreg_lite._checks.to_unit_range`); NaN/inf voxels are a ``ValueError``. ``size`` resamples (corners
aligned, see :mod:`._nifti`) and ``spacing`` follows (1 mm stored by default).
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_options, to_unit_range
from ..config import data_dir
from ._nifti import (check_files, find_root, check_shapes, load_array, missing_root_error, normalise_size, read_json,
                     resize_image, resize_label, scaled_spacing)

__all__ = ["OASIS", "LABEL_PRESETS", "neurite_split_sizes"]

#: named label lists (see the module docstring for the aseg / seg35 question).
LABEL_PRESETS: dict[str, list[int]] = {
    "seg35": list(range(1, 36)),
    "seg24": list(range(1, 25)),
    "seg4": [1, 2, 3, 4],
    "vxm30": [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, 46, 47, 49, 50, 51, 52,
              53, 54, 60, 63],
}

L2R_SOURCE = "the Learn2Reg challenge (task 3, OASIS, release 1.1) at learn2reg.grand-challenge.org"
NEURITE_SOURCE = "the neurite-oasis v1.0 page (github.com/adalca/medical-datasets, the HyperMorph OASIS data)"
_SUBJ_RE = re.compile(r"(OASIS_\d+)_\d{4}")
_SPLITS = ("train", "val", "test")


def neurite_split_sizes(n: int) -> tuple[int, int, int]:
    """``(train, val, test)`` subject counts for ``n`` neurite subjects (300/30/84 when ``n >= 414``)."""
    if n >= 414:
        return 300, 30, n - 330
    if n < 4:
        raise ValueError(f"the neurite layout needs at least 4 subjects to split into train/val/test, got {n}")
    n_val = max(1, round(n * 30 / 414))
    n_test = max(1, round(n * 84 / 414))
    return n - n_val - n_test, n_val, n_test


def _subject_id(path: str) -> str:
    name = Path(path).name
    m = _SUBJ_RE.search(name)
    return m.group(1) if m else name.split(".")[0]


def _make_pairs(subjects: list, pairs: str, n_pairs: int | None, seed: int) -> list[tuple]:
    if len(subjects) < 2:
        raise ValueError(f"need at least 2 subjects to make pairs, got {len(subjects)}")
    if pairs == "consecutive":
        out = list(zip(subjects[:-1], subjects[1:]))
        return out[:n_pairs] if n_pairs is not None else out
    rng = random.Random(seed)
    n = n_pairs if n_pairs is not None else len(subjects)
    out = []
    for _ in range(n):
        a, b = rng.sample(range(len(subjects)), 2)
        out.append((subjects[a], subjects[b]))
    return out


class OASIS(Dataset):
    """Pairs of OASIS brains as sample dicts (see the module docstring for layouts, splits and labels).

    Args:
        root: the folder holding ``OASIS_dataset.json`` (``l2r``) or ``subjects.txt`` (``neurite``); default
            ``$DEQREG_DATA_DIR/OASIS`` or ``$DEQREG_DATA_DIR/neurite-oasis``.
        layout: ``"l2r"`` or ``"neurite"``.
        ndim: 3, or 2 (neurite 2D slices only).
        size: spatial size to resample to; ``"auto"`` = ``(128, 128, 128)`` in 3D (the paper) and the stored
            160 x 192 in 2D; ``None`` keeps the stored size.
        labels: label values or a :data:`LABEL_PRESETS` name; default ``"seg35"`` (3D) / ``"seg24"`` (2D).
        split: ``"train"``, ``"val"`` or ``"test"``.
        pairs: ``"consecutive"`` or ``"random"`` (train split of l2r, every split of neurite).
        n_pairs: number of pairs (default: all consecutive pairs, or as many random pairs as subjects).
        seed: seed of the random pairs.
        spacing: stored voxel size in mm (both releases are 1 mm isotropic).
    Item keys: ``fixed``, ``moving`` (float32 ``(1, 1, *spatial)`` in [0, 1]), ``fixed_seg``, ``moving_seg``
    (int64), ``spacing``, ``labels``, ``ids`` (``(fixed id, moving id)``), ``layout``, and ``fixed_mask``,
    ``moving_mask`` (bool) when the release has brain masks (Learn2Reg ``masksTr``).
    Attributes: ``pairs`` (list of ``(fixed, moving)`` subject records), ``subjects``, ``skipped`` (entries ignored
    because they name ``.csv`` files), ``root``.
    """

    def __init__(self, root: str | Path | None = None, layout: str = "l2r", ndim: int = 3,
                 size: Sequence[int] | None | str = "auto", labels: Sequence[int] | str | None = None,
                 split: str = "train", pairs: str = "consecutive", n_pairs: int | None = None, seed: int = 0,
                 spacing: float = 1.0) -> None:
        check_options(layout, ("l2r", "neurite"), "layout")
        check_options(split, _SPLITS, "split")
        check_options(pairs, ("consecutive", "random"), "pairs")
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if layout == "l2r" and ndim == 2:
            raise ValueError("the Learn2Reg OASIS release is 3D only; use layout='neurite' for the 2D slices")
        self.layout, self.ndim, self.split = layout, ndim, split
        if isinstance(size, str):
            if size != "auto":
                raise ValueError(f"size must be 'auto', None or {ndim} integers, got {size!r}")
            size = (128, 128, 128) if ndim == 3 else None
        self.size = normalise_size(size, ndim)
        if labels is None:
            labels = "seg35" if ndim == 3 else "seg24"
        if isinstance(labels, str):
            if labels not in LABEL_PRESETS:
                raise ValueError(f"unknown label preset {labels!r}; presets: {sorted(LABEL_PRESETS)}")
            labels = LABEL_PRESETS[labels]
        self.labels = [int(v) for v in labels]
        self.stored_spacing = (float(spacing),) * ndim
        self.skipped: list[str] = []
        sub = "OASIS" if layout == "l2r" else "neurite-oasis"
        self.root = find_root(Path(root).expanduser() if root is not None else data_dir() / sub,
                              "OASIS_dataset.json" if layout == "l2r" else "subjects.txt")
        if layout == "l2r":
            self._init_l2r(pairs, n_pairs, seed)
        else:
            self._init_neurite(pairs, n_pairs, seed)

    # ---------------------------------------------------------------- Learn2Reg
    def _init_l2r(self, pairs: str, n_pairs: int | None, seed: int) -> None:
        js = self.root / "OASIS_dataset.json"
        if not js.is_file():
            raise missing_root_error("Learn2Reg OASIS", self.root, "OASIS_dataset.json", L2R_SOURCE, "OASIS")
        required = ["training", "registration_val"] if self.split != "test" else ["training"]
        meta = read_json(js, required)
        records: dict[str, dict] = {}
        for i, entry in enumerate(meta["training"]):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise ValueError(f"{js} is malformed: training[{i}] must hold 'image' and 'label', got {entry!r}")
            if str(entry["image"]).endswith(".csv"):
                self.skipped.append(str(entry["image"]))
                continue
            sid = _subject_id(entry["image"])
            records[sid] = self._l2r_record(sid, entry["image"], entry.get("label"), entry.get("mask"))
        if self.split == "test":
            plist = [p for p in meta.get("registration_test", meta.get("test", [])) if isinstance(p, dict)]
        else:
            plist = meta["registration_val"]
        val_pairs = []
        for i, p in enumerate(plist):
            if not isinstance(p, dict) or "fixed" not in p or "moving" not in p:
                raise ValueError(f"{js} is malformed: pair {i} must hold 'fixed' and 'moving', got {p!r}")
            if str(p["fixed"]).endswith(".csv") or str(p["moving"]).endswith(".csv"):
                self.skipped.append(f"{p['fixed']} -> {p['moving']}")
                continue
            ids = []
            for key in ("fixed", "moving"):
                sid = _subject_id(p[key])
                if sid not in records:  # not under training: derive label / mask paths from the image path
                    records[sid] = self._l2r_record(sid, p[key], str(p[key]).replace("images", "labels"),
                                                    str(p[key]).replace("images", "masks"), optional_mask=True)
                ids.append(sid)
            val_pairs.append(tuple(ids))
        if self.split == "train":
            held = {s for p in meta["registration_val"] if isinstance(p, dict)
                    for s in (_subject_id(p.get("fixed", "")), _subject_id(p.get("moving", "")))}
            names = [s for s in dict.fromkeys(_subject_id(e["image"]) for e in meta["training"]
                                              if not str(e["image"]).endswith(".csv")) if s not in held]
            self.subjects = names
            id_pairs = _make_pairs(names, pairs, n_pairs, seed)
        else:
            if not val_pairs:
                raise ValueError(f"{js} lists no usable {self.split} pairs (the Learn2Reg OASIS test entries name "
                                 f".csv files, not images: the test images are not public); use split='val'")
            id_pairs = val_pairs
            self.subjects = list(dict.fromkeys(s for p in id_pairs for s in p))
        self.pairs = [(records[a], records[b]) for a, b in id_pairs]
        self._check_pair_files()

    def _l2r_record(self, sid: str, image: str, label: str | None, mask: str | None,
                    optional_mask: bool = False) -> dict:
        rec = {"id": sid, "image": self.root / image, "label": self.root / label if label else None}
        if rec["label"] is None:
            rec["label"] = self.root / str(image).replace("images", "labels")
        if mask:
            m = self.root / mask
            rec["mask"] = None if optional_mask and not m.is_file() else m
        else:
            rec["mask"] = None
        return rec

    # ---------------------------------------------------------------- neurite
    def _init_neurite(self, pairs: str, n_pairs: int | None, seed: int) -> None:
        txt = self.root / "subjects.txt"
        if not txt.is_file():
            raise missing_root_error("neurite-oasis", self.root, "subjects.txt", NEURITE_SOURCE, "neurite-oasis")
        names = [ln.strip() for ln in txt.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        names = list(dict.fromkeys(names))
        n_tr, n_val, _ = neurite_split_sizes(len(names))
        parts = {"train": names[:n_tr], "val": names[n_tr:n_tr + n_val], "test": names[n_tr + n_val:]}
        self.subjects = parts[self.split]
        img, seg = ("slice_norm", "slice_seg24") if self.ndim == 2 else ("aligned_norm", "aligned_seg35")
        recs = {s: {"id": s, "image": self.root / s / f"{img}.nii.gz", "label": self.root / s / f"{seg}.nii.gz",
                    "mask": None} for s in self.subjects}
        self.pairs = [(recs[a], recs[b]) for a, b in _make_pairs(self.subjects, pairs, n_pairs, seed)]
        self._check_pair_files()

    # ---------------------------------------------------------------- common
    def _check_pair_files(self) -> None:
        paths = [r[k] for p in self.pairs for r in p for k in ("image", "label", "mask") if r[k] is not None]
        check_files(paths, f"OASIS ({self.layout}, split={self.split!r}) under {self.root}")

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, rec: dict) -> dict:
        arrays = {"image": load_array(rec["image"], self.ndim), "label": load_array(rec["label"], self.ndim)}
        if rec["mask"] is not None:
            arrays["mask"] = load_array(rec["mask"], self.ndim)
        check_shapes({f"{k} ({rec[k].name})": v for k, v in arrays.items()}, f"subject {rec['id']}")
        return arrays

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        fr, mr = self.pairs[index]
        f, m = self._load(fr), self._load(mr)
        check_shapes({f"fixed {fr['id']}": f["image"], f"moving {mr['id']}": m["image"]}, "pair")
        stored = f["image"].shape
        sample: dict = {"layout": self.layout, "labels": list(self.labels), "ids": (fr["id"], mr["id"])}
        recs = {"fixed": fr, "moving": mr}
        for name, arr in (("fixed", f), ("moving", m)):
            x = torch.from_numpy(to_unit_range(arr["image"], f"OASIS {recs[name]['image']}"))[None, None]
            sample[name] = resize_image(x, self.size).contiguous()
            seg = torch.from_numpy(np.rint(np.asarray(arr["label"])).astype(np.int64))[None, None]
            sample[f"{name}_seg"] = resize_label(seg, self.size).contiguous()
            if "mask" in arr:
                mask = torch.from_numpy(np.asarray(arr["mask"]) > 0)[None, None]
                sample[f"{name}_mask"] = resize_label(mask, self.size).contiguous()
        new = self.size if self.size is not None else stored
        sample["spacing"] = scaled_spacing(self.stored_spacing, stored, new)
        return sample

    def __repr__(self) -> str:
        return (f"OASIS(layout={self.layout!r}, ndim={self.ndim}, split={self.split!r}, pairs={len(self)}, "
                f"size={self.size}, root={str(self.root)!r})")
