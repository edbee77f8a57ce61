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


def test_memory_vs_steps_quick_measures_the_checkpointed_deqreg(tmp_path):
    text = _run("memory_vs_steps.py", "--quick", "--out", str(tmp_path))
    assert "deqreg ckpt" in text and "with checkpointed phantom steps" in text
    import json
    result = json.loads((tmp_path / "memory_vs_steps.json").read_text())
    for case in result["cases"]:
        s = case["summary"]
        assert s["ckpt_over_voxelmorph"] < s["deqreg_over_voxelmorph"] and s["ckpt_time"]["ratio"] > 0
    assert "checkpoint_phantom=True" in (tmp_path / "memory_vs_steps.md").read_text()
