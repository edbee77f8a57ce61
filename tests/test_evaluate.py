"""Evaluation: tables, baselines through the same path, training memory, step sweeps, statistics."""
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from deqreg_lite import evaluate as ev
from deqreg_lite.config import seed_everything
from deqreg_lite.datasets import brain_pairs
from deqreg_lite.losses import diffusion
from deqreg_lite.methods.base import RegistrationMethod
from deqreg_lite.result import RegistrationResult
from deqreg_lite.warp import warp

SIZE = (32, 32)



class TinyMethod(RegistrationMethod):
    """A few-parameter iterative method: ``disp += conv(tanh(conv([f, m o disp, disp])))``, BPTT over T steps."""

    name = "tiny"

    def __init__(self, ndim: int = 2, width: int = 4, T: int = 1) -> None:
        super().__init__(ndim)
        self.width, self.T, self.trained_steps = width, T, T
        self.conv1 = nn.Conv2d(2 + ndim, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, ndim, 3, padding=1)
        nn.init.normal_(self.conv2.weight, std=0.3)

    def config(self) -> dict:
        return {"ndim": self.ndim, "width": self.width, "T": self.T}

    def forward(self, fixed, moving, steps=None, return_states=False):
        steps = self.T if steps is None else steps
        disp = fixed.new_zeros(fixed.shape[0], self.ndim, *fixed.shape[2:])
        states = []
        for _ in range(steps):
            x = torch.cat([fixed, warp(moving, disp), disp], 1)
            disp = disp + self.conv2(torch.tanh(self.conv1(x)))
            if return_states:
                states.append(disp)
        return RegistrationResult(disp=disp, states=states, state_steps=list(range(1, steps + 1)) if return_states
                                  else [], info={"steps": steps, "nfe": steps})

    def training_step(self, fixed, moving, loss_fn, backward=Tensor.backward):
        loss = loss_fn(fixed, moving, self(fixed, moving).disp)
        backward(loss)
        return {"loss": float(loss.detach())}


def loss_fn(fixed, moving, disp):
    return ((fixed - warp(moving, disp)) ** 2).mean() + 0.1 * diffusion(disp)


@pytest.fixture(scope="module")
def pairs():
    items = list(brain_pairs("val", n=3, size=SIZE))
    kp = torch.tensor([[5.0, 6.0], [20.0, 12.5], [16.0, 16.0]])
    items[1] = {**items[1], "fixed_kp": kp, "moving_kp": kp + 1.0}
    return items


def make(**kw):
    seed_everything(0)
    return TinyMethod(**kw)


def test_evaluate_columns_on_a_learned_method(pairs):
    m = make(T=2)
    before = [p.detach().clone() for p in m.parameters()]
    table = ev.evaluate(m, pairs)
    assert table.name == "tiny" and len(table) == 3
    assert table.rows[0]["pair"] == "dipy_t1->mni152_2009a"
    for r in table.rows:
        for c in ("dice", "dice_1", "hd95", "folding_pct", "sdlogj", "sdlogj_plain", "time_s", "steps", "nfe"):
            assert c in r and math.isfinite(r[c]), c
        assert r["steps"] == 2
    assert "tre_mm" in table.rows[1] and "tre_mm" not in table.rows[0]
    assert table.info["memory_kind"] == "saved_tensors" and table.info["memory_bytes"] > 0
    assert table.info["train_time_s"] > 0
    s = table.summary()
    assert s["n"] == 3 and {"dice", "dice_std", "memory_mb", "train_time_s", "tre_mm"} <= set(s)
    assert s["tre_mm_std"] == 0.0  # one pair has keypoints
    md = table.to_markdown()
    assert "**mean**" in md and "dipy_t1->mni152_2009a" in md
    assert table.to_csv().splitlines()[0].startswith("method,pair,dice")
    assert m.training  # mode restored, parameters and gradients untouched
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(p.grad is None for p in m.parameters())
    # steps are passed through
    assert ev.evaluate(m, pairs[0], steps=3, memory=False).rows[0]["steps"] == 3


