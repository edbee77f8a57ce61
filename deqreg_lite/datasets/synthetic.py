"""Generated data with exactly known answers: random label maps, random intensities and random smooth warps.

No registry carries several labelled subjects or deformation pairs, so this module fills the gap the way
SynthMorph does (Hoffmann et al., 2022): draw a random label map, paint it with random intensities, and deform
it with a random smooth diffeomorphism whose displacement is known exactly.

Conventions (those of :mod:`deqreg_lite.warp`): images are ``(B, C, *spatial)`` float tensors, label maps
``(B, 1, *spatial)`` int64 tensors, displacements ``(B, ndim, *spatial)`` in **voxels** with channels in
array-axis order, and ``warp(image, disp)(x) = image(x + disp(x))``. Everything works in 2D and 3D.

Seeds. Every random function takes ``seed``: an ``int`` (a fresh CPU ``torch.Generator`` is seeded with it), or a
``torch.Generator`` to draw from (it advances). Noise is always drawn on the CPU and then moved to ``device``,
so the same seed gives the same data on every device.

``true_disp``. In every sample dict of this package, ``true_disp`` is the displacement that *generated* the moving
image from the fixed one: ``moving_seg == warp(fixed_seg, true_disp, mode="nearest")`` exactly, and
``moving == warp(fixed, true_disp)`` up to the intensity change. A registration ``u`` (with
``warp(moving, u) ~ fixed``) is then the *inverse* of ``true_disp``; its error is the displacement
``compose(u, true_disp)``, i.e. ``u(x) + true_disp(x + u(x))``, which is zero for a perfect ``u``. If you need a
pair whose registration answer is exact instead, swap the roles: with ``d = deform_sample(img, seg)``, take
``fixed = d.image`` and ``moving = img``; then ``warp(moving, d.disp) == fixed``.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_image, check_int
from ..warp import integrate_velocity, warp

__all__ = [
    "smooth_noise", "random_velocity", "random_deformation", "random_label_map", "random_intensities",
    "bias_field", "apply_intensity_change", "random_intensity_change", "deform_sample", "synthetic_pair",
    "Deformed", "IntensityChange",
]


# ---------------------------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------------------------
def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        items = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of 2 or 3 integer sizes, got {shape!r}") from None
    if len(items) not in (2, 3):
        raise ValueError(f"shape must have 2 (H, W) or 3 (D, H, W) entries, got {len(items)}: {items}")
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in items):
        raise ValueError(f"shape must hold integers, got {items}")
    if any(int(s) < 2 for s in items):
        raise ValueError(f"every size in shape must be >= 2 voxels, got {items}")
    return tuple(int(s) for s in items)


def _check_number(value: float, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if (strict and value <= minimum) or (not strict and value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


_check_int = check_int  # (value, name, minimum): the library's one integer check


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"seed generator must live on the CPU, got one on {seed.device}")
        return seed
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return torch.Generator().manual_seed(int(seed) % 2**63)
    raise ValueError(f"seed must be an int or a CPU torch.Generator, got {type(seed).__name__}")


def _check_labels(seg: Tensor, name: str = "label_map") -> int:
    ndim = check_image(seg, name, finite=False)
    if seg.is_floating_point() or seg.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (B, 1, *spatial), got dtype {seg.dtype}")
    if seg.shape[1] != 1:
        raise ValueError(f"{name} must have one channel (B, 1, *spatial), got {tuple(seg.shape)}")
    if seg.numel() and int(seg.min()) < 0:
        raise ValueError(f"{name} must hold labels >= 0, got a minimum of {int(seg.min())}")
    return ndim


# ---------------------------------------------------------------------------------------------------------------
# smooth random fields
# ---------------------------------------------------------------------------------------------------------------
def _gaussian_kernel(sigma: float, dtype: torch.dtype) -> Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_valid(x: Tensor, kernel: Tensor, ndim: int) -> Tensor:
    """Separable convolution of ``(B, C, *spatial)`` with a 1D ``kernel`` along every spatial axis, no padding:
    each axis shrinks by ``len(kernel) - 1``."""
    for axis in range(2, 2 + ndim):
        y = x.movedim(axis, -1)
        lead = y.shape[:-1]
        y = F.conv1d(y.reshape(-1, 1, y.shape[-1]), kernel.view(1, 1, -1))
        x = y.view(*lead, y.shape[-1]).movedim(-1, axis)
    return x.contiguous()


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``(B, C, *spatial)`` with std ``sigma`` voxels; edges replicated."""
    if sigma <= 0:
        return x
    ndim = x.dim() - 2
    kernel = _gaussian_kernel(sigma, x.dtype).to(x.device)
    radius = kernel.numel() // 2
    b, c = x.shape[:2]
    y = F.pad(x.reshape(b * c, 1, *x.shape[2:]), [radius] * (2 * ndim), mode="replicate")
    return _blur_valid(y, kernel, ndim).view(x.shape)


