"""deqreg_lite: deformable image registration as a deep equilibrium model, small and readable.

Modules, ground floor first (each imports only from the floors below it):

* ``config``, ``warp``, ``losses``, ``metrics``, ``solvers`` - stateless maths and settings;
* ``datasets``, ``deq`` - data and the deep-equilibrium machinery;
* ``classical`` - gradient-descent registration (Eq. 2);
* ``viz``, ``widgets`` - figures and notebook widgets.
"""
from importlib import import_module as _import_module

__version__ = "0.1.0"

_SUBMODULES = ("config", "warp", "losses", "metrics", "solvers", "deq", "nets", "datasets", "classical", "methods",
               "train", "evaluate", "pretrained", "viz", "widgets")


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
