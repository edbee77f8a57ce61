"""Notebook widgets: thin ``ipywidgets`` wrappers over tested library functions (no maths lives here).

Every builder returns an :class:`ipywidgets.interactive` object. Its callback runs once when the widget is built and
again whenever a control changes, in a kernel or not, so tests can drive it without a browser::

    w = deformation_explorer(sample["moving"])
    control(w, "strength").value = 8.0     # runs the callback again
    w.result["folding_pct"]                # the numbers the figure shows

``w.result`` is always a dict of plain numbers (and the chosen options), the same numbers printed in the figure's
titles. Figures are drawn with :mod:`deqreg_lite.viz`, rendered to PNG into an :class:`ipywidgets.Image` child of the
widget (``w.images``) and closed at once, so nothing piles up in ``matplotlib``'s figure list. Rendering into an
``Image`` rather than printing into the interactive's ``Output`` keeps ``jupyter nbconvert --execute`` working:
nbclient's mimic of the ``Output`` widget can block on large images (jupyter/nbclient#312).

Widgets:

* :func:`deformation_explorer`: a random smooth deformation of an image; strength, smoothness, integration steps and
  seed sliders; warped image, deformed grid, Jacobian determinant and the % of folding voxels.
* :func:`classical_explorer`: classical registration (:func:`deqreg_lite.classical.register`) with sliders for
  λ, the step size, the iterations, the resolution levels and the optimizer; figure, convergence curve, Dice, folding.
* :func:`iteration_stepper`: a slider over the recorded ``result.states`` of a registration, to step through it.
* :func:`prediction_explorer`: a slider over pairs (and a menu over models) showing a one-shot prediction of a
  learned method (e.g. VoxelMorph), with its Dice against the identity's.
"""
from __future__ import annotations

import html
import io
import time
from typing import Any, Mapping

import ipywidgets as W
import matplotlib.pyplot as plt
from torch import Tensor

from ._checks import check_image
from .classical import DEFAULT_ADAM_LR, RegistrationDivergedError, default_gd_lr, register
from .datasets.synthetic import random_deformation
from .evaluate import as_method, pair_metrics
from .losses import Objective, diffusion
from .metrics import folding_percent, jacobian_det
from .result import RegistrationResult
from .viz import plot_grid, plot_jacobian, plot_trace, registration_figure, show_image, show_labels
from .warp import warp

__all__ = ["deformation_explorer", "classical_explorer", "iteration_stepper", "prediction_explorer", "control"]

_STYLE = {"description_width": "initial"}
_WIDE = W.Layout(width="420px")


def control(widget: W.interactive, name: str) -> W.ValueWidget:
    """The control of ``widget`` that sets the callback's argument ``name`` (e.g. ``"strength"``, ``"lam"``).

    Setting its ``.value`` re-runs the callback; the new numbers are in ``widget.result``.
    """
    for w in widget.kwargs_widgets:
        if w._kwarg == name:
            return w
    names = [w._kwarg for w in widget.kwargs_widgets]
    raise KeyError(f"no control named {name!r}; this widget has {names}")


def _new_image() -> W.Image:
    return W.Image(format="png", layout=W.Layout(max_width="100%", height="auto"))


def _render(fig, image: W.Image, dpi: int = 80) -> None:
    """Render ``fig`` to PNG into ``image``, then close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    image.value = buf.getvalue()
    image.layout.display = None


def _hide(image: W.Image) -> None:
    """Hide ``image`` (nothing to show): an empty PNG would show the browser's broken-image icon."""
    image.value = b""
    image.layout.display = "none"


def _finish(widget: W.interactive, images: list[W.Image], text: W.HTML | None = None) -> W.interactive:
    """Put the figure images (and a line of text) between the controls and the interactive's output area;
    keep them as ``widget.images`` and ``widget.text``."""
    extra = ([text] if text is not None else []) + list(images)
    widget.children = (*widget.children[:-1], *extra, widget.out)
    widget.images = images
    widget.text = text
    return widget


