"""The main job: `python -m deqreg_lite demo`."""
import pytest

from deqreg_lite.__main__ import main


def test_demo_prints_table_and_saves_figure(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--iterations", "20", "--levels", "2", "--methods", "voxelmorph,deqreg", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    # the classical row names what runs: Adam by default (it was labelled "classical GD" before issue 9)
    for word in ("identity", "classical (Adam)", "voxelmorph", "deqreg", "Dice", "HD95", "fold %", "SDlogJ", "time s"):
        assert word in text
    assert out.exists() and out.stat().st_size > 10_000
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("identity", "deqreg"))}
    assert float(rows["deqreg"][1]) > float(rows["identity"][1]) + 0.05


def test_demo_rejects_unknown_options():
    with pytest.raises(SystemExit):
        main(["demo", "--lamda", "1"])
