"""Generated 3D training pairs for the small 3D models (``scripts/train_3d.py``): brain-like and lung-like volumes.

No 3D training set ships with the package (OASIS and NLST need downloads; the two shipped 3D samples are single
volumes), so the small 3D models learn from volumes *drawn from label maps*, the SynthMorph way (Hoffmann et al.,
2022): draw a label map, paint it, deform it. Unlike SynthMorph's random blobs, the label maps here are rough
anatomy, so that the models meet structures like the shipped samples':

``"brain"``  :func:`brain_like`: a perturbed ellipsoid brain with a cortical grey-matter ribbon whose thickness
             varies (gyri-like folds), a CSF rim, CSF-filled deep sulci, two lateral ventricles and two deep
             grey-matter blobs, painted T1-like
             (CSF dark, GM mid, WM bright, background 0, as ``brain3d``); labels 0 background, 1 CSF, 2 GM, 3 WM;
             axes as ``brain3d`` (0 posterior -> anterior, 1 superior -> inferior, 2 left -> right).
``"lung"``   :func:`lung_like`: a chest crop: an elliptic body in air, two lungs over diaphragm domes with a tree of
             thin vessels, ribs and a spine, painted CT-like in ``lung3d``'s window (air 0, lung ~0.1, soft tissue
             ~0.65, bone ~0.9); labels 0 outside the body, 1 lung, 2 soft tissue, 3 bone; axes as ``lung3d``
             (0 superior -> inferior, 1 anterior -> posterior, 2 right -> left). Its moving side also gets a
             breathing motion (superior-inferior, growing towards the diaphragm).
``"synth"``  SynthMorph's own random label map (:func:`~deqreg_lite.datasets.synthetic.random_label_map`, 16
             labels) painted with random intensities (labels 1 .. 15).
``"brain3d"``, ``"lung3d"``  **the shipped samples' fixed volumes** (resized), deformed like the others. Opt-in
             only: with them, an evaluation on the shipped samples is on training anatomy, and must say so
             (:data:`SHIPPED_KINDS`).

A pair (every kind): the noise-free painted volume is warped twice, by two independent random smooth
diffeomorphisms (:func:`~deqreg_lite.datasets.synthetic.random_deformation`), one per side; each side then gets its
own noise and a mild random gamma and bias field (:func:`~deqreg_lite.datasets.synthetic.random_intensity_change`,
the change that made ``brain3d``'s moving image), and the labels are warped with nearest-neighbour interpolation.
So fixed and moving share the anatomy and differ by a known kind of change, as in ``brain3d`` and ``lung3d``.

Seeds. Item ``i`` of split ``split`` with base seed ``seed`` is drawn from
:func:`~deqreg_lite.datasets.pairs.item_seed` ``(split, i, seed)``: the disjoint seed ranges of the 2D pairs, so no
validation or test item is ever drawn with a training seed. Every item is a function of ``(split, seed, index)``
only. Items are sample dicts with the keys of :data:`~deqreg_lite.datasets.pairs.PAIR_KEYS`: ``fixed``, ``moving``
(float32 ``(1, 1, D, H, W)`` in [0, 1]), ``fixed_seg``, ``moving_seg`` (int64 ``(1, 1, D, H, W)``), ``spacing``
(nominal mm per voxel: the shipped sample's field of view over ``size``), ``labels``, ``ids``, ``kind``, ``seed``.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .._checks import check_int
from ..warp import integrate_velocity, resize_image, warp
from .pairs import PAIR_KEYS, SEED_RANGES, check_index, check_kinds, item_seed
from .samples import load_sample
from .synthetic import (_gaussian_blur, _generator, bias_field, random_intensities, random_intensity_change,
                        random_label_map, random_velocity, smooth_noise)

__all__ = ["Phantom", "brain_like", "lung_like", "breathing_velocity", "VolumePairDataset", "VOLUME_KINDS",
           "SHIPPED_KINDS"]

#: the kinds of generated 3D pairs (see the module docstring).
VOLUME_KINDS = ("brain", "lung", "synth", "brain3d", "lung3d")
#: the kinds made from the shipped samples: training on them puts the shipped anatomy into training.
SHIPPED_KINDS = ("brain3d", "lung3d")
#: labels and their names per kind (``synth``: 1 .. 15).
_LABELS = {"brain": {1: "CSF", 2: "GM", 3: "WM"}, "brain3d": {1: "CSF", 2: "GM", 3: "WM"},
           "lung": {1: "lung", 2: "soft tissue", 3: "bone"}, "lung3d": {1: "lung"},
           "synth": {i: f"label_{i}" for i in range(1, 16)}}
#: the field of view in mm of each kind (the shipped samples': 96 voxels of 2 mm and of 3 mm).
_FOV_MM = {"brain": 192.0, "brain3d": 192.0, "lung": 288.0, "lung3d": 288.0, "synth": 192.0}
_SAMPLES: dict[tuple[str, tuple[int, ...]], tuple[Tensor, Tensor]] = {}  # resized shipped volumes, per size


class Phantom(NamedTuple):
    """A painted label map before any deformation, noise or intensity change."""

    image: Tensor  #: float32 ``(1, 1, D, H, W)`` in [0, 1], noise-free (blurred: partial volume)
    seg: Tensor  #: int64 ``(1, 1, D, H, W)`` labels


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _check_shape3(shape: Sequence[int], name: str = "shape", minimum: int = 8) -> tuple[int, int, int]:
    try:
        items = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be (D, H, W), three integers >= {minimum}, got {shape!r}") from None
    if len(items) != 3 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in items) \
            or min(int(s) for s in items) < minimum:
        raise ValueError(f"{name} must be (D, H, W), three integers >= {minimum}, got {shape!r}")
    return tuple(int(s) for s in items)  # type: ignore[return-value]


def _coords(shape: tuple[int, int, int]) -> Tensor:
    """``(3, D, H, W)`` coordinates in [-1, 1] along each axis (corners aligned)."""
    axes = [torch.linspace(-1.0, 1.0, s) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _uniform(gen: torch.Generator, low: float, high: float, n: int = 1) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _paint(seg: Tensor, means: dict[int, float], gen: torch.Generator, *, texture: float, blur: float,
           bias: float, texture_smoothness: float) -> Tensor:
    """Label means, a smooth texture inside the labels, a partial-volume blur and a mild bias; clipped to [0, 1]."""
    shape = tuple(seg.shape[2:])
    image = torch.zeros(seg.shape, dtype=torch.float32)
    for label, mean in means.items():
        image[seg == label] = float(mean)
    if texture > 0:
        tex = smooth_noise(shape, 1, smoothness=texture_smoothness, seed=gen)
        image = image + texture * tex * (seg > 0)
    image = _gaussian_blur(image, blur)
    if bias > 0:
        image = image * bias_field(torch.randn(1, 1, 4, 4, 4, generator=gen) * bias, shape)
    return image.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# phantoms
# ---------------------------------------------------------------------------------------------------------------
def brain_like(shape: Sequence[int], *, seed: int | torch.Generator = 0) -> Phantom:
    """A brain-like label map (0 background, 1 CSF, 2 GM, 3 WM), painted T1-like; see the module docstring.

    Proportions near ``brain3d``'s (brain ~27 % of the volume, GM more than WM, CSF a few %), each drawn anew: the
    brain's radii and centre, its outline (smooth noise), the ribbon's thickness and folds, the ventricles, the
    tissue intensities (CSF 0.30-0.50, GM 0.58-0.78, WM 0.84-1.0), texture, blur and bias.

    Args:
        shape: ``(D, H, W)``, each >= 8.
        seed: int or CPU ``torch.Generator``.
    Returns:
        :class:`Phantom` ``(image (1, 1, D, H, W) in [0, 1], seg (1, 1, D, H, W) int64)``.
    """
    shape = _check_shape3(shape)
    gen = _generator(seed)
    m = min(shape)
    c = _coords(shape)
    radii = torch.tensor([0.88, 0.78, 0.82]) * torch.exp(0.07 * torch.randn(3, generator=gen))
    centre = 0.04 * torch.randn(3, generator=gen)
    outline = smooth_noise(shape, 1, smoothness=max(2.0, m / 5), seed=gen)[0, 0]
    folds = smooth_noise(shape, 1, smoothness=max(1.0, m / 18), seed=gen)[0, 0]
    wobble = smooth_noise(shape, 1, smoothness=max(1.5, m / 8), seed=gen)[0, 0]
    rel = (c - centre.view(3, 1, 1, 1)) / radii.view(3, 1, 1, 1)
    level = rel.pow(2).sum(0).sqrt() + 0.05 * outline
    brain = level < 1.0
    depth = 1.0 - level  # 0 at the surface, growing inwards (in units of the radius)
    ribbon = float(_uniform(gen, 0.27, 0.35)) + 0.15 * folds  # the cortex: thick where folds > 0 (gyri)
    gm = brain & (depth < ribbon)
    csf = brain & ((depth < 0.03 + 0.012 * wobble) | ((folds < -1.2) & (depth < 0.9 * ribbon)))  # rim, sulci
    for s in (-1.0, 1.0):  # deep grey matter (basal ganglia, thalamus): two blobs beside the ventricles
        dc = centre + torch.tensor([0.0, 0.12, s * 0.25]) * radii
        dlevel = ((c - dc.view(3, 1, 1, 1)) / (0.16 * radii).view(3, 1, 1, 1)).pow(2).sum(0).sqrt()
        gm |= brain & (dlevel + 0.15 * wobble < 1.0)
    side = float(_uniform(gen, 0.10, 0.16))
    vr = torch.tensor([0.30, 0.11, 0.07]) * torch.exp(0.15 * torch.randn(3, generator=gen))
    for s in (-1.0, 1.0):
        vc = centre + torch.tensor([0.02, -0.08, s * side]) * radii
        vlevel = ((c - vc.view(3, 1, 1, 1)) / (vr * radii).view(3, 1, 1, 1)).pow(2).sum(0).sqrt() + 0.1 * wobble
        csf |= brain & (vlevel < 1.0)
    seg = torch.zeros(shape, dtype=torch.int64)
    seg[brain] = 3
    seg[gm] = 2
    seg[csf] = 1
    seg = seg[None, None]
    means = {1: float(_uniform(gen, 0.30, 0.50)), 2: float(_uniform(gen, 0.58, 0.78)),
             3: float(_uniform(gen, 0.84, 1.00))}
    image = _paint(seg, means, gen, texture=0.03, blur=float(_uniform(gen, 0.4, 0.9)), bias=0.08,
                   texture_smoothness=max(1.5, m / 10))
    return Phantom(image, seg)


def lung_like(shape: Sequence[int], *, seed: int | torch.Generator = 0) -> Phantom:
    """A chest-CT-like label map (0 outside the body, 1 lung, 2 soft tissue, 3 bone), painted in ``lung3d``'s
    window; see the module docstring.

    Drawn anew each time: the body's ellipse, the lungs' size, position and diaphragm domes, the vessel tree (where
    two smooth noise fields are both near zero: thin tubes), the ribs' spacing and phase, the intensities (lung
    0.05-0.16, soft tissue 0.60-0.72 with texture, vessels 0.50-0.68, bone 0.80-1.0), blur and bias.

    Args:
        shape: ``(D, H, W)``, each >= 8.
        seed: int or CPU ``torch.Generator``.
    Returns:
        :class:`Phantom` ``(image (1, 1, D, H, W) in [0, 1], seg (1, 1, D, H, W) int64)``.
    """
    shape = _check_shape3(shape)
    gen = _generator(seed)
    m = min(shape)
    c = _coords(shape)
    z, y, x = c[0], c[1], c[2]  # superior -> inferior, anterior -> posterior, right -> left
    outline = smooth_noise(shape, 1, smoothness=max(2.0, m / 5), seed=gen)[0, 0]
    b = torch.tensor([0.82, 0.95]) * torch.exp(0.06 * torch.randn(2, generator=gen))
    oy, ox = (0.04 * torch.randn(2, generator=gen)).tolist()
    body_level = (((y - oy) / b[0]) ** 2 + ((x - ox) / b[1]) ** 2).sqrt() + 0.03 * outline
    body = body_level < 1.0
    lung = torch.zeros(shape, dtype=torch.bool)
    dome = float(_uniform(gen, 0.35, 0.65))
    for s in (-1.0, 1.0):
        cy = oy + 0.06 * b[0]
        cx = ox + s * float(_uniform(gen, 0.40, 0.50)) * b[1]
        ry, rx = 0.62 * b[0] * float(_uniform(gen, 0.9, 1.1)), 0.36 * b[1] * float(_uniform(gen, 0.9, 1.1))
        q = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        apex = -0.95 + 0.1 * float(torch.rand((), generator=gen))
        top = z > apex + 0.25 * q  # the apex is rounded
        bottom = z < dome + 0.35 * q  # the diaphragm dome: higher in the middle of each lung
        lung |= (q + 0.08 * outline < 1.0) & top & bottom
    lung &= body_level < 0.86
    t1 = smooth_noise(shape, 1, smoothness=max(1.5, m / 10), seed=gen)[0, 0]
    t2 = smooth_noise(shape, 1, smoothness=max(1.5, m / 10), seed=gen)[0, 0]
    vessels = lung & (t1.abs() < 0.22) & (t2.abs() < 0.22)
    ribs_n = float(_uniform(gen, 4.0, 6.0))
    phase = float(_uniform(gen, 0.0, 2 * math.pi))
    ribs = body & (body_level > 0.87) & (body_level < 0.96) & (torch.sin(math.pi * ribs_n * z + phase) > 0.45)
    spine = (((y - (oy + 0.72 * b[0])) / 0.13) ** 2 + ((x - ox) / 0.11) ** 2) < 1.0
    bone = body & (ribs | spine) & ~lung
    seg = torch.zeros(shape, dtype=torch.int64)
    seg[body] = 2
    seg[lung] = 1
    seg[bone] = 3
    seg = seg[None, None]
    means = {1: float(_uniform(gen, 0.05, 0.16)), 2: float(_uniform(gen, 0.60, 0.72)),
             3: float(_uniform(gen, 0.80, 1.00))}
    image = _paint(seg, means, gen, texture=0.04, blur=0.0, bias=0.0, texture_smoothness=max(1.5, m / 10))
    image = torch.where(vessels[None, None], torch.as_tensor(float(_uniform(gen, 0.50, 0.68))), image)
    image = _gaussian_blur(image, float(_uniform(gen, 0.4, 0.8)))
    image = image * bias_field(torch.randn(1, 1, 4, 4, 4, generator=gen) * 0.04, shape)
    return Phantom(image.clamp(0.0, 1.0), seg)


def breathing_velocity(seg: Tensor, amplitude: float) -> Tensor:
    """A smooth superior-inferior velocity for a lung-like volume: 0 above the lungs' apex, growing linearly to
    ``amplitude`` voxels at the lowest lung voxel (the diaphragm) and staying there below, tapered in-plane by a
    Gaussian of the distance to the lungs' centre line, and smoothed.

    Args:
        seg: int64 ``(1, 1, D, H, W)`` labels with the lungs as label 1 (axis 0 superior -> inferior).
        amplitude: voxels at the diaphragm (any sign: > 0 moves the sampling point down).
    Returns:
        float32 ``(1, 3, D, H, W)`` velocity in voxels (only axis 0 is non-zero); zeros if there is no lung.
    """
    if seg.dim() != 5 or seg.shape[:2] != (1, 1):
        raise ValueError(f"seg must be (1, 1, D, H, W), got {tuple(seg.shape)}")
    shape = tuple(seg.shape[2:])
    v = torch.zeros(1, 3, *shape)
    lung = seg[0, 0] == 1
    if not lung.any():
        return v
    rows = lung.any(dim=2).any(dim=1).nonzero()[:, 0].float()
    top, bottom = float(rows.min()), float(rows.max())
    z = torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1)
    ramp = ((z - top) / max(bottom - top, 1.0)).clamp(0.0, 1.0)
    inplane = lung.any(dim=0).float()
    taper = _gaussian_blur(inplane[None, None], max(1.0, min(shape[1:]) / 6))[0, 0]
    taper = taper / taper.max().clamp_min(1e-6)
    v[0, 0] = amplitude * ramp * taper.unsqueeze(0)
    return _gaussian_blur(v, max(1.0, min(shape) / 16))


def _shipped(name: str, shape: tuple[int, int, int]) -> Phantom:
    """A shipped sample's fixed volume and labels resized to ``shape`` (cached)."""
    key = (name, shape)
    if key not in _SAMPLES:
        s = load_sample(name)
        image = resize_image(s["fixed"], shape).clamp(0.0, 1.0)
        seg = F.interpolate(s["fixed_seg"].float(), size=shape, mode="nearest").long()
        _SAMPLES[key] = (image, seg)
    image, seg = _SAMPLES[key]
    return Phantom(image.clone(), seg.clone())