def _check_sample(sample: Mapping[str, Any]) -> None:
    for key in ("fixed", "moving"):
        if key not in sample:
            raise ValueError(f"sample must be a dict with 'fixed' and 'moving' (B, C, *spatial) tensors; "
                             f"{key!r} is missing (keys: {sorted(sample)})")
        check_image(sample[key], f"sample[{key!r}]")


def _zero_disp(image: Tensor) -> Tensor:
    return image.new_zeros(image.shape[0], image.dim() - 2, *image.shape[2:])


# ---------------------------------------------------------------------------------------------------------------
# deformation explorer
# ---------------------------------------------------------------------------------------------------------------
def deformation_explorer(image: Tensor, seg: Tensor | None = None, *, strength: float = 2.0,
                         max_strength: float = 16.0, smoothness: float = 8.0, steps: int = 7, seed: int = 0,
                         grid_step: int = 6, label_names: Mapping[int, str] | None = None,
                         show: bool = True) -> W.interactive:
    """Explore random smooth deformations of ``image``, and watch folding appear as their strength grows.

    The displacement is :func:`deqreg_lite.datasets.synthetic.random_deformation`: a smooth random velocity of
    RMS ``strength`` voxels, integrated by scaling and squaring with ``steps`` squarings. With ``steps = 0`` the
    velocity itself is used as the displacement: it folds (Jacobian determinant ``<= 0``) once it is strong for its
    smoothness, while the integrated field stays invertible far longer.

    Args:
        image: ``(1, C, *spatial)`` image (2D, or 3D shown as its middle slice).
        seg: optional ``(1, 1, *spatial)`` integer label map, overlaid and warped with the image.
        strength, smoothness, steps, seed: initial slider values (see ``random_deformation``).
        max_strength: the strength slider's upper end, in voxels.
        grid_step: spacing of the drawn grid lines, in voxels.
        label_names: label id -> name, for a colour key on the label panels (e.g. ``sample["label_names"]``).
        show: draw the figure (``False`` computes the numbers only).
    Returns:
        The :class:`ipywidgets.interactive`; ``.result`` holds ``strength``, ``smoothness``, ``steps``, ``seed``,
        ``folding_pct``, ``jac_min`` and ``jac_max``.
    """
    check_image(image, "image")
    if image.shape[0] != 1:
        raise ValueError(f"image must hold one item (1, C, *spatial), got {tuple(image.shape)}")
    shape = tuple(image.shape[2:])
    picture = _new_image()

    def update(strength: float, smoothness: float, steps: int, seed: int) -> dict[str, Any]:
        disp = random_deformation(shape, strength=strength, smoothness=smoothness, seed=seed, steps=steps,
                                  device=image.device)
        jac = jacobian_det(disp)
        out = {"strength": float(strength), "smoothness": float(smoothness), "steps": int(steps),
               "seed": int(seed), "folding_pct": float(folding_percent(disp)[0]),
               "jac_min": float(jac.min()), "jac_max": float(jac.max())}
        if show:
            warped = warp(image, disp)
            fig, axes = plt.subplots(1, 4, figsize=(15, 4), constrained_layout=True)
            if seg is None:
                show_image(axes[0], image, "original")
                show_image(axes[1], warped, "warped: image(x + u(x))")
            else:
                show_labels(axes[0], image, seg, "original", names=label_names)
                show_labels(axes[1], warped, warp(seg, disp, mode="nearest"), "warped: image(x + u(x))",
                            names=label_names)
            plot_grid(axes[2], disp, step=grid_step, title="deformed grid x + u(x)")
            im = plot_jacobian(axes[3], disp, title=f"det J: min {out['jac_min']:.2f}, max {out['jac_max']:.2f}")
            fig.colorbar(im, ax=axes[3], shrink=0.8)
            how = "velocity used directly (no integration)" if steps == 0 else f"{steps} squarings"
            fig.suptitle(f"strength {strength:.1f} vx, smoothness {smoothness:.0f} vx, {how}: "
                         f"folding {out['folding_pct']:.2f} % of voxels (J <= 0, black)")
            _render(fig, picture)
        return out

    widget = W.interactive(
        update,
        strength=W.FloatSlider(value=strength, min=0.0, max=max_strength, step=0.5, description="strength (vx)",
                               style=_STYLE, layout=_WIDE, continuous_update=False),
        smoothness=W.FloatSlider(value=smoothness, min=2.0, max=24.0, step=1.0, description="smoothness (vx)",
                                 style=_STYLE, layout=_WIDE, continuous_update=False),
        steps=W.IntSlider(value=steps, min=0, max=8, description="integration steps", style=_STYLE,
                          layout=_WIDE, continuous_update=False),
        seed=W.IntSlider(value=seed, min=0, max=20, description="seed", style=_STYLE, layout=_WIDE,
                         continuous_update=False),
    )
    return _finish(widget, [picture])


