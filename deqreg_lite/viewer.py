"""Interactive Plotly viewers of 3D volumes, deformations and Jacobian determinants (floor 4: figures only).

* :func:`three_plane` - one volume in three orthogonal planes, with an optional label/mask overlay and keypoints;
  one slider per array axis moves that plane.
* :func:`deformation_viewer` - fixed / warped moving / Jacobian determinant (diverging colours around 1, folding
  ``J <= 0`` in black) in three planes, three sliders.
* :func:`comparison_figure` - the paper's Figure 4 layout: one row per method (warped moving, Jacobian), one
  slider over the slices of one axis.

All return a plain :class:`plotly.graph_objects.Figure` (no ``FigureWidget``, so no ``anywidget`` is needed): the
sliders are Plotly slider steps that ``restyle`` the traces' data, so they work in any renderer that runs Plotly's
JavaScript (JupyterLab, Colab, a saved HTML file) without a Python kernel. Every slice a slider can show is stored
in the figure, so big volumes are shown strided (``max_size`` voxels per axis at most, the spacing scaled to match)
and the sliders offer ``max_steps`` positions at most.

Conventions. Volumes are ``(D0, D1, D2)`` arrays (or tensors ``(1, 1, D0, D1, D2)``), displacements
``(1, 3, D0, D1, D2)`` in voxels, keypoints ``(N, 3)`` voxel indices in array-axis order, spacing in mm per voxel.
The panel "axis k" is the slice ``volume[..., i, ...]`` at index ``i`` of axis ``k``; its rows are the first
remaining axis (drawn top to bottom) and its columns the second. Coordinates on the panels are in mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ._checks import check_spacing
from .metrics import jacobian_det
from .warp import warp

__all__ = ["three_plane", "deformation_viewer", "comparison_figure", "JACOBIAN_RANGE", "jacobian_colorscale",
           "display_stride", "plane_slice", "plotly_renderer", "ordinal"]

#: the colour range of Jacobian panels: 1 (no volume change) sits in the middle, J <= 0 (folding) is black.
JACOBIAN_RANGE = (-1.0, 3.0)
_DEFAULT_NAMES = ("axis 0", "axis 1", "axis 2")


#: the environment variable that asks :func:`plotly_renderer` for figures that draw in a static HTML export.
STATIC_HTML_ENV = "DEQREG_STATIC_HTML"


def plotly_renderer(static_html: bool | None = None, *, environ: Mapping[str, str] | None = None,
                    modules: Mapping | None = None) -> str:
    """The Plotly renderer name for this environment (set it with ``plotly.io.renderers.default = ...``).

    In order:

    1. ``$PLOTLY_RENDERER`` when set (CI sets ``json``: the figure is stored as data, nothing is drawn);
    2. ``"notebook"`` when a static HTML export is asked for (``static_html=True``, or ``$DEQREG_STATIC_HTML`` set
       to anything but ``""``/``0``): plotly.js is embedded in the notebook's output once, so the exported page
       draws every figure offline and without a kernel;
    3. ``"colab"`` on Google Colab (``google.colab`` imported, or ``$COLAB_RELEASE_TAG`` set);
    4. ``"plotly_mimetype"`` everywhere else (JupyterLab, Jupyter Notebook 7, VS Code): the figure goes to the
       front end as JSON and its Plotly extension (``jupyterlab-plotly``, installed with plotly) draws it, offline.
       Not ``"notebook_connected"``: it loads plotly.js from a CDN and draws blank when the download is late or
       impossible.

    ``environ`` and ``modules`` default to ``os.environ`` and ``sys.modules`` (the tests pass their own).
    """
    import os
    import sys

    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if environ.get("PLOTLY_RENDERER"):
        return environ["PLOTLY_RENDERER"]
    if static_html is None:
        static_html = environ.get(STATIC_HTML_ENV, "") not in ("", "0")
    if static_html:
        return "notebook"
    if "google.colab" in modules or "COLAB_RELEASE_TAG" in environ:
        return "colab"
    return "plotly_mimetype"


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``12th``, ``13th``, ``21st``, ..."""
    n = int(n)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def jacobian_colorscale(zmin: float = JACOBIAN_RANGE[0], zmax: float = JACOBIAN_RANGE[1]) -> list:
    """A diverging colour scale for ``[zmin, zmax]``: blue (shrinking) - white at J = 1 - red (growing), with
    every ``J <= 0`` (folding) black. Needs ``zmin < 0 < 1 < zmax``."""
    if not zmin < 0 < 1 < zmax:
        raise ValueError(f"need zmin < 0 < 1 < zmax, got {zmin}, {zmax}")
    f = lambda v: (v - zmin) / (zmax - zmin)
    return [[0.0, "black"], [f(0.0), "black"], [min(f(0.0) + 1e-6, f(1.0)), "#2166ac"], [f(1.0), "#f7f7f7"],
            [1.0, "#b2182b"]]


