"""The baselines are registration methods behind the learned methods' interface; the one runner adapter
(``as_method``); the shared mode and RNG blocks (``deqreg_lite._contexts``)."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from deqreg_lite import evaluate as ev
from deqreg_lite._contexts import eval_mode, isolated_rng, module_mode
from deqreg_lite.classical import register
from deqreg_lite.datasets import brain_pairs
from deqreg_lite.methods import RegistrationMethod
from deqreg_lite.methods.baselines import (AnyNdim, ClassicalBaseline, ElastixBaseline, IdentityBaseline,
                                           classical_method, elastix_available, identity_method)
from deqreg_lite.result import RegistrationResult

SIZE = (32, 32)


@pytest.fixture(scope="module")
def pairs():
    return list(brain_pairs("val", n=2, size=SIZE))


def test_baselines_are_registration_methods_with_nothing_to_train(pairs):
    f, m = pairs[0]["fixed"], pairs[0]["moving"]
    for method in (IdentityBaseline(2), ClassicalBaseline(2, iterations=3)):
        assert isinstance(method, RegistrationMethod) and list(method.parameters()) == []
        assert isinstance(method(f, m), RegistrationResult)
        with pytest.raises(TypeError, match="nothing to train"):
            method.training_step(f, m, lambda *a: torch.zeros(()))
    assert identity_method.name == "identity" and classical_method().name == "classical"
    assert ClassicalBaseline(2, iterations=3).config() == {"ndim": 2, "name": "classical", "iterations": 3,
                                                           "progress": False}


def test_identity_gives_zero_for_any_ndim_and_checks_it():
    for shape in ((1, 1, 6, 7), (2, 1, 4, 5, 6)):
        x = torch.rand(shape)
        r = identity_method(x, x, return_states=True)
        assert r.disp.shape == (shape[0], len(shape) - 2, *shape[2:]) and not r.disp.any()
        assert r.state_steps == [0] and r.info["steps"] == 0
    assert isinstance(identity_method.method(3), IdentityBaseline) and identity_method.method(3).ndim == 3
    with pytest.raises(ValueError, match="3 spatial axes"):
        IdentityBaseline(3)(torch.rand(1, 1, 6, 7), torch.rand(1, 1, 6, 7))


def test_classical_baseline_is_classical_register(pairs):
    f, m = pairs[0]["fixed"], pairs[0]["moving"]
    kw = dict(lam=1.0, iterations=[3, 4], levels=2)
    ref = register(f, m, progress=False, **kw)
    with torch.no_grad():  # it enables gradients itself
        got = ClassicalBaseline(2, **kw)(f, m)
    assert torch.equal(got.disp, ref.disp) and got.info["steps"] == 4
    # steps sets the finest level's iterations; return_states records each of them
    r = classical_method(**kw)(f, m, steps=2, return_states=True)
    assert r.info["steps"] == 2 and r.state_steps == [0, 1, 2]
    assert torch.equal(r.disp, register(f, m, progress=False, lam=1.0, iterations=[3, 2], levels=2).disp)
    with pytest.raises(TypeError, match="record_every"):
        classical_method(record_every=2)


def test_a_baseline_module_evaluates_like_its_factory_without_a_training_cost(pairs):
    a = ev.evaluate(IdentityBaseline(2), pairs)  # memory=True: a method with no parameters has no training cost
    b = ev.evaluate(identity_method, pairs)
    assert "memory_bytes" not in a.info and a.name == b.name == "identity"
    for ra, rb in zip(a.rows, b.rows):
        assert {k: v for k, v in ra.items() if k != "time_s"} == {k: v for k, v in rb.items() if k != "time_s"}


def test_elastix_baseline_without_itk_says_how_to_install():
    if elastix_available():
        pytest.skip("itk-elastix is installed")
    with pytest.raises(ImportError, match="pip install itk-elastix"):
        ElastixBaseline(2)


def test_as_method_is_the_one_call(pairs):
    f, m = pairs[0]["fixed"], pairs[0]["moving"]
    seen = []

    def plain(fixed, moving):
        seen.append(torch.is_grad_enabled())
        return torch.zeros(1, 2, *fixed.shape[2:])

    call = ev.as_method(plain)
    assert call.name == "plain" and call.module is None and call.device is None and not call.trainable
    assert isinstance(call(f, m), RegistrationResult) and seen == [True]  # callables run with gradients
    with pytest.raises(TypeError, match="steps"):
        call(f, m, steps=2)  # only the options asked for are passed; plain takes none
    with pytest.raises(TypeError, match="return_states"):
        call(f, m, return_states=True)
    with pytest.raises(TypeError, match="RegistrationResult"):
        ev.as_method(lambda a, b: "nope")(f, m)
    with pytest.raises(TypeError, match="callable"):
        ev.as_method(3)
    assert ev.as_method(IdentityBaseline(2)).module is not None and not ev.as_method(IdentityBaseline(2)).trainable
    assert ev.as_method(plain, "cpu").device == torch.device("cpu")
    assert isinstance(identity_method, AnyNdim)


def test_module_mode_puts_the_mode_back_even_on_an_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    net.train()
    with pytest.raises(RuntimeError):
        with eval_mode(net):
            assert not net.training and not net[1].training
            raise RuntimeError
    assert net.training and net[1].training
    net.eval()
    with module_mode(net, True):
        assert net.training
    assert not net.training
    with eval_mode(None):  # nothing to switch
        pass


def test_isolated_rng_leaves_every_generator_as_it_was():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    with isolated_rng():
        torch.rand(5), np.random.rand(5), random.random()
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