def smooth_noise(shape: Sequence[int], channels: int = 1, *, smoothness: float = 4.0,
                 seed: int | torch.Generator = 0, batch: int = 1, device: torch.device | str | None = None
                 ) -> Tensor:
    """Gaussian-smoothed white noise, rescaled to unit root mean square.

    White noise is drawn on a grid coarser by ``f = max(1, smoothness / 2)`` and extended by the kernel's
    radius on every side, blurred there with a Gaussian of std ``smoothness / f`` coarse voxels (that is
    ``smoothness`` fine voxels) without padding, so the field is statistically the same at the edges as inside,
    and upsampled linearly (corners aligned). This costs far less than blurring at full resolution.

    Args:
        shape: spatial shape ``(H, W)`` or ``(D, H, W)``.
        channels: number of independent fields.
        smoothness: std of the Gaussian kernel, in voxels of ``shape`` (> 0). Larger means smoother.
        seed: int or CPU ``torch.Generator``.
        batch: number of independent samples.
        device: where the result goes (noise is drawn on the CPU).
    Returns:
        float32 ``(batch, channels, *shape)``; each ``(sample, channel)`` field has a root mean square of 1.
    """
    shape = _check_shape(shape)
    channels = _check_int(channels, "channels", 1)
    batch = _check_int(batch, "batch", 1)
    smoothness = _check_number(smoothness, "smoothness", 0.0, strict=True)
    gen = _generator(seed)
    factor = max(1.0, smoothness / 2.0)
    coarse = tuple(max(2, int(math.ceil((s - 1) / factor)) + 1) for s in shape)
    kernel = _gaussian_kernel(smoothness / factor, torch.float32)
    pad = kernel.numel() - 1
    noise = torch.randn(batch, channels, *(c + pad for c in coarse), generator=gen, dtype=torch.float32)
    field = _blur_valid(noise, kernel, len(shape))
    if coarse != shape:
        field = F.interpolate(field, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear",
                              align_corners=True)
    rms = field.pow(2).mean(dim=tuple(range(2, field.dim())), keepdim=True).sqrt().clamp_min(1e-12)
    field = field / rms
    return field.to(device) if device is not None else field


def random_velocity(shape: Sequence[int], strength: float = 2.0, smoothness: float = 8.0,
                    seed: int | torch.Generator = 0, batch: int = 1,
                    device: torch.device | str | None = None) -> Tensor:
    """A smooth random stationary velocity field.

    Each component is :func:`smooth_noise`; the field is then scaled so that ``strength`` is exactly the root
    mean square, over all voxels and all components, of the velocity of each sample.

    Args:
        shape: spatial shape ``(H, W)`` or ``(D, H, W)``.
        strength: RMS velocity in voxels (>= 0). Each component has a std of about ``strength``; the largest
            values reach about 3 to 4 times it. 0 gives a zero field.
        smoothness: std of the smoothing Gaussian, in voxels (> 0).
        seed: int or CPU ``torch.Generator``.
        batch: number of independent fields.
        device: where the result goes.
    Returns:
        float32 ``(batch, ndim, *shape)`` in voxels per unit time, channels in array-axis order.
    """
    shape = _check_shape(shape)
    strength = _check_number(strength, "strength", 0.0)
    v = smooth_noise(shape, len(shape), smoothness=smoothness, seed=seed, batch=batch)
    rms = v.pow(2).mean(dim=tuple(range(1, v.dim())), keepdim=True).sqrt().clamp_min(1e-12)
    v = v * (strength / rms)
    return v.to(device) if device is not None else v


