"""The trainer: resume bit for bit, atomic checkpoints, clear errors, logs, seeds."""
import math
import os
import sys
import types

import pytest
import torch
from torch import Tensor, nn

from deqreg_lite import train as tr
from deqreg_lite.config import seed_everything
from deqreg_lite.datasets import brain_pairs
from deqreg_lite.losses import diffusion
from deqreg_lite.methods.base import RegistrationMethod
from deqreg_lite.result import RegistrationResult
from deqreg_lite.warp import warp

SIZE = (24, 24)



class TinyMethod(RegistrationMethod):
    """A few-parameter iterative method: ``disp += conv(tanh(conv([f, m o disp, disp])))``, BPTT over T steps.
    Its training step adds random noise to the images, so resuming must restore the RNG state too."""

    name = "tiny"

    def __init__(self, ndim: int = 2, width: int = 4, T: int = 1) -> None:
        super().__init__(ndim)
        self.width, self.T, self.trained_steps = width, T, T
        self.conv1 = nn.Conv2d(2 + ndim, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, ndim, 3, padding=1)
        nn.init.normal_(self.conv2.weight, std=1e-2)
        nn.init.zeros_(self.conv2.bias)

    def config(self) -> dict:
        return {"ndim": self.ndim, "width": self.width, "T": self.T}

    def forward(self, fixed, moving, steps=None, return_states=False):
        steps = self.T if steps is None else steps
        disp = fixed.new_zeros(fixed.shape[0], self.ndim, *fixed.shape[2:])
        states = []
        for _ in range(steps):
            x = torch.cat([fixed, warp(moving, disp), disp], 1)
            disp = disp + self.conv2(torch.tanh(self.conv1(x)))
            if return_states:
                states.append(disp)
        return RegistrationResult(disp=disp, states=states, state_steps=list(range(1, steps + 1)) if return_states
                                  else [], info={"steps": steps})

    def training_step(self, fixed, moving, loss_fn, backward=Tensor.backward):
        noisy = fixed + 0.01 * torch.randn_like(fixed)
        loss = loss_fn(noisy, moving, self(noisy, moving).disp)
        backward(loss)
        return {"loss": float(loss.detach()), "noise": 0.01}


def loss_fn(fixed, moving, disp):
    return ((fixed - warp(moving, disp)) ** 2).mean() + 0.1 * diffusion(disp)


def make(seed=0, **kw):
    seed_everything(seed)
    return TinyMethod(**kw)


@pytest.fixture(scope="module")
def data():
    return brain_pairs("train", n=5, size=SIZE), list(brain_pairs("val", n=2, size=SIZE))


def params(m):
    return [p.detach().clone() for p in m.parameters()]


def equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def strip_time(history):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


def test_resume_is_bit_identical(data, tmp_path):
    train, val = data
    common = dict(lr=1e-2, batch_size=2, iterations=8, val_every=2, log_every=3, progress=False, seed=3)
    straight = tr.Trainer(make(), loss_fn, train, val, **common)
    straight.fit()

    first = tr.Trainer(make(), loss_fn, train, val, checkpoint_dir=tmp_path / "run", checkpoint_every=4,
                       log_path=tmp_path / "run" / "log.jsonl", **common)
    first.fit(until=4)
    assert (tmp_path / "run" / "last.pt").is_file()
    torch.manual_seed(123)  # disturb the global RNGs: resume must restore them
    second = tr.Trainer(make(seed=99), loss_fn, train, val, checkpoint_dir=tmp_path / "run",
                        log_path=tmp_path / "run" / "log.jsonl", **common)
    second.resume()
    assert second.iteration == 4
    second.fit()
    assert equal(params(straight.method), params(second.method))
    assert not equal(params(straight.method), params(make()))  # it did train
    assert strip_time(second.history) == strip_time(straight.history)
    assert strip_time(tr.read_log(tmp_path / "run" / "log.jsonl")) == strip_time(second.history)


def test_validation_does_not_change_training(data):
    train, val = data
    a = tr.Trainer(make(), loss_fn, train, val, lr=1e-2, iterations=4, val_every=1, progress=False)
    b = tr.Trainer(make(), loss_fn, train, None, lr=1e-2, iterations=4, progress=False)
    a.fit(), b.fit()
    assert equal(params(a.method), params(b.method))


def test_seeds_reproduce(data):
    train, _ = data
    runs = []
    for seed in (0, 0, 1):
        t = tr.Trainer(make(), loss_fn, train, lr=1e-2, iterations=3, seed=seed, progress=False)
        t.fit()
        runs.append(params(t.method))
    assert equal(runs[0], runs[1])
    assert not equal(runs[0], runs[2])
    # data order: a function of (seed, iteration); every epoch visits every item once
    order = [i for it in range(5) for i in tr.batch_indices(0, it, 2, 5)]
    assert sorted(order) == sorted(list(range(5)) * 2)
    assert tr.batch_indices(0, 3, 2, 5) == tr.batch_indices(0, 3, 2, 5) != tr.batch_indices(1, 3, 2, 5)