def test_identity_and_callables_go_through_the_same_path(pairs):
    table = ev.evaluate(ev.identity_method, pairs)
    assert table.name == "identity" and "memory_bytes" not in table.info
    for r, s in zip(table.rows, pairs):
        assert r["folding_pct"] == 0 and r["sdlogj"] == pytest.approx(0, abs=1e-6)
        zero = torch.zeros(1, 2, *SIZE)
        assert r["dice"] == pytest.approx(ev.pair_metrics(s, zero)["dice"])
    sy, sx = pairs[1]["spacing"]
    assert table.rows[1]["tre_mm"] == pytest.approx(math.hypot(sy, sx))  # keypoints off by (1, 1) voxel

    def shift(fixed, moving):  # a plain callable that returns a displacement tensor
        return torch.ones(1, 2, *fixed.shape[2:])

    t = ev.evaluate(shift, pairs, hd95=False)
    assert t.name == "shift" and "hd95" not in t.rows[0] and t.rows[1]["tre_mm"] == pytest.approx(0, abs=1e-5)
    with pytest.raises(TypeError, match="steps"):
        ev.evaluate(shift, pairs, steps=3)
    with pytest.raises(ValueError, match="disp"):
        ev.evaluate(lambda f, m: torch.zeros(1, 3, 4, 4), pairs)

    classical = ev.classical_method(iterations=5, lam=1.0)
    tc = ev.evaluate(classical, pairs[:1], steps=3)
    assert tc.name == "classical" and tc.rows[0]["steps"] == 3


def test_training_memory_counts_saved_tensors(pairs):
    f, m = pairs[0]["fixed"], pairs[0]["moving"]
    one, four = ev.training_memory(make(T=1), f, m, loss_fn), ev.training_memory(make(T=4), f, m, loss_fn)
    assert 0 < one < four  # BPTT keeps every step's activations
    # at least the 4-channel activation (1, 4, 32, 32) float32 of each step is saved
    assert four - one >= 3 * 4 * 32 * 32 * 4
    with pytest.raises(ValueError, match="kind"):
        ev.training_memory(make(), f, m, loss_fn, kind="rss")


class TwoLosses(nn.Module):
    """Two equal chains, backpropagated one after the other (``split``) or together."""

    name = "two"

    def __init__(self, split):
        super().__init__()
        self.conv, self.split = nn.Conv2d(1, 8, 3, padding=1), split

    def training_step(self, fixed, moving, loss_fn, backward=Tensor.backward):
        chain = lambda: torch.tanh(self.conv(fixed)).pow(2).mean()
        if self.split:
            backward(chain())
            backward(chain())
        else:
            backward(chain() + chain())
        return {"loss": 0.0}


def test_training_memory_is_the_peak_of_what_is_alive_together():
    f = torch.rand(1, 1, 32, 32)
    activation = 8 * 32 * 32 * 4  # one tanh output, float32
    apart, together = ev.training_memory(TwoLosses(True), f, f), ev.training_memory(TwoLosses(False), f, f)
    assert together - apart == activation  # the input and the weight are shared (de-duplicated by storage)


def test_step_sweep_from_states_equals_separate_runs(pairs):
    m = make(T=3)
    steps = (1, 2, 3, 5)
    fast = ev.step_sweep(m, pairs, steps)
    slow = ev.step_sweep(m, pairs, steps, use_states=False)
    assert fast["mode"] == "states" and slow["mode"] == "runs"
    assert fast["steps"] == [1, 2, 3, 5] and fast["trained_steps"] == 3
    for key in ("dice", "dice_std", "folding_pct", "folding_pct_std"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-6), key
    assert len(fast["per_pair"]["dice"]) == 4 and len(fast["per_pair"]["dice"][0]) == 3
    # classical registration records every iteration: one run of 4 gives the whole sweep
    c = ev.classical_method(iterations=4, lam=1.0)
    cf, cs = ev.step_sweep(c, pairs[:1], (2, 4)), ev.step_sweep(c, pairs[:1], (2, 4), use_states=False)
    assert cf["mode"] == "states" and cf["dice"] == pytest.approx(cs["dice"], abs=1e-6)
    assert cf["folding_pct"] == pytest.approx(cs["folding_pct"], abs=1e-6)