def random_deformation(shape: Sequence[int], strength: float = 2.0, smoothness: float = 8.0,
                       seed: int | torch.Generator = 0, steps: int = 7, batch: int = 1,
                       device: torch.device | str | None = None) -> Tensor:
    """A random smooth diffeomorphic displacement: :func:`random_velocity` integrated by scaling and squaring.

    With ``steps=7`` the flow is resolved and the map is invertible (Jacobian determinant > 0) as long as the
    velocity is smooth relative to its size, e.g. ``strength <= smoothness / 2``.

    Args:
        shape: spatial shape ``(H, W)`` or ``(D, H, W)``.
        strength: RMS of the *velocity* in voxels (see :func:`random_velocity`); the displacement's RMS is close
            to it.
        smoothness: std of the smoothing Gaussian of the velocity, in voxels.
        seed: int or CPU ``torch.Generator``.
        steps: scaling-and-squaring steps (:func:`deqreg_lite.warp.integrate_velocity`).
        batch: number of independent fields.
        device: where the computation runs and the result goes.
    Returns:
        float32 ``(batch, ndim, *shape)`` displacement in voxels, channels in array-axis order.
    """
    steps = _check_int(steps, "steps", 0)
    v = random_velocity(shape, strength=strength, smoothness=smoothness, seed=seed, batch=batch, device=device)
    return integrate_velocity(v, steps=steps)


# ---------------------------------------------------------------------------------------------------------------
# label maps and intensities
# ---------------------------------------------------------------------------------------------------------------
def random_label_map(shape: Sequence[int], n_labels: int = 26, *, seed: int | torch.Generator = 0,
                     smoothness: float = 4.0, warp_strength: float = 2.0, warp_smoothness: float = 8.0,
                     device: torch.device | str | None = None) -> Tensor:
    """A SynthMorph-style random label map.

    Draws ``n_labels`` independent :func:`smooth_noise` fields, warps them (bilinearly) with a random
    :func:`random_deformation` so that the blobs get bent shapes, and takes the argmax over the fields.

    With the defaults, a map of 64 x 64 or 32 x 32 x 32 voxels or larger holds all or nearly all of its labels
    (at least 20 of 26); a very small map or a large ``smoothness`` holds fewer.

    Args:
        shape: spatial shape ``(H, W)`` or ``(D, H, W)``.
        n_labels: number of labels (>= 2); the map holds ids ``0 .. n_labels - 1``.
        seed: int or CPU ``torch.Generator``; the same seed gives the same map.
        smoothness: std, in voxels, of the Gaussian that smooths each field; sets the blob size.
        warp_strength: RMS velocity in voxels of the extra deformation (0 switches it off).
        warp_smoothness: smoothness in voxels of that deformation.
        device: where the result goes.
    Returns:
        int64 ``(1, 1, *shape)`` label map.
    """
    shape = _check_shape(shape)
    n_labels = _check_int(n_labels, "n_labels", 2)
    warp_strength = _check_number(warp_strength, "warp_strength", 0.0)
    gen = _generator(seed)
    fields = smooth_noise(shape, n_labels, smoothness=smoothness, seed=gen)
    if warp_strength > 0:
        disp = random_deformation(shape, strength=warp_strength, smoothness=warp_smoothness, seed=gen)
        fields = warp(fields, disp)
    labels = fields.argmax(dim=1, keepdim=True).to(torch.int64)
    return labels.to(device) if device is not None else labels


def bias_field(coarse: Tensor, shape: Sequence[int]) -> Tensor:
    """A smooth multiplicative bias field: ``exp`` of a coarse log-field upsampled linearly (corners aligned).

    Args:
        coarse: ``(B, 1, *grid)`` log-bias on a coarse grid (2 or 3 axes; e.g. 4 x 4 x 4).
        shape: spatial shape of the output.
    Returns:
        ``(B, 1, *shape)`` positive field, 1 where ``coarse`` is 0.
    """
    shape = _check_shape(shape)
    ndim = check_image(coarse, "coarse")
    if ndim != len(shape):
        raise ValueError(f"coarse {tuple(coarse.shape)} has {ndim} spatial axes but shape {shape} has {len(shape)}")
    if not coarse.is_floating_point():
        raise ValueError(f"coarse must be a floating-point tensor, got {coarse.dtype}")
    up = F.interpolate(coarse, size=shape, mode="bilinear" if ndim == 2 else "trilinear", align_corners=True)
    return up.exp()