def _to_volume(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume (D0, D1, D2), or (1, 1, D0, D1, D2); got shape {x.shape}")
    return x


def _to_disp(disp) -> torch.Tensor:
    d = torch.as_tensor(disp).detach().float().cpu()
    if d.dim() == 4:
        d = d[None]
    if d.dim() != 5 or d.shape[:2] != (1, 3):
        raise ValueError(f"disp must have shape (1, 3, D0, D1, D2) or (3, D0, D1, D2), got {tuple(d.shape)}")
    return d


def _spacing(spacing, ndim: int = 3) -> np.ndarray:
    """:func:`deqreg_lite._checks.check_spacing` (3D by default)."""
    return check_spacing(spacing, ndim)


def display_stride(shape: Sequence[int], max_size: int | None) -> int:
    """The stride that brings every axis of ``shape`` to ``max_size`` voxels or fewer (1 when ``None``)."""
    if max_size is None:
        return 1
    if max_size < 2:
        raise ValueError(f"max_size must be >= 2, got {max_size}")
    return max(1, math.ceil(max(shape) / max_size))


def plane_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """``volume`` sliced at ``index`` along ``axis``: a 2D array over the two remaining axes, in order."""
    return np.take(volume, index, axis=axis)


def _slider_positions(n: int, max_steps: int) -> list[int]:
    if n <= max_steps:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, max_steps)})


def _round(a: np.ndarray, decimals: int | None) -> list:
    a = np.asarray(a, dtype=np.float64)
    if decimals is not None:
        a = np.round(a, decimals)
    return a.tolist()


@dataclass
class _Panel:
    volume: np.ndarray                 # 3D, already strided
    axis: int
    row: int
    col: int
    colorscale: object = "gray"
    zmin: float | None = None
    zmax: float | None = None
    colorbar: dict | None = None
    name: str = ""
    overlay: np.ndarray | None = None  # 3D, NaN where transparent
    overlay_colorscale: object = "Viridis"
    overlay_opacity: float = 0.4
    overlay_range: tuple = (None, None)
    keypoints: np.ndarray | None = None  # (N, 3) in strided voxel units
    traces: list = field(default_factory=list)  # indices: heatmap, [overlay], [scatter]


