"""The notebook widgets, driven without a kernel: build each one, move its controls, check the numbers it shows."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ipywidgets = pytest.importorskip("ipywidgets")

from deqreg_lite import widgets  # noqa: E402
from deqreg_lite.classical import register  # noqa: E402
from deqreg_lite.datasets.synthetic import deform_sample, random_intensities, random_label_map  # noqa: E402

SHAPE = (40, 40)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_figures_left():
    plt.close("all")
    yield
    assert plt.get_fignums() == [], "a widget left a matplotlib figure open"


@pytest.fixture(scope="module")
def sample():
    """A mono-modal pair whose answer is a known smooth deformation: moving = image, fixed = image deformed."""
    seg = random_label_map(SHAPE, 5, seed=1)
    image = random_intensities(seg, seed=2)
    d = deform_sample(image, seg, strength=2.5, smoothness=8.0, seed=3)
    return {"fixed": d.image, "moving": image, "fixed_seg": d.seg, "moving_seg": seg, "labels": [1, 2, 3, 4],
            "spacing": (1.0, 1.0)}


def test_control_finds_by_name_and_says_what_exists(sample):
    w = widgets.deformation_explorer(sample["moving"], show=False)
    assert isinstance(w, ipywidgets.interactive)
    assert isinstance(widgets.control(w, "strength"), ipywidgets.FloatSlider)
    with pytest.raises(KeyError, match="strength"):
        widgets.control(w, "nope")


def test_deformation_explorer_folding_grows_with_strength(sample):
    w = widgets.deformation_explorer(sample["moving"], strength=0.0, steps=0, show=False)
    assert w.result["folding_pct"] == 0.0 and w.result["jac_min"] == pytest.approx(1.0)
    folds = []
    for s in (0.0, 2.0, 8.0, 16.0):
        widgets.control(w, "strength").value = s
        assert w.result["strength"] == s  # the callback ran (interactive swallows errors without a kernel)
        folds.append(w.result["folding_pct"])
    assert folds[0] == 0.0 and folds[1] == 0.0
    assert folds[-1] > folds[-2] > 0.0
    # Integration (scaling and squaring) keeps the same velocity invertible: far less folding.
    widgets.control(w, "steps").value = 7
    assert w.result["steps"] == 7 and w.result["folding_pct"] < 0.25 * folds[-1]
    # A new seed gives a new field.
    before = w.result["jac_min"]
    widgets.control(w, "seed").value = 5
    assert w.result["seed"] == 5 and w.result["jac_min"] != before


def test_deformation_explorer_draws_into_its_image(sample):
    w = widgets.deformation_explorer(sample["moving"], sample["moving_seg"], strength=1.0)
    shown = bytes(w.images[0].value)
    assert shown.startswith(PNG) and w.images[0] in w.children
    widgets.control(w, "strength").value = 6.0
    assert bytes(w.images[0].value) != shown  # the figure was redrawn


def test_deformation_explorer_rejects_bad_image():
    with pytest.raises(ValueError):
        widgets.deformation_explorer(torch.zeros(2, 1, 8, 8))


def test_classical_explorer_registers_and_lambda_smooths(sample):
    w = widgets.classical_explorer(sample, lam=1.0, iterations=40, levels=2)
    r = w.result
    assert not r["diverged"] and r["iterations"] == 40
    assert r["dice"] > r["dice_identity"] + 0.1
    assert w.registration is not None and w.registration.disp.shape == (1, 2, *SHAPE)
    assert all(bytes(im.value).startswith(PNG) for im in w.images)
    widgets.control(w, "lam").value = 30.0
    stiff = w.result
    assert stiff["lam"] == pytest.approx(30.0)
    assert stiff["diffusion"] < 0.5 * r["diffusion"] and stiff["folding_pct"] <= r["folding_pct"]
    widgets.control(w, "iterations").value = 0
    assert w.result["dice"] == pytest.approx(r["dice_identity"]) and w.result["folding_pct"] == 0.0


def test_classical_explorer_reports_divergence(sample):
    w = widgets.classical_explorer(sample, lam=1.0, iterations=20, levels=1, optimizer="gd", show=False)
    assert not w.result["diverged"] and w.registration is not None
    widgets.control(w, "lr").value = 3.0  # far beyond GD's stable step for lam=1
    assert w.result["diverged"] and w.registration is None
    assert "diverged" in w.text.value and w.text in w.children
    widgets.control(w, "optimizer").value = "adam"
    assert not w.result["diverged"] and w.result["optimizer"] == "adam"


def test_classical_explorer_manual_runs_on_click(sample):
    w = widgets.classical_explorer(sample, iterations=10, levels=1, show=False, manual=True)
    assert w.result is None
    w.manual_button.click()
    assert w.result["iterations"] == 10


def test_iteration_stepper_shows_the_recorded_states(sample):
    res = register(sample["fixed"], sample["moving"], lam=1.0, iterations=30, levels=2, record_every=10)
    w = widgets.iteration_stepper(sample, res)
    assert bytes(w.images[0].value).startswith(PNG)
    assert w.result["index"] == len(res.states) - 1 and w.result["iteration"] == 30
    last = w.result
    widgets.control(w, "index").value = 0
    first = w.result
    assert first["iteration"] == 0 and first["index"] == 0
    assert last["energy"] < first["energy"] and last["dice"] > first["dice"]
    # The energy it shows for the final state is the one the optimiser was heading to (trace: before each step).
    assert last["energy"] <= min(res.trace["energy"][-10:]) + 1e-3


def test_iteration_stepper_needs_states(sample):
    res = register(sample["fixed"], sample["moving"], iterations=2)
    with pytest.raises(ValueError, match="record_every"):
        widgets.iteration_stepper(sample, res)


# ---------------------------------------------------------------------------------------------------------------
# issue 11: what a student saw in the browser
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def drawn(monkeypatch):
    """Capture, from every figure a widget renders, its suptitle, legend texts and the lines of each axes."""
    seen = []
    render = widgets._render

    def spy(fig, image, dpi=80):
        seen.append({"suptitle": fig._suptitle.get_text() if fig._suptitle else "",
                     "legends": [t.get_text() for ax in fig.axes if ax.get_legend()
                                 for t in ax.get_legend().get_texts()],
                     "lines": [[(ln.get_label(), list(ln.get_xdata())) for ln in ax.get_lines()]
                               for ax in fig.axes]})
        render(fig, image, dpi)

    monkeypatch.setattr(widgets, "_render", spy)
    return seen


def test_classical_explorer_calls_one_minus_lncc_a_dissimilarity(sample, drawn):
    widgets.classical_explorer(sample, iterations=10, levels=1)
    legends = drawn[-1]["legends"]
    assert "similarity" not in legends, "the falling 1 - LNCC curve was labelled 'similarity'"
    assert any("1 - LNCC" in t and "dissimilarity" in t for t in legends), legends


def test_classical_explorer_handles_zero_iterations(sample):
    from deqreg_lite.losses import Objective

    w = widgets.classical_explorer(sample, lam=1.0, iterations=10, levels=1)
    widgets.control(w, "iterations").value = 0
    r = w.result
    assert r["iterations"] == 0 and not r["diverged"]
    zero = torch.zeros(1, 2, *SHAPE)
    assert r["energy"] == pytest.approx(float(Objective("lncc", "diffusion", 1.0).energy(
        sample["fixed"], sample["moving"], zero)), rel=1e-5), "0 iterations showed 'final energy nan'"
    assert "nan" not in w.text.value
    for image in w.images:  # an empty PNG left on show is a broken-image icon
        assert bytes(image.value).startswith(PNG) or image.layout.display == "none"
    widgets.control(w, "iterations").value = 10  # the curve comes back
    assert all(bytes(im.value).startswith(PNG) and im.layout.display != "none" for im in w.images)


def test_iteration_stepper_count_agrees_with_its_x_axis(sample, drawn):
    res = register(sample["fixed"], sample["moving"], lam=1.0, iterations=30, levels=2, record_every=10)
    w = widgets.iteration_stepper(sample, res)
    for index in (len(res.states) - 1, 0):
        widgets.control(w, "index").value = index
        fig = drawn[-1]
        dot = [x for ln in fig["lines"][3] if ln[0] == "this state" for x in ln[1]]
        shown = int(fig["suptitle"].split("iteration ")[1].split(" of ")[0])
        assert dot == [shown] == [w.result["iteration_total"]], (fig["suptitle"], dot)
        energy_x = [xs for label, xs in fig["lines"][3] if label == "energy"][0]
        assert energy_x[0] == 0 and energy_x[-1] == len(res.trace["energy"]) - 1
    assert w.result["iteration_total"] == 30 and w.result["iteration"] == 0  # after 30 coarse steps
    widgets.control(w, "index").value = len(res.states) - 1
    assert w.result["iteration_total"] == w.result["iterations_total"] == 60 and w.result["iteration"] == 30


def test_jacobian_colours_agree_with_the_colour_bar():
    from matplotlib.colors import to_rgba

    from deqreg_lite import viz

    disp = torch.zeros(1, 2, 20, 20)
    disp[:, 0] = torch.linspace(0, 60, 20).view(1, 20, 1) * torch.sin(torch.linspace(0, 6, 20)).view(1, 1, 20)
    fig, ax = plt.subplots()
    im = viz.plot_jacobian(ax, disp, colorbar=True)
    cb = im.colorbar
    assert cb is not None and cb.extend == "min" and "J <= 0" in cb.ax.get_ylabel()
    assert im.norm.vmin == 0.0, "the colour bar must not show negative J in blue"
    assert im.cmap(im.norm(-0.5)) == to_rgba("black")  # J < 0 is black in the map and in the bar's end
    assert im.cmap(im.norm(0.5))[2] > 0.5  # shrinking (0 < J < 1) stays blue
    plt.close(fig)


def test_show_labels_draws_a_colour_key(sample):
    from deqreg_lite import viz

    fig, ax = plt.subplots()
    viz.show_labels(ax, sample["moving"], sample["moving_seg"], names={1: "CSF", 2: "GM", 3: "WM"})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["CSF", "GM", "WM"]
    plt.close(fig)


def test_deformation_explorer_keys_its_label_colours(sample, drawn):
    widgets.deformation_explorer(sample["moving"], sample["moving_seg"], label_names={1: "a", 2: "b"})
    assert drawn[-1]["legends"] == ["a", "b", "a", "b"]  # original and warped label panels


def test_prediction_explorer_moves_over_pairs_and_models(sample):
    from deqreg_lite.methods.baselines import identity_method

    other = {**sample, "fixed": sample["moving"], "fixed_seg": sample["moving_seg"]}  # a pair already aligned

    def oracle(fixed, moving):  # a "model" that knows the answer for the first pair
        return register(fixed, moving, lam=1.0, iterations=30, levels=2).disp

    w = widgets.prediction_explorer({"identity": identity_method, "oracle": oracle}, [sample, other])
    assert bytes(w.images[0].value).startswith(PNG) and w.text in w.children
    assert w.result["pair"] == 0 and w.result["model"] == "identity"
    assert w.result["dice"] == pytest.approx(w.result["dice_identity"])
    widgets.control(w, "model").value = "oracle"
    assert w.result["model"] == "oracle" and w.result["dice"] > w.result["dice_identity"] + 0.1
    widgets.control(w, "pair").value = 1
    assert w.result["pair"] == 1 and w.result["dice_identity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="index"):
        widgets.prediction_explorer(identity_method, [sample], index=3)
