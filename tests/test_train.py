"""The trainer: resume bit for bit, atomic checkpoints, clear errors, logs, seeds."""
import math
import os

import pytest
import torch
from torch import Tensor, nn

from deqreg_lite import train as tr
from deqreg_lite.config import seed_everything
from deqreg_lite.datasets import brain_pairs
from deqreg_lite.losses import diffusion
from deqreg_lite.methods import base as method_base
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
    with pytest.raises(tr.RunExistsError, match="overwrite=True"):
        fresh.fit()  # a fresh run does not silently replace an earlier run's log ...
    assert strip_time(tr.read_log(log)) == strip_time(history)
    fresh = tr.Trainer(make(), loss_fn, train, None, iterations=1, log_every=1, progress=False, log_path=log,
                       overwrite=True)
    fresh.fit()  # ... unless told to: it then starts a fresh log
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


def test_load_method_rebuilds_through_from_checkpoint(tmp_path, monkeypatch):
    # load_method goes through RegistrationMethod.from_checkpoint: the class registered under the checkpoint's name,
    # built with the stored config (formerly through methods.build_method, which this test used to patch)
    m = make(T=2)
    path = tr.save_checkpoint(tmp_path / "m.pt", m)
    calls = []

    class Spy(TinyMethod):
        def __init__(self, ndim, **kw):
            calls.append((self.name, ndim, kw))
            super().__init__(ndim, **kw)

    monkeypatch.setitem(method_base._REGISTRY, "tiny", Spy)
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


# ---------------------------------------------------------------------------------------------------------------
# nothing a user has made is lost
# ---------------------------------------------------------------------------------------------------------------
COMMON = dict(lr=1e-2, batch_size=2, iterations=8, val_every=2, log_every=3, progress=False, seed=3)


def straight_run(train, val, **kw):
    t = tr.Trainer(make(), loss_fn, train, val, **{**COMMON, **kw})
    t.fit()
    return t


def files_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_fresh_run_refuses_an_existing_run_folder(data, tmp_path):
    train, val = data
    run = tmp_path / "run"
    kw = dict(checkpoint_dir=run, log_path=run / "log.jsonl", **{**COMMON, "iterations": 4})
    tr.Trainer(make(), loss_fn, train, val, **kw).fit()
    assert {"last.pt", "best.pt", "log.jsonl"} <= set(os.listdir(run))
    before = files_bytes(run)
    again = tr.Trainer(make(seed=5), loss_fn, train, val, **kw)
    with pytest.raises(tr.RunExistsError, match=r"last\.pt.*best\.pt.*log\.jsonl(?s:.*)resume.*overwrite=True"):
        again.fit()
    assert files_bytes(run) == before  # nothing touched
    # only the checkpoints, or only the log, count as a run too
    with pytest.raises(tr.RunExistsError):
        tr.Trainer(make(), loss_fn, train, None, checkpoint_dir=run, **{**COMMON, "iterations": 1}).fit()
    with pytest.raises(tr.RunExistsError):
        tr.Trainer(make(), loss_fn, train, None, log_path=run / "log.jsonl", **{**COMMON, "iterations": 1}).fit()
    # resuming is fine without overwrite
    resumed = tr.Trainer(make(), loss_fn, train, val, **{**kw, "iterations": 6})
    resumed.resume()
    resumed.fit()
    assert tr.load_checkpoint(run)["iteration"] == 6
    # overwrite=True replaces the run: the old best.pt does not survive a run without validation
    fresh = tr.Trainer(make(), loss_fn, train, None, overwrite=True, checkpoint_dir=run, log_path=run / "log.jsonl",
                       **{**COMMON, "iterations": 2})
    fresh.fit()
    assert sorted(os.listdir(run)) == ["last.pt", "log.jsonl"]
    assert tr.load_checkpoint(run)["iteration"] == 2


def test_resume_with_another_lr_applies_and_records_it(data, tmp_path):
    train, val = data
    run = tmp_path / "run"
    # reference: 4 iterations at 1e-2, then the optimizer's lr set to 1e-3 by hand
    ref = tr.Trainer(make(), loss_fn, train, val, **COMMON)
    ref.fit(until=4)
    for g in ref.optimizer.param_groups:
        g["lr"] = 1e-3
    ref.fit()

    first = tr.Trainer(make(), loss_fn, train, val, checkpoint_dir=run, **COMMON)
    first.fit(until=4)
    second = tr.Trainer(make(), loss_fn, train, val, checkpoint_dir=run, **{**COMMON, "lr": 1e-3})
    with pytest.warns(UserWarning, match="lr=0.001.*was 0.01"):
        second.resume()
    assert [g["lr"] for g in second.optimizer.param_groups] == [1e-3]
    second.fit()
    assert equal(params(ref.method), params(second.method))  # the new lr was used
    assert second.lr_changes == [{"iteration": 4, "previous": 1e-2, "lr": 1e-3}]
    ckpt = tr.load_checkpoint(run)
    assert ckpt["trainer"]["lr"] == 1e-3 and ckpt["extra"]["lr_changes"] == second.lr_changes
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-3
    rows = [r for r in second.history if r["split"] == "train"]
    assert [(r["iteration"], r["lr"]) for r in rows] == [(3, 1e-2), (6, 1e-3), (8, 1e-3)]
    # the record survives a further resume at the same lr
    third = tr.Trainer(make(), loss_fn, train, val, checkpoint_dir=run, **{**COMMON, "lr": 1e-3})
    third.resume()
    assert third.lr_changes == second.lr_changes