class IntensityChange(NamedTuple):
    """Result of :func:`random_intensity_change`: the changed image and the parameters that reproduce it."""

    image: Tensor  #: ``(B, C, *spatial)`` in [0, 1]
    gamma: Tensor  #: ``(B,)`` exponents
    bias_coarse: Tensor  #: ``(B, 1, *grid)`` coarse log-bias (see :func:`bias_field`)


def apply_intensity_change(image: Tensor, gamma: Tensor | float, bias_coarse: Tensor | None = None) -> Tensor:
    """Deterministic intensity change: ``clip(bias(x) * image(x) ** gamma, 0, 1)``.

    Args:
        image: ``(B, C, *spatial)`` float image with values in [0, 1] (values below 0 are clipped first).
        gamma: exponent, a float or a ``(B,)`` tensor (> 0).
        bias_coarse: ``(B, 1, *grid)`` coarse log-bias (see :func:`bias_field`), or None for no bias.
    Returns:
        ``(B, C, *spatial)`` float image in [0, 1].
    """
    check_image(image, "image")
    if not image.is_floating_point():
        raise ValueError(f"image must be a floating-point tensor, got {image.dtype}")
    ndim = image.dim() - 2
    g = torch.as_tensor(gamma, dtype=image.dtype, device=image.device).reshape(-1)
    if g.numel() not in (1, image.shape[0]) or not torch.all(g > 0):
        raise ValueError(f"gamma must be > 0, a float or a ({image.shape[0]},) tensor, got {gamma!r}")
    out = image.clamp_min(0.0).pow(g.view(-1, *([1] * (ndim + 1))))
    if bias_coarse is not None:
        out = out * bias_field(bias_coarse.to(image.device, image.dtype), image.shape[2:])
    return out.clamp(0.0, 1.0)


def random_intensity_change(image: Tensor, *, seed: int | torch.Generator = 0, gamma_std: float = 0.1,
                            bias_strength: float = 0.1, bias_grid: int = 4) -> IntensityChange:
    """A mild random intensity change (an MRI-like gamma and a smooth multiplicative bias field).

    ``gamma = exp(N(0, gamma_std))`` per sample; the log-bias is ``N(0, bias_strength)`` on a ``bias_grid`` per
    axis coarse grid, upsampled linearly. See :func:`apply_intensity_change`.

    Args:
        image: ``(B, C, *spatial)`` float image in [0, 1].
        seed: int or CPU ``torch.Generator``.
        gamma_std: std of ``log(gamma)`` (>= 0).
        bias_strength: std of the log-bias at the coarse nodes (>= 0); 0.1 means about +-10 %.
        bias_grid: number of coarse nodes per axis (>= 2).
    Returns:
        :class:`IntensityChange` ``(image, gamma, bias_coarse)``.
    """
    ndim = check_image(image, "image")
    gamma_std = _check_number(gamma_std, "gamma_std", 0.0)
    bias_strength = _check_number(bias_strength, "bias_strength", 0.0)
    bias_grid = _check_int(bias_grid, "bias_grid", 2)
    gen = _generator(seed)
    b = image.shape[0]
    gamma = torch.exp(torch.randn(b, generator=gen) * gamma_std)
    coarse = torch.randn(b, 1, *([bias_grid] * ndim), generator=gen) * bias_strength
    gamma, coarse = gamma.to(image.device), coarse.to(image.device)
    return IntensityChange(apply_intensity_change(image, gamma, coarse), gamma, coarse)


