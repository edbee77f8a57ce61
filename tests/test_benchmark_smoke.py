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