class InterruptAt(TinyMethod):
    """Raises KeyboardInterrupt inside its ``at``-th training step, after drawing its random noise."""

    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at, self.calls = at, 0

    def training_step(self, fixed, moving, loss_fn, backward=Tensor.backward):
        self.calls += 1
        noisy = fixed + 0.01 * torch.randn_like(fixed)
        if self.calls == self.at:
            raise KeyboardInterrupt
        loss = loss_fn(noisy, moving, self(noisy, moving).disp)
        backward(loss)
        return {"loss": float(loss.detach()), "noise": 0.01}


def make_interrupting(at, seed=0):
    seed_everything(seed)
    return InterruptAt(at)


@pytest.mark.parametrize("at", [3, 5])
def test_ctrl_c_in_a_training_step_saves_and_resume_matches(data, tmp_path, at):
    train, val = data
    ref = straight_run(train, val)
    run = tmp_path / "run"
    kw = dict(checkpoint_dir=run, log_path=run / "log.jsonl", **COMMON)
    t = tr.Trainer(make_interrupting(at), loss_fn, train, val, **kw)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    ckpt = tr.load_checkpoint(run)
    assert ckpt["iteration"] == at - 1 == t.iteration  # the interrupted iteration is rolled back
    assert os.listdir(run) and not [n for n in os.listdir(run) if n.endswith(".tmp")]
    resumed = tr.Trainer(make_interrupting(0, seed=99), loss_fn, train, val, **kw)
    resumed.resume()
    resumed.fit()
    assert equal(params(ref.method), params(resumed.method))
    assert strip_time(resumed.history) == strip_time(ref.history)
    assert strip_time(tr.read_log(run / "log.jsonl")) == strip_time(ref.history)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_checkpoint_before_validation_and_interrupted_validation(data, tmp_path, error):
    train, val = data
    ref = straight_run(train, val)
    run = tmp_path / "run"
    kw = dict(checkpoint_dir=run, log_path=run / "log.jsonl", checkpoint_every=None, **COMMON)
    t = tr.Trainer(make(), loss_fn, train, val, **kw)
    real_validate, calls = t.validate, []

    def failing_validate():
        calls.append(t.iteration)
        if len(calls) == 2:  # the validation at iteration 4
            raise error("validation failed")
        return real_validate()

    t.validate = failing_validate
    with pytest.raises(error, match="validation failed"):
        t.fit()
    ckpt = tr.load_checkpoint(run)
    assert ckpt["iteration"] == 4  # a fresh last.pt of that iteration (checkpoint_every=None)
    assert [r["iteration"] for r in ckpt["history"] if r["split"] == "val"] == [2]
    resumed = tr.Trainer(make(seed=7), loss_fn, train, val, **kw)
    resumed.resume()
    resumed.fit()  # validates iteration 4 first, then goes on
    assert equal(params(ref.method), params(resumed.method))
    assert strip_time(resumed.history) == strip_time(ref.history)


def test_stale_temp_files_from_a_killed_save_are_removed(data, tmp_path):
    train, _ = data
    run = tmp_path / "run"
    run.mkdir()
    m = make()
    good = tr.save_checkpoint(run / "last.pt", m, iteration=1)
    size = good.stat().st_size
    # what a killed save leaves: a full-size temporary file (this version's name, and an older mkstemp name)
    for name in (".last.pt.tmp", ".last.pt.k3j_x9a1.tmp", ".best.pt.tmp"):
        (run / name).write_bytes(b"\0" * size)
    (run / "notes.tmp").write_text("mine")  # not a checkpoint temp: left alone
    tr.save_checkpoint(run / "last.pt", m, iteration=2)
    assert sorted(os.listdir(run)) == [".best.pt.tmp", "last.pt", "notes.tmp"]
    # a run in that folder removes every stale checkpoint temp when it starts
    t = tr.Trainer(m, loss_fn, train, iterations=3, checkpoint_dir=run, progress=False)
    t.resume()
    (run / ".last.pt.tmp").write_bytes(b"\0" * size)
    t.fit()
    assert sorted(os.listdir(run)) == ["last.pt", "notes.tmp"]
    assert tr.load_checkpoint(run)["iteration"] == 3


