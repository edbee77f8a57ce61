"""The floors of deqreg_lite (issue 9): no module imports from a floor above its own, lazily (inside a function) or
not, and on its own floor only from rooms that are more primitive (listed before it in :data:`FLOORS`).

Every module of the package must be placed in :data:`FLOORS`; a new file that is not fails
:func:`test_every_module_is_placed` until it is given a floor. The map follows ``deqreg_lite/__init__.py``'s floor
list. Modules that other work on issue 9 adds (``checkpoints``, ``methods.resolution``, ``methods.baselines``, the
``evaluate`` package, ``datasets.learn2reg``) are placed already; a placed module that does not exist is fine.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "deqreg_lite"

#: floor -> its rooms, most primitive first. A room may import any room of a lower floor and the rooms listed
#: before it on its own floor. ``deqreg_lite`` itself (the package's lazy ``__init__``) is the top: nothing imports it.
FLOORS: dict[int, list[str]] = {
    0: ["config", "_checks", "_contexts", "memory", "warp", "result", "losses", "metrics", "solvers"],
    1: ["nets", "deq", "checkpoints",
        "datasets._nifti", "datasets.synthetic", "datasets.samples", "datasets.pairs", "datasets.volumes", "datasets.download",
        "datasets.learn2reg", "datasets.oasis", "datasets.nlst", "datasets"],
    2: ["classical",
        "methods.base", "methods._common", "methods.loss", "methods.voxelmorph", "methods.unrolling",
        "methods.gradirn", "methods.riir", "methods.deqreg", "methods.resolution", "methods.baselines", "methods",
        "pretrained"],
    3: ["train", "distributed",
        "evaluate.stats", "evaluate.tables", "evaluate.cost", "evaluate.run", "evaluate"],
    4: ["viz", "viewer", "widgets"],
    5: ["presets", "__main__"],
    6: [""],  # the package itself
}
RANK = {name: (floor, i) for floor, rooms in FLOORS.items() for i, name in enumerate(rooms)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` for every import of a deqreg_lite module in ``path``, at any depth of the code."""
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    package = [p for p in package if p]
    known = modules()
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "deqreg_lite" or alias.name.startswith("deqreg_lite."):
                    out.append((node.lineno, alias.name[len("deqreg_lite."):] if "." in alias.name else ""))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "deqreg_lite" or node.module.startswith("deqreg_lite.")):
                mod = node.module[len("deqreg_lite."):] if "." in node.module else ""
            else:
                continue
            for alias in node.names:  # `from . import train` imports the module deqreg_lite.train
                sub = f"{mod}.{alias.name}" if mod else alias.name
                out.append((node.lineno, sub if sub in known else mod))
    return sorted(set(out))


def test_every_module_is_placed():
    unplaced = sorted(n for n in modules() if n not in RANK)
    assert not unplaced, f"give these modules a floor in tests/test_layering.py (and deqreg_lite/__init__.py): " \
                         f"{unplaced}"


def test_no_module_imports_upward():
    bad = []
    for name, path in modules().items():
        if name not in RANK:
            continue
        floor, pos = RANK[name]
        for line, target in imports_of(name, path):
            if target == name:
                continue
            if target not in RANK:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports unplaced module {target!r}")
                continue
            t_floor, t_pos = RANK[target]
            if t_floor > floor or (t_floor == floor and t_pos > pos):
                where = "a higher floor" if t_floor > floor else "a less primitive room of its own floor"
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({name}, floor {floor}) imports "
                           f"{target or 'deqreg_lite'} (floor {t_floor}), {where}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # a lazy import inside a function, written relative to a sub-package, is still found
    src = tmp_path / "probe.py"
    src.write_text("def f():\n    from ..evaluate import evaluate\n    from . import base\n")
    found = imports_of("methods.probe", src)
    assert (2, "evaluate") in found and (3, "methods.base") in found


def test_train_does_not_import_evaluate():
    targets = {t for _, t in imports_of("train", ROOT / "train.py")}
    assert not any(t == "evaluate" or t.startswith("evaluate.") for t in targets)


