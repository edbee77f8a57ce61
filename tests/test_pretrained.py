"""The shipped pretrained checkpoints (data/checkpoints): loading, shapes, eval mode, better than identity, errors."""
from __future__ import annotations

import pytest
import torch

from deqreg_lite import pretrained
from deqreg_lite.datasets import load_sample
from deqreg_lite.evaluate import pair_metrics
from deqreg_lite.pretrained import PRETRAINED, HalfResolution, available_pretrained, load_pretrained

_missing = [n for n, ok in available_pretrained().items() if not ok]


@pytest.fixture(scope="module")
def brain():
    return load_sample("brain2d")


@pytest.fixture(scope="module")
def identity_dice(brain):
    return pair_metrics(brain, torch.zeros(1, 2, 160, 192), with_hd95=False)["dice"]


@pytest.mark.parametrize("name", PRETRAINED)
def test_loads_in_eval_mode_and_registers_brain2d(name, brain, identity_dice):
    if name in _missing:
        pytest.fail(f"checkpoint {name}.pt is missing from {pretrained.checkpoints_dir()}; make it with "
                    f"python scripts/train_pretrained.py --names {name}")
    model = load_pretrained(name)
    assert isinstance(model, HalfResolution) and model.name == name
    assert not model.training and all(not m.training for m in model.modules())
    with torch.no_grad():
        res = model(brain["fixed"], brain["moving"])
    assert res.disp.shape == (1, 2, 160, 192) and torch.isfinite(res.disp).all()
    assert res.info["internal_size"] == (80, 96)
    m = pair_metrics(brain, res.disp, with_hd95=False)
    assert m["dice"] > identity_dice + 0.02, (name, m["dice"], identity_dice)


def test_unrolling_is_t3_and_states_are_upsampled(brain):
    model = load_pretrained("unrolling")
    assert model.trained_steps == 3 and model.config()["T"] == 3
    with torch.no_grad():
        res = model(brain["fixed"], brain["moving"], steps=5, return_states=True)
    assert res.state_steps == [1, 2, 3, 4, 5]
    assert all(s.shape == (1, 2, 160, 192) for s in res.states)
    torch.testing.assert_close(res.states[-1], res.disp)


def test_wrapper_rescales_displacements():
    class Const(torch.nn.Module):  # a "method" returning a constant 1-voxel shift at its own resolution
        name, trained_steps, ndim = "const", 1, 2

        def forward(self, fixed, moving, steps=None, return_states=False):
            from deqreg_lite.result import RegistrationResult
            d = torch.ones(fixed.shape[0], 2, *fixed.shape[2:])
            return RegistrationResult(disp=d, states=[d] if return_states else [],
                                      state_steps=[1] if return_states else [], trace={}, info={"steps": 1})

    x = torch.rand(1, 1, 160, 192)
    res = HalfResolution(Const())(x, x, return_states=True)
    assert res.disp.shape == (1, 2, 160, 192) and res.states[0].shape == (1, 2, 160, 192)
    torch.testing.assert_close(res.disp[0, 0], torch.full((160, 192), 159 / 79))
    torch.testing.assert_close(res.disp[0, 1], torch.full((160, 192), 191 / 95))


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="deqreg12"):
        load_pretrained("deqreg7")


def test_missing_file_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQREG_CHECKPOINTS_DIR", str(tmp_path))
    assert available_pretrained() == {n: False for n in PRETRAINED}
    with pytest.raises(FileNotFoundError, match="scripts/train_pretrained.py --names riir"):
        load_pretrained("riir")


def test_corrupt_pretrained_checkpoint_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQREG_CHECKPOINTS_DIR", str(tmp_path))
    good = pretrained.REPO_ROOT / "data" / "checkpoints" / "voxelmorph.pt"
    if good.is_file():
        (tmp_path / "voxelmorph.pt").write_bytes(good.read_bytes()[:1000])  # truncated
    else:
        (tmp_path / "voxelmorph.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or truncated") as e:
        load_pretrained("voxelmorph")
    msg = str(e.value)
    assert str(tmp_path / "voxelmorph.pt") in msg and "weights_only" not in msg
    assert "train_pretrained.py --names voxelmorph" in msg
