"""Training and evaluation pairs for the 2D models, generated from the shipped brain slices.

Only two real 2D brains ship with the package (``brain2d``: the MNI template slice and a dipy T1 slice), so the
2D models learn from pairs *generated* around them. Every item is a function of ``(split, seed, index)`` only:
item ``i`` is always the same, whatever was drawn before it, and in whatever order items are asked for.

Kinds of pairs (``kinds``; item ``i`` has kind ``kinds[i % len(kinds)]``, so repeat a name to weight it):

``"brain"``  intra-subject: one of the two brain slices (picked at random) is deformed twice, by two independent
             random smooth diffeomorphisms, and gets two independent mild intensity changes (gamma and bias);
             the labels are warped with nearest-neighbour interpolation.
``"inter"``  inter-subject: the real pair (template slice -> dipy slice), each side deformed by its own random
             diffeomorphism and intensity change, so the pair keeps the real anatomical difference.
``"synth"``  SynthMorph-style: a random label map painted twice with random intensities, one copy deformed
             (:func:`deqreg_lite.datasets.synthetic.synthetic_pair`), labels ``1 .. n_labels - 1``.

Seeds. Item ``i`` of split ``split`` with base seed ``seed`` is drawn from the integer :func:`item_seed`, which lies
in ``SEED_RANGES[split]``: train ``[0, 10^6)``, val ``[10^9, 10^9 + 10^6)``, test ``[2 10^9, 2 10^9 + 10^6)``.
The ranges are disjoint, so no evaluation pair is ever generated with a seed used in training.

The evaluation set (``split="val"`` or ``"test"``, built by :func:`brain_pairs`): item 0 is the **real
inter-subject pair** (``brain2d`` as shipped, resized to ``size``, no synthetic change), and items ``1 .. n-1`` are
held-out generated pairs of the ``kinds`` given (``("brain", "inter")`` by default) drawn with eval-range seeds.
Be honest about what this measures: the held-out pairs are unseen *deformations and intensity changes*, not unseen
anatomy (only two brains exist here); the real pair is the one truly inter-subject test, and training's
``"inter"`` kind sees the same two brains paired (deformed and re-shaded, never as shipped). Pass
``kinds=("brain", "synth")`` to train without that pairing.

Every item is a sample dict with the same keys: ``fixed``, ``moving`` (float32 ``(1, 1, H, W)`` in [0, 1]),
``fixed_seg``, ``moving_seg`` (int64 ``(1, 1, H, W)``), ``spacing`` (mm per voxel at ``size``), ``labels``,
``ids`` (``(fixed id, moving id)``), ``kind`` and ``seed`` (``None`` for the real pair). :func:`collate` stacks
items into a batch.
"""
from __future__ import annotations

import numbers
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .._checks import check_int
from .samples import load_sample
from .synthetic import deform_sample, random_intensity_change, synthetic_pair

__all__ = ["PairDataset", "brain_pairs", "collate", "item_seed", "SEED_RANGES", "PAIR_KINDS", "PAIR_KEYS"]

#: split -> ``[low, high)`` range of the integer seeds its items are drawn with (pairwise disjoint).
SEED_RANGES: dict[str, tuple[int, int]] = {
    "train": (0, 10**6),
    "val": (10**9, 10**9 + 10**6),
    "test": (2 * 10**9, 2 * 10**9 + 10**6),
}
#: the kinds of generated pairs (see the module docstring).
PAIR_KINDS = ("brain", "inter", "synth")
#: the keys of every item.
PAIR_KEYS = ("fixed", "moving", "fixed_seg", "moving_seg", "spacing", "labels", "ids", "kind", "seed")

_BASE_STRIDE = 104_729  # a prime: base seeds shift the sequence of item seeds by large, different offsets
_BASES: dict[tuple[int, int], dict] = {}  # resized brain2d, cached per size


def item_seed(split: str, index: int, seed: int = 0) -> int:
    """The integer seed of item ``index`` of ``split`` with base seed ``seed``.

    ``low + (seed * 104729 + index) mod 10^6`` with ``[low, low + 10^6) = SEED_RANGES[split]``: distinct for the
    first million items of a dataset, and never shared between splits.
    """
    if split not in SEED_RANGES:
        raise ValueError(f"split must be one of {tuple(SEED_RANGES)}, got {split!r}")
    for name, v in (("index", index), ("seed", seed)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    low, high = SEED_RANGES[split]
    return low + (int(seed) * _BASE_STRIDE + int(index)) % (high - low)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        size = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (H, W), got {size!r}") from None
    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"size must be (H, W) with both >= 8 (2D pairs only), got {size}")
    return size