def test_trained_vs_best():
    sweep = {"method": "m", "steps": [1, 3, 6, 12], "trained_steps": 3,
             "dice": [0.5, 0.7, 0.8, 0.75], "dice_std": [0.1] * 4,
             "folding_pct": [0.0, 0.1, 0.2, 0.5], "folding_pct_std": [0.01] * 4}
    r = ev.trained_vs_best(sweep)
    assert (r["trained_steps"], r["trained_dice"], r["best_steps"], r["best_dice"]) == (3, 0.7, 6, 0.8)
    assert r["best_folding_pct"] == 0.2
    assert ev.trained_vs_best(sweep, metric="folding_pct")["best_steps"] == 1
    with pytest.raises(ValueError, match="trained_steps"):
        ev.trained_vs_best(sweep, trained_steps=48)
    assert "| m | 3 | 70.00 (10.00)" in ev.table2({"m": sweep})


def table_of(name, dice):
    return ev.Table(rows=[{"pair": f"p{i}", "dice": d, "folding_pct": 0.1} for i, d in enumerate(dice)], name=name)


def test_wilcoxon_and_table1():
    base = [0.70, 0.72, 0.65, 0.80, 0.75, 0.68, 0.71, 0.77]
    ref = table_of("deqreg", [d + 0.05 for d in base])
    worse = table_of("voxelmorph", base)
    noisy = table_of("riir", [d + 0.05 + e for d, e in zip(base, [1e-3, -2e-3, 3e-3, -4e-3, 5e-3, -6e-3, 7e-3,
                                                                  -8e-3])])
    assert ev.wilcoxon(ref, worse) == pytest.approx(2 / 2**8)  # exact test, all 8 differences of one sign
    assert ev.wilcoxon(ref, noisy) > 0.5
    assert ev.wilcoxon(ref, ref) == 1.0
    shuffled = ev.Table(rows=list(reversed(worse.rows)), name="voxelmorph")  # matched by pair id, not position
    assert ev.wilcoxon(ref, shuffled) == ev.wilcoxon(ref, worse)
    with pytest.raises(ValueError, match="pairs"):
        ev.wilcoxon(ref, table_of("x", base[:5]))
    missing = ev.Table(name="elastix", note="not installed (pip install itk-elastix)")
    md = ev.table1({"deqreg": ref, "voxelmorph": worse, "riir": noisy, "elastix": missing})
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()}
    assert "\u2020" in lines["voxelmorph"] and "\u2020" not in lines["riir"] and "\u2020" not in lines["deqreg"]
    assert "**" in lines["deqreg"] and "not installed" in lines["elastix"]
    assert "Dice (%)" in md and "p < 0.05" in md


def test_elastix_missing_gives_a_clear_message(pairs):
    if ev.elastix_available():
        pytest.skip("itk-elastix is installed")
    with pytest.raises(ImportError, match="pip install itk-elastix"):
        ev.elastix_method()
    t = ev.evaluate_elastix(pairs)
    assert t.rows == [] and "not installed" in t.note and "not installed" in t.to_markdown()


def test_pair_metrics_and_format_table_still_work(pairs):
    s = pairs[0]
    zero = torch.zeros(1, 2, *SIZE)
    full, quick = ev.pair_metrics(s, zero), ev.pair_metrics(s, zero, with_hd95=False)
    assert "hd95" in full and "hd95" not in quick and full["dice"] == quick["dice"]
    assert "identity" in ev.format_table({"identity": full}, ["dice", "hd95"])


def test_learn2reg_disp_files_follow_the_official_convention(tmp_path):
    from scipy import ndimage

    from deqreg_lite.evaluate import load_l2r_disp, save_l2r_disp
    from deqreg_lite.warp import identity

    gen = torch.Generator().manual_seed(0)
    shape = (10, 12, 9)
    disp = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3, generator=gen) * 1.5, size=shape,
                                           mode="trilinear", align_corners=True)
    moving = torch.rand(1, 1, *shape, generator=gen)
    for fmt in ("nii.gz", "npz"):
        path = save_l2r_disp(disp, tmp_path, "OASIS_0395", "OASIS_0396", fmt=fmt)
        assert path.name == f"disp_0395_0396.{fmt}"
        back = load_l2r_disp(path)
        assert torch.allclose(back, disp)
        # Learn2Reg's evaluation: map_coordinates(moving, identity + disp.transpose(3, 0, 1, 2), order=1)
        arr = np.load(path)["arr_0"] if fmt == "npz" else None
        if arr is not None:
            assert arr.shape == (*shape, 3)
            coords = identity(shape)[0].numpy() + arr.transpose(3, 0, 1, 2)
            ref = ndimage.map_coordinates(moving[0, 0].numpy(), coords, order=1, mode="nearest")
            assert np.allclose(warp(moving, disp)[0, 0].numpy(), ref, atol=1e-5)
    nlst = save_l2r_disp(disp[0], tmp_path, "NLST_0101_0000", "NLST_0101_0001")
    assert nlst.name == "disp_0101_0101.nii.gz"
    with pytest.raises(ValueError, match="3, D, H, W"):
        save_l2r_disp(torch.zeros(1, 2, 4, 4), tmp_path, "1", "2")


