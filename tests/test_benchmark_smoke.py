"""Smoke runs of the benchmark scripts that the retraining relies on: each one's --quick mode end to end (tiny
budgets, temporary output folders), so that a change in the library cannot silently break them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_recipes_quick_trains_and_measures_the_certificate():
    text = _run("recipes.py", "--quick")
    for key in ('"residual"', '"rho"', '"drift_max"', '"dice_long"', '"identity_dice"'):
        assert key in text


def test_fair_tables_quick_writes_both_tables():
    text = _run("fair_tables.py", "--quick")
    assert "## Table 1" in text and "## Table 2" in text
    assert "largest move from 48 to" in text  # the DEQ drift row


def test_train_pretrained_runs_resumes_and_exports(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "train_pretrained.py"), "--names", "voxelmorph",
           "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "ckpt"), "--threads", "1"]
    first = subprocess.run(cmd + ["--iterations", "3"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(cmd + ["--iterations", "5", "--export"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at iteration 3" in second.stdout
    import json
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    rec = manifest["models"]["voxelmorph"]
    assert rec["init"] == "scratch" and rec["iterations"] == 5 and rec["seed"] == 0
    assert rec["selection"] and rec["data"]["subjects"] and rec["lr"] == pytest.approx(1e-3)
    from deqreg_lite.methods.base import RegistrationMethod
    assert RegistrationMethod.from_checkpoint(tmp_path / "ckpt" / "voxelmorph.pt").name == "voxelmorph"
    from deqreg_lite.checkpoints import load_checkpoint
    shipped = load_checkpoint(tmp_path / "ckpt" / "voxelmorph.pt", "cpu")["extra"]["pretrained"]
    assert isinstance(shipped["train_curve"], list) and isinstance(shipped["val_curve"], list)
    assert "train_curve" not in rec  # the curves ship inside the checkpoint, not in the manifest


def test_train_pretrained_stages_switch_options_and_select_in_the_last_stage(tmp_path, monkeypatch):
    """A recipe in stages: the later stage's options take over at its step (resuming the same run), and best.pt is
    chosen among the last stage's checkpoints only."""
    import importlib.util

    from deqreg_lite.checkpoints import load_checkpoint
    spec = importlib.util.spec_from_file_location("train_pretrained_under_test",
                                                  REPO / "scripts" / "train_pretrained.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = {"kwargs": {"T": 3, "S": 1, "damping": 0.5, "leak": 0.5}, "iterations": 4, "lr": 1e-3, "batch_size": 1,
           "stages": ((2, {"solver": "anderson", "jac_weight": 0.1, "jac_power": 1, "jac_target": 0.5}),)}
    monkeypatch.setitem(mod.SETTINGS, "deqreg", cfg)
    monkeypatch.setattr(mod, "VAL_EVERY", 1)
    monkeypatch.setattr(mod, "VAL_PAIRS", 1)
    logs: list[str] = []
    summary = mod.train_run("deqreg", 0, tmp_path, log=logs.append)
    assert summary["iterations"] == 4 and summary["init"] == "scratch"
    assert [s["from"] for s in summary["stages"]] == [0, 2]
    assert summary["config"]["solver"] == "anderson" and summary["config"]["jac_power"] == 1
    assert any("resumed at iteration 2 (stage 2/2" in line for line in logs)
    best = load_checkpoint(tmp_path / "deqreg-seed0" / "best.pt", "cpu")
    assert best["iteration"] >= 2 and best["config"]["solver"] == "anderson"
    assert summary["selected_iteration"] >= 2


def test_memory_vs_steps_quick_measures_the_checkpointed_deqreg(tmp_path):
    text = _run("memory_vs_steps.py", "--quick", "--out", str(tmp_path))
    assert "deqreg ckpt" in text and "with checkpointed phantom steps" in text
    import json
    result = json.loads((tmp_path / "memory_vs_steps.json").read_text())
    for case in result["cases"]:
        s = case["summary"]
        assert s["ckpt_over_voxelmorph"] < s["deqreg_over_voxelmorph"] and s["ckpt_time"]["ratio"] > 0
    assert "checkpoint_phantom=True" in (tmp_path / "memory_vs_steps.md").read_text()


def test_paper_scale_quick_writes_every_method_and_precision(tmp_path):
    import json

    _run("paper_scale.py", "--quick", "--out", str(tmp_path))
    (path,) = tmp_path.glob("paper_scale_*.json")
    result = json.loads(path.read_text())
    assert path.with_suffix(".md").is_file()
    assert result["meta"]["quick"] and result["meta"]["torch"] and result["meta"]["device_name"]
    assert [t["precision"] for t in result["tables"]] == ["float32", "bf16"]
    keys = {"voxelmorph", "unrolling", "unrolling_ml", "gradirn", "riir", "deqreg12", "deqreg"}
    for table in result["tables"]:
        assert keys <= {r["key"] for r in table["rows"]}
        vxm = next(r for r in table["rows"] if r["key"] == "voxelmorph")
        assert vxm["memory_x_vxm"] == 1.0 and vxm["train_s"] > 0 and vxm["infer_s"] > 0
        assert all("skipped" in r or r["memory_bytes"] > 0 for r in table["rows"])
    (fig,) = result["fig2c"]
    assert {p["series"] for p in fig["points"]} >= {"voxelmorph", "bptt", "deqreg"}


def test_step_cost_quick_times_a_checkpoint_as_trained(tmp_path):
    from deqreg_lite.checkpoints import save_checkpoint
    from deqreg_lite.methods.deqreg import DEQReg
    ckpt = tmp_path / "deqreg.pt"
    save_checkpoint(ckpt, DEQReg(2, damping=0.5, leak=0.5, jac_weight=0.1, jac_power=1, solver="anderson"))
    _run("step_cost.py", "--quick", "--checkpoint", str(ckpt), "--out", str(tmp_path))
    import json
    rows = json.loads((tmp_path / "step_cost.json").read_text())["cases"][0]["rows"]
    assert "deqreg as trained (--checkpoint's options)" in rows and rows["voxelmorph"]["ratio_to_voxelmorph"] == 1.0
