"""Modes, folders and seeds."""
import pytest
import torch

from deqreg_lite import config


def test_mode_and_by_mode(monkeypatch):
    monkeypatch.setenv("DEQREG_MODE", "quick")
    assert config.mode() == "quick" and config.by_mode(1, 2, 3) == 1
    monkeypatch.setenv("DEQREG_MODE", "full")
    assert config.by_mode(1, 2, 3) == 3 and config.by_mode(1, 2) == 2
    monkeypatch.delenv("DEQREG_MODE")
    assert config.mode() == "default"
    monkeypatch.setenv("DEQREG_MODE", "fast")
    with pytest.raises(ValueError, match="DEQREG_MODE"):
        config.mode()


def test_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("DEQREG_DATA_DIR", str(tmp_path))
    assert config.data_dir() == tmp_path
    monkeypatch.delenv("DEQREG_SAMPLES_DIR", raising=False)
    assert config.samples_dir() == config.REPO_ROOT / "data" / "samples"


def test_seed_everything_repeats():
    config.seed_everything(3)
    a = torch.rand(3)
    gen = config.seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    assert torch.equal(torch.rand(2, generator=gen), torch.rand(2, generator=torch.Generator().manual_seed(3)))