# ---------------------------------------------------------------------------------------------------------------
# classical registration explorer
# ---------------------------------------------------------------------------------------------------------------
def classical_explorer(sample: Mapping[str, Any], *, lam: float = 1.0, lr: float | None = None,
                       iterations: int = 100, max_iterations: int = 600, optimizer: str = "adam", levels: int = 2,
                       similarity: str = "lncc", show: bool = True, manual: bool = False) -> W.interactive:
    """Classical registration of a sample pair with sliders for λ, the step size, iterations, levels and optimizer.

    Each change runs :func:`deqreg_lite.classical.register` (sliders act when released) and shows
    :func:`deqreg_lite.viz.registration_figure`, the convergence curve, and the metrics of
    :func:`deqreg_lite.evaluate.pair_metrics` next to those of the identity (no registration).

    Args:
        sample: a sample dict (``fixed``, ``moving``, optionally ``fixed_seg``, ``moving_seg``, ``labels``).
        lam, lr, iterations, optimizer, levels: initial values (``lr=None``: the library's default step for
            the initial optimizer and λ; plain GD diverges when ``lr`` is too large for λ, and the widget says so).
        max_iterations: the iterations slider's upper end (per level).
        similarity: ``"lncc"`` or ``"mse"``, passed to ``register``.
        show: draw the figures (``False`` computes the numbers only).
        manual: add a "Register" button and run only when it is pressed (for slow, large inputs).
    Returns:
        The :class:`ipywidgets.interactive`; ``.result`` holds the options, ``dice`` and ``dice_identity``
        (when the sample has labels), ``folding_pct``, ``sdlogj``, ``diffusion`` (the regulariser of the final
        field, voxels²), ``energy`` (final; with 0 iterations the energy of the unchanged field), ``time_s`` and
        ``diverged``. ``.registration`` is the last :class:`~deqreg_lite.result.RegistrationResult` (``None``
        after a divergence). The curve's legend names the similarity term a dissimilarity (``1 - LNCC``).
    """
    _check_sample(sample)
    fixed, moving = sample["fixed"], sample["moving"]
    identity = pair_metrics(sample, _zero_disp(fixed))
    holder: dict[str, W.interactive] = {}
    pictures = [_new_image(), _new_image()]
    text = W.HTML()
    # the trace's "similarity" is the dissimilarity L_sim that is minimised (lower is better): say so in the legend
    dissim = "dissimilarity 1 - LNCC" if similarity == "lncc" else "dissimilarity MSE"

    def objective(lam: float) -> Objective:
        return Objective(similarity, "diffusion", lam)

    def update(lam: float, lr: float, iterations: int, levels: int, optimizer: str) -> dict[str, Any]:
        out: dict[str, Any] = {"lam": float(lam), "lr": float(lr), "iterations": int(iterations),
                               "levels": int(levels), "optimizer": optimizer, "diverged": False}
        if "dice" in identity:
            out["dice_identity"] = identity["dice"]
        try:
            res = register(fixed, moving, lam=lam, lr=lr, iterations=iterations, levels=levels,
                           optimizer=optimizer, similarity=similarity)
        except RegistrationDivergedError as err:
            if "widget" in holder:
                holder["widget"].registration = None
            text.value = f"<b>diverged</b>: {html.escape(str(err))}"
            for picture in pictures:
                _hide(picture)
            return {**out, "diverged": True}
        if "widget" in holder:
            holder["widget"].registration = res
        else:
            holder["first"] = res
        m = pair_metrics(sample, res.disp)
        out.update({k: m[k] for k in ("dice", "folding_pct", "sdlogj") if k in m})
        out["diffusion"] = float(diffusion(res.disp))
        # The trace holds the energy before each step; with 0 iterations nothing ran, so score the field itself.
        out["energy"] = (res.trace["energy"][-1] if res.trace["energy"]
                         else float(objective(lam).energy(fixed, moving, res.disp)))
        out["time_s"] = res.time
        if show:
            score = f"Dice {identity['dice']:.3f} -> {m['dice']:.3f}, " if "dice" in m else ""
            fig = registration_figure(fixed, moving, res.disp,
                                      title=f"{optimizer}, λ={lam:.3g}, lr={lr:.3g}, {iterations} it x {levels} "
                                            f"level(s): {score}folding {m['folding_pct']:.2f} %")
            _render(fig, pictures[0])
            if res.trace["energy"]:
                fig, ax = plt.subplots(1, 2, figsize=(11, 3.2), constrained_layout=True)
                plot_trace(ax[0], res.trace, keys=("energy", "similarity"), labels={"similarity": dissim},
                           title=f"energy and {dissim} (both fall)")
                plot_trace(ax[1], res.trace, keys=("regulariser",), title="regulariser (diffusion, vx²)")
                for a in ax:
                    _mark_levels(a, res.info["iterations"])
                _render(fig, pictures[1])
            else:
                _hide(pictures[1])
        dice = f"Dice {out['dice_identity']:.3f} &rarr; <b>{out['dice']:.3f}</b>, " if "dice" in out else ""
        ran = "" if res.trace["energy"] else "0 iterations: no optimisation ran (the identity, u = 0); "
        text.value = (f"{ran}{dice}folding <b>{out['folding_pct']:.2f} %</b>, SDlogJ {out['sdlogj']:.3f}, "
                      f"final energy {out['energy']:.4f}, {res.time:.2f} s")
        return out

    widget = W.interactive(
        update, {"manual": manual, "manual_name": "Register"},
        lam=W.FloatLogSlider(value=lam, base=10, min=-2, max=2, step=0.25, description="λ (lam)", style=_STYLE,
                             layout=_WIDE, continuous_update=False),
        lr=W.FloatLogSlider(value=lr if lr is not None else DEFAULT_ADAM_LR if optimizer == "adam"
                            else default_gd_lr(lam, fixed.dim() - 2), base=10, min=-3, max=0.5,
                            step=0.1, description="step size (lr)", style=_STYLE, layout=_WIDE,
                            continuous_update=False),
        iterations=W.IntSlider(value=iterations, min=0, max=max_iterations, step=10,
                               description="iterations per level", style=_STYLE, layout=_WIDE,
                               continuous_update=False),
        levels=W.IntSlider(value=levels, min=1, max=3, description="resolution levels", style=_STYLE,
                           layout=_WIDE, continuous_update=False),
        optimizer=W.Dropdown(options=["adam", "gd"], value=optimizer, description="optimizer", style=_STYLE),
    )
    widget.registration = holder.pop("first", None)
    holder["widget"] = widget
    return _finish(widget, pictures, text)


