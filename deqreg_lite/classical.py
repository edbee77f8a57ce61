"""Classical registration: gradient descent on the energy of Eq. 1 (Eq. 2 of the paper).

``disp_{t+1} = disp_t - eta_t * grad E(disp_t)``, with ``E = L_sim(fixed, moving ∘ disp) + lam * L_reg(disp)``.
Two step rules: Adam (the default; an adaptive ``eta_t``), and plain gradient descent with a fixed step.
"""
from __future__ import annotations

import numbers
import time
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import check_disp, check_image, check_int, check_options, check_same_spatial
from .config import default_device
from .losses import Objective, check_lam
from .result import RegistrationResult
from .warp import resize_disp, resize_image

__all__ = ["register", "RegistrationDivergedError", "DEFAULT_ADAM_LR", "default_gd_lr"]

#: Default Adam step: roughly the largest move per iteration, in voxels.
DEFAULT_ADAM_LR = 0.1


def default_gd_lr(lam: float, ndim: int) -> float:
    """Default per-voxel GD step: ``1 / (1 + 8 lam / ndim)``.

    The diffusion term's per-voxel Hessian has the largest eigenvalue ``8 lam / ndim`` (the discrete Laplacian's
    ``4 ndim``, times the ``2 / ndim**2`` of the mean over axes and channels), so plain gradient descent is only
    stable for steps below ``2 / (8 lam / ndim)``; the ``1 +`` leaves room for the similarity term's curvature.
    """
    return 1.0 / (1.0 + 8.0 * lam / ndim)


class RegistrationDivergedError(RuntimeError):
    """The energy became NaN or inf: the step size is too large for this problem."""


