"""The paper's Unrolling baseline (issue 10): ``unrolling_ml``, GraDIRN without similarity gradients.

3 resolution levels x 3 weight-tied steps, ``phi <- phi + CNN_l([If, Im o phi, phi])`` at each level, ``steps`` at
test time = steps at the finest level (the paper's Fig. 1), BPTT through every level. The single-level ``unrolling``
(T = 3) stays, under its name, as an extra.
"""
from __future__ import annotations

import json

import pytest
import torch

from deqreg_lite.__main__ import main
from deqreg_lite.memory import SavedBytes
from deqreg_lite.methods import (METHODS, GraDIRN, MultiLevelUnrolling, RegistrationLoss, RegistrationMethod,
                                 Unrolling, build_method, gradirn)
from deqreg_lite.methods._common import downsample, residual_step
from deqreg_lite.pretrained import checkpoint_path
from deqreg_lite.train import save_checkpoint
from deqreg_lite.warp import resize_disp

torch.set_num_threads(1)


def build(ndim=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_method("unrolling_ml", ndim, **kwargs)


def first_convs(method):
    return [next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
            for net in method.nets]


# ------------------------------------------------------------------------------------------- what it is
def test_registered_under_its_own_name_next_to_the_single_level_extra():
    assert METHODS["unrolling_ml"] is MultiLevelUnrolling and METHODS["unrolling"] is Unrolling
    method = build()
    assert isinstance(method, GraDIRN) and method.name == "unrolling_ml" and not method.use_grad
    assert GraDIRN.use_grad and build_method("gradirn", 2).name == "gradirn"
    assert method.levels == 3 and method.steps_per_level == method.trained_steps == 3
    assert method.config() == {"ndim": 2, "levels": 3, "steps_per_level": 3}
    with pytest.raises(TypeError, match="eta_init"):
        build_method("unrolling_ml", 2, eta_init=1.0)  # no gradient step, no step size
    with pytest.raises(TypeError, match="use_grad"):
        build_method("gradirn", 2, use_grad=False)  # one configuration, one name
    for bad in (dict(levels=0), dict(steps_per_level=0), dict(levels=1.5)):
        with pytest.raises(ValueError):
            MultiLevelUnrolling(2, **bad)
    with pytest.raises(ValueError, match="ndim"):
        MultiLevelUnrolling(4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_each_level_sees_if_warped_im_and_phi_only(ndim, pair2d, pair3d, monkeypatch):
    """U-Net input ``[If, Im o phi, phi]`` (2 + ndim channels) per level, no step size, no similarity gradient."""
    method = build(ndim, levels=2, steps_per_level=2)
    assert [c.in_channels for c in first_convs(method)] == [2 + ndim] * 2
    assert not any("rho" in n for n, _ in method.named_parameters()) and method.eta is None
    assert [c.in_channels for c in first_convs(build_method("gradirn", ndim, levels=2))] == [2 + 2 * ndim] * 2

    def refuse(*args, **kwargs):
        raise AssertionError("unrolling_ml computed a similarity gradient")

    monkeypatch.setattr(gradirn, "similarity_grad", refuse)
    fixed, moving = pair2d if ndim == 2 else pair3d
    with torch.no_grad():
        method(fixed, moving)
    method.training_step(fixed, moving, RegistrationLoss())


def test_the_update_is_eq3_per_level_by_hand(pair2d):
    """Two levels (1/2, 1) of two steps, recomputed with the library's pieces: downsample, residual_step, resize_disp;
    one level with the single-level Unrolling's weights is that Unrolling."""
    fixed, moving = pair2d
    method = build(levels=2, steps_per_level=2)
    for net in method.nets:  # make the updates visible (the heads start near zero)
        torch.nn.init.normal_(net.head.weight, std=1e-2)
    with torch.no_grad():
        res = method(fixed, moving, steps=3)
        f1, m1 = downsample(fixed, (16, 16)), downsample(moving, (16, 16))
        phi = torch.zeros(1, 2, 16, 16)
        for _ in range(2):
            phi = residual_step(method.nets[0], f1, m1, phi)
        phi = resize_disp(phi, (32, 32))
        for _ in range(3):
            phi = residual_step(method.nets[1], fixed, moving, phi)
    assert res.disp.abs().max() > 1e-3
    torch.testing.assert_close(res.disp, phi, rtol=0, atol=0)

    torch.manual_seed(1)
    single = Unrolling(2, T=3)
    torch.nn.init.normal_(single.net.head.weight, std=1e-2)
    one_level = MultiLevelUnrolling(2, levels=1, steps_per_level=3)
    one_level.nets[0].load_state_dict(single.net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(one_level(fixed, moving).disp, single(fixed, moving).disp, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- forward contract
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("steps", [None, 1, 5])
def test_shapes_steps_and_states_under_no_grad(ndim, steps, pair2d, pair3d):
    fixed, moving = pair2d if ndim == 2 else pair3d
    method = build(ndim, levels=3, steps_per_level=2)
    with torch.no_grad():
        res = method(fixed, moving, steps=steps, return_states=True)
    n = 2 if steps is None else steps
    assert res.disp.shape == (1, ndim, *fixed.shape[2:]) and torch.isfinite(res.disp).all()
    assert not res.disp.requires_grad
    assert res.info["steps"] == n and res.info["nfe"] == 2 * 2 + n  # two coarse levels of 2 steps, then n
    assert len(res.states) == n and res.state_steps == list(range(1, n + 1))
    assert all(s.shape == res.disp.shape for s in res.states) and torch.equal(res.states[-1], res.disp)
    assert len(res.info["residuals"]) == n == len(res.trace["residual"])
    assert [len(r) for r in res.info.extras["coarse_residuals"]] == [2, 2]
    with torch.no_grad():
        assert method(fixed, moving).states == []


def test_steps_vary_at_the_finest_level_only(pair2d):
    """``steps=t`` runs the coarse levels as trained, then t finest steps: its states extend those of fewer steps."""
    fixed, moving = pair2d
    method = build()
    with torch.no_grad():
        short = method(fixed, moving, steps=2, return_states=True)
        long = method(fixed, moving, steps=6, return_states=True)
    assert short.info.extras["coarse_residuals"] == long.info.extras["coarse_residuals"]
    for a, b in zip(short.states, long.states[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_input_checks_beyond_the_shared_ones(pair2d):
    """test_methods.test_bad_inputs covers steps, shapes, channels and ranks for every method, this one included."""
    fixed, moving = pair2d
    method = build()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"intensities in \[0, 1\]"):
            method(fixed, moving * 255)
    with pytest.raises(ValueError, match="same shape"):
        method.training_step(fixed, moving[..., :16], RegistrationLoss())
    with pytest.raises(TypeError):
        method(fixed, moving, tol=1e-3)  # no solve options


# ------------------------------------------------------------------------------------------------ training
def test_training_step_backpropagates_through_every_level(pair2d):
    fixed, moving = pair2d
    method = build(levels=3, steps_per_level=2)
    calls = []

    def backward(loss):
        calls.append(float(loss.detach()))
        loss.backward()

    out = method.training_step(fixed, moving, RegistrationLoss(), backward)
    assert set(out) == {"loss", "steps", "nfe", "residual"} and all(isinstance(v, float) for v in out.values())
    assert out["nfe"] == 6 and out["steps"] == 2 and out["loss"] == pytest.approx(calls[0]) and len(calls) == 1
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the coarsest level's first layer gets gradient from the final field's loss: BPTT through all levels
    assert all(float(c.weight.grad.abs().sum()) > 0 for c in first_convs(method))
    # the loss is on the final full-resolution field
    with torch.no_grad():
        disp = method(fixed, moving).disp
    assert out["loss"] == pytest.approx(float(RegistrationLoss()(fixed, moving, disp)), rel=1e-5)


def test_memory_grows_linearly_with_the_steps_per_level(pair2d):
    """BPTT keeps every step's graph at every level: the saved bytes grow by the same amount per added step."""
    fixed, moving = pair2d
    peaks = []
    for spl in (1, 2, 4):
        method = build(levels=2, steps_per_level=spl)
        with SavedBytes() as mem:
            method.training_step(fixed, moving, RegistrationLoss())
        peaks.append(mem.peak)
    assert peaks[0] < peaks[1] < peaks[2]
    assert peaks[2] - peaks[1] == pytest.approx(2 * (peaks[1] - peaks[0]), rel=0.05)


# ------------------------------------------------------------------------------------------ config, files
def test_config_and_checkpoint_round_trip(tmp_path, pair2d):
    fixed, moving = pair2d
    method = build(levels=2, steps_per_level=4).eval()
    clone = build_method(method.name, **method.config())
    clone.load_state_dict(method.state_dict())
    assert type(clone) is MultiLevelUnrolling and clone.config() == method.config()
    path = save_checkpoint(tmp_path / "u.pt", method, rng=False)
    for loader in (RegistrationMethod, GraDIRN, MultiLevelUnrolling):
        rebuilt = loader.from_checkpoint(path)
        assert type(rebuilt) is MultiLevelUnrolling and rebuilt.config() == method.config()
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(fixed, moving).disp, method(fixed, moving).disp, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a Unrolling"):
        Unrolling.from_checkpoint(path)


def test_the_shipped_single_level_unrolling_still_loads_under_its_name():
    path = checkpoint_path("unrolling")
    if not path.exists():
        pytest.skip("no shipped unrolling.pt")
    method = RegistrationMethod.from_checkpoint(path)
    assert type(method) is Unrolling and method.name == "unrolling" and method.config() == {"ndim": 2, "T": 3}


# ---------------------------------------------------------------------------------------------------- CLI
def test_the_cli_offers_it_and_refuses_options_it_does_not_take(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "unrolling_ml" in capsys.readouterr().out
    base = ["train", "--dataset", "sample", "--method", "unrolling_ml", "--size", "32", "48", "--no-progress",
            "--log-every", "1"]
    assert main([*base, "--iterations", "0", "--out", str(tmp_path / "bad"), "--T", "5"]) == 2
    err = capsys.readouterr().err
    assert "not an option of unrolling_ml" in err and "--T" in err and not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    assert main([*base, "--iterations", "2", "--val-pairs", "0", "--no-eval", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "unrolling_ml"
    assert type(RegistrationMethod.from_checkpoint(out / "last.pt")) is MultiLevelUnrolling