def _mark_levels(ax, iterations: list[int], start: int = 1) -> None:
    """Dotted vertical lines where a finer resolution level starts (trace plotted from x = ``start``)."""
    done = 0
    for n in iterations[:-1]:
        done += n
        ax.axvline(done + start - 0.5, color="gray", ls=":", lw=1)


# ---------------------------------------------------------------------------------------------------------------
# iteration stepper
# ---------------------------------------------------------------------------------------------------------------
def iteration_stepper(sample: Mapping[str, Any], result: RegistrationResult, *, show: bool = True
                      ) -> W.interactive:
    """Step through the displacements that a registration recorded (``register(..., record_every=k)``).

    The slider's readout is the iteration (of the finest level) at which each state was recorded. Each state is
    scored with :func:`deqreg_lite.evaluate.pair_metrics`, and its energy is evaluated with
    :class:`deqreg_lite.losses.Objective` using the options stored in ``result.info``.

    Args:
        sample: the sample dict that was registered.
        result: a :class:`~deqreg_lite.result.RegistrationResult` with non-empty ``states``.
        show: draw the figure (``False`` computes the numbers only).
    Returns:
        The :class:`ipywidgets.interactive`; ``.result`` holds ``index``, ``iteration`` (of the finest level, the
        slider's readout), ``iteration_total`` and ``iterations_total`` (over all levels: the figure's count and
        the x of its dot on the energy curve), ``dice`` (with labels), ``folding_pct`` and ``energy`` of the state
        shown.
    """
    _check_sample(sample)
    if not result.states:
        raise ValueError("result has no recorded states; register with record_every > 0, e.g. "
                         "register(fixed, moving, record_every=10)")
    fixed, moving = sample["fixed"], sample["moving"]
    info = result.info
    objective = Objective(info.get("similarity", "lncc"), "diffusion", info.get("lam", 1.0),
                          win=info.get("win", 5))
    its = list(info.get("iterations", [max(result.state_steps)]))
    offset = sum(its[:-1])  # trace entries of the coarser levels come first
    steps = list(result.state_steps) or list(range(len(result.states)))
    picture = _new_image()

    def update(index: int) -> dict[str, Any]:
        disp = result.states[index].to(fixed.device)
        m = pair_metrics(sample, disp)
        energy = float(objective.energy(fixed, moving, disp))
        out = {"index": int(index), "iteration": int(steps[index]), "iteration_total": offset + int(steps[index]),
               "iterations_total": offset + its[-1], "folding_pct": m["folding_pct"], "energy": energy}
        if "dice" in m:
            out["dice"] = m["dice"]
        if show:
            warped = warp(moving, disp)
            fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), constrained_layout=True)
            if "fixed_seg" in sample and "moving_seg" in sample:
                show_labels(axes[0], warped, warp(sample["moving_seg"], disp, mode="nearest"),
                            "warped moving + its labels", names=sample.get("label_names"))
            else:
                show_image(axes[0], warped, "warped moving")
            plot_grid(axes[1], disp, title="deformed grid")
            im = plot_jacobian(axes[2], disp, title=f"det J, folding {m['folding_pct']:.2f} %")
            fig.colorbar(im, ax=axes[2], shrink=0.8)
            # x = iterations done so far over all levels: the trace's entry k is the energy after k steps
            plot_trace(axes[3], result.trace, keys=("energy",), title="energy (all levels)", start=0)
            axes[3].set_xlabel("iteration (all levels)")
            _mark_levels(axes[3], its, start=0)
            axes[3].plot([out["iteration_total"]], [energy], "o", color="C3", label="this state")
            axes[3].legend()
            dice = f"Dice {m['dice']:.3f}, " if "dice" in m else ""
            finest = f" ({steps[index]} of {its[-1]} at the finest level)" if offset else ""
            fig.suptitle(f"iteration {out['iteration_total']} of {out['iterations_total']}{finest}: {dice}"
                         f"folding {m['folding_pct']:.2f} %, energy {energy:.4f}")
            _render(fig, picture)
        return out

    options = [(str(s), i) for i, s in enumerate(steps)]
    widget = W.interactive(
        update,
        index=W.SelectionSlider(options=options, value=len(options) - 1, description="iteration (finest level)",
                                style=_STYLE, layout=_WIDE, continuous_update=True),
    )
    return _finish(widget, [picture])


