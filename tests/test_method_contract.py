"""The method contract (issue 9): an abstract base class, captured configs, from_checkpoint, the checkpoint format
version, ``steps=None`` = the trained steps, the typed ``MethodInfo``, HalfResolution as a method, and the layering
of ``pretrained``."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from deqreg_lite import checkpoints, config, pretrained
from deqreg_lite.datasets import load_sample
from deqreg_lite.methods import METHODS, DEQReg, HalfResolution, RegistrationMethod, Unrolling, build_method
from deqreg_lite.result import MethodInfo, RegistrationResult
from deqreg_lite.train import load_checkpoint, load_method, save_checkpoint
from deqreg_lite.warp import resize_image

PKG = Path(pretrained.__file__).resolve().parent
_missing = [n for n, ok in pretrained.available_pretrained().items() if not ok]


@pytest.fixture(scope="module")
def pair80():
    s = load_sample("brain2d")
    return resize_image(s["fixed"], (80, 96)), resize_image(s["moving"], (80, 96))


def _pair(size=(20, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *size, generator=g), torch.rand(1, 1, *size, generator=g)


# ---------------------------------------------------------------------------------------------------------------
# the abstract base class
# ---------------------------------------------------------------------------------------------------------------
def test_a_method_without_training_step_or_forward_fails_when_built():
    class NoTraining(RegistrationMethod):
        def forward(self, fixed, moving, steps=None, return_states=False):
            return RegistrationResult(disp=torch.zeros(1, 2, 4, 4))

    class NoForward(RegistrationMethod):
        def training_step(self, fixed, moving, loss_fn, backward=Tensor.backward):
            return {"loss": 0.0}

    with pytest.raises(TypeError, match="training_step"):
        NoTraining(2)
    with pytest.raises(TypeError, match="forward"):
        NoForward(2)
    with pytest.raises(TypeError, match="abstract"):
        RegistrationMethod(2)


def test_a_constructor_with_star_args_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"\*args"):
        class Starry(RegistrationMethod):  # noqa: F841
            def __init__(self, ndim, *sizes):
                super().__init__(ndim)


# ---------------------------------------------------------------------------------------------------------------
# captured configs
# ---------------------------------------------------------------------------------------------------------------
#: the dicts the five hand-kept config() methods returned before (checkpoints store them)
LEGACY = {
    "voxelmorph": {"ndim": 2},
    "unrolling": {"ndim": 2, "T": 3},
    "unrolling_ml": {"ndim": 2, "levels": 3, "steps_per_level": 3},
    "gradirn": {"ndim": 2, "levels": 3, "steps_per_level": 3, "eta_init": 1.0},
    "riir": {"ndim": 2, "T": 6, "hidden": 16, "use_grad": True},
    # + the recipe options added later (damping, jac_weight, jac_eps, ..., checkpoint_phantom); configs saved before
    # them (the shipped checkpoints of that time) lack them and rebuild with their defaults, the paper's undamped
    # solve without checkpointing
    "deqreg": {"ndim": 2, "T": 48, "S": 3, "gamma": 0.5, "K": 3, "tau": 0.5, "solver": "fixed_point", "tol": 1e-3,
               "damping": 1.0, "jac_weight": 0.0, "jac_eps": 1e-2, "leak": 0.0, "jac_power": 0,
               "jac_target": 0.0, "checkpoint_phantom": False, "inject_moving": False},
    "deqreg12": {"ndim": 2, "T": 12, "S": 0, "gamma": 0.5, "K": 3, "tau": 0.5, "solver": "fixed_point",
                 "tol": 1e-3, "damping": 1.0, "jac_weight": 0.0, "jac_eps": 1e-2, "leak": 0.0, "jac_power": 0,
               "jac_target": 0.0, "checkpoint_phantom": False, "inject_moving": False},
}
OPTIONS = {"voxelmorph": {}, "unrolling": {"T": 5}, "unrolling_ml": {"levels": 2, "steps_per_level": 4},
           "gradirn": {"levels": 2, "steps_per_level": 2, "eta_init": 0.5},
           "riir": {"T": 4, "hidden": 8, "use_grad": False},
           "deqreg": {"T": 10, "S": 2, "gamma": 1, "K": 2, "tau": 0.25, "solver": "anderson", "tol": 1e-4,
                      "damping": 0.5, "jac_weight": 0.1, "jac_eps": 0.05, "leak": 0.25},
           "deqreg12": {"T": 6, "tol": 0, "checkpoint_phantom": True}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_config_is_captured_and_round_trips(name):
    method = build_method(name, 2)
    assert method.config() == LEGACY[name]
    assert [type(v) for v in method.config().values()] == [type(v) for v in LEGACY[name].values()]
    custom = build_method(name, 2, **OPTIONS[name])
    cfg = custom.config()
    assert cfg == {"ndim": 2, **{k: v for k, v in LEGACY[name].items() if k != "ndim"}, **OPTIONS[name]}
    again = type(custom)(**cfg)
    assert again.config() == cfg and type(again) is type(custom)
    cfg["ndim"] = 3  # a copy: changing it does not change the method
    assert custom.config()["ndim"] == 2


def test_validated_values_are_recorded():
    assert build_method("deqreg", 2, gamma=1).config()["gamma"] == 1.0
    assert isinstance(build_method("deqreg", 2, gamma=1).config()["gamma"], float)


def test_from_checkpoint_round_trips_every_method(tmp_path):
    f, m = _pair()
    for name in sorted(METHODS):
        torch.manual_seed(0)
        method = build_method(name, 2, **OPTIONS[name]).eval()
        path = save_checkpoint(tmp_path / f"{name}.pt", method, rng=False)
        rebuilt = RegistrationMethod.from_checkpoint(path)
        assert type(rebuilt) is type(method) and rebuilt.config() == method.config() and not rebuilt.training
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(f, m).disp, method(f, m).disp, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'unrolling'.*not a DEQReg"):
        DEQReg.from_checkpoint(tmp_path / "unrolling.pt")
    assert type(Unrolling.from_checkpoint(tmp_path / "unrolling.pt")) is Unrolling
    with pytest.raises(TypeError, match="bogus"):
        RegistrationMethod.from_checkpoint(tmp_path / "deqreg.pt", bogus=1)
    assert RegistrationMethod.from_checkpoint(tmp_path / "deqreg.pt", tol=0.5).tol == 0.5


@pytest.mark.parametrize("name", pretrained.PRETRAINED)
def test_from_checkpoint_loads_every_shipped_checkpoint_like_load_pretrained(name, pair80):
    if name in _missing:
        pytest.fail(f"checkpoint {name}.pt is missing; make it with python scripts/train_pretrained.py --names {name}")
    path = pretrained.checkpoint_path(name)
    bare = RegistrationMethod.from_checkpoint(path)
    wrapped = pretrained.load_pretrained(name)
    assert type(bare) is type(wrapped.method) and bare.config() == wrapped.config()
    f, m = pair80
    with torch.no_grad():
        torch.testing.assert_close(bare(f, m).disp, wrapped.method(f, m).disp, rtol=0, atol=0)
        torch.testing.assert_close(load_method(path, "cpu")(f, m).disp, bare(f, m).disp, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint format version
# ---------------------------------------------------------------------------------------------------------------
def test_the_shipped_files_are_version_1_and_the_writer_writes_the_current_version(tmp_path):
    assert checkpoints.CHECKPOINT_VERSION == 1
    path = pretrained.checkpoint_path("voxelmorph")
    assert torch.load(path, weights_only=True)["version"] == 1
    out = save_checkpoint(tmp_path / "v.pt", build_method("voxelmorph", 2), rng=False)
    assert torch.load(out, weights_only=True)["version"] == checkpoints.CHECKPOINT_VERSION


def test_an_old_format_checkpoint_without_a_version_converts(tmp_path, pair80):
    raw = torch.load(pretrained.checkpoint_path("unrolling"), weights_only=True)
    old = {k: raw[k] for k in ("format", "name", "config", "model")}  # version 0: no version field, bare layout
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ckpt["version"] == 1 and ckpt["ndim"] == 2 and ckpt["history"] == [] and ckpt["extra"] == {}
    assert ckpt["iteration"] == 0 and ckpt["optimizer"] is None
    method = RegistrationMethod.from_checkpoint(tmp_path / "old.pt")
    f, m = pair80
    with torch.no_grad():
        torch.testing.assert_close(method(f, m).disp, pretrained.load_pretrained("unrolling").method(f, m).disp,
                                   rtol=0, atol=0)
    assert "version" not in torch.load(tmp_path / "old.pt", weights_only=True)  # the file is not rewritten


def test_a_newer_format_version_is_refused_by_name(tmp_path):
    raw = torch.load(pretrained.checkpoint_path("voxelmorph"), weights_only=True)
    torch.save({**raw, "version": checkpoints.CHECKPOINT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=r"new\.pt.*newer"):
        load_checkpoint(tmp_path / "new.pt")


# ---------------------------------------------------------------------------------------------------------------
# steps=None is the trained number of steps
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["voxelmorph", "unrolling", "unrolling_ml", "gradirn", "riir"])
def test_steps_none_equals_the_trained_steps(name):
    torch.manual_seed(0)
    method = build_method(name, 2).eval()
    f, m = _pair()
    with torch.no_grad():
        a, b = method(f, m), method(f, m, steps=method.trained_steps)
    torch.testing.assert_close(a.disp, b.disp, rtol=0, atol=0)
    assert a.info["steps"] == b.info["steps"] == method.trained_steps


@pytest.mark.parametrize("name", ["deqreg", "deqreg12"])
def test_deqreg_steps_none_is_the_documented_trained_solve(name, pair80):
    if name in _missing:
        pytest.fail(f"checkpoint {name}.pt is missing")
    method = pretrained.load_pretrained(name).method
    f, m = pair80
    with torch.no_grad():
        default = method(f, m)
        explicit = method(f, m, steps=method.trained_steps, tol=method.tol, policy="lowest")
        exact = method(f, m, steps=method.trained_steps)
        also_exact = method(f, m, steps=method.trained_steps, tol=0, policy="last")
    torch.testing.assert_close(default.disp, explicit.disp, rtol=0, atol=0)
    assert default.info["steps"] == explicit.info["steps"] and default.info["residuals"] == explicit.info["residuals"]
    assert default.info.extras["tol"] == method.tol and default.info.extras["policy"] == "lowest"
    torch.testing.assert_close(exact.disp, also_exact.disp, rtol=0, atol=0)
    assert exact.info["steps"] == method.trained_steps and exact.info.extras["policy"] == "last"


def test_deqreg_solve_options_are_checked():
    method = build_method("deqreg", 2, T=3)
    f, m = _pair()
    with pytest.raises(ValueError, match="policy"):
        method(f, m, policy="best")
    with pytest.raises(ValueError, match="tol"):
        method(f, m, tol=-1.0)
    with pytest.raises(TypeError):
        method(f, m, bogus=1)
    with pytest.raises(TypeError):  # the one-step and unrolled methods take no solve options
        build_method("unrolling", 2)(f, m, tol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the typed record
# ---------------------------------------------------------------------------------------------------------------
def test_info_is_a_typed_record_with_a_dict_view():
    torch.manual_seed(0)
    f, m = _pair()
    with torch.no_grad():
        vm = build_method("voxelmorph", 2)(f, m)
        un = build_method("unrolling", 2)(f, m)
        dq = build_method("deqreg", 2, T=4)(f, m)
    for res in (vm, un, dq):
        assert isinstance(res.info, MethodInfo)
        assert res.trace["residual"] is res.info.residuals  # stored once
    assert dict(vm.info) == {"steps": 1, "nfe": 1, "residuals": []} and "converged" not in vm.info
    assert un.info.steps == un.info["steps"] == 3 and un.info.get("converged") is None
    assert dq.info.converged is not None and dq.info.sample_steps == dq.info["sample_steps"] and \
        len(dq.info.sample_residual) == 1
    assert dq.info["solver"] == dq.info.extras["solver"] == "fixed_point" and "best_step" in dq.info
    un.info["note"] = "x"  # unknown keys go to extras, known ones to the fields
    un.info["steps"] = 7
    assert un.info.extras["note"] == "x" and un.info.steps == 7


def test_a_result_built_from_dicts_converts_and_keeps_its_curves():
    res = RegistrationResult(disp=torch.zeros(1, 2, 4, 4), trace={"energy": [3.0, 2.0], "residual": [0.5]},
                             info={"steps": 2, "lr": 0.1})
    assert res.info.residuals == [0.5] and res.info.steps == 2 and res.info.extras == {"lr": 0.1}
    assert set(res.trace) == {"energy", "residual"} and res.trace["energy"] == [3.0, 2.0]
    plain = RegistrationResult(disp=torch.zeros(1, 2, 4, 4), trace={"energy": [1.0]}, info={"lr": 0.1})
    assert set(plain.trace) == {"energy"} and dict(plain.info) == {"lr": 0.1}


# ---------------------------------------------------------------------------------------------------------------
# HalfResolution and the pretrained module
# ---------------------------------------------------------------------------------------------------------------
def test_half_resolution_is_a_registration_method_and_passes_solve_options_on():
    from deqreg_lite.pretrained import HalfResolution as Reexported

    assert Reexported is HalfResolution and issubclass(HalfResolution, RegistrationMethod)
    torch.manual_seed(0)
    inner = build_method("deqreg", 2, T=3)
    model = HalfResolution(inner)
    assert model.name == "deqreg" and model.trained_steps == 3 and model.config() == inner.config()
    f, m = _pair((40, 48))
    with torch.no_grad():
        res = model(f, m, steps=3, tol=0.5, policy="lowest")
    assert res.info["internal_size"] == (20, 24) and res.info["factor"] == 2 and res.info.extras["tol"] == 0.5


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("module", ["pretrained.py", "checkpoints.py", "result.py", "methods/base.py",
                                   "methods/resolution.py"])
def test_the_contract_rooms_import_nothing_from_the_training_floor(module):
    found = _imports(PKG / module)
    upward = {n for n in found if n.split(".")[-1] in ("train", "evaluate", "distributed", "__main__", "viz",
                                                        "widgets", "viewer")}
    assert not upward, (module, upward)
    if module == "checkpoints.py":  # floor 1: nothing from the package at all
        assert not {n for n in found if n.startswith(".")}, found


def test_the_checkpoints_folder_variable_is_read_in_config_only():
    read = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["']DEQREG_CHECKPOINTS_DIR""")
    readers = sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if read.search(p.read_text()))
    assert readers == ["config.py"]
    assert pretrained.checkpoints_dir is config.checkpoints_dir


def test_load_pretrained_no_longer_trains_and_says_which_script_does(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQREG_CHECKPOINTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"scripts/train_pretrained.py --names riir.*no longer trains"):
        pretrained.load_pretrained("riir", train_if_missing=True)
    assert list(tmp_path.iterdir()) == []