# ------------------------------------------------------------------ docs that point inside the repository (issue 9)
def test_no_reference_to_files_outside_the_repository():
    # shared/lessons.md and shared/datasets.md are not part of the repository: facts users need are in its own docs
    repo = ROOT.parent
    files = [*ROOT.rglob("*.py"), *(repo / "notebooks").glob("*.py"), *(repo / "scripts").glob("*"),
             *(repo / "benchmarks").glob("*.py")]
    bad = [f"{p.relative_to(repo)}:{i}" for p in files if p.is_file()
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if "shared/lessons" in line or "shared/datasets" in line]
    assert not bad, bad


def test_distributed_uses_the_trainers_hook():
    from deqreg_lite import distributed, train

    assert "_step" not in vars(distributed.DistributedTrainer)  # the step is the trainer's, not a copy
    assert "_after_backward" in vars(train.Trainer) and "_after_backward" in vars(distributed.DistributedTrainer)
    assert "no hook" not in distributed.__doc__


# ------------------------------------------------------------------------------ one home per helper (issue 9)
def test_helpers_have_one_home():
    import torch

    from deqreg_lite import _checks, classical, deq, metrics, solvers, train, viewer
    from deqreg_lite.datasets import synthetic
    from deqreg_lite.methods import _common

    assert _common.rel_residual is solvers.rel_residual and deq.Map is solvers.Map
    assert metrics._spacing is _checks.check_spacing and synthetic._check_int is _checks.check_int
    assert viewer._spacing([2.0], 3).tolist() == metrics._spacing(2.0, 3).tolist() == [2.0] * 3
    for check in (lambda v: train._check_int(v, "n", 1), lambda v: _common.check_count(v, "n"),
                  lambda v: _checks.check_int(v, "n", 1)):
        assert check(3) == 3
        for bad in (0, True, 2.0, "3"):
            with pytest.raises(ValueError, match="n must be an integer >= 1"):
                check(bad)
    # one bool check: every switch of the library refuses 0/1, strings and None with the same message
    from deqreg_lite.evaluate import evaluate
    from deqreg_lite.methods import build_method
    from deqreg_lite.methods.riir import RIIR

    tiny = torch.rand(1, 1, 8, 8)
    switches = {"check_bool": lambda v: _checks.check_bool(v, "flag"),
                "deq.check_checkpoint": lambda v: deq.check_checkpoint(v, "flag"),
                "DEQReg(inject_moving=)": lambda v: build_method("deqreg", 2, inject_moving=v),
                "RIIR(use_grad=)": lambda v: RIIR(2, use_grad=v),
                "DEQReg.forward(certificate=)": lambda v: build_method("deqreg", 2)(tiny, tiny, certificate=v),
                "evaluate(certificate=)": lambda v: evaluate(build_method("voxelmorph", 2), [], certificate=v)}
    for where, check in switches.items():
        for bad in (0, 1, "yes", None):
            with pytest.raises(ValueError, match=r"must be True or False, got"):
                check(bad)
    assert _checks.check_bool(False, "flag") is False
    with pytest.raises(ValueError, match="steps must be an integer >= 1 or None"):
        _common.check_steps(0, 5)
    assert _common.check_steps(None, 5) == 5
    with pytest.raises(ValueError, match="levels must be an integer >= 1"):
        classical.register(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), levels=0)
    # the solvers' trace is the one relative residual, epsilon 1e-9
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 5, 5, generator=g)
    f = lambda z: 0.5 * z + a
    z0 = torch.zeros_like(a)
    _, info = solvers.fixed_point(f, z0, max_iter=3, tol=0.0)
    z, expected = z0, []
    for _ in range(3):
        fz = f(z)
        expected.append(solvers.rel_residual(fz, z))
        z = fz
    assert info.rel_trace == expected
    num = (f(z0) - z0).reshape(3, -1).norm(dim=1)
    assert expected[0] == float((num / (f(z0).reshape(3, -1).norm(dim=1) + 1e-9)).max())