def test_evaluate_writes_disp_files(tmp_path):
    from deqreg_lite.evaluate import identity_method

    sample = {"fixed": torch.rand(1, 1, 6, 7, 8), "moving": torch.rand(1, 1, 6, 7, 8),
              "ids": ("OASIS_0001", "OASIS_0002")}
    table = ev.evaluate(identity_method, [sample], memory=False, disp_dir=tmp_path)
    assert (tmp_path / "disp_0001_0002.nii.gz").exists()
    assert table.rows[0]["disp_file"].endswith("disp_0001_0002.nii.gz")


def test_convergence_columns_for_deq_methods(pairs):
    from deqreg_lite.methods.deqreg import DEQReg
    from deqreg_lite.methods.resolution import HalfResolution

    seed_everything(0)
    deq = DEQReg(2, T=4, S=0)
    with torch.no_grad():
        deq.net.head.weight.normal_(0, 0.05)  # a fresh DEQReg predicts ~0: make the solve do something
    plain = ev.evaluate(deq, pairs[:2], memory=False, hd95=False)
    for r in plain.rows:
        assert 0 < r["residual"] < math.inf and r["converged"] in (0.0, 1.0) and "spectral_radius" not in r
    cert = ev.evaluate(deq, pairs[:2], memory=False, hd95=False, certificate=True)
    assert [r["dice"] for r in cert.rows] == [r["dice"] for r in plain.rows]  # the fields are unchanged
    assert [r["residual"] for r in cert.rows] == [r["residual"] for r in plain.rows]
    assert all(r["spectral_radius"] > 0 for r in cert.rows)
    s = cert.summary()
    assert s["residual_max"] == max(r["residual"] for r in cert.rows)
    assert s["converged_min"] == min(r["converged"] for r in cert.rows)
    assert s["spectral_radius_max"] == max(r["spectral_radius"] for r in cert.rows)
    md = cert.to_markdown(["dice", "residual", "converged", "spectral_radius"])
    assert "| worst |" in md and "e-0" in md.splitlines()[2]  # the residual in scientific notation
    assert "| worst |" not in plain.to_markdown(["dice"])
    # through HalfResolution's **options
    half = ev.evaluate(HalfResolution(deq), pairs[0], memory=False, hd95=False, certificate=True)
    assert "spectral_radius" in half.rows[0] and "residual" in half.rows[0]
    # methods without the option run as before, without the columns
    tiny = ev.evaluate(make(T=2), pairs[:1], memory=False, hd95=False, certificate=True)
    ident = ev.evaluate(ev.identity_method, pairs[:1], hd95=False, certificate=True)
    for t in (tiny, ident):
        assert not {"residual", "converged", "spectral_radius"} & set(t.rows[0])
        assert "| worst |" not in t.to_markdown()
    with pytest.raises(ValueError, match="certificate"):
        ev.evaluate(deq, pairs[:1], memory=False, certificate="yes")


def test_min_pairs_for_a_wilcoxon_test_and_the_note_without_one():
    from deqreg_lite.evaluate import min_pairs_for_test, no_test_note

    assert min_pairs_for_test() == 6 and min_pairs_for_test(0.01) == 8  # 2/2^6 < 0.05 <= 2/2^5; 2/2^8 < 0.01
    assert "at least 6 pairs" in no_test_note(1) and "0 by construction" in no_test_note(1)
    assert no_test_note(3).startswith("3 pairs") and "over these pairs only" in no_test_note(3)
    with pytest.raises(ValueError, match="alpha"):
        min_pairs_for_test(1.5)