def _build(panels: list[_Panel], rows: int, cols: int, spacing: np.ndarray, point: Sequence[int],
           titles: Sequence[str], *, title: str, slab: float, max_steps: int, decimals: int | None,
           height: int | None, slider_labels: Mapping[int, str], stride: int = 1, row_heights=None,
           width: int | None = None, horizontal_spacing: float = 0.08,
           vertical_spacing: float | None = None) -> go.Figure:
    if vertical_spacing is None:
        vertical_spacing = 0.08 if rows > 1 else 0.1
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles), horizontal_spacing=horizontal_spacing,
                        vertical_spacing=vertical_spacing, row_heights=row_heights)
    # open every slider on one of its own steps: the first picture is a slice the slider can come back to
    point = list(point)
    for axis in {p.axis for p in panels}:
        positions = _slider_positions(panels[0].volume.shape[axis], max_steps)
        point[axis] = min(positions, key=lambda v: abs(v - int(point[axis])))

    def coords(axis):
        a, b = [k for k in range(3) if k != axis]
        shape = panels[0].volume.shape
        return a, b, (np.arange(shape[b]) * spacing[b]).tolist(), (np.arange(shape[a]) * spacing[a]).tolist()

    def kp_xy(p: _Panel, index: int):
        a, b = [k for k in range(3) if k != p.axis]
        near = np.abs(p.keypoints[:, p.axis] - index) <= slab
        return (p.keypoints[near, b] * spacing[b]).tolist(), (p.keypoints[near, a] * spacing[a]).tolist()

    def sliced(p: _Panel, index: int):
        out = {"hm": _round(plane_slice(p.volume, p.axis, index), decimals)}
        if p.overlay is not None:
            out["ov"] = _round(plane_slice(p.overlay, p.axis, index), decimals)
        if p.keypoints is not None:
            out["kp"] = kp_xy(p, index)
        return out

    for p in panels:
        _, _, x, y = coords(p.axis)
        s = sliced(p, int(point[p.axis]))
        hover = f"{p.name}<br>x %{{x:.1f}} mm, y %{{y:.1f}} mm<br>value %{{z:.3f}}<extra></extra>"
        fig.add_trace(go.Heatmap(z=s["hm"], x=x, y=y, colorscale=p.colorscale, zmin=p.zmin, zmax=p.zmax,
                                 showscale=p.colorbar is not None, colorbar=p.colorbar, name=p.name,
                                 hovertemplate=hover), row=p.row, col=p.col)
        p.traces = [len(fig.data) - 1]
        if p.overlay is not None:
            fig.add_trace(go.Heatmap(z=s["ov"], x=x, y=y, colorscale=p.overlay_colorscale, showscale=False,
                                     zmin=p.overlay_range[0], zmax=p.overlay_range[1], opacity=p.overlay_opacity,
                                     name=f"{p.name} overlay", hoverinfo="skip"), row=p.row, col=p.col)
            p.traces.append(len(fig.data) - 1)
        if p.keypoints is not None:
            kx, ky = s["kp"]
            fig.add_trace(go.Scatter(x=kx, y=ky, mode="markers", name="keypoints", showlegend=False,
                                     marker=dict(color="#00e5ff", size=5, symbol="x"), hoverinfo="skip"),
                          row=p.row, col=p.col)
            p.traces.append(len(fig.data) - 1)

    # images: equal aspect, rows drawn top to bottom, no grid; mm axes labelled with the array axis they show (x on
    # the bottom row; y on the first column, or on every panel when the columns show different planes)
    several_planes = len({p.axis for p in panels}) > 1
    label = dict(font=dict(size=10), standoff=4)
    for i, p in enumerate(panels):
        ref = fig.get_subplot(p.row, p.col)
        xname = ref.xaxis.plotly_name  # "xaxis", "xaxis2", ...
        xanchor = "x" + xname[5:]
        a, b = [k for k in range(3) if k != p.axis]
        fig.update_xaxes(showgrid=False, zeroline=False, constrain="domain", row=p.row, col=p.col,
                         title=dict(text=f"axis {b} (mm)", **label) if p.row == rows else None)
        fig.update_yaxes(showgrid=False, zeroline=False, autorange="reversed", scaleanchor=xanchor,
                         scaleratio=1, constrain="domain", row=p.row, col=p.col,
                         title=dict(text=f"axis {a} (mm)", **label) if p.col == 1 or several_planes else None)

    sliders = []
    axes = sorted({p.axis for p in panels})
    n_sliders = len(axes)
    for j, axis in enumerate(axes):
        members = [p for p in panels if p.axis == axis]
        n = members[0].volume.shape[axis]
        steps = []
        for index in _slider_positions(n, max_steps):
            zs, xs, ys, idx = [], [], [], []
            for p in members:
                _, _, x, y = coords(axis)
                s = sliced(p, index)
                zs.append(s["hm"]), xs.append(x), ys.append(y), idx.append(p.traces[0])
                if p.overlay is not None:
                    zs.append(s["ov"]), xs.append(x), ys.append(y), idx.append(p.traces[1])
                if p.keypoints is not None:
                    kx, ky = s["kp"]
                    zs.append(None), xs.append(kx), ys.append(ky), idx.append(p.traces[-1])
            label = str(index * stride)  # the index in the original (unstrided) volume
            steps.append(dict(method="restyle", label=label, args=[{"z": zs, "x": xs, "y": ys}, idx]))
        positions = _slider_positions(n, max_steps)
        active = int(np.argmin([abs(v - int(point[axis])) for v in positions]))
        share = 1.0 / n_sliders
        sliders.append(dict(active=active, steps=steps, x=j * share + 0.01, len=share - 0.03, y=0,
                            yanchor="top", pad=dict(t=30), currentvalue=dict(prefix=slider_labels[axis] + ": ",
                                                                             font=dict(size=11)),
                            font=dict(size=9)))
    fig.update_layout(title=dict(text=title), sliders=sliders, margin=dict(l=10, r=10, t=60, b=10),
                      height=height or (300 * rows + 140), width=width, plot_bgcolor="white")
    return fig


