"""The Plotly three-plane viewers: figure structure, slider steps, slice data, speed."""
import json
import time

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from deqreg_lite import viewer
from deqreg_lite.metrics import jacobian_det
from deqreg_lite.warp import warp

SHAPE = (12, 14, 10)


@pytest.fixture(scope="module")
def vol():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 1, *SHAPE, generator=g)


def _z(trace):
    return np.asarray(trace.z, dtype=float)


def test_three_plane_structure_and_slices(vol):
    t0 = time.perf_counter()
    fig = viewer.three_plane(vol, spacing=(2.0, 1.0, 3.0), title="t", decimals=None)
    assert time.perf_counter() - t0 < 5
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    assert len(fig.data) == 3 and all(t.type == "heatmap" for t in fig.data)
    v = vol[0, 0].numpy()
    centre = [n // 2 for n in SHAPE]
    for k in range(3):
        np.testing.assert_allclose(_z(fig.data[k]), np.take(v, centre[k], axis=k), rtol=0, atol=1e-6)
    assert len(fig.layout.sliders) == 3
    for k, slider in enumerate(fig.layout.sliders):
        assert len(slider.steps) == SHAPE[k]
        assert slider.active == centre[k]
        for i in (0, SHAPE[k] - 1):
            step = slider.steps[i]
            assert step.method == "restyle" and list(step.args[1]) == [k]
            np.testing.assert_allclose(np.asarray(step.args[0]["z"][0]), np.take(v, i, axis=k), atol=1e-6)
    # mm coordinates: axis 0 panel shows axes (1, 2) as (y, x)
    assert fig.data[0].x[-1] == pytest.approx((SHAPE[2] - 1) * 3.0)
    assert fig.data[0].y[-1] == pytest.approx((SHAPE[1] - 1) * 1.0)
    json.loads(pio.to_json(fig))  # serialisable (what the json renderer sends)


def test_three_plane_point_rounding_and_max_steps(vol):
    fig = viewer.three_plane(vol, point=(1, 2, 3), max_steps=5)
    v = vol[0, 0].numpy()
    # axis 2 has 10 slices and 5 steps (0, 2, 4, 7, 9): the requested slice 3 opens on the nearest step, 2
    np.testing.assert_allclose(_z(fig.data[2]), np.round(v[:, :, 2], 3), atol=1e-9)
    assert fig.layout.sliders[2].steps[fig.layout.sliders[2].active].label == "2"
    assert [len(s.steps) for s in fig.layout.sliders] == [5, 5, 5]
    assert fig.layout.sliders[0].steps[-1].label == str(SHAPE[0] - 1)


def test_three_plane_overlay_and_keypoints(vol):
    seg = (vol > 0.5).long() * 2
    kp = torch.tensor([[6.0, 7.0, 5.0], [0.0, 0.0, 0.0]])
    fig = viewer.three_plane(vol, overlay=seg, keypoints=kp, slab=0.5)
    assert len(fig.data) == 9  # per plane: image, overlay, keypoints
    assert [t.type for t in fig.data[:3]] == ["heatmap", "heatmap", "scatter"]
    ov = _z(fig.data[1])
    s = seg[0, 0, 6].numpy()
    assert np.all(np.isnan(ov[s == 0])) and np.all(ov[s == 2] == 2)
    assert list(fig.data[2].x) == [5.0] and list(fig.data[2].y) == [7.0]  # the centre plane has one keypoint
    step0 = fig.layout.sliders[0].steps[0]
    assert list(step0.args[1]) == [0, 1, 2]
    assert step0.args[0]["z"][2] is None and list(step0.args[0]["x"][2]) == [0.0]  # keypoint 2 sits on slice 0


def test_three_plane_strides_big_volumes():
    big = np.random.default_rng(0).random((40, 30, 20))
    fig = viewer.three_plane(big, spacing=2.0, max_size=16, decimals=None)
    assert viewer.display_stride(big.shape, 16) == 3
    np.testing.assert_allclose(_z(fig.data[0]), big[::3, ::3, ::3][7])
    assert fig.data[0].x[1] == pytest.approx(6.0)
    assert fig.layout.sliders[0].steps[-1].label == str(13 * 3)


def test_deformation_viewer(vol):
    g = torch.Generator().manual_seed(1)
    disp = torch.randn(1, 3, *SHAPE, generator=g)
    kp = torch.tensor([[6.0, 7.0, 5.0]])
    t0 = time.perf_counter()
    fig = viewer.deformation_viewer(vol, vol, disp, keypoints=kp, moving_keypoints=kp, decimals=None)
    assert time.perf_counter() - t0 < 5
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 9 and len(fig.data) == 9 + 6  # keypoints on the fixed and warped rows
    assert len(fig.layout.sliders) == 3 and [len(s.steps) for s in fig.layout.sliders] == list(SHAPE)
    warped = warp(vol, disp)[0, 0].numpy()
    jac = jacobian_det(disp)[0].numpy()
    by_name = {t.name: t for t in heat}
    np.testing.assert_allclose(_z(by_name["warped moving, axis 0"]), warped[6], atol=1e-6)
    np.testing.assert_allclose(_z(by_name["det J, axis 1"]), np.clip(jac[:, 7], *viewer.JACOBIAN_RANGE), atol=1e-6)
    assert "folding" in fig.layout.title.text and "TRE" in fig.layout.title.text
    # the axis-2 slider moves the three axis-2 panels (and their keypoint markers)
    step = fig.layout.sliders[2].steps[4]
    assert len(step.args[1]) == 5
    np.testing.assert_allclose(np.asarray(step.args[0]["z"][-1]), np.clip(jac[:, :, 4], -1, 3), atol=1e-6)


def test_jacobian_colorscale_marks_folding():
    cs = viewer.jacobian_colorscale()
    lo, hi = viewer.JACOBIAN_RANGE
    f = lambda v: (v - lo) / (hi - lo)
    assert cs[0][1] == "black" and cs[1] == [f(0.0), "black"]
    assert [f(1.0), "#f7f7f7"] in cs
    with pytest.raises(ValueError):
        viewer.jacobian_colorscale(0.5, 2.0)


def test_comparison_figure(vol):
    zero = torch.zeros(1, 3, *SHAPE)
    shift = torch.zeros(1, 3, *SHAPE)
    shift[:, 0] = 1.0
    fig = viewer.comparison_figure(vol, vol, {"identity": zero, "shift": shift}, axis=1, decimals=None)
    assert len(fig.data) == 2 + 2 * 2 and len(fig.layout.sliders) == 1
    assert len(fig.layout.sliders[0].steps) == SHAPE[1]
    np.testing.assert_allclose(_z(fig.data[2]), vol[0, 0, :, 7].numpy(), atol=1e-6)  # identity: warped == moving
    np.testing.assert_allclose(_z(fig.data[3]), 1.0, atol=1e-6)


def test_bad_inputs(vol):
    with pytest.raises(ValueError, match="3D"):
        viewer.three_plane(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="spacing"):
        viewer.three_plane(vol, spacing=(1.0, 2.0))
    with pytest.raises(ValueError, match="overlay"):
        viewer.three_plane(vol, overlay=np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="disp"):
        viewer.deformation_viewer(vol, vol, torch.zeros(1, 2, *SHAPE))


def test_plotly_renderer_per_environment():
    r = viewer.plotly_renderer
    assert r(environ={}, modules={}) == "plotly_mimetype"  # JupyterLab, Notebook 7, VS Code: drawn offline
    assert r(environ={}, modules={"google.colab": object()}) == "colab"
    assert r(environ={"COLAB_RELEASE_TAG": "x"}, modules={}) == "colab"
    assert r(environ={"PLOTLY_RENDERER": "json"}, modules={"google.colab": object()}) == "json"  # CI wins
    assert r(environ={viewer.STATIC_HTML_ENV: "1"}, modules={}) == "notebook"  # plotly.js embedded
    assert r(environ={viewer.STATIC_HTML_ENV: "0"}, modules={}) == "plotly_mimetype"
    assert r(True, environ={}, modules={"google.colab": object()}) == "notebook"
    assert r(environ={"PLOTLY_RENDERER": "json"}, modules={}, static_html=True) == "json"
    for env in ({}, {"COLAB_RELEASE_TAG": "x"}, {viewer.STATIC_HTML_ENV: "1"}):
        assert r(environ=env, modules={}) in pio.renderers  # a renderer plotly knows
        assert r(environ=env, modules={}) != "notebook_connected"  # the CDN one draws blank offline
    assert viewer.plotly_renderer() in pio.renderers  # this process's environment


def test_ordinal_and_stride_titles(vol):
    assert [viewer.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "101st", "111th"]
    big = np.random.default_rng(0).random((40, 30, 20))
    assert "every 2nd voxel" in viewer.three_plane(big, max_size=20).layout.title.text
    assert "every 3rd voxel" in viewer.three_plane(big, max_size=16).layout.title.text
    disp = torch.zeros(1, 3, 40, 30, 20)
    assert "every 2nd voxel" in viewer.deformation_viewer(big, big, disp, max_size=20).layout.title.text
    assert "th voxel" not in viewer.comparison_figure(big, big, {"id": disp}, max_size=20).layout.title.text


def test_mm_axes_are_labelled(vol):
    fig = viewer.three_plane(vol, spacing=2.0)
    # panel k (slice across axis k) shows axis b across (x) and axis a down (y), a < b the two other axes
    for k, (a, b) in enumerate([(1, 2), (0, 2), (0, 1)]):
        sub = fig.get_subplot(1, k + 1)
        assert sub.xaxis.title.text == f"axis {b} (mm)" and sub.yaxis.title.text == f"axis {a} (mm)"
    fig = viewer.deformation_viewer(vol, vol, torch.zeros(1, 3, *SHAPE))
    assert fig.get_subplot(3, 2).xaxis.title.text == "axis 2 (mm)"  # bottom row: x labelled
    assert fig.get_subplot(1, 2).xaxis.title.text is None
    assert all(fig.get_subplot(r, c).yaxis.title.text for r in (1, 2, 3) for c in (1, 2, 3))  # planes differ
    fig = viewer.comparison_figure(vol, vol, {"identity": torch.zeros(1, 3, *SHAPE)}, axis=1)
    assert fig.get_subplot(2, 1).xaxis.title.text == "axis 2 (mm)" and fig.get_subplot(2, 1).yaxis.title.text
    assert fig.get_subplot(2, 2).yaxis.title.text is None  # one plane: y labelled on the first column only


def test_comparison_figure_has_a_fixed_size_that_fits_its_panels():
    vol = torch.rand(1, 1, 40, 40, 40)
    zero = torch.zeros(1, 3, 40, 40, 40)
    fig = viewer.comparison_figure(vol, vol, {"identity": zero, "other": zero}, axis=1, spacing=1.5)
    width, height = fig.layout.width, fig.layout.height
    assert width is not None and width < 1000  # not the page's width (which left 180 px panels in 1300 px)
    for r in (1, 2, 3):
        for c in (1, 2):
            sub = fig.get_subplot(r, c)
            px_w = (sub.xaxis.domain[1] - sub.xaxis.domain[0]) * (width - 170)
            px_h = (sub.yaxis.domain[1] - sub.yaxis.domain[0]) * (height - 210)
            assert 250 <= px_w <= 270 and abs(px_h - px_w) < 0.05 * px_w  # square slices, ~260 px panels


def test_three_plane_opens_on_a_slider_step(vol):
    """With fewer steps than slices, the first picture is the active step's slice (one the slider can return to),
    not the requested point's slice between two steps."""
    for point in (None, (0, 1, 2), (SHAPE[0] - 2, SHAPE[1] // 2 + 1, 1)):
        fig = viewer.three_plane(vol, point=point, max_steps=4, decimals=None)
        for k, slider in enumerate(fig.layout.sliders):
            shown = _z(fig.data[k])
            np.testing.assert_allclose(shown, np.asarray(slider.steps[slider.active].args[0]["z"][0]), atol=1e-9)
