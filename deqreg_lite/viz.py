"""Matplotlib figures for registration results. 3D inputs are shown as their middle slice along axis 0."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.patches import Patch
from torch import Tensor

from .metrics import jacobian_det

__all__ = ["to_2d", "show_image", "plot_grid", "plot_jacobian", "plot_trace", "registration_figure",
           "show_labels"]


def to_2d(x: Tensor, channel: int | None = 0, index: int | None = None) -> np.ndarray:
    """A 2D numpy view of ``(B, C, *spatial)`` (first batch item, ``channel``; middle slice of 3D volumes)."""
    x = x.detach().float().cpu()
    x = x[0] if channel is None else x[0, channel]
    if x.dim() == 3 + (channel is None):
        mid = x.shape[-3] // 2 if index is None else index
        x = x[..., mid, :, :]
    return x.numpy()


def _disp_2d(disp: Tensor, index: int | None = None) -> np.ndarray:
    """In-plane components ``(2, H, W)`` of a 2D or 3D displacement (3D: middle slice along axis 0)."""
    d = disp.detach().float().cpu()[0]
    if d.shape[0] == 3:
        mid = d.shape[1] // 2 if index is None else index
        d = d[1:, mid]
    return d.numpy()


def show_image(ax, image: Tensor, title: str = "", cmap: str = "gray", **kw) -> None:
    ax.imshow(to_2d(image), cmap=cmap, **kw)
    ax.set_title(title)
    ax.set_axis_off()


def show_labels(ax, image: Tensor, seg: Tensor, title: str = "", alpha: float = 0.4,
                names: Mapping[int, str] | None = None) -> None:
    """Image with its label map overlaid. ``names`` (label id -> name) adds a colour key (legend) for those ids."""
    ax.imshow(to_2d(image), cmap="gray")
    lab = to_2d(seg).astype(float)
    # one fixed colour per label id (tab10 for up to 9 labels, tab20 beyond), so labels 1-3 differ clearly
    cmap, top = ("tab10", 10) if lab.max() < 10 else ("tab20", 20)
    ax.imshow(np.ma.masked_where(lab == 0, lab % top), cmap=cmap, vmin=0, vmax=top - 1, alpha=alpha,
              interpolation="nearest")
    if names:
        colours = plt.get_cmap(cmap)
        handles = [Patch(facecolor=colours((int(i) % top) / (top - 1)), alpha=max(alpha, 0.6), label=str(n))
                   for i, n in sorted(names.items()) if int(i) != 0]
        ax.legend(handles=handles, loc="lower right", fontsize="small", framealpha=0.8)
    ax.set_title(title)
    ax.set_axis_off()


def plot_grid(ax, disp: Tensor, step: int = 6, title: str = "deformation grid", color: str = "k",
              lw: float = 0.6) -> None:
    """Draw the deformed grid lines ``x + disp(x)`` (every ``step`` voxels) of a 2D field, image orientation."""
    d = _disp_2d(disp)
    h, w = d.shape[1:]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    py, px = yy + d[0], xx + d[1]
    for r in range(0, h, step):
        ax.plot(px[r, :], py[r, :], color=color, lw=lw)
    for c in range(0, w, step):
        ax.plot(px[:, c], py[:, c], color=color, lw=lw)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.set_axis_off()


def plot_jacobian(ax, disp: Tensor, title: str = "Jacobian determinant", vmax: float = 2.0,
                  colorbar: bool = False):
    """Jacobian determinant map (blue < 1 < red), with folded voxels (J <= 0) in black. Returns the image.

    The colour scale starts at 0: every J <= 0 is drawn black, and a colour bar of the image (``colorbar=True``, or
    ``fig.colorbar(im)``) shows black below 0 as its "under" end, so the map and its colour bar agree.
    """
    jac = jacobian_det(disp)[:, None]
    j = to_2d(jac)
    cmap = plt.get_cmap("RdBu_r").with_extremes(under="black")
    cmap.colorbar_extend = "min"  # the colour bar draws the black "J <= 0" end as a triangle below 0
    im = ax.imshow(j, cmap=cmap, norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(vmax, float(j.max()))))
    folded = np.ma.masked_where(j > 0, np.ones_like(j))  # J == 0 exactly would sit at the scale's end: black too
    ax.imshow(folded, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.8)
        cb.set_label("det J (black: J <= 0, folded)")
    return im


def plot_trace(ax, trace: dict[str, Sequence[float]], keys: Sequence[str] = ("energy", "similarity", "regulariser"),
               logy: bool = False, title: str = "convergence", labels: Mapping[str, str] | None = None,
               start: int = 1) -> None:
    """Curves of ``trace[key]`` against the iteration, the first entry at x = ``start``; ``labels`` renames keys in
    the legend (e.g. ``{"similarity": "1 - LNCC"}``: the trace's "similarity" is a dissimilarity, lower is better)."""
    labels = labels or {}
    for k in keys:
        if k in trace and len(trace[k]):
            ax.plot(np.arange(start, start + len(trace[k])), trace[k], label=labels.get(k, k))
    ax.set_xlabel("iteration")
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.set_title(title)


def registration_figure(fixed: Tensor, moving: Tensor, disp: Tensor, title: str = "", grid_step: int = 6):
    """Five panels: fixed, moving, warped moving, deformation grid and Jacobian determinant. Returns the figure."""
    from .warp import warp

    warped = warp(moving, disp.to(moving.device))
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.8), constrained_layout=True)
    show_image(axes[0], fixed, "fixed")
    show_image(axes[1], moving, "moving")
    show_image(axes[2], warped, "warped moving")
    plot_grid(axes[3], disp, step=grid_step)
    im = plot_jacobian(axes[4], disp)
    fig.colorbar(im, ax=axes[4], shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig
