"""Blocks that leave global state as they found it (floor 0): the random generators, and a module's train/eval mode.

* :func:`isolated_rng` - run a block without changing any global RNG state (torch CPU, CUDA, NumPy, Python);
* :func:`module_mode` / :func:`eval_mode` - run a block with a module in train or eval mode, then put back the
  mode it had;
* :func:`sync` - wait for a CUDA device's queued work, so that a wall-clock time covers it (nothing on the CPU).
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["isolated_rng", "module_mode", "eval_mode", "sync"]


def sync(device: torch.device | None) -> None:
    """Wait for the CUDA device's queued work (for timing); nothing on the CPU or for ``None``."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without changing any global RNG state (torch CPU, every CUDA device, NumPy, Python).

    Draws inside the block still change the generators there; they are restored when it ends, even on an error.
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextlib.contextmanager
def module_mode(module: nn.Module | None, training: bool) -> Iterator[None]:
    """Run a block with ``module.train(training)``; afterwards (even on an error) the module gets back the mode
    that ``module.training`` had before, for itself and all its sub-modules. ``None``: nothing to switch."""
    if module is None:
        yield
        return
    was_training = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was_training)


def eval_mode(module: nn.Module | None) -> contextlib.AbstractContextManager[None]:
    """``module_mode(module, False)``: eval mode for the block, the previous mode after it."""
    return module_mode(module, False)
