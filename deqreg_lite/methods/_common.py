"""Helpers shared by the learned methods: input checks, size-agnostic U-Net calls, residuals, result assembly."""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_image, check_image_dtype, check_int, check_unit_range
from .._contexts import sync
from ..losses import LossFn, lncc
from ..nets import UNet
from ..result import RegistrationResult
from ..solvers import rel_residual  # noqa: F401  (re-exported: the one relative residual lives in solvers)
from ..warp import resize_image, warp
from .base import Backward, RegistrationMethod

__all__ = ["check_pair", "check_steps", "check_count", "unet_apply", "rel_residual", "downsample", "normalise_grad",
           "image_gradient", "similarity_grad", "GRAD_EPS", "make_result", "Clock", "residual_step",
           "iterate_forward", "last_field_training_step"]


def check_pair(fixed: Tensor, moving: Tensor, ndim: int, model: torch.nn.Module | None = None) -> None:
    """Check the images given to a learned method; raises ``TypeError``/``ValueError`` saying what came.

    ``fixed`` and ``moving`` must be finite ``(B, 1, *spatial)`` tensors with ``ndim`` spatial axes and the same
    shape, floating point (integer/uint8 images: convert with ``.float()`` and scale), of the dtype of ``model``'s
    parameters when ``model`` is given (float64 runs need ``model.double()``; nothing is converted silently), and
    hold intensities in [0, 1] up to :data:`~deqreg_lite._checks.UNIT_RANGE_TOL` (1e-3) of rounding (other units,
    0..255 or HU: the message says how to normalise).
    """
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    for name, x in (("fixed", fixed), ("moving", moving)):
        got = check_image(x, name)
        if got != ndim:
            raise ValueError(f"{name} must have shape (B, 1, *{ndim} spatial axes) for a {ndim}D method, "
                             f"got {tuple(x.shape)}")
        if x.shape[1] != 1:
            raise ValueError(f"{name} must have one channel (B, 1, *spatial), got {tuple(x.shape)}")
        check_image_dtype(x, name, None if param is None else param.dtype)
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same shape")
    if fixed.dtype != moving.dtype:
        raise ValueError(f"fixed ({fixed.dtype}) and moving ({moving.dtype}) must have the same dtype")
    check_unit_range(fixed, "fixed")
    check_unit_range(moving, "moving")


def check_steps(steps: int | None, default: int) -> int:
    """``None`` -> ``default``; otherwise ``steps`` must be an integer >= 1 (``ValueError`` if not;
    :func:`deqreg_lite._checks.check_int`)."""
    value = check_int(steps, "steps", 1, allow_none=True)
    return default if value is None else value


def check_count(value: int, name: str, low: int = 1) -> int:
    """A constructor's integer option: ``ValueError`` unless an integer ``>= low``
    (:func:`deqreg_lite._checks.check_int`)."""
    return check_int(value, name, low)


def unet_apply(net: UNet, x: Tensor) -> Tensor:
    """``net(x)`` for any spatial size: ``x`` ``(B, C, *spatial)`` is padded at the far end of every axis
    (replicate) up to a multiple of ``2**net.levels``, and the output cropped back to ``(B, out, *spatial)``."""
    m = 2 ** net.levels
    spatial = x.shape[2:]
    pads = [(-s) % m for s in spatial]
    if not any(pads):
        return net(x)
    pad_arg: list[int] = []
    for p in reversed(pads):  # F.pad lists the last axis first
        pad_arg += [0, p]
    y = net(F.pad(x, pad_arg, mode="replicate"))
    return y[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]


def downsample(image: Tensor, size: Sequence[int]) -> Tensor:
    """Blur and resample ``image`` ``(B, C, *spatial)`` to ``size`` (:func:`deqreg_lite.warp.resize_image`)."""
    return resize_image(image, size, blur=True)