def _prepare(volume, spacing, max_size, point):
    vol = _to_volume(volume, "volume")
    f = display_stride(vol.shape, max_size)
    sp = _spacing(spacing) * f
    vol = vol[::f, ::f, ::f]
    if point is None:
        point = [n // 2 for n in vol.shape]
    else:
        point = [min(max(int(round(p / f)), 0), n - 1) for p, n in zip(point, vol.shape)]
    return vol, f, sp, point


def _keypoints(kp, f: int) -> np.ndarray | None:
    if kp is None:
        return None
    kp = kp.detach().float().cpu().numpy() if isinstance(kp, torch.Tensor) else np.asarray(kp, dtype=float)
    kp = kp.reshape(-1, kp.shape[-1])
    if kp.shape[-1] != 3:
        raise ValueError(f"keypoints must have shape (N, 3), got {kp.shape}")
    return kp / f


def three_plane(volume, spacing=None, overlay=None, *, point: Sequence[int] | None = None, title: str = "",
                names: Sequence[str] = _DEFAULT_NAMES, colorscale="gray", zmin: float | None = None,
                zmax: float | None = None, overlay_colorscale="Viridis", overlay_opacity: float = 0.35,
                keypoints=None, slab: float = 2.0, max_size: int | None = 64, max_steps: int = 48,
                decimals: int | None = 3, height: int | None = None) -> go.Figure:
    """One 3D volume in three orthogonal planes through ``point``, with a slider per axis.

    Args:
        volume: ``(D0, D1, D2)`` array or tensor (leading singleton dims are dropped).
        spacing: mm per voxel (one number or three); default 1.
        overlay: optional volume of the same shape (labels or a mask) drawn on top, transparent where it is 0.
        point: the voxel the three planes pass through (default: the centre).
        names: the planes' names, for ``names[k]`` = the slice across axis ``k`` (e.g. ``("coronal", "axial",
            "sagittal")`` for the shipped ``brain3d``).
        colorscale, zmin, zmax: the volume's colours (default: the volume's min and max).
        keypoints: optional ``(N, 3)`` voxel indices; those within ``slab`` voxels of a plane are marked on it.
        max_size: show big volumes strided to at most this many voxels per axis (``None``: never).
        max_steps: the most positions a slider offers.
        decimals: round the stored slices (smaller figures); ``None`` keeps them exact.
    Returns:
        ``go.Figure``: traces per plane in order heatmap, [overlay heatmap], [keypoint scatter]; three sliders
        (``layout.sliders[k]`` moves the plane across axis ``k``), each step ``restyle``-ing that plane's traces.
    """
    vol, f, sp, point = _prepare(volume, spacing, max_size, point)
    ov = None
    if overlay is not None:
        ov = _to_volume(overlay, "overlay")
        if ov.shape != _to_volume(volume, "volume").shape:
            raise ValueError(f"overlay {ov.shape} and volume {_to_volume(volume, 'volume').shape} must match")
        ov = ov[::f, ::f, ::f].astype(np.float64)
        ov_range = (float(np.nanmin(ov)), float(np.nanmax(ov)))
        ov = np.where(ov == 0, np.nan, ov)
    zmin = float(np.nanmin(vol)) if zmin is None else zmin
    zmax = float(np.nanmax(vol)) if zmax is None else zmax
    kp = _keypoints(keypoints, f)
    panels = [_Panel(vol, k, 1, k + 1, colorscale, zmin, zmax, None, names[k], overlay=ov,
                     overlay_colorscale=overlay_colorscale, overlay_opacity=overlay_opacity,
                     overlay_range=ov_range if ov is not None else (None, None), keypoints=kp)
              for k in range(3)]
    panels[2].colorbar = dict(len=0.8, thickness=12)
    titles = [f"{names[k]} (across axis {k})" if names is not _DEFAULT_NAMES else f"slice across axis {k}"
              for k in range(3)]
    stride = f" (shown every {ordinal(f)} voxel)" if f > 1 else ""
    return _build(panels, 1, 3, sp, point, titles, title=(title + stride).strip(), slab=slab, max_steps=max_steps,
                  decimals=decimals, height=height, slider_labels={k: f"{names[k]} index" for k in range(3)},
                  stride=f)


def deformation_viewer(fixed, moving, disp, *, spacing=None, keypoints=None, moving_keypoints=None,
                       point: Sequence[int] | None = None, title: str = "", names: Sequence[str] = _DEFAULT_NAMES,
                       slab: float = 2.0, max_size: int | None = 64, max_steps: int = 32,
                       decimals: int | None = 3, height: int | None = None) -> go.Figure:
    """Fixed / warped moving / Jacobian determinant of ``disp`` in three planes, with a slider per axis.

    Args:
        fixed, moving: ``(1, 1, D0, D1, D2)`` tensors (or ``(D0, D1, D2)`` arrays).
        disp: ``(1, 3, D0, D1, D2)`` displacement in voxels, with ``warped = warp(moving, disp)``.
        keypoints: optional fixed keypoints ``(N, 3)``, marked on the fixed and the warped rows (after a good
            registration the warped moving image's landmarks sit on them).
        moving_keypoints: optional moving keypoints ``(N, 3)``; not drawn (they live on the moving grid), but with
            ``keypoints`` they put the mean TRE (:func:`deqreg_lite.metrics.tre`) in the title.
        Others: as :func:`three_plane`.
    Returns:
        ``go.Figure`` with 3 rows (fixed, warped moving, Jacobian determinant: colour range
        :data:`JACOBIAN_RANGE`, white at 1, black where ``J <= 0``) x 3 planes, and three sliders. The title
        gives the folding percentage (and the mean TRE when both keypoint sets are given).
    """
    fx = _to_volume(fixed, "fixed")
    d = _to_disp(disp)
    if tuple(d.shape[2:]) != fx.shape:
        raise ValueError(f"disp {tuple(d.shape)} does not match fixed {fx.shape}")
    mv = torch.as_tensor(_to_volume(moving, "moving"), dtype=torch.float32)[None, None]
    warped = warp(mv, d)[0, 0].numpy()
    jac = jacobian_det(d)[0].numpy()
    folding = float((jac <= 0).mean() * 100)
    fx, f, sp, point = _prepare(fx, spacing, max_size, point)
    warped, jac_s = warped[::f, ::f, ::f], np.clip(jac[::f, ::f, ::f], *JACOBIAN_RANGE)
    kp = _keypoints(keypoints, f)
    lo, hi = float(min(fx.min(), warped.min())), float(max(fx.max(), warped.max()))
    panels = []
    for k in range(3):
        panels.append(_Panel(fx, k, 1, k + 1, "gray", lo, hi, None, f"fixed, {names[k]}", keypoints=kp))
        panels.append(_Panel(warped, k, 2, k + 1, "gray", lo, hi, None, f"warped moving, {names[k]}",
                             keypoints=kp))
        panels.append(_Panel(jac_s, k, 3, k + 1, jacobian_colorscale(), *JACOBIAN_RANGE,
                             dict(len=0.3, y=0.15, thickness=12, title=dict(text="det J")) if k == 2 else None,
                             f"det J, {names[k]}"))
    titles = [f"{row}: {names[k]}" for row in ("fixed", "warped moving", "det J") for k in range(3)]
    info = f"folding {folding:.2f}% (J <= 0, black)"
    if keypoints is not None and moving_keypoints is not None:
        from .metrics import tre

        info += f", mean TRE {float(tre(keypoints, moving_keypoints, d, _spacing(spacing)).mean()):.2f} mm"
    stride = f", shown every {ordinal(f)} voxel" if f > 1 else ""
    return _build(panels, 3, 3, sp, point, titles, title=f"{title} ({info}{stride})".strip(), slab=slab,
                  max_steps=max_steps, decimals=decimals, height=height,
                  slider_labels={k: f"{names[k]} index" for k in range(3)}, stride=f)


def comparison_figure(fixed, moving, disps: Mapping[str, object], *, axis: int = 0, index: int | None = None,
                      spacing=None, title: str = "", max_size: int | None = 64, max_steps: int = 48,
                      decimals: int | None = 3, height: int | None = None, width: int | None = None,
                      panel_px: int = 260) -> go.Figure:
    """The paper's Figure 4 as a Plotly figure: the first row fixed and moving, then one row per method with its
    warped moving image and its Jacobian determinant, all sliced across ``axis``; one slider over the slices.

    Args:
        disps: method name -> displacement ``(1, 3, D0, D1, D2)`` in voxels (e.g. ``{"identity": zero,
            "classical": result.disp}``).
        index: the initial slice (default: the middle).
        panel_px: the width of each panel in pixels; the figure's ``width`` and ``height`` (default: computed) fit
            two such columns and the rows at the slices' aspect ratio, so the panels keep their size on any page.
    Returns:
        ``go.Figure`` with ``1 + len(disps)`` rows x 2 columns (one heatmap each) and one slider.
    """
    if not disps:
        raise ValueError("disps must name at least one method")
    fx = _to_volume(fixed, "fixed")
    mv_t = torch.as_tensor(_to_volume(moving, "moving"), dtype=torch.float32)[None, None]
    point = [n // 2 for n in fx.shape]
    if index is not None:
        point[axis] = int(index)
    fxs, f, sp, point = _prepare(fx, spacing, max_size, point)
    mvs = mv_t[0, 0].numpy()[::f, ::f, ::f]
    lo, hi = float(min(fxs.min(), mvs.min())), float(max(fxs.max(), mvs.max()))
    panels = [_Panel(fxs, axis, 1, 1, "gray", lo, hi, None, "fixed"),
              _Panel(mvs, axis, 1, 2, "gray", lo, hi, None, "moving")]
    titles = ["fixed", "moving"]
    for r, (name, disp) in enumerate(disps.items(), start=2):
        d = _to_disp(disp)
        if tuple(d.shape[2:]) != fx.shape:
            raise ValueError(f"disp of {name!r} {tuple(d.shape)} does not match fixed {fx.shape}")
        jac = jacobian_det(d)[0].numpy()
        warped = warp(mv_t, d)[0, 0].numpy()[::f, ::f, ::f]
        panels.append(_Panel(warped, axis, r, 1, "gray", lo, hi, None, f"{name}: warped moving"))
        panels.append(_Panel(np.clip(jac[::f, ::f, ::f], *JACOBIAN_RANGE), axis, r, 2, jacobian_colorscale(),
                             *JACOBIAN_RANGE, dict(len=0.3, thickness=12, title=dict(text="det J"))
                             if r == 2 else None, f"{name}: det J"))
        titles += [f"{name}: warped moving", f"{name}: det J (folding {float((jac <= 0).mean() * 100):.2f}%)"]
    rows = 1 + len(disps)
    # A fixed size, so that the panels are panel_px wide whatever the width of the page (a figure without a width
    # fills the page, and its equal-aspect panels then shrink to fit the height: 180 px in a 1300 px figure).
    a, b = [k for k in range(3) if k != axis]
    aspect = fxs.shape[a] * sp[a] / (fxs.shape[b] * sp[b])
    gap_x, gap_y = 80, 55                      # px between columns (axis labels), between rows (subplot titles)
    plot_w = 2 * panel_px + gap_x
    plot_h = rows * panel_px * aspect + (rows - 1) * gap_y
    margin_w, margin_h = 20 + 150, 60 + 150  # margins + tick labels and colour bar; title; slider and axis labels
    width = width or int(round(plot_w + margin_w))
    height = height or int(round(plot_h + margin_h))
    stride = f" (shown every {ordinal(f)} voxel)" if f > 1 else ""
    return _build(panels, rows, 2, sp, point, titles, title=(title + stride).strip(), slab=0.0, max_steps=max_steps,
                  decimals=decimals, height=height, width=width, horizontal_spacing=gap_x / plot_w,
                  vertical_spacing=gap_y / plot_h if rows > 1 else 0.1,
                  slider_labels={axis: f"slice across axis {axis}"}, stride=f)