def _synth(shape: tuple[int, int, int], gen: torch.Generator) -> Phantom:
    seg = random_label_map(shape, 16, seed=gen, smoothness=max(2.0, min(shape) / 12))
    return Phantom(random_intensities(seg, seed=gen, noise_std=0.0), seg)


# ---------------------------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------------------------
class VolumePairDataset(Dataset):
    """A map-style dataset of generated 3D registration pairs (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; sets the seed range
            (:data:`~deqreg_lite.datasets.pairs.SEED_RANGES`).
        n: number of items (>= 1).
        size: ``(D, H, W)`` of every volume, each >= 8 (the 3D U-Nets need multiples of 16).
        kinds: kinds of pairs (a subset of :data:`VOLUME_KINDS`), cycled over the index; repeat a name to weight it.
            Default ``("brain", "lung")``: no shipped anatomy.
        seed: base seed (>= 0).
        strength: RMS velocity in voxels of each side's random deformation, drawn per item uniformly from
            ``[strength / 2, strength]`` (default ``min(size) / 24``: 1.33 voxels at 32^3).
        smoothness: smoothness in voxels of the deformations (default ``min(size) / 8``).
        breathing: largest superior-inferior breathing motion of a ``"lung"`` item's moving side, in voxels at the
            diaphragm, drawn uniformly from ``[-breathing, breathing]`` (default ``min(size) / 16``; 0: none).
        noise: largest std of each side's Gaussian noise, drawn from ``[noise / 3, noise]`` (default 0.03; brain-like
            volumes get it inside the head only, as skull-stripped scans).
    Raises:
        ValueError: a bad split, ``n``, ``size``, kind, or number (an unknown option is a ``TypeError``).
    """

    def __init__(self, split: str = "train", n: int = 1000, size: Sequence[int] = (32, 32, 32), *,
                 kinds: Sequence[str] = ("brain", "lung"), seed: int = 0, strength: float | None = None,
                 smoothness: float | None = None, breathing: float | None = None, noise: float = 0.03) -> None:
        if split not in SEED_RANGES:
            raise ValueError(f"split must be one of {tuple(SEED_RANGES)}, got {split!r}")
        self.split, self.n = split, check_int(n, "n", 1)
        self.size = _check_shape3(size, "size")
        self.kinds = check_kinds(kinds, VOLUME_KINDS)
        item_seed(split, 0, seed)  # validates seed
        self.seed = int(seed)
        m = min(self.size)
        self.strength = self._number(strength, "strength", m / 24)
        self.smoothness = self._number(smoothness, "smoothness", m / 8, positive=True)
        self.breathing = self._number(breathing, "breathing", m / 16)
        self.noise = self._number(noise, "noise", 0.03)

    @staticmethod
    def _number(value: float | None, name: str, default: float, positive: bool = False) -> float:
        if value is None:
            return float(default)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or value < 0 or (positive and value == 0):
            raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")
        return float(value)

    @property
    def shipped_anatomy(self) -> bool:
        """Whether any kind is made from a shipped sample (:data:`SHIPPED_KINDS`)."""
        return any(k in SHIPPED_KINDS for k in self.kinds)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"VolumePairDataset(split={self.split!r}, n={self.n}, size={self.size}, kinds={self.kinds}, "
                f"seed={self.seed})")

    def describe(self) -> dict:
        """The dataset's settings, for a training record."""
        return {"split": self.split, "n": self.n, "size": list(self.size), "kinds": list(self.kinds),
                "seed": self.seed, "seed_range": list(SEED_RANGES[self.split]), "strength": self.strength,
                "smoothness": self.smoothness, "breathing": self.breathing, "noise": self.noise,
                "shipped_anatomy": self.shipped_anatomy}

    def _check_index(self, index: int) -> int:
        return check_index(index, self.n, type(self).__name__)

    def kind(self, index: int) -> str:
        """The kind of item ``index``."""
        return self.kinds[self._check_index(index) % len(self.kinds)]

    def item_seed(self, index: int) -> int:
        """The integer seed of item ``index`` (:func:`~deqreg_lite.datasets.pairs.item_seed`)."""
        return item_seed(self.split, self._check_index(index), self.seed)

    def __getitem__(self, index: int) -> dict:
        kind, seed = self.kind(index), self.item_seed(index)
        gen = torch.Generator().manual_seed(seed)
        shape = self.size
        if kind == "brain":
            ph = brain_like(shape, seed=gen)
        elif kind == "lung":
            ph = lung_like(shape, seed=gen)
        elif kind == "synth":
            ph = _synth(shape, gen)
        else:
            ph = _shipped(kind, shape)
        out: dict = {}
        for role in ("fixed", "moving"):
            strength = float(_uniform(gen, 0.5 * self.strength, self.strength))
            v = random_velocity(shape, strength=strength, smoothness=self.smoothness, seed=gen)
            if role == "moving" and kind in ("lung", "lung3d") and self.breathing > 0:
                v = v + breathing_velocity(ph.seg, float(_uniform(gen, -self.breathing, self.breathing)))
            disp = integrate_velocity(v, steps=7)
            image = warp(ph.image, disp)
            seg = warp(ph.seg, disp, mode="nearest")
            sigma = float(_uniform(gen, self.noise / 3, self.noise)) if self.noise > 0 else 0.0
            noise = sigma * torch.randn(image.shape, generator=gen)
            if kind in ("brain", "brain3d"):
                noise = noise * (image > 0.02)  # skull-stripped: no noise outside the head
            image = random_intensity_change((image + noise).clamp(0.0, 1.0), seed=gen, gamma_std=0.1,
                                            bias_strength=0.1).image
            out[role], out[f"{role}_seg"] = image.clamp(0.0, 1.0).contiguous(), seg.contiguous()
        labels = _LABELS[kind]
        out["spacing"] = tuple(_FOV_MM[kind] / s for s in shape)
        out["labels"] = list(labels)
        out["label_names"] = dict(labels)
        out["ids"] = (f"{kind}{seed}_f", f"{kind}{seed}_m")
        out["kind"], out["seed"] = kind, seed
        return {k: out[k] for k in (*PAIR_KEYS[:7], "label_names", "kind", "seed")}