def normalise_grad(g: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale-free gradient: ``g / max|g|`` per sample (values in [-1, 1]; a zero gradient stays zero)."""
    b = g.shape[0]
    scale = g.detach().reshape(b, -1).abs().amax(dim=1).clamp_min(eps)
    return g / scale.view(b, *([1] * (g.dim() - 1)))


def image_gradient(image: Tensor) -> Tensor:
    """Spatial gradient of ``image`` ``(B, 1, *spatial)`` by central differences (one-sided at the border), in
    intensity per voxel: ``(B, ndim, *spatial)``, channel ``i`` along spatial axis ``i`` (the order of ``disp``)."""
    ndim = image.dim() - 2
    return torch.cat(torch.gradient(image, dim=tuple(range(2, 2 + ndim))), dim=1)


#: the variance floor of the LNCC behind :func:`similarity_grad`, relative to each image's global variance (the
#: ``eps`` of :func:`deqreg_lite.losses.lncc`, whose default for the loss is 1e-5).
GRAD_EPS = 0.2


def similarity_grad(fixed: Tensor, moving: Tensor, disp: Tensor) -> Tensor:
    """The normalised LNCC gradient with respect to the displacement, an *input* of GraDIRN and RIIR
    (``(B, ndim, *spatial)``, max-abs 1 per sample; :func:`normalise_grad`).

    Computed by the chain rule with the moving image's gradient taken **before** warping:
    ``g(x) = d(1 - lncc(fixed, w, eps=GRAD_EPS)) / dw (x) * (grad moving)(x + disp(x))``, ``w = moving o disp``,
    where ``grad moving`` is :func:`image_gradient` (central differences) sampled bilinearly (zeros outside the
    image).
    This is the form classical registration uses (e.g. demons); it is continuous in ``disp``. The exact derivative
    of the bilinearly warped image (:meth:`deqreg_lite.losses.Objective.grad`) is not: on every grid line, and so
    everywhere at ``disp = 0``, where every method starts, it is a one-sided difference whose side the rounding of
    the sampling coordinate picks, so float32, float64, CPU and CUDA gave different inputs (up to 2.9x the gradient's
    largest value on ``brain2d``).

    The LNCC has a **strong variance floor**, ``GRAD_EPS = 0.2`` of each image's global variance (the loss uses
    1e-5): the networks iterate on this input, and with a weak floor the gradient on near-flat patches (background,
    the edge of the brain) swings with faint intensity noise, which the iteration amplifies. Measured with the
    shipped GraDIRN / RIIR on ``brain2d`` (``benchmarks/numerics.py``), 1e-4 noise on an input moved their fields by
    1.5 / 0.31 voxels with a floor of 1e-5, 0.09 / 0.09 with 1e-4, and 0.007 / 0.018 with 0.2; a mixed batch moved
    a pair by 5e-3 / 3e-3, 3e-3 / 3e-3 and 6e-5 / 5e-5 voxels. With a strong floor, low-contrast patches count by
    their local covariance rather than their correlation.

    Each sample's LNCC map is averaged over its own voxels (not over the batch), so a sample's gradient does not
    depend on the batch it is in. Works without a graph (``create_graph=False``) and under ``torch.no_grad()``.
    ``fixed``, ``moving``: ``(B, 1, *spatial)``; ``disp``: ``(B, ndim, *spatial)`` in voxels.
    """
    with torch.enable_grad():
        warped = warp(moving.detach(), disp.detach()).requires_grad_(True)
        cc = lncc(fixed.detach(), warped, eps=GRAD_EPS, reduction="none")
        (dw,) = torch.autograd.grad(cc.flatten(1).mean(1).sum(), warped)
    grad_moving = warp(image_gradient(moving.detach()), disp.detach(), padding="zeros")
    return normalise_grad(-dw * grad_moving)


def make_result(disp: Tensor, states: list[Tensor], state_steps: list[int], info: dict,
                elapsed: float) -> RegistrationResult:
    trace = {"residual": list(info["residuals"])} if "residuals" in info else {}
    return RegistrationResult(disp=disp, states=states, state_steps=state_steps, trace=trace, info=info,
                              time=elapsed)


class Clock:
    """Wall-clock seconds, synchronising CUDA when the tensors live there."""

    def __init__(self, x: Tensor) -> None:
        self.device = x.device
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        sync(self.device)
        return time.perf_counter() - self.start


def residual_step(net: UNet, fixed: Tensor, moving: Tensor, phi: Tensor, extra: Tensor | None = None) -> Tensor:
    """The residual update of Eq. 3/5: ``phi + net([fixed, moving o phi, phi])`` (``net``: ``2 + ndim`` inputs;
    ``[.., extra]`` and ``2 + ndim + C`` inputs when ``extra`` ``(B, C, *spatial)`` is given).

    ``fixed``, ``moving`` ``(B, 1, *spatial)``; ``phi`` ``(B, ndim, *spatial)`` in voxels; returns like ``phi``.
    """
    parts = [fixed, warp(moving, phi), phi] + ([extra] if extra is not None else [])
    return phi + unet_apply(net, torch.cat(parts, dim=1))


def iterate_forward(method: RegistrationMethod, fixed: Tensor, moving: Tensor, steps: int | None,
                    return_states: bool) -> RegistrationResult:
    """The forward pass of an unrolled method: check the pair, run ``method._iterate(fixed, moving, steps, keep)``
    (``steps=None``: ``method.trained_steps``) and assemble the result, with the states ``phi_1 .. phi_steps``
    (detached) when ``return_states``."""
    check_pair(fixed, moving, method.ndim, model=method)
    steps = check_steps(steps, method.trained_steps)
    clock = Clock(fixed)
    disp, phis, info = method._iterate(fixed, moving, steps, return_states)
    states = [p.detach() for p in phis]
    return make_result(disp, states, list(range(1, len(states) + 1)), info, clock.elapsed())


def last_field_training_step(method: RegistrationMethod, fixed: Tensor, moving: Tensor, loss_fn: LossFn,
                             backward: Backward, steps: int) -> dict[str, float]:
    """The training step of an unrolled method trained on its last field only: check the pair, run
    ``method._iterate(fixed, moving, steps, keep=False)`` with the graph on (BPTT), back-propagate
    ``loss_fn(fixed, moving, phi_steps)`` and return ``loss``, ``steps``, ``nfe`` and the last ``residual``."""
    check_pair(fixed, moving, method.ndim, model=method)
    disp, _, info = method._iterate(fixed, moving, steps, keep=False)
    loss = loss_fn(fixed, moving, disp)
    backward(loss)
    return {"loss": float(loss.detach()), "steps": float(steps), "nfe": float(info.nfe),
            "residual": info.residuals[-1]}

