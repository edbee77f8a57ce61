"""The learned registration methods, all behind one interface (:mod:`deqreg_lite.methods.base`).

============  ===================================================================  ============================
name          update                                                                training
============  ===================================================================  ============================
voxelmorph    ``disp = UNet([If, Im])`` (one step)                                  loss on the output
unrolling_ml  ``phi += CNN_l([If, Im o phi, phi])``, 3 levels x 3 (the paper's        BPTT, loss on the last step
              Unrolling: GraDIRN without similarity gradients, Eq. 3 per level)
unrolling     ``phi += UNet([If, Im o phi, phi])``, one level, T = 3 (Eq. 3); an    BPTT, loss on the last step
              extra, not the paper's baseline (the shipped ``unrolling.pt``)
gradirn       ``phi += CNN_l([If, Im o phi, phi, g]) - eta_l g``, 3 levels x 3      BPTT, loss on the last step
riir          ConvGRU over U-Net features of ``[If, Im o phi, phi, g]``, T = 6      BPTT, Eq. 4:
                                                                                    ``L(phi_T) + sum_t w_t L(phi_t)``
deqreg        fixed point of ``phi + UNet([If, Im o phi, phi])``, T = 48, S = 3     phantom gradient, Eq. 9
deqreg12      the same with T = 12, S = 0                                           phantom gradient
============  ===================================================================  ============================

For ``unrolling_ml`` and ``gradirn``, ``steps`` at test time is the number of steps at the finest level.

``build_method(name, ndim, **kwargs)`` builds one by name; ``method.config()`` gives the kwargs back, recorded
automatically when the method is built (``build_method(method.name, **method.config())`` rebuilds it), and
``RegistrationMethod.from_checkpoint(path)`` rebuilds a saved one with its weights. What ``steps=None`` and
``steps=t`` mean for each method is tabulated in :mod:`deqreg_lite.methods.base`. :class:`HalfResolution`
(:mod:`deqreg_lite.methods.resolution`) runs any of them at a coarser resolution. The baselines (no registration, classical gradient descent,
elastix) are methods behind the same interface, in :mod:`deqreg_lite.methods.baselines`; they have nothing to
train and are not in :data:`METHODS`. The training loss lives in
:mod:`deqreg_lite.methods.loss` (:class:`RegistrationLoss`, default ``lam = 1`` in voxel units).
"""
from __future__ import annotations

import inspect

from .base import Backward, LossFn, RegistrationMethod, registered_methods
from .baselines import (AnyNdim, BaselineMethod, ClassicalBaseline, ElastixBaseline, IdentityBaseline,
                        classical_method, elastix_method, identity_method)
from .deqreg import DEQReg, DEQReg12, deqreg12
from .gradirn import GraDIRN, MultiLevelUnrolling
from .loss import RegistrationLoss
from .resolution import HalfResolution
from .riir import RIIR
from .unrolling import Unrolling
from .voxelmorph import VoxelMorph

__all__ = ["RegistrationMethod", "LossFn", "Backward", "VoxelMorph", "Unrolling", "MultiLevelUnrolling", "GraDIRN",
           "RIIR", "DEQReg", "DEQReg12", "deqreg12", "RegistrationLoss", "METHODS", "build_method", "HalfResolution",
           "registered_methods", "BaselineMethod", "IdentityBaseline", "ClassicalBaseline", "ElastixBaseline",
           "AnyNdim", "identity_method", "classical_method", "elastix_method"]

METHODS: dict[str, type[RegistrationMethod]] = {
    "voxelmorph": VoxelMorph, "unrolling": Unrolling, "unrolling_ml": MultiLevelUnrolling, "gradirn": GraDIRN,
    "riir": RIIR, "deqreg": DEQReg, "deqreg12": DEQReg12}


def build_method(name: str, ndim: int, **kwargs) -> RegistrationMethod:
    """Build the method called ``name`` (a key of :data:`METHODS`) for ``ndim`` (2 or 3) with its options.

    Raises:
        ValueError: for an unknown name (the message lists the known ones) or a bad option value.
        TypeError: for an option the method does not take (the message lists the ones it takes).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "ndim")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"{name} got unknown option(s) {unknown}; it takes {valid}")
    return cls(ndim, **kwargs)