def _downsample(x: Tensor, factor: int) -> Tensor:
    return resize_image(x, [max(2, s // factor) for s in x.shape[2:]], blur=False)


def _working_dtype(fixed: Tensor, moving: Tensor) -> torch.dtype:
    """float64 when both images are float64, else float32; any other dtype is converted with a warning."""
    if fixed.dtype == moving.dtype == torch.float64:
        return torch.float64
    for name, x in (("fixed", fixed), ("moving", moving)):
        if x.dtype not in (torch.float32, torch.float64):
            warnings.warn(f"register: {name} is {x.dtype}; it is converted to float32 as it is (no rescaling). LNCC "
                          f"does not depend on the intensity scale, but MSE and the balance with lam do: give "
                          f"images in [0, 1] (e.g. x.float() / 255 for uint8)", stacklevel=3)
    return torch.float32


def register(fixed: Tensor, moving: Tensor, *, lam: float = 1.0, iterations: int | Sequence[int] = 200,
             optimizer: str = "adam", lr: float | None = None, similarity: str = "lncc", win: int = 5,
             levels: int = 1, init_disp: Tensor | None = None, record_every: int = 0,
             device: torch.device | str | None = None, progress: bool = False,
             callback: Callable[[int, Tensor, dict], None] | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` by minimising ``L_sim + lam * diffusion`` over a dense displacement.

    Args:
        fixed, moving: ``(B, C, *spatial)`` images, 2D or 3D, intensities in about [0, 1]. Two float64 images
            are registered in float64; anything else in float32 (integer and float16 images with a warning).
        lam: weight λ of the diffusion regulariser (displacements in voxels).
        iterations: steps per resolution level (one number for all levels, or one per level, coarse to fine).
        optimizer: ``"adam"`` (adaptive step) or ``"gd"`` (plain gradient descent, Eq. 2 with a fixed step).
        lr: step size. For Adam, about the largest move per iteration in voxels (default 0.1). For GD, ``eta``
            per voxel: the energies are means over ``N`` voxels, so the applied step is ``eta_t = lr * N``, which
            keeps ``lr`` independent of the image size (default :func:`default_gd_lr`, which stays below the
            stability limit of the diffusion term).
        similarity: ``"lncc"`` (loss ``1 - LNCC``, window ``win``) or ``"mse"``.
        levels: number of resolution levels (1 = full resolution only; 3 = 1/4, 1/2, 1).
        init_disp: optional starting displacement ``(B, ndim, *spatial)`` in voxels (default zero).
        record_every: keep a copy of the displacement every this many iterations of the finest level
            (0 keeps none), for stepping through the optimisation.
        device: where to compute; default CUDA when available, else the CPU. The result comes back on
            ``fixed``'s device.
        progress: show a tqdm progress bar.
        callback: called as ``callback(iteration, disp, terms)`` after every step (``terms`` holds floats).
    Returns:
        :class:`RegistrationResult` with ``disp`` ``(B, ndim, *spatial)``, ``trace`` holding ``energy``,
        ``similarity`` and ``regulariser`` per iteration (all levels, coarse first), ``states`` and
        ``state_steps`` when ``record_every > 0``, and ``info`` with the options and per-level iteration counts.
    Raises:
        RegistrationDivergedError: when the energy stops being finite (lower ``lr``).
        TypeError: for a ``lam`` that is not a number.
        ValueError: for ``lam`` not a finite number >= 0 (inf and NaN included), a spatial axis of fewer than 2
            voxels, or mismatched shapes.

    **Batches.** Every pair of the batch is registered on its own: the energy is the batch mean of the pairs'
    energies, so its gradient with respect to one pair's displacement is that pair's gradient divided by ``B``;
    the step multiplies it back by ``B``, and both optimizers then act element-wise. A pair gets the displacement
    it gets alone (up to float rounding), whatever else shares its batch. The ``trace`` holds batch means.
    """
    check_options(optimizer, ("adam", "gd"), "optimizer")
    ndim = check_image(fixed, "fixed")
    check_image(moving, "moving")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same shape")
    if min(fixed.shape[2:]) < 2:
        raise ValueError(f"every spatial axis needs at least 2 voxels (a displacement along a 1-voxel axis has no "
                         f"gradient to follow); got images of shape {tuple(fixed.shape)}. For a 2D slice of a "
                         f"volume, drop the 1-voxel axis: pass (B, C, H, W)")
    lam = check_lam(lam)
    levels = check_int(levels, "levels", 1)
    one = isinstance(iterations, numbers.Integral) and not isinstance(iterations, bool)
    hint = f" (one count, or {levels} of them: one per level)"
    its = [check_int(iterations, "iterations", 0, hint=hint)] * levels if one else \
        [check_int(i, "iterations", 0, hint=hint) for i in iterations]
    if len(its) != levels:
        raise ValueError(f"iterations must be one count >= 0 or {levels} of them, got {iterations}")
    if lr is None:
        lr = DEFAULT_ADAM_LR if optimizer == "adam" else default_gd_lr(lam, ndim)
    lr = float(lr)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    out_device = fixed.device
    device = torch.device(device) if device is not None else default_device()
    dtype = _working_dtype(fixed, moving)
    fixed, moving = fixed.to(device, dtype), moving.to(device, dtype)
    objective = Objective(similarity, "diffusion", lam, win=win)

    if init_disp is not None:
        check_disp(init_disp, "init_disp")
        check_same_spatial(fixed, init_disp, "fixed", "init_disp")
        disp = init_disp.detach().to(device, dtype)
    else:
        disp = fixed.new_zeros(fixed.shape[0], ndim, *fixed.shape[2:])

    trace: dict[str, list[float]] = {"energy": [], "similarity": [], "regulariser": []}
    states: list[Tensor] = []
    state_steps: list[int] = []
    start = time.perf_counter()
    bar = tqdm(total=sum(its), desc="register", disable=not progress, leave=False)
    batch = fixed.shape[0]
    for level in range(levels):
        factor = 2 ** (levels - 1 - level)
        f_l, m_l = _downsample(fixed, factor), _downsample(moving, factor)
        d = resize_disp(disp, f_l.shape[2:]).clone().requires_grad_(True)
        opt = torch.optim.Adam([d], lr=lr) if optimizer == "adam" else None
        eta = lr * f_l[0, 0].numel()
        finest = level == levels - 1
        if finest and record_every:
            states.append(d.detach().clone())
            state_steps.append(0)
        for it in range(its[level]):
            energy, sim, reg = objective.terms(f_l, m_l, d)
            if not torch.isfinite(energy):
                raise RegistrationDivergedError(
                    f"energy became {energy.item()} at level {level}, iteration {it}; lower lr (now {lr})")
            # each pair's own gradient: the energy is the batch mean of the pairs' energies, so B x it is their sum
            grad, = torch.autograd.grad(energy * batch, d)
            with torch.no_grad():
                if opt is not None:
                    d.grad = grad
                    opt.step()
                else:
                    d.sub_(eta * grad)
            terms = {"energy": energy.item(), "similarity": sim.item(), "regulariser": reg.item()}
            for k, v in terms.items():
                trace[k].append(v)
            if finest and record_every and (it + 1) % record_every == 0:
                states.append(d.detach().clone())
                state_steps.append(it + 1)
            if callback is not None:
                callback(it, d.detach(), terms)
            bar.update(1)
        disp = d.detach()
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(disp).all():
        raise RegistrationDivergedError("the displacement holds NaN or inf; lower lr")
    info = {"optimizer": optimizer, "lr": lr, "lam": lam, "similarity": similarity, "levels": levels,
            "iterations": its, "device": str(device)}
    return RegistrationResult(disp=disp.to(out_device), states=[s.to(out_device) for s in states],
                              state_steps=state_steps, trace=trace, info=info, time=elapsed)
