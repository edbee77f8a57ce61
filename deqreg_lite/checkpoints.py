"""The checkpoint file format: writing, reading, and converting files of older format versions.

A checkpoint is a ``dict`` written with ``torch.save`` and read with ``torch.load(weights_only=True)`` (plain values
and tensors only). Format version :data:`CHECKPOINT_VERSION` (1) holds:

``format`` (``"deqreg_lite.checkpoint"``), ``version`` (1), ``name`` (the method's ``name``), ``ndim``, ``config``
(``method.config()``: the constructor arguments, ``ndim`` included; ``None`` when the module has none),
``trained_steps``, ``model`` (state dict), ``optimizer`` (state dict or None), ``scaler`` (GradScaler state or
None), ``iteration``, ``rng`` (``torch``, ``cuda`` (list or None), ``numpy`` (dict), ``python`` (tuple), or None),
``sampler`` (``seed``, ``batch_size``, ``position`` = samples drawn so far), ``history`` (list of dicts),
``trainer`` (the trainer's options), ``extra`` (e.g. ``factor`` and ``pretrained`` for the shipped models),
``torch_version``.

Versions: **0** is a file without a ``version`` field (the layout before the field existed: ``format``, ``name``,
``config``, ``model``, the rest optional); **1** is the layout above. :func:`load_checkpoint` converts every older
version to the current one in memory (:func:`upgrade_checkpoint`; the file is never rewritten) and refuses a newer
one with a ``ValueError`` that says so. Shipped files (``data/checkpoints/*.pt``) are version 1.

Writes are atomic: a temporary file ``.<name>.tmp`` in the same folder, then ``os.replace``; a crash mid-write
leaves the previous checkpoint intact. A corrupt or truncated file gives a ``ValueError`` that names the file.

This module sits on floor 1 (it imports only ``torch``, ``numpy`` and the standard library), so that
:meth:`RegistrationMethod.from_checkpoint <deqreg_lite.methods.base.RegistrationMethod.from_checkpoint>` (floor 2)
and the trainer (floor 3) share it.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "upgrade_checkpoint",
           "get_rng_state", "set_rng_state", "remove_stale_temps"]

CHECKPOINT_FORMAT = "deqreg_lite.checkpoint"
#: the format version that :func:`save_checkpoint` writes (files without a ``version`` field are version 0).
CHECKPOINT_VERSION = 1


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files that an interrupted :func:`save_checkpoint` left in ``folder`` (those of the
    checkpoint file ``name`` only, when given). Returns the paths removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stem = re.escape(name) if name is not None else r"[^/]+\.pt"
    pattern = re.compile(rf"\.{stem}(\.[A-Za-z0-9_]+)?\.tmp")  # ours: .NAME.tmp; older versions: .NAME.XXXX.tmp
    removed = []
    for p in folder.iterdir():
        if pattern.fullmatch(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed



# ---------------------------------------------------------------------------------------------------------------
# RNG states (all plain tensors, ints and tuples, so that checkpoints load with weights_only=True)
# ---------------------------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """The states of every random generator the training touches: torch CPU, CUDA (if any), NumPy, Python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`get_rng_state` returned (the CUDA part only when CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(f"the checkpoint holds {len(cuda)} CUDA RNG states, this machine has "
                          f"{torch.cuda.device_count()} devices; CUDA RNG states not restored", stacklevel=2)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))



# ---------------------------------------------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------------------------------------------
def _method_config(method: nn.Module) -> dict | None:
    try:
        cfg = method.config()
    except NotImplementedError:
        warnings.warn(f"{type(method).__name__}.config() is not implemented: the checkpoint cannot rebuild the "
                      "method with RegistrationMethod.from_checkpoint()", stacklevel=3)
        return None
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{type(method).__name__}.config() must return a dict, got {type(cfg).__name__}")
    return dict(cfg)


