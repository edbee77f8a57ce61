"""`python -m deqreg_lite train` and `evaluate` (smoke runs on the shipped 2D sample pairs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqreg_lite.__main__ import PRESETS, main
from deqreg_lite.train import load_checkpoint, read_log

SMALL = ["--dataset", "sample", "--method", "voxelmorph", "--size", "32", "48", "--val-pairs", "2", "--log-every",
         "2", "--no-progress"]


def test_presets_follow_the_paper():
    assert PRESETS["oasis"]["size"] == (128, 128, 128) and PRESETS["nlst"]["size"] == (224, 192, 224)
    for d in ("oasis", "nlst"):
        assert PRESETS[d]["epochs"] == 100 and PRESETS[d]["lr"] == 1e-4 and PRESETS[d]["ndim"] == 3
    assert PRESETS["nlst"]["lam"] / PRESETS["oasis"]["lam"] == pytest.approx(0.125 / 0.1)
    assert PRESETS["sample"]["ndim"] == 2


def test_train_resume_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--iterations", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| voxelmorph |" in text and "| identity |" in text and "Dice (%)" in text
    for name in ("last.pt", "log.jsonl", "run.json", "table.md"):
        assert (out / name).is_file(), name
    assert load_checkpoint(out / "last.pt")["iteration"] == 4
    assert json.loads((out / "run.json").read_text())["size"] == [32, 48]
    first = load_checkpoint(out / "last.pt")["model"]

    assert main(["train", *SMALL, "--iterations", "6", "--out", str(out), "--resume", "--no-eval"]) == 0
    text = capsys.readouterr().out
    assert "resumed at iteration 4" in text
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 6
    assert any(not torch.equal(first[k], ckpt["model"][k]) for k in first)
    rows = [r for r in read_log(out / "log.jsonl") if r["split"] == "train"]
    assert [r["iteration"] for r in rows] == [2, 4, 6]

    table = tmp_path / "table.md"
    assert main(["evaluate", "--checkpoint", str(out), "--pairs", "2", "--no-memory", "--out", str(table)]) == 0
    text = capsys.readouterr().out
    row = [line for line in text.splitlines() if line.startswith("| voxelmorph |")]
    assert len(row) == 1 and len(row[0].split("|")) >= 8
    assert table.read_text().splitlines()[0].startswith("| Method |")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *SMALL, "--iterations", "2", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "sample", "--method", "transmorph"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_wrong_size_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--dataset", "sample", "--method", "voxelmorph", "--size", "32", "32", "32",
                 "--out", str(tmp_path)]) == 2
    assert "--size needs 2 numbers" in capsys.readouterr().err


def test_missing_oasis_folder_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    missing = tmp_path / "no_oasis_here"
    proc = subprocess.run([sys.executable, "-m", "deqreg_lite", "train", "--dataset", "oasis", "--method", "deqreg",
                           "--data-dir", str(missing), "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and str(missing) in proc.stderr and "--data-dir" in proc.stderr