def random_intensities(label_map: Tensor, *, seed: int | torch.Generator = 0,
                       mean_range: tuple[float, float] = (0.0, 1.0), noise_std: float = 0.03,
                       blur_sigma: float = 0.5, bias_strength: float = 0.2, bias_grid: int = 4) -> Tensor:
    """Paint a label map with random intensities (SynthMorph's image model).

    Every label gets a mean drawn uniformly from ``mean_range``; the image is then blurred (partial volume),
    gets Gaussian noise and a smooth multiplicative bias field, and is min-max rescaled to [0, 1].

    Args:
        label_map: int ``(B, 1, *spatial)`` labels >= 0.
        seed: int or CPU ``torch.Generator``.
        mean_range: ``(low, high)`` range of the label means, before the final rescaling.
        noise_std: std of the additive Gaussian noise (>= 0), in units of the mean range.
        blur_sigma: std in voxels of the Gaussian blur (>= 0; 0 switches it off).
        bias_strength: std of the log-bias at the coarse nodes (>= 0; 0 switches it off).
        bias_grid: coarse nodes per axis of the bias field (>= 2).
    Returns:
        float32 ``(B, 1, *spatial)`` image in [0, 1], on ``label_map``'s device.
    """
    ndim = _check_labels(label_map)
    lo, hi = (_check_number(v, "mean_range", -math.inf) for v in mean_range)
    if hi < lo:
        raise ValueError(f"mean_range must be (low, high) with low <= high, got {mean_range}")
    noise_std = _check_number(noise_std, "noise_std", 0.0)
    blur_sigma = _check_number(blur_sigma, "blur_sigma", 0.0)
    bias_strength = _check_number(bias_strength, "bias_strength", 0.0)
    bias_grid = _check_int(bias_grid, "bias_grid", 2)
    gen = _generator(seed)
    labels = label_map.detach().cpu()
    b = labels.shape[0]
    n = int(labels.max()) + 1
    means = lo + (hi - lo) * torch.rand(b, n, generator=gen)
    image = torch.gather(means, 1, labels.reshape(b, -1)).view(labels.shape).float()
    image = _gaussian_blur(image, blur_sigma)
    image = image + noise_std * torch.randn(image.shape, generator=gen)
    coarse = torch.randn(b, 1, *([bias_grid] * ndim), generator=gen) * bias_strength
    image = image - image.amin(dim=tuple(range(1, ndim + 2)), keepdim=True)  # >= 0 before the multiplicative bias
    image = image * bias_field(coarse, image.shape[2:])
    lo_img = image.amin(dim=tuple(range(1, ndim + 2)), keepdim=True)
    hi_img = image.amax(dim=tuple(range(1, ndim + 2)), keepdim=True)
    image = (image - lo_img) / (hi_img - lo_img).clamp_min(1e-12)
    return image.to(label_map.device)


# ---------------------------------------------------------------------------------------------------------------
# deformed samples and pairs
# ---------------------------------------------------------------------------------------------------------------
class Deformed(NamedTuple):
    """Result of :func:`deform_sample`: ``image == warp(original, disp)`` and ``seg == warp(seg, disp, "nearest")``."""

    image: Tensor  #: ``(B, C, *spatial)`` warped image
    seg: Tensor | None  #: ``(B, 1, *spatial)`` warped labels, or None
    disp: Tensor  #: ``(B, ndim, *spatial)`` displacement in voxels that produced them


def deform_sample(image: Tensor, seg: Tensor | None = None, *, strength: float = 2.0, smoothness: float = 8.0,
                  seed: int | torch.Generator = 0, steps: int = 7, padding: str = "border") -> Deformed:
    """Warp an image (and its labels) with a random smooth diffeomorphism; return the exact displacement.

    ``disp = random_deformation(...)``; ``warped = warp(image, disp)`` (bilinear) and
    ``warped_seg = warp(seg, disp, mode="nearest")``. So ``disp`` maps the grid of the *warped* image into the
    original: if you register ``moving = image`` to ``fixed = warped``, ``disp`` is exactly the answer.

    Args:
        image: float ``(B, C, *spatial)``.
        seg: optional int ``(B, 1, *spatial)`` labels on the same grid.
        strength: RMS velocity in voxels (see :func:`random_velocity`).
        smoothness: smoothness of the velocity in voxels.
        seed: int or CPU ``torch.Generator``; one deformation per batch item.
        steps: scaling-and-squaring steps.
        padding: ``"border"`` or ``"zeros"``, as in :func:`deqreg_lite.warp.warp`.
    Returns:
        :class:`Deformed` ``(image, seg, disp)``; ``disp`` is float32 ``(B, ndim, *spatial)`` in voxels.
    """
    check_image(image, "image")
    if not image.is_floating_point():
        raise ValueError(f"image must be a floating-point tensor, got {image.dtype}; pass labels as seg")
    if seg is not None:
        _check_labels(seg, "seg")
        if seg.shape[0] != image.shape[0] or seg.shape[2:] != image.shape[2:]:
            raise ValueError(f"seg {tuple(seg.shape)} must share the batch size and spatial shape of image "
                             f"{tuple(image.shape)}")
    disp = random_deformation(tuple(image.shape[2:]), strength=strength, smoothness=smoothness, seed=seed,
                              steps=steps, batch=image.shape[0], device=image.device)
    warped = warp(image, disp, padding=padding)
    warped_seg = warp(seg, disp, mode="nearest", padding=padding) if seg is not None else None
    return Deformed(warped, warped_seg, disp)


