"""Measure training memory on any device: the bytes that autograd saves for backward.

On a CPU there is no ``max_memory_allocated``, and peak RSS hides the growth unless glibc is told otherwise (with
glibc's defaults large blocks are recycled out of sight of RSS; peak RSS, read via ``/proc/self/clear_refs``, agreed
with this count and the profiler only with ``MALLOC_MMAP_THRESHOLD_=65536`` set). What grows with backpropagation through time is the set of tensors autograd saves for
the backward pass, so we count those, once per storage (several saved tensors can share one).

    with SavedBytes() as mem:
        loss = model(x).sum()          # building the graph saves tensors
    loss.backward()                    # backward frees them
    mem.total, mem.peak                # bytes ever saved, bytes alive together at most

Activation checkpointing (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``) hides the tensors of
its region from these hooks: in the forward they are replaced by placeholders (only the region's inputs are saved,
and counted), and in the backward the region is run again under checkpoint's own hooks, which keep the recomputed
tensors until they are used. To count those too, a checkpointed region passes
``context_fn=recompute_context`` (as :func:`deqreg_lite.deq.phantom` does with ``checkpoint=True``): every
tensor that the recomputation saves is then counted, in every active :class:`SavedBytes`, from the moment it is
recomputed until it is freed, so ``peak`` includes the recomputed region's activations during its backward, as
on a GPU they would be.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedBytes", "recompute_context"]

#: the SavedBytes contexts entered and not yet left, innermost last
_ACTIVE: list["SavedBytes"] = []


class _Box:
    """A saved tensor, held detached: keeping the tensor itself would tie it to its own graph in a reference
    cycle (through its ``grad_fn``), and the graph would never be freed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedBytes:
    """Context manager that counts the bytes saved for backward while it is active, de-duplicated by storage.

    Attributes:
        total: bytes of every distinct storage saved while active (a storage freed and reused counts again).
        now: bytes of the saved storages still alive (they are freed when their graph is).
        peak: the largest ``now`` seen: the memory of the graphs that were alive together.
    """

    def __init__(self) -> None:
        self.total = self.now = self.peak = 0
        self._alive: dict[tuple, int] = {}
        self._hooks = None

    def _count(self, t: Tensor, holder: Any) -> None:
        """Count ``t``'s storage as saved until ``holder`` (an object that keeps it) is garbage."""
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())
        nbytes = storage.nbytes()
        if self._alive.get(key, 0) == 0:
            self.total += nbytes
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        self._alive[key] = self._alive.get(key, 0) + 1
        weakref.finalize(holder, self._release, key, nbytes)

    def _pack(self, t: Tensor) -> _Box:
        box = _Box(t.detach())
        self._count(t, box)
        return box

    def _release(self, key: tuple, nbytes: int) -> None:
        self._alive[key] -= 1
        if self._alive[key] == 0:
            del self._alive[key]
            self.now -= nbytes

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda box: box.tensor)
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(*exc)
        self._hooks = None


_warned = [False]


class _CountRecomputed:
    """While a checkpointed region is recomputed: count what checkpoint's own hooks keep, in every active
    :class:`SavedBytes`, and leave the keeping to them. Re-enterable (a region can be recomputed more than once,
    e.g. by a second ``backward`` with ``retain_graph=True``)."""

    def __init__(self) -> None:
        self._stack: list = []

    def __enter__(self) -> None:
        hooks = None
        if _ACTIVE:
            top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private: guarded
            try:
                hooks = top(True) if top is not None else None
            except Exception:  # a torch whose private function changed: measure without the recomputation
                hooks = None
            if hooks is None and not _warned[0]:
                _warned[0] = True
                warnings.warn("SavedBytes cannot see the tensors that activation checkpointing recomputes with "
                              "this torch version: the peak it reports leaves them out", RuntimeWarning,
                              stacklevel=2)
        if hooks is None:
            self._stack.append(None)
            return
        inner_pack, inner_unpack = hooks
        counters = list(_ACTIVE)

        def pack(t: Tensor) -> Any:
            # checkpoint keeps ``t.detach()`` (``t`` when it needs no grad); handing it that very tensor lets us
            # follow its life, and counting first still counts the last one, after which checkpoint stops the
            # recomputation by raising
            kept = t.detach() if t.requires_grad else t
            for counter in counters:
                counter._count(kept, kept)
            return inner_pack(kept)

        ctx = torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack)
        ctx.__enter__()
        self._stack.append(ctx)

    def __exit__(self, *exc) -> None:
        ctx = self._stack.pop()
        if ctx is not None:
            ctx.__exit__(*exc)


def recompute_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=...)``
    that lets every active :class:`SavedBytes` count the tensors the checkpointed region saves when it is
    recomputed in the backward (nothing changes when none is active). Returns ``(forward context, recompute
    context)``."""
    return contextlib.nullcontext(), _CountRecomputed()
