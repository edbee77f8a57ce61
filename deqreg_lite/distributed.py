"""Data-parallel training under ``torchrun``: the same command on N processes, one batch split N ways.

Launch::

    torchrun --nproc_per_node 4 -m deqreg_lite train --dataset oasis --method deqreg --batch-size 4 --out runs/oasis

(``python -m torch.distributed.run`` is the same launcher.) Without ``torchrun`` everything here is a no-op and the
command trains in one process.

Design
------
* :func:`init_from_env` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by torchrun) and starts the process
  group: ``nccl`` on CUDA (each process on ``cuda:LOCAL_RANK``), ``gloo`` on the CPU.
* Data: ``--batch-size`` is the **global** batch. Batch ``i`` is still :func:`deqreg_lite.train.batch_indices`
  ``(seed, i, global_batch, n)``, a function of ``(seed, iteration)`` only; rank ``r`` takes the ``r``-th
  contiguous slice of it (:func:`rank_indices`). So a checkpoint resumes with any world size that divides the
  global batch, and N processes see exactly the pairs one process would.
* Gradients: the methods compute their own backward inside ``training_step`` (DEQReg back-propagates several
  terms, one ``backward`` call each, and its phantom gradient runs extra graph pieces). ``DistributedDataParallel``
  fits that badly: it fires its all-reduce inside each ``backward`` of the wrapped module's *forward* outputs and
  expects one forward/backward pair per step (``no_sync`` on all but the last backward, with ``find_unused_parameters``
  for the pieces a given term does not reach, is brittle and method-specific). Instead, after ``training_step``
  returns, :func:`average_gradients` all-reduces (sums, then divides by the world size) every parameter's
  accumulated ``.grad`` in one flat buffer. As every loss is a mean over the batch and the shards have equal size,
  the result equals the gradient of the whole batch in one process (the test checks this to float round-off). A
  parameter no term reached gets a zero gradient on that rank, so every rank joins the same collective.
* Under AMP the scaled gradients are averaged before the GradScaler unscales them; an inf on any rank spreads to
  all, so every rank skips the same steps and the scaler states stay equal.
* Only rank 0 writes checkpoints and logs, validates and shows a progress bar; every rank keeps the history rows
  of its own training so that the loop runs identically. Parameters are broadcast from rank 0 at the start (and
  after a resume), so all ranks start equal even with different initial seeds.

:class:`DistributedTrainer` subclasses :class:`deqreg_lite.train.Trainer` and overrides ``_batch`` and
``_after_backward``: the trainer's hook between ``training_step`` (the gradients are in ``.grad``) and gradient
clipping and the optimizer step. Here it averages the gradients and the step's stats across the processes; the
training step itself is the trainer's, not a copy.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .train import Trainer, batch_indices

__all__ = ["init_from_env", "is_distributed", "is_main", "rank", "world_size", "barrier", "cleanup",
           "rank_indices", "average_gradients", "broadcast_parameters", "DistributedTrainer"]


def is_distributed() -> bool:
    """Whether a process group is running (``init_from_env`` found torchrun's variables)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, and in a plain (not distributed) run."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(backend: str | None = None) -> dict:
    """Start the process group from torchrun's environment; a no-op when ``WORLD_SIZE`` is unset or 1.

    Args:
        backend: default ``nccl`` when CUDA is available, else ``gloo``.
    Returns:
        ``{"distributed", "rank", "world_size", "local_rank", "device", "backend"}``; ``device`` is
        ``cuda:LOCAL_RANK`` under nccl (also made the current CUDA device), else None (the default device).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1 or not dist.is_available():
        return {"distributed": False, "rank": 0, "world_size": 1, "local_rank": 0, "device": None, "backend": None}
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = None
    if backend == "nccl":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]), world_size=world)
    return {"distributed": True, "rank": dist.get_rank(), "world_size": dist.get_world_size(), "local_rank": local,
            "device": device, "backend": backend}


def cleanup() -> None:
    """Destroy the process group (if any)."""
    if is_distributed():
        dist.destroy_process_group()


def rank_indices(seed: int, iteration: int, global_batch: int, n: int, rank_: int | None = None,
                 world: int | None = None) -> list[int]:
    """The dataset indices rank ``rank_`` trains on at ``iteration``: its contiguous slice of the global batch
    ``batch_indices(seed, iteration, global_batch, n)`` (``global_batch`` must be a multiple of the world size)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if global_batch % world:
        raise ValueError(f"the batch size ({global_batch}) must be a multiple of the number of processes ({world})")
    per = global_batch // world
    return batch_indices(seed, iteration, global_batch, n)[rank_ * per:(rank_ + 1) * per]


def _params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def average_gradients(module: nn.Module) -> None:
    """All-reduce-average the ``.grad`` of every trainable parameter across ranks (one flat buffer per dtype and
    device). Missing gradients count as zeros (and are set), so every rank joins the same collective. No-op when
    not distributed."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in _params(module):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for (_, _), ps in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p in ps:
            k = p.grad.numel()
            p.grad.copy_(flat[offset:offset + k].view_as(p.grad))
            offset += k


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op when not distributed)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def _average_stats(stats: dict, device: torch.device) -> dict:
    """The mean of each float statistic over ranks (every rank returns the same keys)."""
    if not is_distributed() or not stats:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


class DistributedTrainer(Trainer):
    """:class:`~deqreg_lite.train.Trainer` over ``torchrun`` processes (see the module docstring).

    Same arguments as ``Trainer``; ``batch_size`` is the global batch (a multiple of the world size). Without a
    process group it behaves exactly as ``Trainer``. Only rank 0 writes ``checkpoint_dir`` and ``log_path`` and
    validates.
    """

    def __init__(self, method: nn.Module, loss_fn: Any, train_data: Any, val_data: Any = None, **kwargs) -> None:
        world = world_size()
        if not is_main():
            kwargs["progress"] = False
        super().__init__(method, loss_fn, train_data, val_data, **kwargs)
        if self.batch_size % world:
            raise ValueError(f"batch_size ({self.batch_size}) is the global batch and must be a multiple of the "
                             f"number of processes ({world})")
        broadcast_parameters(self.method)

    # -- data: this rank's slice of the (seed, iteration) batch ------------------------------------------------
    def _batch(self, iteration: int) -> dict:
        if not is_distributed():
            return super()._batch(iteration)
        idx = rank_indices(self.seed, iteration, self.batch_size, len(self.train_data))
        items = [self.train_data[i] for i in idx]
        if len(items) == 1:
            return items[0]
        from .datasets.pairs import collate

        return collate([{"fixed": s["fixed"], "moving": s["moving"]} for s in items])

    # -- one step: Trainer._step, with the gradients and stats averaged across ranks before the optimizer -----
    def _after_backward(self, stats: dict) -> dict:
        average_gradients(self.method)
        return _average_stats(stats, self.device)  # a NaN on any rank reaches every rank: all raise together

    # -- rank 0 only: files and validation ----------------------------------------------------------------------
    def save(self, path=None):
        if is_main():
            return super().save(path)
        return None

    def _log(self, row: dict) -> None:
        if is_main():
            return super()._log(row)
        self.history.append(row)

    def _rewrite_log(self) -> None:
        if is_main():
            super()._rewrite_log()

    def validate(self) -> dict | None:
        if is_main():
            return super().validate()
        self._last_val = self.iteration
        return None

    def resume(self, path=None) -> "DistributedTrainer":
        super().resume(path)
        broadcast_parameters(self.method)
        return self

    def fit(self, until: int | None = None) -> list[dict]:
        history = super().fit(until)
        barrier()  # rank 0's last checkpoint is on disk before any rank goes on
        return history
