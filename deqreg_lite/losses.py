"""Similarity and regularisation terms, and the registration objective of Eq. 1.

**Sign convention.** :func:`lncc` and :func:`ncc`-style functions are *similarities*: higher is better, 1 means a
perfect local linear match, -1 a perfect inverted match. A *loss* to minimise is ``1 - lncc(...)``;
:class:`Objective` does that for you. :func:`mse` and :func:`diffusion` are already losses (lower is better).

Each objective term is available as a stateless function and through :class:`Objective`, which gives both the
``energy`` and its ``grad`` with respect to the displacement, so that a classical gradient step (Eq. 2) and a
learned step read alike (as in GraDIRN). The same :class:`Objective` is the training loss of every learned method
(:class:`deqreg_lite.methods.loss.RegistrationLoss` is it with the training defaults), optionally with a soft-Dice
term over label maps (:meth:`Objective.with_segs`).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_disp, check_image, check_options, check_same_spatial
from .warp import warp


def check_lam(lam: float) -> float:
    """The regulariser weight λ as a float: ``TypeError`` unless a real number (not a bool), ``ValueError`` unless
    finite and >= 0 (an infinite λ makes every energy NaN or inf)."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"lam must be a number (the weight of the diffusion regulariser), got {type(lam).__name__}")
    if not 0 <= lam < math.inf:
        raise ValueError(f"lam must be a finite number >= 0 (the weight of the diffusion regulariser), got {lam!r}")
    return float(lam)

__all__ = ["check_lam", "box_mean", "lncc", "mse", "diffusion", "soft_dice", "Objective", "Terms", "LossFn", "LNCC", "Diffusion",
           "LNCC_EPS"]

#: default variance floor of :func:`lncc`, relative to each image's global variance.
LNCC_EPS = 1e-5


def _box_sum(x: Tensor, win: int) -> Tensor:
    """Sum over a ``win``-wide box (zeros outside), into a new tensor; ``x`` is left untouched.

    Per spatial axis: a copy, then ``win - 1`` in-place adds of shifted slices. Each pass is a plain, contiguous,
    vectorised add, several times faster on CPU than ``avg_pool``/grouped ``conv`` (and than cumulative sums,
    which also lose precision on long axes); the sum is exactly 0 wherever the box holds only zeros.
    """
    pad = win // 2
    for dim in range(2, x.dim()):
        n = x.shape[dim]
        out = x.clone(memory_format=torch.contiguous_format)
        for k in range(1, min(pad, n - 1) + 1):
            out.narrow(dim, k, n - k).add_(x.narrow(dim, 0, n - k))
            out.narrow(dim, 0, n - k).add_(x.narrow(dim, k, n - k))
        x = out
    return x


