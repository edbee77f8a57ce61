"""deqreg_lite: deformable image registration as a deep equilibrium model, small and readable.

Modules, ground floor first. Each imports only from the floors below it and, on its own floor, from the rooms
listed before it (more primitive); nothing imports upward, lazily or not (``tests/test_layering.py`` checks this):

* floor 0, stateless maths and settings: ``config`` (every environment variable), ``_checks`` (every shared input
  check), ``_contexts`` (eval mode and isolated RNG state for a block), ``memory``, ``warp``, ``result``,
  ``losses`` (the one ``Objective``), ``metrics``, ``solvers`` (and the one relative residual);
* floor 1, data and machinery: ``nets``, ``deq``, ``checkpoints``, ``datasets`` (synthetic, samples, pairs,
  volumes, download, Learn2Reg file I/O, OASIS, NLST);
* floor 2, registration methods: ``classical`` (Eq. 2), ``methods`` (the learned methods, their loss and the
  baselines), ``pretrained`` (loads the shipped checkpoints);
* floor 3, driving methods over data: ``train`` (``Trainer``; takes a validation function), ``distributed``,
  ``evaluate`` (tables, running methods over pairs, statistics, training cost);
* floor 4, showing results: ``viz``, ``viewer``, ``widgets``;
* floor 5, entry points: ``presets`` (per-dataset settings), ``__main__`` (the command line); outside the package,
  ``notebooks/``, ``benchmarks/`` and ``scripts/`` use the public API only.
"""
from importlib import import_module as _import_module

__version__ = "0.1.0"

_SUBMODULES = ("config", "warp", "losses", "metrics", "solvers", "deq", "nets", "datasets", "classical", "methods",
               "train", "evaluate", "pretrained", "viz", "widgets", "presets")


def __getattr__(name: str):
    # Lazy sub-modules keep `import deqreg_lite` fast and let `deqreg_lite.viz` load matplotlib only when asked.
    if name in _SUBMODULES:
        return _import_module(f"{__name__}.{name}")
    if name == "load_sample":
        return _import_module(f"{__name__}.datasets").load_sample
    if name == "load_pretrained":
        return _import_module(f"{__name__}.pretrained").load_pretrained
    if name == "register":
        return _import_module(f"{__name__}.classical").register
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + ["load_sample", "register", "load_pretrained"])