def test_log_and_history_have_validation_rows(data, tmp_path):
    train, val = data
    log = tmp_path / "logs" / "log.jsonl"
    t = tr.Trainer(make(), loss_fn, train, val, lr=1e-3, iterations=4, val_every=2, log_every=2,
                   checkpoint_dir=tmp_path / "ck", progress=False, log_path=log)
    history = t.fit()
    rows = tr.read_log(log)
    assert strip_time(rows) == strip_time(history)
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [r["iteration"] for r in val_rows] == [2, 4]
    for r in val_rows:
        assert 0 <= r["dice"] <= 1 and r["folding_pct"] >= 0 and "dice_std" in r
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["iteration"] for r in train_rows] == [2, 4]
    assert all(math.isfinite(r["loss"]) and r["lr"] == 1e-3 for r in train_rows)
    assert (tmp_path / "ck" / "best.pt").is_file() and (tmp_path / "ck" / "last.pt").is_file()
    fresh = tr.Trainer(make(), loss_fn, train, None, iterations=1, log_every=1, progress=False, log_path=log)
    fresh.fit()  # a fresh run starts a fresh log
    assert [r["iteration"] for r in tr.read_log(log)] == [1]


def test_checkpoint_contents_and_weights_only_load(tmp_path):
    m = make()
    opt = torch.optim.AdamW(m.parameters())
    path = tr.save_checkpoint(tmp_path / "a.pt", m, opt, iteration=7, history=[{"split": "train", "loss": 1.0}],
                              sampler={"seed": 0, "batch_size": 1, "position": 7})
    raw = torch.load(path, weights_only=True)  # plain data only: safe to load
    assert raw["name"] == "tiny" and raw["config"] == {"ndim": 2, "width": 4, "T": 1} and raw["iteration"] == 7
    assert set(raw["rng"]) == {"torch", "cuda", "numpy", "python"} and raw["optimizer"] is not None
    ck = tr.load_checkpoint(path, name="tiny")
    assert ck["history"] == [{"split": "train", "loss": 1.0}]


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    m = make()
    path = tr.save_checkpoint(tmp_path / "last.pt", m, iteration=1)
    before = params(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the temporary file is fully written ...
        raise OSError("disk full")  # ... and then the process "dies" before the rename

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint(path, m, iteration=2)
    monkeypatch.undo()
    ck = tr.load_checkpoint(path)
    assert ck["iteration"] == 1
    assert all(torch.equal(ck["model"][k], v) for k, v in zip(ck["model"], before))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_nan_loss_stops_with_a_clear_error(data):
    train, _ = data
    t = tr.Trainer(make(), lambda f, m, d: loss_fn(f, m, d) * float("nan"), train, iterations=3, progress=False)
    before = params(t.method)
    with pytest.raises(tr.TrainingDivergedError, match=r"iteration 1\b.*(?s:.*)learning rate.*lambda"):
        t.fit()
    assert equal(before, params(t.method)) and t.iteration == 0


def test_clear_checkpoint_errors(tmp_path, data):
    train, _ = data
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tr.load_checkpoint(tmp_path / "missing.pt")
    t = tr.Trainer(make(), loss_fn, train, iterations=2, progress=False)
    with pytest.raises(FileNotFoundError):
        t.resume(tmp_path / "missing.pt")

    class Other(TinyMethod):
        name = "other"

    tr.save_checkpoint(tmp_path / "other.pt", Other())
    with pytest.raises(ValueError, match="'other'.*not 'tiny'"):
        t.resume(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(Exception):
        tr.load_checkpoint(tmp_path / "junk.pt")


def test_load_method_rebuilds_through_build_method(tmp_path, monkeypatch):
    m = make(T=2)
    path = tr.save_checkpoint(tmp_path / "m.pt", m)
    calls = []

    def build_method(name, ndim, **kw):
        calls.append((name, ndim, kw))
        return TinyMethod(ndim, **kw)

    fake = types.ModuleType("deqreg_lite.methods")
    fake.build_method = build_method
    monkeypatch.setitem(sys.modules, "deqreg_lite.methods", fake)
    rebuilt = tr.load_method(path, map_location="cpu")
    assert calls == [("tiny", 2, {"width": 4, "T": 2})]
    assert equal(params(rebuilt), params(m)) and not rebuilt.training


def test_options_are_checked(data):
    train, _ = data
    with pytest.raises(TypeError):
        tr.Trainer(make(), loss_fn, train, bogus=1)
    with pytest.raises(ValueError, match="lr"):
        tr.Trainer(make(), loss_fn, train, lr=0)
    with pytest.raises(TypeError, match="train_data"):
        tr.Trainer(make(), loss_fn, 42)
    with pytest.warns(UserWarning, match="amp"):
        t = tr.Trainer(make(), loss_fn, train, amp=True, device="cpu", progress=False)
    assert t.amp is False and t.scaler is None
    # one sample dict is a dataset of one pair
    one = tr.Trainer(make(), loss_fn, train[0], iterations=1, progress=False)
    one.fit()
    assert one.iteration == 1
