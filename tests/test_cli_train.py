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


# ---------------------------------------------------------------------------------------------------------------
# nothing a user has made is lost; every bad argument is `error: ...` with exit code 2
# ---------------------------------------------------------------------------------------------------------------
def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_train_refuses_an_existing_run_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--iterations", "2", "--out", str(out), "--no-eval"]) == 0
    before = _files(out)
    assert {"last.pt", "log.jsonl", "run.json"} <= set(before)
    capsys.readouterr()
    assert main(["train", *SMALL, "--iterations", "3", "--out", str(out), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--resume" in err and "--overwrite" in err
    assert _files(out) == before  # log.jsonl, run.json, best.pt, last.pt untouched
    assert main(["train", *SMALL, "--iterations", "3", "--out", str(out), "--resume", "--overwrite"]) == 2
    assert main(["train", *SMALL, "--iterations", "3", "--out", str(out), "--no-eval", "--overwrite"]) == 0
    assert load_checkpoint(out / "last.pt")["iteration"] == 3
    assert [r["iteration"] for r in read_log(out / "log.jsonl") if r["split"] == "train"] == [2, 3]


def test_resume_keeps_or_applies_and_records_the_lr(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--iterations", "2", "--lr", "5e-4", "--out", str(out), "--no-eval"]) == 0
    # no --lr: the run's own lr goes on (not the preset's 1e-3)
    assert main(["train", *SMALL, "--iterations", "4", "--out", str(out), "--resume", "--no-eval"]) == 0
    assert load_checkpoint(out / "last.pt")["optimizer"]["param_groups"][0]["lr"] == 5e-4
    assert json.loads((out / "run.json").read_text())["lr"] == 5e-4
    capsys.readouterr()
    # --lr X: applied from the checkpoint on, and recorded truthfully
    assert main(["train", *SMALL, "--iterations", "6", "--lr", "1e-4", "--out", str(out), "--resume",
                 "--no-eval"]) == 0
    text = capsys.readouterr().out
    assert "lr 0.0001 (changed from 0.0005 at iteration 4)" in text
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-4 and ckpt["trainer"]["lr"] == 1e-4
    run = json.loads((out / "run.json").read_text())
    assert run["lr"] == 1e-4 and run["lr_changes"] == [{"iteration": 4, "previous": 5e-4, "lr": 1e-4}]
    assert run["resumed_at"] == [2, 4]
    rows = [(r["iteration"], r["lr"]) for r in read_log(out / "log.jsonl") if r["split"] == "train"]
    assert rows == [(2, 5e-4), (4, 5e-4), (6, 1e-4)]


def test_amp_is_recorded_and_kept_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    # default auto: float32 on the CPU
    assert main(["train", *SMALL, "--iterations", "1", "--val-pairs", "0", "--out", str(out), "--no-eval"]) == 0
    assert "amp off" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["amp"] == "off"
    assert load_checkpoint(out / "last.pt")["trainer"]["amp_mode"] == "off"
    # an explicit bf16 runs under CPU bfloat16 autocast, is recorded, and --resume without --amp keeps it
    assert main(["train", *SMALL, "--iterations", "2", "--val-pairs", "0", "--amp", "bf16", "--out", str(out),
                 "--no-eval", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["amp"] == "bf16"
    assert main(["train", *SMALL, "--iterations", "3", "--val-pairs", "0", "--out", str(out), "--resume",
                 "--no-eval"]) == 0
    assert "amp bf16" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["amp"] == "bf16"
    assert load_checkpoint(out / "last.pt")["trainer"]["amp_mode"] == "bf16"
    # a given --amp replaces the run's mode (with a warning); fp16 on the CPU falls back to float32
    with pytest.warns(UserWarning, match="fp16"):
        assert main(["train", *SMALL, "--iterations", "4", "--val-pairs", "0", "--amp", "fp16", "--out", str(out),
                     "--resume", "--no-eval"]) == 0
    captured = capsys.readouterr()
    assert "amp off" in captured.out and "amp='bf16'" in captured.err
    assert load_checkpoint(out / "last.pt")["trainer"]["amp_mode"] == "off"


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from deqreg_lite import train as tr

    real, calls = tr.Trainer._forward_backward, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(tr.Trainer, "_forward_backward", interrupted)
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--iterations", "4", "--out", str(out), "--no-eval"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(out / "last.pt")["iteration"] == 2
    monkeypatch.undo()
    assert main(["train", *SMALL, "--iterations", "4", "--out", str(out), "--resume", "--no-eval"]) == 0
    assert load_checkpoint(out / "last.pt")["iteration"] == 4


def test_divergence_is_an_error_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    from deqreg_lite import train as tr

    def diverge(self, batch):
        raise self._diverged("the training loss became nan")

    monkeypatch.setattr(tr.Trainer, "_forward_backward", diverge)
    assert main(["train", *SMALL, "--iterations", "2", "--out", str(tmp_path / "run"), "--no-eval"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged at iteration 1") and "learning rate" in err


TRAIN = ["train", "--dataset", "sample", "--method"]
BAD = [
    ["demo", "--iterations", "-1"], ["demo", "--iterations", "x"], ["demo", "--levels", "0"], ["demo", "--lam", "-1"],
    ["demo", "--lam", "nan"], ["demo", "--lr", "0"], ["demo", "--seed", "-1"], ["demo", "--methods", "bogus"],
    [*TRAIN, "voxelmorph", "--batch-size", "0"],
    [*TRAIN, "voxelmorph", "--batch-size", "-2"],
    [*TRAIN, "voxelmorph", "--iterations", "-3"],
    [*TRAIN, "voxelmorph", "--epochs", "two"],
    [*TRAIN, "voxelmorph", "--lr", "0"],
    [*TRAIN, "voxelmorph", "--lr", "inf"],
    [*TRAIN, "voxelmorph", "--lam", "-0.5"],
    [*TRAIN, "unrolling", "--T", "0"],
    [*TRAIN, "deqreg", "--S", "-1"],
    [*TRAIN, "deqreg", "--gamma", "-1"],
    [*TRAIN, "voxelmorph", "--size", "0", "0"],
    [*TRAIN, "voxelmorph", "--size", "3", "3"],
    [*TRAIN, "voxelmorph", "--steps", "0"],
    [*TRAIN, "voxelmorph", "--val-every", "-1"],
    [*TRAIN, "voxelmorph", "--val-pairs", "-1"],
    [*TRAIN, "voxelmorph", "--checkpoint-every", "-1"],
    [*TRAIN, "voxelmorph", "--log-every", "0"],
    [*TRAIN, "voxelmorph", "--seed", "-1"],
    [*TRAIN, "voxelmorph", "--grad-clip", "0"],
    [*TRAIN, "voxelmorph", "--device", "bogus"],
    [*TRAIN, "voxelmorph", "--amp", "bogus"], [*TRAIN, "voxelmorph", "--amp", "float16"],
    ["train", "--dataset", "bogus", "--method", "voxelmorph"],
    ["evaluate", "--checkpoint", "x", "--pairs", "0"], ["evaluate", "--checkpoint", "x", "--pairs", "-1"],
    ["evaluate", "--checkpoint", "x", "--steps", "0"], ["evaluate", "--checkpoint", "x", "--dataset", "nope"],
    [], ["bogus"],
]


@pytest.mark.parametrize("argv", BAD, ids=" ".join)
def test_bad_arguments_are_argparse_errors(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out lands here
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "error:" in capsys.readouterr().err


def test_zero_is_never_the_default(tmp_path, capsys):
    # --iterations 0 does what it says: no training step; the untrained model is saved and evaluated
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--iterations", "0", "--out", str(out), "--no-eval"]) == 0
    assert load_checkpoint(out / "last.pt")["iteration"] == 0
    # --val-pairs 0: no validation (no val rows, no best.pt)
    out2 = tmp_path / "run2"
    assert main(["train", *SMALL[:-5], "--val-pairs", "0", "--log-every", "1", "--iterations", "1", "--out",
                 str(out2), "--no-progress"]) == 0
    assert not (out2 / "best.pt").exists() and all(r["split"] == "train" for r in read_log(out2 / "log.jsonl"))


def test_evaluate_bad_checkpoints_and_options_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--iterations", "1", "--out", str(out), "--no-eval"]) == 0
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk" * 10)
    capsys.readouterr()
    for argv in (["--checkpoint", str(junk), "--dataset", "sample"],
                 ["--checkpoint", str(out), "--split", "bogus", "--no-memory"],
                 ["--checkpoint", str(out), "--disp-dir", str(tmp_path / "d"), "--no-memory"],
                 ["--checkpoint", str(out), "--out", str(tmp_path), "--no-memory"]):
        assert main(["evaluate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and "weights_only" not in err, (argv, err)
    # --pairs 0 is refused (it used to evaluate the default 9 pairs)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint", str(out), "--pairs", "0", "--no-memory"])
    assert e.value.code == 2 and "--pairs: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("method, flags", [("gradirn", ["--T", "5"]), ("voxelmorph", ["--S", "1"]),
                                           ("unrolling", ["--K", "2", "--solver", "anderson"]),
                                           ("riir", ["--gamma", "0.3"]),
                                           ("voxelmorph", ["--checkpoint-phantom"])])
def test_an_option_the_method_does_not_take_is_an_error(method, flags, tmp_path, capsys):
    # before issue 9 these were dropped silently and training ran without them
    argv = ["train", *SMALL[:3], method, *SMALL[4:], "--iterations", "0", "--out", str(tmp_path / "r"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"not an option of {method}" in err and flags[0] in err
    assert not (tmp_path / "r").exists()


def test_deq_flags_reach_the_constructor(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", *SMALL[:3], "deqreg", *SMALL[4:], "--iterations", "0", "--val-pairs", "0", "--out", str(out),
            "--T", "4", "--S", "1", "--gamma", "0.25", "--K", "2", "--tau", "0.75", "--tol", "0.01",
            "--solver", "anderson"]
    assert main(argv) == 0
    kwargs = json.loads((out / "run.json").read_text())["method_kwargs"]
    assert kwargs == {"T": 4, "S": 1, "gamma": 0.25, "K": 2, "tau": 0.75, "tol": 0.01, "solver": "anderson"}
    config = load_checkpoint(out / "last.pt")["config"]
    assert {k: config[k] for k in kwargs} == kwargs


def test_checkpoint_phantom_switch_reaches_the_constructor(tmp_path):
    out = tmp_path / "r"
    argv = ["train", *SMALL[:3], "deqreg", *SMALL[4:], "--iterations", "0", "--val-pairs", "0", "--out", str(out),
            "--T", "2", "--checkpoint-phantom"]
    assert main(argv) == 0
    assert json.loads((out / "run.json").read_text())["method_kwargs"] == {"T": 2, "checkpoint_phantom": True}
    assert load_checkpoint(out / "last.pt")["config"]["checkpoint_phantom"] is True


def test_help_names_the_paper_hyper_parameters(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Eq. 9 correction loss" in text and "weight of the state terms in Eq. 9" in text
    assert "phantom-gradient steps" not in text.split("--S")[1].split("--gamma")[0]
    assert "damping" not in text.split("--gamma")[1].split("--K")[0]
    for flag in ("--K", "--tau", "--tol", "--solver"):
        assert flag in text


def test_presets_are_one_module():
    from deqreg_lite import __main__ as cli, presets

    assert cli.PRESETS is presets.PRESETS and cli.DATASET_DIRS is presets.DATASET_DIRS
    assert presets.PRESETS["sample"]["size"] == presets.TRAIN_SIZE
    assert presets.PRESETS["sample"]["lr"] == presets.SETTINGS["voxelmorph"]["lr"]
