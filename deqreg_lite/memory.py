"""Measure training memory on any device: the bytes that autograd saves for backward.

On a CPU there is no ``max_memory_allocated``, and peak RSS hides the growth unless glibc is told otherwise (with
glibc's defaults large blocks are recycled out of sight of RSS; peak RSS, read via ``/proc/self/clear_refs``, agreed
with this count and the profiler only with ``MALLOC_MMAP_THRESHOLD_=65536`` set). What grows with backpropagation through time is the set of tensors autograd saves for
the backward pass, so we count those, once per storage (several saved tensors can share one).

    with SavedBytes() as mem:
        loss = model(x).sum()          # building the graph saves tensors
    loss.backward()                    # backward frees them
    mem.total, mem.peak                # bytes ever saved, bytes alive together at most
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

__all__ = ["SavedBytes"]


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

    def _pack(self, t: Tensor) -> _Box:
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())
        nbytes = storage.nbytes()
        if self._alive.get(key, 0) == 0:
            self.total += nbytes
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        self._alive[key] = self._alive.get(key, 0) + 1
        box = _Box(t.detach())
        weakref.finalize(box, self._release, key, nbytes)
        return box

    def _release(self, key: tuple, nbytes: int) -> None:
        self._alive[key] -= 1
        if self._alive[key] == 0:
            del self._alive[key]
            self.now -= nbytes

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda box: box.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
