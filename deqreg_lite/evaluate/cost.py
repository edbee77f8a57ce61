"""The training cost of a method: memory and wall time of one training step, measured without changing the method."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .._contexts import isolated_rng, module_mode, sync
from ..memory import SavedBytes

__all__ = ["training_memory", "training_cost", "sync"]


@contextlib.contextmanager
def _training_mode(method: nn.Module) -> Iterator[None]:
    """Train mode, fresh gradients, global RNGs untouched; restores the mode and every parameter's ``.grad``."""
    params = list(method.parameters())
    grads = [p.grad for p in params]
    try:
        with module_mode(method, True), isolated_rng():
            for p in params:
                p.grad = None
            yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g


def _default_loss() -> Callable:
    from ..losses import Objective

    return Objective("lncc", "diffusion", lam=1.0).energy


def training_memory(method: nn.Module, fixed: Tensor, moving: Tensor, loss_fn: Callable | None = None, *,
                    kind: str = "auto") -> int:
    """Memory of one training step of ``method`` on ``(fixed, moving)``, in bytes.

    * ``kind="saved"`` (the default on the CPU): the peak of the bytes saved for backward that are alive together
      during ``method.training_step``, counted with ``torch.autograd.graph.saved_tensors_hooks`` and
      de-duplicated by storage (parameters saved by convolutions count too). This is the part of training memory
      that grows with BPTT's T and stays flat for a DEQ; temporaries and the optimizer are not in it.
    * ``kind="cuda_peak"`` (the default on CUDA): ``torch.cuda.max_memory_allocated`` during the step (everything
      allocated, model and inputs included), as the paper's "Mem." column.

    The step runs in train mode; parameters and their ``.grad`` and the global RNG states are left as they were
    (no optimizer step is taken).

    Args:
        method: a RegistrationMethod.
        fixed, moving: ``(B, 1, *spatial)`` on the method's device.
        loss_fn: ``(fixed, moving, disp) -> scalar``; default ``1 - LNCC + 1.0 * diffusion``.
        kind: ``"auto"``, ``"saved"`` or ``"cuda_peak"``.
    """
    if kind not in ("auto", "saved", "cuda_peak"):
        raise ValueError(f"kind must be one of ('auto', 'saved', 'cuda_peak'), got {kind!r}")
    loss_fn = loss_fn if loss_fn is not None else _default_loss()
    if kind == "auto":
        kind = "cuda_peak" if fixed.device.type == "cuda" else "saved"
    if kind == "cuda_peak" and fixed.device.type != "cuda":
        raise ValueError(f"kind='cuda_peak' needs CUDA tensors, got them on {fixed.device}")
    with _training_mode(method):
        if kind == "cuda_peak":
            torch.cuda.synchronize(fixed.device)
            torch.cuda.reset_peak_memory_stats(fixed.device)
            method.training_step(fixed, moving, loss_fn)
            torch.cuda.synchronize(fixed.device)
            return int(torch.cuda.max_memory_allocated(fixed.device))
        with SavedBytes() as saved:
            method.training_step(fixed, moving, loss_fn)
        return int(saved.peak)


def training_cost(method: nn.Module, fixed: Tensor, moving: Tensor, loss_fn: Callable | None = None) -> dict:
    """``memory_bytes`` and ``memory_kind`` (:func:`training_memory`, which also warms up) and ``train_time_s``
    (wall time of one more training step, per pair), without changing the method."""
    loss_fn = loss_fn if loss_fn is not None else _default_loss()
    kind = "cuda_peak" if fixed.device.type == "cuda" else "saved"
    mem = training_memory(method, fixed, moving, loss_fn, kind=kind)
    with _training_mode(method):
        sync(fixed.device)
        t0 = time.perf_counter()
        method.training_step(fixed, moving, loss_fn)
        sync(fixed.device)
        elapsed = time.perf_counter() - t0
    return {"memory_bytes": mem, "memory_kind": "cuda_peak" if kind == "cuda_peak" else "saved_tensors",
            "train_time_s": elapsed / fixed.shape[0]}