def synthetic_pair(shape: Sequence[int], *, seed: int = 0, n_labels: int = 26, mode: str = "deformed",
                   strength: float = 2.0, smoothness: float = 8.0, label_smoothness: float = 4.0,
                   device: torch.device | str | None = None) -> dict:
    """A ready-to-register synthetic pair, with the keys of :func:`deqreg_lite.datasets.load_sample`.

    Modes:

    * ``"deformed"`` (default): one random label map is the fixed segmentation; the moving segmentation is it
      warped by a random diffeomorphism ``true_disp`` (``moving_seg == warp(fixed_seg, true_disp, "nearest")``).
      The two images are painted independently (different random intensities per label, noise and bias), as
      in SynthMorph; the moving image is painted on the fixed grid and warped bilinearly, so its edges are as
      smooth as the fixed image's.
    * ``"independent"``: two unrelated label maps drawn with the same settings (as SynthMorph trains); there is
      no ``true_disp``.

    Args:
        shape: spatial shape ``(H, W)`` or ``(D, H, W)``.
        seed: int; the pair is a function of it.
        n_labels: number of labels (>= 2).
        mode: ``"deformed"`` or ``"independent"``.
        strength: RMS velocity in voxels of ``true_disp``'s velocity (``"deformed"`` only).
        smoothness: smoothness in voxels of that velocity.
        label_smoothness: blob size of the label maps (see :func:`random_label_map`).
        device: where the tensors go.
    Returns:
        dict with ``fixed``, ``moving`` (float32 ``(1, 1, *shape)`` in [0, 1]), ``fixed_seg``, ``moving_seg``
        (int64 ``(1, 1, *shape)``), ``spacing`` (1 mm per axis), ``labels`` (``1 .. n_labels - 1``; label 0 is
        treated as background, as in the brain samples), ``label_names``, ``ids``, and for ``"deformed"``
        ``true_disp`` (float32 ``(1, ndim, *shape)``, voxels).
    """
    shape = _check_shape(shape)
    if mode not in ("deformed", "independent"):
        raise ValueError(f"mode must be one of ('deformed', 'independent'), got {mode!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    gen = _generator(seed)
    fixed_seg = random_label_map(shape, n_labels, seed=gen, smoothness=label_smoothness)
    fixed = random_intensities(fixed_seg, seed=gen)
    out: dict = {}
    if mode == "deformed":
        painted = random_intensities(fixed_seg, seed=gen)
        moving, moving_seg, disp = deform_sample(painted, fixed_seg, strength=strength, smoothness=smoothness,
                                                 seed=gen)
        out["true_disp"] = disp
        ids = (f"synth{seed}_a", f"synth{seed}_a_deformed")
    else:
        moving_seg = random_label_map(shape, n_labels, seed=gen, smoothness=label_smoothness)
        moving = random_intensities(moving_seg, seed=gen)
        ids = (f"synth{seed}_a", f"synth{seed}_b")
    sample = {
        "fixed": fixed, "moving": moving.clamp(0.0, 1.0), "fixed_seg": fixed_seg, "moving_seg": moving_seg,
        "spacing": (1.0,) * len(shape), "labels": list(range(1, n_labels)),
        "label_names": {i: f"label_{i}" for i in range(1, n_labels)}, "ids": ids, **out,
    }
    if device is not None:
        sample = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in sample.items()}
    return sample