class _BoxMean(torch.autograd.Function):
    """Zero-padded box mean. The filter is symmetric, so it is its own adjoint: the backward pass is the same
    box mean of the incoming gradient (and differentiable again, for double backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, win: int) -> Tensor:  # type: ignore[override]
        ctx.win = win
        return _box_sum(x, win).mul_(1.0 / win ** (x.dim() - 2))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _BoxMean.apply(grad, ctx.win), None


def box_mean(x: Tensor, win: int) -> Tensor:
    """Mean over a ``win``-wide box around every voxel, with zeros outside the image.

    Separable: one 1D box sum per spatial axis, so the cost grows with ``win``, not ``win**ndim``.
    Args:
        x: ``(B, C, *spatial)``.
    Returns:
        ``(B, C, *spatial)``.
    """
    if win < 1 or win % 2 == 0:
        raise ValueError(f"win must be a positive odd integer, got {win}")
    return _BoxMean.apply(x, win)


def lncc(a: Tensor, b: Tensor, win: int = 5, eps: float = LNCC_EPS, reduction: str = "mean") -> Tensor:
    """Local normalised cross-correlation, a **similarity** in [-1, 1] (higher is better).

    For every voxel, the correlation of ``a`` and ``b`` over a ``win``-wide box (``win**ndim`` voxels, zero
    padding at the border, as in VoxelMorph), with each local variance floored by a small fraction of that image's
    own global variance:

        ``cc = cov(a, b) / sqrt((var(a) + eps * s2(a)) * (var(b) + eps * s2(b)))``,

    where ``var`` and ``cov`` are the box statistics (``E[xy] - E[x] E[y]`` over the box) and ``s2(x)`` is the
    variance of ``x`` over the whole image, per sample and channel, plus ``1e-6`` times its mean square (so that
    only an all-zero image has ``s2 = 0``; it then counts as 1).

    Why the floor is relative: it makes ``lncc`` exactly invariant to the intensity scale (``lncc(c * a, b) ==
    lncc(a, b)`` for any ``c > 0``, up to rounding, as long as the product of the two floored variances is a normal
    float: in float32, for intensity scales down to about ``1e-8``), and it bounds the correlation and its gradient
    where a patch is flat or nearly so (background, the edge of the brain): there a variance far below
    ``eps * s2`` (faint noise) changes ``cc`` by little, whatever the intensity scale. The price: a patch whose
    own variance is not much larger than ``eps * s2`` has ``|cc| < 1`` even when ``b`` is a linear function of
    ``a`` (``var / (var + eps * s2)``; with the default ``eps = 1e-5`` that is below 0.999 only for patches whose
    variance is under 1% of the image's).

    On a flat patch (zero variance) the covariance is 0 too, so ``cc`` is 0: finite, never NaN, with a finite
    gradient. The limit of float32: ``E[x^2] - E[x]^2`` cancels, so a window whose variance is below about ``1e-6``
    of its mean square (a flat patch at a nonzero intensity) gets a variance and a covariance made of rounding, and
    its ``cc`` (which the floor keeps small, up to about 0.1 with the default ``eps``) is rounding too; a flat patch
    at 0 (a zero background) is exact. The network-input gradient of GraDIRN and RIIR uses a far larger floor
    (:data:`deqreg_lite.methods._common.GRAD_EPS`), where this does not show.

    Args:
        a, b: ``(B, C, *spatial)`` images with 2 or 3 spatial axes.
        win: odd window width in voxels (the paper uses 5).
        eps: the variance floor, **relative** to each image's global variance ``s2``; a number > 0.
            (Before this version ``eps`` was an absolute ``1e-8`` added to ``var(a) * var(b)``, which made ``lncc``
            depend on the intensity scale and left its gradient to rounding on flat patches.)
        reduction: ``"mean"`` gives a scalar (the mean over batch, channels and voxels), ``"none"`` the map
            ``(B, C, *spatial)``.
    Returns:
        The mean local correlation, or its map. Use ``1 - lncc(a, b)`` as a loss.
    """
    check_image(a, "a")
    check_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape")
    if win < 1 or win % 2 == 0:
        raise ValueError(f"win must be a positive odd integer, got {win}")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < math.inf):
        raise ValueError(f"eps must be a number > 0 (a variance floor relative to the image's variance), got {eps!r}")
    check_options(reduction, ("mean", "none"), "reduction")
    # One box filter per statistic rather than one on a 5-channel stack: each pass stays cache-sized, and
    # autograd only runs the backward of the statistics that depend on an input that needs a gradient.
    mu_a, mu_b = box_mean(a, win), box_mean(b, win)
    a2, b2 = a * a, b * b
    aa, bb, ab = box_mean(a2, win), box_mean(b2, win), box_mean(a * b, win)
    var_a = torch.addcmul(aa, mu_a, mu_a, value=-1.0).clamp_min(0.0)
    var_b = torch.addcmul(bb, mu_b, mu_b, value=-1.0).clamp_min(0.0)
    cov = torch.addcmul(ab, mu_a, mu_b, value=-1.0)
    den = (var_a + _variance_floor(a, a2, eps)) * (var_b + _variance_floor(b, b2, eps))
    cc = (cov * torch.rsqrt(den)).clamp(-1.0, 1.0)
    return cc.mean() if reduction == "mean" else cc


def _variance_floor(x: Tensor, x2: Tensor, eps: float) -> Tensor:
    """``eps * s2(x)`` per sample and channel, ``(B, C, 1, ...)``, given ``x2 = x * x``: ``s2 = (1 + 1e-6) E[x^2] -
    E[x]^2`` over the whole image (the global variance plus 1e-6 of the mean square), homogeneous of degree 2 in
    ``x`` and 0 only for an all-zero image, where it is replaced by 1. One pass each over ``x`` and ``x2``; the
    cancellation of this form costs a floor only relative accuracy ``~1e-7 E[x^2] / var``, plenty for a floor."""
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    s2 = torch.addcmul(x2.mean(dim=dims, keepdim=True) * (1.0 + 1e-6), mean, mean, value=-1.0).clamp_min(0.0)
    return torch.where(s2 > 0, s2, torch.ones_like(s2)) * eps


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference, a **loss** (lower is better). ``a``, ``b``: ``(B, C, *spatial)``; returns a scalar."""
    check_image(a, "a")
    check_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape")
    return (a - b).square().mean()


def diffusion(disp: Tensor) -> Tensor:
    """Diffusion regulariser: the mean of the squared forward differences of ``disp``, in voxels².

    ``(1 / ndim) * sum_axis mean((disp[x + e_axis] - disp[x])**2)``, each mean over batch, channels and the
    voxels that have a forward neighbour along that axis (VoxelMorph's ``Grad('l2')``).

    Args:
        disp: ``(B, ndim, *spatial)`` in voxels.
    Returns:
        A scalar, 0 for any constant (translation) field (float32 for a float16 or bfloat16 ``disp``).
    """
    ndim = check_disp(disp)
    if disp.dtype in (torch.float16, torch.bfloat16):  # a network's output under autocast: square and sum in float32
        disp = disp.float()
    total = disp.new_zeros(())
    for axis in range(2, 2 + ndim):
        total = total + torch.diff(disp, dim=axis).square().mean()
    return total / ndim


#: a training loss as the methods see it: ``loss_fn(fixed, moving, disp) -> scalar`` (``(B, C, *spatial)`` images,
#: a ``(B, ndim, *spatial)`` displacement in voxels). :class:`Objective` is one; so is what
#: :meth:`Objective.with_segs` returns.
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Terms(NamedTuple):
    """What :meth:`Objective.terms` returns: three scalar tensors, ``energy = similarity + lam * regulariser``.

    A named tuple, so ``energy, sim, reg = objective.terms(...)`` unpacks it. For code written against the old
    ``RegistrationLoss.terms`` dict, ``terms["loss"]`` (= ``energy``), ``terms["similarity"]`` and
    ``terms["regulariser"]`` still work.
    """

    energy: Tensor
    similarity: Tensor
    regulariser: Tensor

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            if key not in ("loss", "energy", "similarity", "regulariser"):
                raise KeyError(f"{key!r}; Terms has energy (alias 'loss'), similarity, regulariser")
            return getattr(self, "energy" if key == "loss" else key)
        return tuple.__getitem__(self, key)


def soft_dice(warped_onehot: Tensor, fixed_onehot: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean soft Dice over batch and channels of two ``(B, L, *spatial)`` maps in [0, 1]; a scalar in [0, 1]
    (a **similarity**: ``1 - soft_dice`` is the loss :meth:`Objective.with_segs` adds)."""
    axes = tuple(range(2, warped_onehot.dim()))
    inter = (warped_onehot * fixed_onehot).sum(axes)
    denom = warped_onehot.sum(axes) + fixed_onehot.sum(axes)
    return ((2 * inter + eps) / (denom + eps)).mean()


class Objective:
    """The registration energy of Eq. 1: ``E(disp) = L_sim(fixed, warp(moving, disp)) + lam * L_reg(disp)``,
    the one objective of the library: classical registration minimises it, every learned method trains on it
    (``RegistrationLoss`` in :mod:`deqreg_lite.methods.loss` is this class with the training defaults).

    Args:
        similarity: ``"lncc"`` (dissimilarity ``1 - lncc``, window ``win``), ``"mse"``, or a callable
            ``(fixed, warped) -> scalar loss`` (lower is better).
        regulariser: ``"diffusion"`` or a callable ``(disp) -> scalar loss``.
        lam: weight of the regulariser (λ), >= 0. Displacements are in voxels, so λ is in the units of
            ``L_sim / voxel²``. The paper's ``lam = 0.1`` (OASIS) was set in its own code's units; in voxel units it
            regularises too little: measured on this project, one-step and unrolled models trained with
            ``lam = 0.1`` collapsed after 2-3 minutes of training (25-28% folded voxels, Dice falling from 0.89 to
            0.85), while ``lam = 1`` did not. Hence the training default ``lam = 1``.
        win: LNCC window in voxels, a positive odd integer (the paper: 5).
        dice_weight: weight of ``1 - soft Dice`` over label maps, >= 0. Labels are bound with :meth:`with_segs`,
            which returns a loss with the same ``(fixed, moving, disp)`` signature, so the methods never see
            labels; with ``dice_weight = 0`` (the default) there is no such term.

    ``energy``, ``terms``, ``grad`` and calling the objective take ``fixed``, ``moving`` ``(B, C, *spatial)`` and
    ``disp`` ``(B, ndim, *spatial)``. Calling it returns ``energy`` (so an ``Objective`` is a :data:`LossFn`).
    """

    def __init__(self, similarity: str | Callable[[Tensor, Tensor], Tensor] = "lncc",
                 regulariser: str | Callable[[Tensor], Tensor] = "diffusion", lam: float = 1.0,
                 win: int = 5, dice_weight: float = 0.0) -> None:
        if isinstance(similarity, str):
            check_options(similarity, ("lncc", "mse"), "similarity")
            self._sim = (lambda f, w: 1.0 - lncc(f, w, win=win)) if similarity == "lncc" else mse
        elif callable(similarity):
            self._sim = similarity
        else:
            raise TypeError(f"similarity must be 'lncc', 'mse' or a callable, got {type(similarity).__name__}")
        if isinstance(regulariser, str):
            check_options(regulariser, ("diffusion",), "regulariser")
            self._reg = diffusion
        elif callable(regulariser):
            self._reg = regulariser
        else:
            raise TypeError(f"regulariser must be 'diffusion' or a callable, got {type(regulariser).__name__}")
        lam = check_lam(lam)
        if isinstance(win, bool) or not isinstance(win, int) or win < 1 or win % 2 == 0:
            raise ValueError(f"win must be a positive odd integer, got {win!r}")
        if not dice_weight >= 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight!r}")
        self.similarity, self.regulariser, self.lam, self.win = similarity, regulariser, float(lam), win
        self.dice_weight = float(dice_weight)

    def __repr__(self) -> str:
        name = lambda x: x if isinstance(x, str) else getattr(x, "__name__", type(x).__name__)
        dice = f", dice_weight={self.dice_weight:g}" if self.dice_weight else ""
        return f"Objective(similarity={name(self.similarity)!r}, regulariser={name(self.regulariser)!r}, " \
               f"lam={self.lam}, win={self.win}{dice})"

    def terms(self, fixed: Tensor, moving: Tensor, disp: Tensor) -> Terms:
        """The energy and its two terms, as :class:`Terms` ``(energy, similarity, regulariser)``, scalars."""
        check_image(fixed, "fixed")
        check_image(moving, "moving")
        check_disp(disp)
        check_same_spatial(fixed, disp, "fixed", "disp")
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same shape")
        sim = self._sim(fixed, warp(moving, disp))
        reg = self._reg(disp)
        return Terms(sim + self.lam * reg, sim, reg)

    def energy(self, fixed: Tensor, moving: Tensor, disp: Tensor) -> Tensor:
        """The scalar energy ``E(disp)``."""
        return self.terms(fixed, moving, disp)[0]

    def __call__(self, fixed: Tensor, moving: Tensor, disp: Tensor) -> Tensor:
        """The scalar energy ``E(disp)`` (the same as :meth:`energy`)."""
        return self.terms(fixed, moving, disp)[0]

    def grad(self, fixed: Tensor, moving: Tensor, disp: Tensor, create_graph: bool = False) -> Tensor:
        """``dE/d disp``, a tensor like ``disp`` ``(B, ndim, *spatial)``.

        Works under ``torch.no_grad()`` too (it enables grad locally), which is what a fixed-point solver needs
        when the update map calls it. With ``create_graph=True`` and a ``disp`` that is part of a graph, the
        result is differentiable (for learned updates trained by backpropagation).
        """
        with torch.enable_grad():
            keep = create_graph and disp.requires_grad
            d = disp if keep else disp.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.energy(fixed, moving, d), d, create_graph=create_graph)
        return g

    def with_segs(self, fixed_seg: Tensor, moving_seg: Tensor, labels: Sequence[int] | None = None) -> LossFn:
        """Bind label maps ``(B, 1, *spatial)`` (integers) and return ``loss_fn(fixed, moving, disp)`` that adds
        ``dice_weight * (1 - soft Dice)`` over ``labels`` (default: every label > 0 present in either map) to the
        energy. The moving one-hot maps are warped bilinearly, so the term is differentiable. With
        ``dice_weight == 0`` this returns ``self``. ``ValueError`` for label maps of different shapes, with more
        than one channel, of a floating-point dtype, or without a label > 0."""
        if self.dice_weight == 0:
            return self
        check_image(fixed_seg, "fixed_seg")
        if fixed_seg.shape != moving_seg.shape or fixed_seg.shape[1] != 1:
            raise ValueError(f"fixed_seg {tuple(fixed_seg.shape)} and moving_seg {tuple(moving_seg.shape)} must be "
                             f"label maps of the same shape (B, 1, *spatial)")
        if fixed_seg.is_floating_point() or moving_seg.is_floating_point():
            raise ValueError("fixed_seg and moving_seg must be integer label maps")
        if labels is None:
            labels = sorted((set(torch.unique(fixed_seg).tolist()) | set(torch.unique(moving_seg).tolist())) - {0})
        if not labels:
            raise ValueError("no foreground label (> 0) to compute a Dice term on")
        ids = torch.as_tensor(list(labels), device=fixed_seg.device).view(1, -1, *([1] * (fixed_seg.dim() - 2)))
        fixed_oh = (fixed_seg == ids).float()
        moving_oh = (moving_seg == ids).float()

        def loss_fn(fixed: Tensor, moving: Tensor, disp: Tensor) -> Tensor:
            base = self(fixed, moving, disp)
            warped = warp(moving_oh.to(disp.dtype), disp)
            return base + self.dice_weight * (1.0 - soft_dice(warped, fixed_oh.to(disp.dtype)))

        return loss_fn


class LNCC(nn.Module):
    """Module form of :func:`lncc` (a similarity, higher is better)."""

    def __init__(self, win: int = 5, eps: float = LNCC_EPS) -> None:
        super().__init__()
        self.win, self.eps = win, eps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return lncc(a, b, win=self.win, eps=self.eps)


class Diffusion(nn.Module):
    """Module form of :func:`diffusion`."""

    def forward(self, disp: Tensor) -> Tensor:
        return diffusion(disp)
