"""scripts/train_3d.py (the small 3D models, trained on the CPU), its data (deqreg_lite.datasets.volumes) and its
loader (deqreg_lite.pretrained.load_pretrained_3d), at tiny sizes: 16^3, a few steps, temporary folders."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from deqreg_lite.checkpoints import load_checkpoint
from deqreg_lite.datasets import load_sample
from deqreg_lite.datasets.pairs import SEED_RANGES
from deqreg_lite.datasets.volumes import VolumePairDataset, brain_like, breathing_velocity, lung_like
from deqreg_lite.methods import build_method
from deqreg_lite.pretrained import (PRETRAINED_3D, HalfResolution, available_pretrained_3d, load_pretrained_3d)

REPO = Path(__file__).resolve().parent.parent
#: a cheap DEQReg for the smoke run: the presets' recipe with a short solve, and its stages moved to step 1 and 2
CHEAP_DEQ = {"kwargs": {"T": 3, "S": 1, "damping": 0.5, "leak": 0.5, "jac_weight": 0.3, "inject_moving": True},
             "stages": ((1, {"solver": "anderson", "jac_weight": 1.0, "jac_power": 1, "jac_target": 0.8}),
                        (2, {"solver": "anderson", "jac_weight": 1.0, "jac_power": 2, "jac_target": 0.8}))}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_3d_under_test", REPO / "scripts" / "train_3d.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def cheap_deq(script, monkeypatch):
    monkeypatch.setitem(script.SETTINGS, "deqreg", {**script.SETTINGS["deqreg"], **CHEAP_DEQ})


# ------------------------------------------------------------------------------------------------------ data
def test_volume_pairs_are_3d_seeded_and_held_out():
    ds = VolumePairDataset("train", 4, (16, 16, 16), kinds=("brain", "lung"))
    a, b = ds[0], ds[0]
    assert [ds.kind(i) for i in range(4)] == ["brain", "lung", "brain", "lung"]
    for item in (ds[0], ds[1]):
        assert item["fixed"].shape == item["moving"].shape == (1, 1, 16, 16, 16)
        assert item["fixed_seg"].dtype == torch.int64 and item["fixed_seg"].shape == (1, 1, 16, 16, 16)
        assert 0.0 <= float(item["fixed"].min()) and float(item["moving"].max()) <= 1.0
        assert item["labels"] == [1, 2, 3] and len(item["spacing"]) == 3
        assert not torch.equal(item["fixed"], item["moving"])  # two deformations, two intensity changes
    torch.testing.assert_close(a["moving"], b["moving"])  # a function of (split, seed, index) only
    val = VolumePairDataset("val", 2, (16, 16, 16))
    assert all(SEED_RANGES["val"][0] <= val.item_seed(i) < SEED_RANGES["val"][1] for i in range(2))
    assert not ds.shipped_anatomy and VolumePairDataset("train", 1, (16,) * 3, kinds="brain3d").shipped_anatomy


def test_phantoms_hold_their_tissues_and_breathing_moves_down_the_lungs():
    brain = brain_like((32, 32, 32), seed=3)
    frac = [float((brain.seg == k).float().mean()) for k in range(4)]
    assert 0.1 < 1 - frac[0] < 0.45 and frac[2] > frac[1] > 0.005 and frac[3] > 0.02  # GM > CSF, WM present
    means = [float(brain.image[brain.seg == k].mean()) for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]  # T1-like: CSF < GM < WM
    lung = lung_like((32, 32, 32), seed=3)
    assert 0.05 < float((lung.seg == 1).float().mean()) < 0.4 and (lung.seg == 3).any()
    assert float(lung.image[lung.seg == 1].mean()) < 0.3 < float(lung.image[lung.seg == 2].mean())
    v = breathing_velocity(lung.seg, 2.0)
    assert v.shape == (1, 3, 32, 32, 32) and float(v[:, 1:].abs().max()) == 0.0
    assert float(v[0, 0, -4:].mean()) > float(v[0, 0, :4].mean())  # grows towards the diaphragm


# ---------------------------------------------------------------------------------------- train, resume, export
def test_each_model_trains_resumes_exports_and_loads(script, cheap_deq, tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "ckpt" / "3d"
    logs: list[str] = []
    small = dict(size=16, val_every=2, val_pairs=1, checkpoint_every=1, log=logs.append)
    for name in script.NAMES:
        s = script.train_3d(name, 0, runs, iterations=2, **small)
        assert s["iterations"] == 2 and s["finished"] and s["init"] == "scratch" and s["config"]["ndim"] == 3
        assert (runs / f"{name}-seed0" / "best.pt").is_file() and s["size"] == [16, 16, 16]
    assert any("step 1/2" in line for line in logs)  # progress on stdout
    deq = json.loads((runs / "deqreg-seed0" / "run.json").read_text())
    assert [st["from"] for st in deq["stages"]] == [0, 1]  # the stage from step 2 starts at the budget: left out
    assert deq["config"]["solver"] == "anderson" and deq["config"]["inject_moving"] is True

    # resume: the same call with a larger budget continues from last.pt
    s = script.train_3d("voxelmorph", 0, runs, iterations=3, **small)
    assert s["iterations"] == 3 and any("resumed at iteration 2" in line for line in logs)
    assert load_checkpoint(runs / "voxelmorph-seed0" / "last.pt", "cpu")["iteration"] == 3

    # export: one file per model and the manifest's record
    recs = script.export_3d(script.NAMES, runs, out, log=logs.append)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and set(manifest["models"]) == set(script.NAMES)
    for name in script.NAMES:
        rec = manifest["models"][name]
        for key in ("init", "iterations", "budget", "budget_rule", "size", "seed", "data", "selection",
                    "train_time_s", "device", "threads", "label", "finished"):
            assert key in rec, (name, key)
        assert rec["init"] == "scratch" and rec["device"] == "cpu" and rec["size"] == [16, 16, 16]
        assert rec["data"]["shipped_samples_in_training"] is False and "16^3" in rec["label"]
        assert rec["bytes"] < 8 * 2**20 and "val_curve" not in rec and "val_curve" in recs[name]

    # loading: the shipped 96^3 volumes in, a 96^3 displacement (in voxels of that grid) out
    monkeypatch.setenv("DEQREG_CHECKPOINTS_DIR", str(tmp_path / "ckpt"))
    assert available_pretrained_3d() == {n: True for n in PRETRAINED_3D}
    brain = load_sample("brain3d")
    for name in script.NAMES:
        model = load_pretrained_3d(name)
        assert isinstance(model, HalfResolution) and model.name == name and not model.training
        with torch.no_grad():
            res = model(brain["fixed"], brain["moving"])
        assert res.disp.shape == (1, 3, 96, 96, 96) and torch.isfinite(res.disp).all()
        assert res.info["internal_size"] == (16, 16, 16)
        half = brain["fixed"][:, :, ::2, ::2, ::2].contiguous()  # another input size runs at the training size too
        with torch.no_grad():
            assert model(half, half).info["internal_size"] == (16, 16, 16)


def test_time_limit_stops_a_run_that_the_same_call_resumes(script, tmp_path):
    runs = tmp_path / "runs"
    s = script.train_3d("voxelmorph", 0, runs, size=16, iterations=4, minutes=1e-6, val_every=4, val_pairs=1,
                        checkpoint_every=1, log=lambda line: None)
    assert s["iterations"] == 1 and s["finished"] is False
    with pytest.raises(RuntimeError, match="--allow-unfinished"):
        script.export_3d(["voxelmorph"], runs, tmp_path / "out", log=lambda line: None)
    with pytest.raises(FileNotFoundError, match="scripts/train_3d.py --names voxelmorph"):  # no best.pt yet
        script.export_3d(["voxelmorph"], runs, tmp_path / "out", allow_unfinished=True, log=lambda line: None)
    with pytest.raises(ValueError, match="size: 16 there, 32 now"):  # a run keeps its settings
        script.train_3d("voxelmorph", 0, runs, size=32, iterations=4, val_pairs=1, log=lambda line: None)
    s = script.train_3d("voxelmorph", 0, runs, size=16, iterations=4, val_every=4, val_pairs=1, checkpoint_every=1,
                        log=lambda line: None)
    assert s["iterations"] == 4 and s["finished"]


# --------------------------------------------------------------------------------------------------- errors
def test_bad_options_raise_value_error(script):
    with pytest.raises(ValueError, match="size must be one of"):
        script.check_settings(20, ("brain",))
    with pytest.raises(ValueError, match="train-on-samples"):
        script.check_settings(32, ("brain3d",))
    with pytest.raises(ValueError, match="kinds"):
        script.check_settings(32, ("liver",))
    for bad in ({"iterations": 0}, {"val_every": 1.5}, {"minutes": -1}, {"train_on_samples": 1}):
        with pytest.raises(ValueError):
            script.check_settings(32, ("brain",), **bad)
    with pytest.raises(ValueError, match="unknown 3D model"):
        script.train_3d("riir", 0, Path("/nonexistent"))
    with pytest.raises(ValueError, match="kinds"):
        VolumePairDataset("train", 1, (16, 16, 16), kinds=("heart",))
    with pytest.raises(ValueError, match="size"):
        VolumePairDataset("train", 1, (16, 16))
    with pytest.raises(TypeError):
        VolumePairDataset("train", 1, (16, 16, 16), strenght=1.0)
    with pytest.raises(ValueError, match="size must be None or 3 integers"):
        HalfResolution(build_method("voxelmorph", 3), factor=3, size=(32, 32))
    assert script.check_settings(32, ("brain",), train_on_samples=True) == ("brain", "brain3d", "lung3d")
    rec = script.data_record(32, ("brain", "brain3d", "lung3d"), 6)
    assert rec["shipped_samples_in_training"] and "training anatomy" in rec["shipped_samples"]


def test_loader_errors_name_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQREG_CHECKPOINTS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="unrolling_ml"):
        load_pretrained_3d("riir")
    with pytest.raises(FileNotFoundError, match="scripts/train_3d.py --names deqreg"):
        load_pretrained_3d("deqreg")
    (tmp_path / "3d").mkdir()
    (tmp_path / "3d" / "voxelmorph.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="train_3d.py --export-only --names voxelmorph"):
        load_pretrained_3d("voxelmorph")


def test_cli_rejects_a_bad_size(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--size", "40", "--export-only"])
    assert "size must be one of" in capsys.readouterr().err