# ---------------------------------------------------------------------------------------------------------------
# prediction explorer
# ---------------------------------------------------------------------------------------------------------------
def prediction_explorer(methods: Any, pairs: Any, *, index: int = 0, show: bool = True) -> W.interactive:
    """Browse one-shot predictions: a slider picks a pair of ``pairs``, a menu a model of ``methods``.

    Each change runs the model once on the pair (through :func:`deqreg_lite.evaluate.as_method`: eval mode, no
    gradients), scores it with :func:`deqreg_lite.evaluate.pair_metrics` (no HD95, to stay fast) next to the
    identity, and shows :func:`deqreg_lite.viz.registration_figure`.

    Args:
        methods: a method (a ``RegistrationMethod`` or a callable ``f(fixed, moving)``), or a dict name -> method.
        pairs: a list of sample dicts (``fixed``, ``moving``, optionally ``fixed_seg``, ``moving_seg``, ``labels``).
        index: the pair shown first.
        show: draw the figure (``False`` computes the numbers only).
    Returns:
        The :class:`ipywidgets.interactive`; ``.result`` holds ``pair``, ``model``, ``dice`` and ``dice_identity``
        (when the pair has labels), ``folding_pct`` and ``time_s`` (the model call).
    """
    if not isinstance(methods, Mapping):
        methods = {getattr(methods, "name", None) or type(methods).__name__: methods}
    if not methods:
        raise ValueError("methods is empty: pass a method or a dict name -> method")
    calls = {str(name): as_method(m) for name, m in methods.items()}
    pairs = [pairs] if isinstance(pairs, Mapping) else list(pairs)
    if not pairs:
        raise ValueError("pairs is empty: pass a list of sample dicts")
    for sample in pairs:
        _check_sample(sample)
    if not 0 <= index < len(pairs):
        raise ValueError(f"index must be in [0, {len(pairs) - 1}], got {index}")
    picture = _new_image()
    text = W.HTML()

    def update(pair: int, model: str) -> dict[str, Any]:
        sample = pairs[pair]
        fixed, moving = sample["fixed"], sample["moving"]
        t0 = time.perf_counter()
        disp = calls[model](fixed, moving).disp
        elapsed = time.perf_counter() - t0
        m = pair_metrics(sample, disp, with_hd95=False)
        out: dict[str, Any] = {"pair": int(pair), "model": model, "folding_pct": m["folding_pct"],
                               "time_s": elapsed}
        if "dice" in m:
            out["dice"] = m["dice"]
            out["dice_identity"] = pair_metrics(sample, _zero_disp(fixed), with_hd95=False)["dice"]
        dice = (f"Dice {out['dice_identity']:.3f} &rarr; <b>{out['dice']:.3f}</b>, " if "dice" in out else "")
        text.value = f"pair {pair}, {html.escape(model)}: {dice}folding <b>{out['folding_pct']:.2f} %</b>, " \
                     f"{1000 * elapsed:.0f} ms"
        if show:
            score = f"Dice {out['dice_identity']:.3f} -> {out['dice']:.3f}, " if "dice" in out else ""
            fig = registration_figure(fixed, moving, disp, title=f"pair {pair}, {model}, one pass: {score}"
                                                                 f"folding {out['folding_pct']:.2f} %")
            _render(fig, picture)
        return out

    names = list(calls)
    widget = W.interactive(
        update,
        pair=W.IntSlider(value=index, min=0, max=len(pairs) - 1, description="pair", style=_STYLE, layout=_WIDE,
                         continuous_update=False),
        model=W.Dropdown(options=names, value=names[0], description="model", style=_STYLE),
    )
    return _finish(widget, [picture], text)