def save_checkpoint(path: str | os.PathLike, method: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    iteration: int = 0, history: Sequence[Mapping] | None = None, rng: bool = True,
                    sampler: Mapping | None = None, scaler: Any = None, trainer: Mapping | None = None,
                    extra: Mapping | None = None) -> Path:
    """Write a checkpoint atomically (temporary file ``.<name>.tmp`` in the same folder, then ``os.replace``).

    A temporary file of this checkpoint left by a killed process is removed first (it is never reused as data).

    Args:
        path: the checkpoint file (its folder is created).
        method: the registration method; its ``name``, ``ndim``, ``config()``, ``trained_steps`` and state dict
            are stored.
        optimizer: stored with its state dict when given.
        iteration: iterations done.
        history: the trainer's history (list of dicts of numbers and strings).
        rng: store the current RNG states (:func:`get_rng_state`).
        sampler: the data sampler's position (``seed``, ``batch_size``, ``position``).
        scaler: a ``torch.amp.GradScaler`` to store.
        trainer: the trainer's options, for the record.
        extra: anything else (plain Python values and tensors).
    Returns:
        the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "name": str(getattr(method, "name", type(method).__name__)), "ndim": getattr(method, "ndim", None),
        "config": _method_config(method), "trained_steps": getattr(method, "trained_steps", None),
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": int(iteration),
        "rng": get_rng_state() if rng else None,
        "sampler": dict(sampler) if sampler is not None else None,
        "history": [dict(r) for r in (history or [])],
        "trainer": dict(trainer) if trainer is not None else None,
        "extra": dict(extra) if extra is not None else {},
        "torch_version": str(torch.__version__),
    }
    remove_stale_temps(path.parent, path.name)
    tmp = path.parent / f".{path.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu", *,
                    name: str | None = None, weights_only: bool = True) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (of any format version up to
    :data:`CHECKPOINT_VERSION`; older ones are converted in memory by :func:`upgrade_checkpoint`).

    Args:
        path: the file, or a folder holding ``last.pt``.
        map_location: where tensors go (default the CPU).
        name: when given, the method name the checkpoint must hold.
        weights_only: load with ``torch.load(weights_only=True)`` (safe; our checkpoints need nothing more).
            Pass False only for a trusted file whose ``config`` holds custom objects.
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is corrupt or truncated, is not a deqreg_lite checkpoint, has a newer format
            version, or holds a method other than ``name`` (the message names the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        hint = f"; checkpoints in {path.parent}: {near}" if near else ""
        raise FileNotFoundError(f"no checkpoint at {path}{hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # pickle, zip, EOF and torch errors: one clear message naming the file
        text = str(exc)
        if weights_only and "Unsupported global" in text:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = found.group(1) if found else "a Python object"
            raise ValueError(f"checkpoint {path} holds {what}, which is neither a tensor nor a plain value, so it "
                             "is not loaded by default; if you made this file yourself and trust it, "
                             "load_checkpoint(path, weights_only=False) reads it") from None
        size = path.stat().st_size
        raise ValueError(f"checkpoint {path} ({size} bytes) cannot be read: it is corrupt or truncated (an "
                         f"interrupted copy or download?) [{type(exc).__name__}]; copy or make it again, or use "
                         "another checkpoint of the run") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a deqreg_lite checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    ckpt = upgrade_checkpoint(ckpt, path)
    if name is not None and ckpt["name"] != name:
        raise ValueError(f"checkpoint {path} holds a {ckpt['name']!r} model, not {name!r}; load it into a "
                         f"{ckpt['name']!r} method (RegistrationMethod.from_checkpoint({str(path)!r}) rebuilds it)")
    return ckpt


# ---------------------------------------------------------------------------------------------------------------
# format versions
# ---------------------------------------------------------------------------------------------------------------
def _v0_to_v1(ckpt: dict) -> dict:
    """Version 0 (no ``version`` field; only ``format``, ``name``, ``model`` sure to be there) -> version 1: the
    missing fields get their empty values, ``ndim`` comes from ``config``, ``trained_steps`` is unknown."""
    out = dict(ckpt)
    config = out.get("config")
    out.setdefault("ndim", config.get("ndim") if isinstance(config, Mapping) else None)
    for key, empty in (("config", None), ("trained_steps", None), ("optimizer", None), ("scaler", None),
                       ("iteration", 0), ("rng", None), ("sampler", None), ("trainer", None),
                       ("torch_version", "unknown")):
        out.setdefault(key, empty)
    out["history"] = list(out.get("history") or [])
    out["extra"] = dict(out.get("extra") or {})
    out["version"] = 1
    return out


#: ``{version: converter to version + 1}``; a format change adds one entry here and bumps CHECKPOINT_VERSION.
_UPGRADES: dict[int, Callable[[dict], dict]] = {0: _v0_to_v1}


def upgrade_checkpoint(ckpt: Mapping, path: str | os.PathLike = "<checkpoint>") -> dict:
    """Convert a checkpoint dict of any older format version to :data:`CHECKPOINT_VERSION` (a new dict; the
    input is not changed). A dict without a ``version`` field is version 0.

    Raises:
        ValueError: the version is newer than this library's, or not an integer (the message names ``path``).
    """
    version = ckpt.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"checkpoint {path} has format version {version!r}, not an integer >= 0")
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {version}, newer than this deqreg_lite's "
                         f"({CHECKPOINT_VERSION}); update deqreg_lite to read it")
    out = dict(ckpt)
    while version < CHECKPOINT_VERSION:
        out = _UPGRADES[version](out)
        version = out["version"]
    return out