def _base(size: tuple[int, int]) -> dict:
    """``brain2d`` resized to ``size`` (images bilinear with antialiasing, labels nearest), cached."""
    if size not in _BASES:
        s = load_sample("brain2d")
        shape = tuple(s["fixed"].shape[2:])
        out = {k: s[k] for k in ("labels", "ids")}
        out["spacing"] = tuple(float(sp) * n / m for sp, n, m in zip(s["spacing"], shape, size))
        for k in ("fixed", "moving"):
            img = s[k] if shape == size else F.interpolate(s[k], size=size, mode="bilinear", align_corners=False,
                                                           antialias=True)
            out[k] = img.clamp(0.0, 1.0).contiguous()
        for k in ("fixed_seg", "moving_seg"):
            seg = s[k] if shape == size else F.interpolate(s[k].float(), size=size, mode="nearest").long()
            out[k] = seg.contiguous()
        _BASES[size] = out
    return _BASES[size]


def check_kinds(kinds: str | Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` (one name or a sequence) as a non-empty tuple of names from ``allowed``; ``ValueError`` otherwise."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in allowed for k in kinds):
        raise ValueError(f"kinds must be a non-empty sequence of {tuple(allowed)}, got {kinds!r}")
    return kinds


def check_index(index: int, n: int, owner: str) -> int:
    """``index`` of a dataset of ``n`` items as a non-negative ``int`` (negative counts from the end, as in a list);
    ``TypeError`` for a non-integer (``bool`` included), ``IndexError`` out of range, naming ``owner``."""
    if not isinstance(index, numbers.Integral) or isinstance(index, bool):
        raise TypeError(f"index must be an integer, got {type(index).__name__}")
    index = int(index)
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for a {owner} of {n} items")
    return index


class PairDataset(Dataset):
    """A map-style dataset of generated 2D registration pairs (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; sets the seed range.
        n: number of items.
        size: ``(H, W)``; the brain slices are resized to it (spacing follows), synthetic pairs drawn at it.
        kinds: kinds of pairs, cycled over the index (default: all three for train, ``("brain", "inter")`` else).
        seed: base seed (>= 0); a different base seed gives a different sequence of items.
        include_real: make item 0 the real inter-subject pair, unchanged (default: True except for train).
        strength: RMS velocity in voxels of each random deformation (default ``max(1, min(size) / 32)``, 5 at
            160 x 192).
        smoothness: smoothness in voxels of the deformations (default ``min(size) / 8``).
        intensity: ``dict`` of :func:`random_intensity_change` options (default gamma_std 0.1, bias_strength 0.1);
            ``None`` or ``{}`` for the defaults, ``False`` to switch intensity changes off.
        n_labels: labels of the synthetic label maps (ids ``0 .. n_labels - 1``, 0 is background).
        label_smoothness: blob size in voxels of the synthetic label maps (default ``max(2, min(size) / 32)``).
    """

    def __init__(self, split: str = "train", n: int = 1000, size: Sequence[int] = (160, 192), *,
                 kinds: Sequence[str] | None = None, seed: int = 0, include_real: bool | None = None,
                 strength: float | None = None, smoothness: float | None = None,
                 intensity: Mapping | bool | None = None, n_labels: int = 26,
                 label_smoothness: float | None = None) -> None:
        if split not in SEED_RANGES:
            raise ValueError(f"split must be one of {tuple(SEED_RANGES)}, got {split!r}")
        self.split, self.n, self.size = split, check_int(n, "n", 1), _check_size(size)
        if kinds is None:
            kinds = PAIR_KINDS if split == "train" else ("brain", "inter")
        self.kinds = check_kinds(kinds, PAIR_KINDS)
        item_seed(split, 0, seed)  # validates seed
        self.seed = int(seed)
        self.include_real = (split != "train") if include_real is None else bool(include_real)
        m = min(self.size)
        self.strength = float(strength) if strength is not None else max(1.0, m / 32)
        self.smoothness = float(smoothness) if smoothness is not None else m / 8
        if intensity is False:
            self.intensity = None
        else:
            self.intensity = {"gamma_std": 0.1, "bias_strength": 0.1, **dict(intensity or {})}
        self.n_labels = int(n_labels)
        self.label_smoothness = float(label_smoothness) if label_smoothness is not None else max(2.0, m / 32)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"PairDataset(split={self.split!r}, n={self.n}, size={self.size}, kinds={self.kinds}, "
                f"seed={self.seed}, include_real={self.include_real})")

    def kind(self, index: int) -> str:
        """The kind of item ``index`` (``"real"`` for the unchanged real pair)."""
        index = self._check_index(index)
        if self.include_real:
            if index == 0:
                return "real"
            index -= 1
        return self.kinds[index % len(self.kinds)]

    def item_seed(self, index: int) -> int | None:
        """The integer seed of item ``index`` (``None`` for the real pair); see :func:`item_seed`."""
        index = self._check_index(index)
        if self.include_real:
            if index == 0:
                return None
            index -= 1
        return item_seed(self.split, index, self.seed)

    def seeds(self) -> list[int]:
        """The seeds of all generated items."""
        return [s for s in (self.item_seed(i) for i in range(self.n)) if s is not None]

    def _check_index(self, index: int) -> int:
        return check_index(index, self.n, type(self).__name__)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        kind, seed = self.kind(index), self.item_seed(index)
        base = _base(self.size)
        if kind == "real":
            return self._item({k: (v.clone() if isinstance(v, Tensor) else v) for k, v in base.items()},
                              kind, None)
        if kind == "synth":
            s = synthetic_pair(self.size, seed=seed, n_labels=self.n_labels, strength=self.strength,
                               smoothness=self.smoothness, label_smoothness=self.label_smoothness)
            return self._item(s, kind, seed)
        gen = torch.Generator().manual_seed(seed)
        if kind == "brain":
            side = "fixed" if torch.rand((), generator=gen) < 0.5 else "moving"
            src = [(base[side], base[f"{side}_seg"], base["ids"][side == "moving"])] * 2
        else:  # inter
            src = [(base["fixed"], base["fixed_seg"], base["ids"][0]), (base["moving"], base["moving_seg"],
                                                                        base["ids"][1])]
        out = {"spacing": base["spacing"], "labels": list(base["labels"])}
        ids = []
        for role, (img, seg, name) in zip(("fixed", "moving"), src):
            d = deform_sample(img, seg, strength=self.strength, smoothness=self.smoothness, seed=gen)
            image = d.image
            if self.intensity is not None:
                image = random_intensity_change(image, seed=gen, **self.intensity).image
            out[role], out[f"{role}_seg"] = image.clamp(0.0, 1.0), d.seg
            ids.append(f"{name}_{kind}{seed}_{role[0]}")
        out["ids"] = tuple(ids)
        return self._item(out, kind, seed)

    @staticmethod
    def _item(s: Mapping, kind: str, seed: int | None) -> dict:
        item = {k: s[k] for k in PAIR_KEYS[:7]}
        item["labels"] = list(item["labels"])
        item["spacing"] = tuple(float(v) for v in item["spacing"])
        item["ids"] = tuple(item["ids"])
        item["kind"], item["seed"] = kind, seed
        return item


def brain_pairs(split: str = "train", n: int | None = None, size: Sequence[int] = (160, 192), *,
                kinds: Sequence[str] | None = None, seed: int = 0, **kwargs) -> PairDataset:
    """The standard 2D pair datasets.

    * ``brain_pairs("train", n)``: ``n`` generated pairs (default 1000), kinds ``("brain", "inter", "synth")``
      cycled, seeds in ``[0, 10^6)``.
    * ``brain_pairs("val", n)`` / ``("test", n)``: the evaluation set: item 0 is the real inter-subject pair, items
      ``1 .. n-1`` held-out ``("brain", "inter")`` pairs with seeds in the split's own range (default ``n = 9``).

    Extra keyword arguments go to :class:`PairDataset` (``strength``, ``smoothness``, ``intensity``, ``n_labels``,
    ``label_smoothness``, ``include_real``).
    """
    if n is None:
        n = 1000 if split == "train" else 9
    return PairDataset(split, n, size, kinds=kinds, seed=seed, **kwargs)


def collate(samples: Sequence[Mapping]) -> dict:
    """Stack sample dicts into one batch.

    Tensors (``(1, C, *spatial)`` each) are concatenated along the batch axis, so images become ``(B, 1, H, W)``;
    every other value becomes a list with one entry per sample (``spacing``, ``labels``, ``ids``, ...).

    Raises:
        ValueError: for an empty list, samples with different keys, or tensors of different shapes.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = list(samples[0])
    for s in samples[1:]:
        if set(s) != set(keys):
            raise ValueError(f"samples must share their keys; got {sorted(keys)} and {sorted(s)}")
    out: dict = {}
    for k in keys:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], Tensor):
            shapes = {tuple(v.shape[1:]) for v in vals}
            if len(shapes) != 1:
                raise ValueError(f"cannot stack {k!r}: the samples' shapes differ ({sorted(shapes)})")
            out[k] = torch.cat(vals, dim=0)
        else:
            out[k] = vals
    return out