def test_corrupt_checkpoint_names_the_file_and_never_suggests_weights_only_false(tmp_path):
    good = tr.save_checkpoint(tmp_path / "good.pt", make(), iteration=1)
    data = good.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "garbage.pt": b"junk" * 100, "empty.pt": b"",
             "pickle.pt": b"\x80\x02}q\x00."[:-1]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="corrupt or truncated") as e:
            tr.load_checkpoint(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and "weights_only" not in msg, msg
        assert e.value.__cause__ is None and e.value.__suppress_context__
    t = tr.Trainer(make(), loss_fn, [{"fixed": torch.rand(1, 1, *SIZE), "moving": torch.rand(1, 1, *SIZE)}],
                   iterations=1, progress=False)
    with pytest.raises(ValueError, match="truncated.pt"):
        t.resume(tmp_path / "truncated.pt")


class NaNAt(TinyMethod):
    """Its displacement becomes NaN from the ``at``-th training step on (as a diverging model's would)."""

    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at, self.calls = at, 0

    def forward(self, fixed, moving, steps=None, return_states=False):
        out = super().forward(fixed, moving, steps, return_states)
        if self.training and self.calls >= self.at:
            out.disp = out.disp * float("nan")
        return out

    def training_step(self, fixed, moving, loss_fn, backward=Tensor.backward):
        self.calls += 1
        return super().training_step(fixed, moving, loss_fn, backward)


def test_diverging_displacement_raises_the_divergence_error(data):
    from deqreg_lite.methods import RegistrationLoss

    train, _ = data
    seed_everything(0)
    t = tr.Trainer(NaNAt(3), RegistrationLoss(lam=1.0), train, iterations=5, progress=False)
    with pytest.raises(tr.TrainingDivergedError, match=r"iteration 3\b(?s:.*)learning rate.*lambda") as e:
        t.fit()
    assert "disp" in str(e.value)  # what went NaN is still said
    assert t.iteration == 2
    # non-finite *images* are bad input, not divergence: the input check's ValueError stays
    bad = [{"fixed": torch.full((1, 1, *SIZE), float("nan")), "moving": torch.rand(1, 1, *SIZE)}]
    t = tr.Trainer(make(), RegistrationLoss(lam=1.0), bad, iterations=1, progress=False)
    with pytest.raises(ValueError) as e:
        t.fit()
    assert not isinstance(e.value, tr.TrainingDivergedError)


def test_a_real_sigint_during_the_optimizer_update_waits_for_the_iteration_to_finish(data, tmp_path):
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled by someone else here")
    train, val = data
    ref = straight_run(train, val)
    run = tmp_path / "run"
    kw = dict(checkpoint_dir=run, log_path=run / "log.jsonl", **COMMON)
    t = tr.Trainer(make(), loss_fn, train, val, **kw)
    real_step, calls = t.optimizer.step, []

    def step_with_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the update
        return real_step(*a, **k)

    t.optimizer.step = step_with_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert t.iteration == 3 and tr.load_checkpoint(run)["iteration"] == 3  # the update completed and was saved
    resumed = tr.Trainer(make(), loss_fn, train, val, **kw)
    resumed.resume()
    resumed.fit()
    assert equal(params(ref.method), params(resumed.method))


# ------------------------------------------------------------------------- validation is a function (issue 9)
def test_validate_takes_a_validation_function(data):
    train, val = data
    calls = []

    def validate_fn(method, val_data, steps):
        calls.append((method, val_data, steps, method.training))
        return {"dice": 0.5, "dice_std": 0.0, "folding_pct": 1.0, "ignored": 3}

    method = make()
    t = tr.Trainer(method, loss_fn, train, val, lr=1e-3, iterations=2, val_every=1, val_steps=1, progress=False,
                   validate_fn=validate_fn)
    t.fit()
    assert [(c[0], c[1], c[2], c[3]) for c in calls] == [(method, val, 1, False)] * 2
    rows = [r for r in t.history if r["split"] == "val"]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[0]["dice"] == 0.5 and rows[0]["folding_pct"] == 1.0 and "ignored" not in rows[0]
    with pytest.raises(TypeError, match="validate_fn"):
        tr.Trainer(make(), loss_fn, train, val, validate_fn=42)


def test_default_validation_gives_the_numbers_of_evaluate(data):
    from deqreg_lite.evaluate import evaluate

    train, val = data
    method = make().eval()
    got = tr.validate_pairs(method, val, None)
    want = evaluate(method, val, memory=False, hd95=False).summary()
    for k in ("dice", "dice_std", "folding_pct", "folding_pct_std", "sdlogj", "sdlogj_std"):
        assert got[k] == want[k], k
    assert got["n"] == len(val) and got["time_s"] >= 0
