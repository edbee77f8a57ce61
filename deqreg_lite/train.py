"""Train a registration method: AdamW, validation, logs, and checkpoints that resume bit for bit.

The trainer drives a :class:`~deqreg_lite.methods.base.RegistrationMethod` through its one training entry point,
``method.training_step(fixed, moving, loss_fn, backward)``; it never reaches into a method's insides. Per
iteration it zeroes the gradients, calls ``training_step`` (which computes the method's own loss and calls
``backward``), checks the loss, and steps the optimizer::

    trainer = Trainer(method, loss_fn, brain_pairs("train", 1000, (64, 64)), brain_pairs("val", 5, (64, 64)),
                      iterations=2000, val_every=200, checkpoint_dir="runs/deqreg", log_path="runs/deqreg/log.jsonl")
    history = trainer.fit()
    # later, or after a crash:
    trainer = Trainer(method, loss_fn, train_data, val_data, iterations=2000, checkpoint_dir="runs/deqreg")
    trainer.resume("runs/deqreg/last.pt")
    trainer.fit()            # continues exactly where the checkpoint left off

Reproducibility
---------------
* Data order is a function of ``(seed, iteration)`` only: sample ``k = iteration * batch_size + j`` is item
  ``perm_e[k mod n]`` of the training set, where ``perm_e`` is a permutation drawn from ``(seed, epoch e = k // n)``.
  Nothing about the order lives in a sampler object, so resuming needs only the iteration.
* A fresh run calls :func:`deqreg_lite.config.seed_everything` ``(seed)`` when :meth:`Trainer.fit` starts (seed the
  model's initialisation yourself, before building it). Checkpoints hold the RNG states (torch CPU and CUDA, NumPy,
  Python ``random``), restored by :meth:`Trainer.resume`.
* Validation runs inside a saved-and-restored RNG state, so validating (or not) never changes training.
* So N iterations straight and N/2 + resume + N/2 give bit-identical parameters (on the same device and threads).

Nothing a user has made is lost
-------------------------------
* A fresh :meth:`Trainer.fit` refuses a ``checkpoint_dir`` that already holds ``last.pt`` or ``best.pt``, or a
  non-empty ``log_path`` (:class:`RunExistsError`), unless ``overwrite=True`` (the old ``last.pt``, ``best.pt``
  and log are then replaced) or the run was resumed (:meth:`Trainer.resume`).
* Resuming with another ``lr`` than the checkpoint's applies the new one to every optimizer parameter group (the
  Adam moments are kept) and records the change in :attr:`Trainer.lr_changes` (``iteration``, ``previous``,
  ``lr``), which is stored in the checkpoints; the training log's ``lr`` column shows the rate actually used.
* ``KeyboardInterrupt`` (Ctrl-C) inside :meth:`Trainer.fit` writes ``last.pt`` of the last completed iteration
  (an interrupted iteration is rolled back: its RNG draws are undone, its gradients dropped), then re-raises.
  Resuming from it gives the same result as an uninterrupted run. A real Ctrl-C (SIGINT, main thread) that
  arrives during the optimizer's update is held until the iteration is done; only a ``KeyboardInterrupt`` raised
  by code inside the update itself leaves ``last.pt`` as it was (a warning says so).
* ``last.pt`` is also written before each validation, so an error in validation loses no training; a checkpoint
  whose validation did not complete is validated again when the run is resumed.
* A checkpoint is written to ``.<name>.tmp`` in the same folder, then renamed; a temporary file left by a killed
  process is replaced by the next save and removed when a run starts, so none accumulate.
* A NaN or inf loss, or a NaN or inf displacement or loss term that a method's own input checks catch during
  training (while the batch itself is finite), raises :class:`TrainingDivergedError` with advice.

Mixed precision
---------------
``amp="bf16"`` runs ``training_step`` under bfloat16 autocast (CUDA, or the CPU), ``amp="fp16"`` under float16
autocast with a ``GradScaler`` (CUDA only), ``amp="auto"`` picks bf16 on a CUDA GPU that supports it, else fp16, and
float32 off CUDA (:func:`resolve_amp`). Autocast runs the convolutions in the low precision; warps, LNCC and the
regulariser run in float32 (:func:`deqreg_lite.warp.warp` samples a half-precision displacement in float32). The
mode is recorded in the checkpoints (``trainer["amp_mode"]``).

Checkpoints
-----------
The format (its fields, its version and the converter of older files) is documented and implemented in
:mod:`deqreg_lite.checkpoints`; :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`get_rng_state`,
:func:`set_rng_state`, :func:`remove_stale_temps` and :data:`CHECKPOINT_FORMAT` are re-exported here.
:func:`load_method` rebuilds a method through
:meth:`~deqreg_lite.methods.base.RegistrationMethod.from_checkpoint`.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import NonFiniteError, check_int
from ._contexts import eval_mode, isolated_rng, sync
from .checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, _method_config, get_rng_state,  # noqa: F401
                          load_checkpoint, remove_stale_temps, save_checkpoint, set_rng_state, upgrade_checkpoint)
from .config import default_device, seed_everything

__all__ = ["Trainer", "TrainingDivergedError", "RunExistsError", "save_checkpoint", "load_checkpoint", "load_method",
           "existing_run_files", "remove_stale_temps", "get_rng_state", "set_rng_state", "batch_indices", "read_log",
           "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "upgrade_checkpoint", "AMP_CHOICES", "resolve_amp"]

_MAX_EPOCH_SEED = 2**31


class TrainingDivergedError(RuntimeError):
    """Training diverged: the loss, or a displacement the method computed from finite images, became NaN or inf.

    The message names the iteration and gives the usual remedies: a lower learning rate, a larger
    regularisation weight ``lam``, gradient clipping (``grad_clip``), and images normalised to [0, 1]. The
    parameters are those before the failed update; ``last.pt`` (if any) holds the last checkpoint.
    """


class RunExistsError(FileExistsError):
    """A fresh training run would replace an earlier run's checkpoints or log (pass ``overwrite=True``, or
    :meth:`Trainer.resume` it)."""


_RUN_FILES = ("last.pt", "best.pt")


def existing_run_files(checkpoint_dir: str | os.PathLike | None, log_path: str | os.PathLike | None = None
                       ) -> list[Path]:
    """The files of an earlier run that a fresh run would replace: ``last.pt`` / ``best.pt`` in
    ``checkpoint_dir`` and a non-empty ``log_path``."""
    found = []
    if checkpoint_dir is not None:
        found += [Path(checkpoint_dir) / n for n in _RUN_FILES if (Path(checkpoint_dir) / n).is_file()]
    if log_path is not None and Path(log_path).is_file() and Path(log_path).stat().st_size > 0:
        found.append(Path(log_path))
    return found


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: the format (save_checkpoint, load_checkpoint, ...) lives in deqreg_lite.checkpoints (floor 1, so
# that the methods can read it); its names are re-exported here
# ---------------------------------------------------------------------------------------------------------------
def load_method(path: str | os.PathLike, map_location: str | torch.device | None = None, **overrides) -> nn.Module:
    """Rebuild a method from a checkpoint (:meth:`RegistrationMethod.from_checkpoint
    <deqreg_lite.methods.base.RegistrationMethod.from_checkpoint>`: the class named by the checkpoint, built with
    its stored config and ``overrides``, plus its weights).

    Args:
        path: checkpoint file (or folder holding ``last.pt``).
        map_location: device of the method (default :func:`deqreg_lite.config.default_device`).
        overrides: constructor options that replace the stored ones (e.g. inference settings).
    Returns:
        the method, in eval mode, on ``map_location``.
    """
    from .methods import RegistrationMethod  # the methods floor (2) sits below this one (3)

    device = map_location if map_location is not None else default_device()
    return RegistrationMethod.from_checkpoint(path, device=device, **overrides)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines training log (one dict per line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------------------------------
def _epoch_perm(seed: int, epoch: int, n: int) -> Tensor:
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % 2**62)
    return torch.randperm(n, generator=gen)


def batch_indices(seed: int, iteration: int, batch_size: int, n: int) -> list[int]:
    """The dataset indices of batch ``iteration``: a function of ``(seed, iteration)`` only.

    Sample ``k = iteration * batch_size + j`` is ``perm(seed, k // n)[k % n]``: every epoch visits every item
    once, in an order drawn from ``(seed, epoch)``.
    """
    out, cache = [], {}
    for k in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch = k // n
        if epoch not in cache:
            cache[epoch] = _epoch_perm(seed, epoch, n)
        out.append(int(cache[epoch][k % n]))
    return out


def _is_sample(x: Any) -> bool:
    return isinstance(x, Mapping) and "fixed" in x and "moving" in x


def _collate(samples: Sequence[Mapping]) -> dict:
    from .datasets.pairs import collate

    return collate(samples)


# ---------------------------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------------------------
#: The values of ``Trainer(amp=...)`` (besides ``True``, ``False`` and ``None``) and of ``train --amp``.
AMP_CHOICES = ("off", "bf16", "fp16", "auto")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_bf16(device: torch.device) -> bool:
    """Whether ``device`` (CUDA) computes bfloat16 natively (not emulated)."""
    try:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch: no including_emulation
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported())


def resolve_amp(amp: bool | str | None, device: str | torch.device, *, stacklevel: int = 2) -> str:
    """The mixed-precision mode a trainer on ``device`` uses for ``amp``: ``"off"``, ``"bf16"`` or ``"fp16"``.

    * ``False``, ``None``, ``"off"``: ``"off"`` (float32).
    * ``"auto"``: on CUDA ``"bf16"`` where the GPU computes bfloat16 natively
      (``torch.cuda.is_bf16_supported``), else ``"fp16"``; elsewhere ``"off"`` (a CPU without bfloat16 units runs
      bfloat16 autocast *slower* than float32: 3-28x per training step, measured on an AVX2 CPU).
    * ``True``: as ``"auto"`` on CUDA (``"fp16"`` on a GPU without bfloat16, as before ``amp`` took a mode); on
      any other device a ``UserWarning`` and ``"off"`` (as before).
    * ``"bf16"``: bfloat16 autocast on CUDA (a warning where the GPU only emulates it) and on the CPU
      (``torch.autocast("cpu", dtype=torch.bfloat16)``); no gradient scaler is needed (bfloat16 has float32's
      exponent range). On another device type (MPS): a warning and ``"off"``.
    * ``"fp16"``: float16 autocast with a ``GradScaler`` on CUDA. **Not on the CPU**: a ``UserWarning`` and
      ``"off"`` (float32); float16's narrow exponent range needs loss scaling, and CPUs gain nothing from it.

    Raises:
        ValueError: ``amp`` is none of ``True``, ``False``, ``None`` or :data:`AMP_CHOICES` (the message lists them).
    """
    if amp is None or amp is False:
        return "off"
    if amp is not True and (not isinstance(amp, str) or amp not in AMP_CHOICES):
        raise ValueError(f"amp must be one of {AMP_CHOICES}, True, False or None (True and 'auto': bf16 on a CUDA GPU "
                         f"that supports it, else fp16; 'off', False, None: float32), got {amp!r}")
    device = torch.device(device)
    if amp == "off":
        return "off"
    if device.type == "cuda":
        if amp in (True, "auto"):
            return "bf16" if _cuda_bf16(device) else "fp16"
        if amp == "bf16" and not _cuda_bf16(device):
            warnings.warn(f"amp='bf16': {torch.cuda.get_device_name(device)} has no native bfloat16; it is emulated "
                          "(slow). amp='auto' picks fp16 there", stacklevel=stacklevel)
        return amp
    if amp == "auto":
        return "off"
    if amp == "bf16" and device.type == "cpu":
        return "bf16"
    what = {True: "amp=True needs a CUDA device", "fp16": "amp='fp16' needs a CUDA device (float16 autocast with "
            "loss scaling; on the CPU use amp='bf16')", "bf16": f"amp='bf16' runs on CUDA and the CPU, not on "
            f"{device.type}"}[amp]
    warnings.warn(f"{what}; training on {device} in float32", stacklevel=stacklevel)
    return "off"


def _checkpoint_amp(trainer_options: Mapping | None) -> str | None:
    """The amp mode a checkpoint's trainer options record (``amp_mode``; older checkpoints: ``amp`` True was
    float16 with a scaler on CUDA), or None when they record none."""
    if not trainer_options:
        return None
    if trainer_options.get("amp_mode") in ("off", "bf16", "fp16"):
        return str(trainer_options["amp_mode"])
    if "amp" in trainer_options:
        return "fp16" if trainer_options["amp"] is True else "off"
    return None


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------
#: ``validate_fn(method, val_data, steps) -> {"dice": ..., "dice_std": ..., "folding_pct": ..., ...}``
ValidateFn = Callable[[nn.Module, Any, "int | None"], Mapping[str, Any]]


def validate_pairs(method: nn.Module, val_data: Any, steps: int | None = None) -> dict:
    """The trainer's default validation: register each sample of ``val_data`` (batch 1) with
    ``method(fixed, moving, steps=steps)`` under ``no_grad``, score it with :func:`deqreg_lite.metrics.pair_metrics`
    (no HD95) and return the mean and the std (ddof=0, over finite values) of each number over the pairs
    (``dice``, ``dice_std``, ``folding_pct``, ``folding_pct_std``, ``sdlogj``, ``tre_mm`` with keypoints, and
    ``time_s``, the wall time of each call), the same numbers as ``evaluate(..., memory=False,
    hd95=False).summary()``. The samples are moved to the device of the method's parameters."""
    from .metrics import pair_metrics

    param = next(method.parameters(), None)
    dev = param.device if param is not None else None
    kwargs = {} if steps is None else {"steps": steps}
    items = [val_data[i] for i in range(len(val_data))] if hasattr(val_data, "__getitem__") else list(val_data)
    rows: list[dict] = []
    for s in items:
        fixed, moving = s["fixed"], s["moving"]
        if dev is not None:
            fixed, moving = fixed.to(dev), moving.to(dev)
        sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            result = method(fixed, moving, **kwargs)
        sync(dev)
        rows.append({**pair_metrics(s, result.disp, with_hd95=False), "time_s": time.perf_counter() - t0})
    out: dict = {"n": len(rows)}
    for key in dict.fromkeys(k for r in rows for k in r):
        vals = np.asarray([float(r[key]) for r in rows if key in r], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[key], out[f"{key}_std"] = (float(vals.mean()), float(vals.std())) if vals.size else (math.nan, math.nan)
    return out


def _check_int(v: Any, name: str, minimum: int, allow_none: bool = False) -> int | None:
    """:func:`deqreg_lite._checks.check_int` (kept under this name for older imports)."""
    return check_int(v, name, minimum, allow_none=allow_none)


class Trainer:
    """Trains one registration method with AdamW.

    Args:
        method: a :class:`~deqreg_lite.methods.base.RegistrationMethod`.
        loss_fn: ``loss_fn(fixed, moving, disp) -> scalar``, passed to ``method.training_step`` (moved to the
            device when it is an ``nn.Module``).
        train_data: a map-style dataset of sample dicts (``len`` and ``[i]``; e.g.
            :func:`deqreg_lite.datasets.brain_pairs`), a list of sample dicts, or one sample dict.
        val_data: sample dicts to validate on (batch size 1 each), with ``validate_fn``.
        validate_fn: ``validate_fn(method, val_data, steps) -> dict`` of mean numbers (``dice``, ``dice_std``,
            ``folding_pct``, ...; the keys of the history's validation rows); ``best.pt`` follows its ``dice``. The
            trainer calls it in eval mode with the RNG states saved and restored. Default :func:`validate_pairs`
            (Dice, folding %, SDlogJ and TRE of :func:`deqreg_lite.metrics.pair_metrics`, no HD95). The command line
            passes one built on :func:`deqreg_lite.evaluate.evaluate`; the trainer itself never imports
            ``evaluate``.
        lr: AdamW learning rate (the paper's 1e-4).
        weight_decay: AdamW weight decay (PyTorch's default 0.01).
        batch_size: pairs per iteration (stacked with :func:`deqreg_lite.datasets.collate`).
        iterations: total iterations of :meth:`fit`.
        val_every: validate every this many iterations, and at the end (0 or None: only at the end; no
            ``val_data``: never).
        val_steps: inference steps for validation (None: the method's trained count).
        checkpoint_dir: folder for ``last.pt`` (every ``checkpoint_every`` iterations, before and after each
            validation, on ``KeyboardInterrupt``, and at the end of each :meth:`fit`) and ``best.pt`` (the best
            validation Dice so far). A fresh run refuses a folder that holds ``last.pt`` or ``best.pt``
            (:class:`RunExistsError`) unless ``overwrite=True``; :meth:`resume` continues it.
        checkpoint_every: iterations between checkpoints (0 or None: only at the end of :meth:`fit`, and around
            validations).
        log_every: iterations averaged into one training row of the history and log.
        seed: seeds the data order, and the global RNGs at the start of a fresh run.
        device: default CUDA when available, else the CPU.
        amp: automatic mixed precision of ``training_step`` (:func:`resolve_amp`): ``"off"`` / ``False`` / ``None``
            (float32, the default); ``"bf16"`` (bfloat16 autocast, no gradient scaler; on CUDA and on the CPU);
            ``"fp16"`` (float16 autocast and a ``GradScaler``, CUDA only: elsewhere a warning and float32);
            ``"auto"`` (bf16 on a CUDA GPU that supports it, else fp16; float32 off CUDA); ``True`` (as ``"auto"``
            on CUDA, a warning and float32 elsewhere). Validation runs in float32. The mode is in
            :meth:`options` (``amp_mode``), so in every checkpoint; :meth:`resume` warns when it differs from the
            checkpoint's.
        grad_clip: clip the gradients' global norm to this value (None: no clipping).
        progress: show a tqdm bar with the loss.
        log_path: a JSON-lines file; every history row is appended to it as it is made (``read_log`` reads it).
            A fresh run starts it anew (refused when it is not empty, unless ``overwrite=True``); :meth:`resume`
            rewrites it to the checkpoint's history.
        overwrite: let a fresh run replace an earlier run's ``last.pt``, ``best.pt`` and log (they are deleted
            when :meth:`fit` starts).

    Attributes:
        history: list of dicts: training rows (``split="train"``, ``iteration``, ``loss`` and the other floats
            ``training_step`` returned, averaged over ``log_every`` iterations, ``lr``, ``time_s`` per iteration with
            data generation)
            and validation rows (``split="val"``, ``iteration``, ``dice``, ``dice_std``, ``folding_pct``,
            ``folding_pct_std``, ``sdlogj``, ``time_s``).
        iteration: iterations done so far.
        lr_changes: list of ``{"iteration", "previous", "lr"}``: each time :meth:`resume` applied an ``lr``
            other than the checkpoint's (kept across checkpoints).
        amp_mode: the mode in use, ``"off"``, ``"bf16"`` or ``"fp16"``; ``amp`` is ``amp_mode != "off"``.
        optimizer, scaler (a ``GradScaler`` for ``"fp16"``, else None), device.
    """

    def __init__(self, method: nn.Module, loss_fn: Callable, train_data: Any, val_data: Any = None, *,
                 lr: float = 1e-4, weight_decay: float = 1e-2, batch_size: int = 1, iterations: int = 1000,
                 val_every: int | None = None, val_steps: int | None = None, checkpoint_dir: str | os.PathLike |
                 None = None, checkpoint_every: int | None = None, log_every: int = 10, seed: int = 0,
                 device: str | torch.device | None = None, amp: bool | str | None = False,
                 grad_clip: float | None = None,
                 progress: bool = True, log_path: str | os.PathLike | None = None, overwrite: bool = False,
                 validate_fn: ValidateFn | None = None) -> None:
        if not isinstance(method, nn.Module) or not hasattr(method, "training_step"):
            raise TypeError(f"method must be a RegistrationMethod (an nn.Module with training_step), got "
                            f"{type(method).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (fixed, moving, disp) -> loss, got {type(loss_fn).__name__}")
        if validate_fn is not None and not callable(validate_fn):
            raise TypeError(f"validate_fn must be callable (method, val_data, steps) -> dict, got "
                            f"{type(validate_fn).__name__}")
        self.validate_fn: ValidateFn = validate_fn if validate_fn is not None else validate_pairs
        if not (isinstance(lr, numbers.Real) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if not (isinstance(weight_decay, numbers.Real) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if grad_clip is not None and not (isinstance(grad_clip, numbers.Real) and grad_clip > 0):
            raise ValueError(f"grad_clip must be a number > 0 or None, got {grad_clip!r}")
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.iterations = _check_int(iterations, "iterations", 0)
        self.val_every = _check_int(val_every, "val_every", 0, allow_none=True) or 0
        self.checkpoint_every = _check_int(checkpoint_every, "checkpoint_every", 0, allow_none=True) or 0
        self.log_every = _check_int(log_every, "log_every", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.val_steps = _check_int(val_steps, "val_steps", 1, allow_none=True)

        if _is_sample(train_data):
            train_data = [train_data]
        if not (hasattr(train_data, "__len__") and hasattr(train_data, "__getitem__")):
            raise TypeError("train_data must be a map-style dataset of sample dicts (with len() and [i]), a list "
                            f"of sample dicts, or one sample dict; got {type(train_data).__name__}")
        if len(train_data) == 0:
            raise ValueError("train_data is empty")
        if _is_sample(val_data):
            val_data = [val_data]
        self.train_data, self.val_data = train_data, val_data

        self.device = torch.device(device) if device is not None else default_device()
        self.method = method.to(self.device)
        self.loss_fn = loss_fn.to(self.device) if isinstance(loss_fn, nn.Module) else loss_fn
        self.lr, self.weight_decay, self.grad_clip = float(lr), float(weight_decay), grad_clip
        self.amp_mode = resolve_amp(amp, self.device, stacklevel=3)
        self.amp = self.amp_mode != "off"
        self.optimizer = torch.optim.AdamW(self.method.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_mode == "fp16" else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.progress = bool(progress)
        self.overwrite = bool(overwrite)
        self.lr_changes: list[dict] = []
        self.history: list[dict] = []
        self.iteration = 0
        self._started = False  # True once fit() ran or a checkpoint was resumed
        self._window: list[dict] = []
        self._best_dice = -math.inf
        self._last_val = -1
        self._saved: tuple | None = None  # (iteration, len(history), last_val) of the last last.pt written
        self._phase = "idle"  # where fit() is in an iteration: step, update, done, idle

    # -- options and state ------------------------------------------------------------------------------------
    def options(self) -> dict:
        """The trainer's options (stored in checkpoints for the record)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                "iterations": self.iterations, "val_every": self.val_every, "val_steps": self.val_steps,
                "checkpoint_every": self.checkpoint_every, "log_every": self.log_every, "seed": self.seed,
                "amp": self.amp, "amp_mode": self.amp_mode, "grad_clip": self.grad_clip, "device": str(self.device)}

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Checkpoint the full training state (default ``checkpoint_dir / "last.pt"``)."""
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("save() needs a path when the trainer has no checkpoint_dir")
            path = self.checkpoint_dir / "last.pt"
        return save_checkpoint(path, self.method, self.optimizer, iteration=self.iteration, history=self.history,
                               sampler={"seed": self.seed, "batch_size": self.batch_size,
                                        "position": self.iteration * self.batch_size},
                               scaler=self.scaler, trainer=self.options(),
                               extra={"best_dice": self._best_dice, "last_val": self._last_val,
                                      "window": list(self._window), "lr_changes": list(self.lr_changes)})

    def restart_selection(self) -> None:
        """Forget the best validation Dice so far: the next validation writes ``best.pt`` whatever its Dice (e.g. when
        a later stage of a training recipe starts and only its checkpoints may be selected)."""
        self._best_dice = -math.inf

    def resume(self, path: str | os.PathLike | None = None) -> "Trainer":
        """Load a checkpoint of this method (model, optimizer, scaler, iteration, RNG states, history).

        ``path`` defaults to ``checkpoint_dir / "last.pt"``. The log file, if any, is rewritten to hold exactly
        the checkpoint's history (rows written after the checkpoint, by a run that then crashed, are dropped).

        The trainer's ``lr`` wins over the checkpoint's: when they differ, the optimizer's parameter groups are
        set to this trainer's ``lr`` (its Adam moments are kept) and the change is appended to
        :attr:`lr_changes` (and a ``UserWarning`` says so). A checkpoint whose validation did not complete (an
        error or Ctrl-C in validation) is validated first by the next :meth:`fit`.

        Raises:
            FileNotFoundError: no checkpoint there.
            ValueError: the checkpoint is unreadable, or holds a different method.
        """
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("resume() needs a path when the trainer has no checkpoint_dir")
            path = self.checkpoint_dir / "last.pt"
        ckpt = load_checkpoint(path, "cpu", name=self.method.name)
        cfg = _method_config(self.method) if ckpt.get("config") is not None else None
        if cfg is not None and cfg != ckpt["config"]:
            warnings.warn(f"the checkpoint's method config {ckpt['config']} differs from this method's {cfg}",
                          stacklevel=2)
        self.method.load_state_dict(ckpt["model"])
        self.lr_changes = [dict(r) for r in (ckpt.get("extra") or {}).get("lr_changes", [])]
        if ckpt.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            previous = [float(g["lr"]) for g in self.optimizer.param_groups]
            if any(p != self.lr for p in previous):
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr
                self.lr_changes.append({"iteration": int(ckpt["iteration"]), "previous": previous[0],
                                        "lr": self.lr})
                warnings.warn(f"resuming {path} (iteration {ckpt['iteration']}) with lr={self.lr:g}; the "
                              f"checkpoint's was {previous[0]:g}: training continues with lr={self.lr:g}",
                              stacklevel=2)
        stored_amp = _checkpoint_amp(ckpt.get("trainer"))
        if stored_amp is not None and stored_amp != self.amp_mode:
            warnings.warn(f"resuming {path} (iteration {ckpt['iteration']}), trained with amp={stored_amp!r}, with "
                          f"amp={self.amp_mode!r}: training continues in {self.amp_mode}", stacklevel=2)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        sampler = ckpt.get("sampler") or {}
        if sampler.get("seed", self.seed) != self.seed or sampler.get("batch_size", self.batch_size) != \
                self.batch_size:
            warnings.warn(f"resuming with seed={self.seed}, batch_size={self.batch_size}, but the checkpoint was "
                          f"made with seed={sampler.get('seed')}, batch_size={sampler.get('batch_size')}: the data "
                          "order will differ from an uninterrupted run", stacklevel=2)
        self.iteration = int(ckpt["iteration"])
        self.history = [dict(r) for r in ckpt.get("history", [])]
        extra = ckpt.get("extra") or {}
        self._best_dice = float(extra.get("best_dice", -math.inf))
        self._last_val = int(extra.get("last_val", -1))
        self._window = [dict(r) for r in extra.get("window", [])]
        if ckpt.get("rng") is not None:
            set_rng_state(ckpt["rng"])
        self._started = True
        self._saved = None
        if self.log_path is not None:
            self._rewrite_log()
        return self

    # -- logging ---------------------------------------------------------------------------------------------
    def _rewrite_log(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.log_path.with_name(f".{self.log_path.name}.tmp")
        with open(tmp, "w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.log_path)

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    # -- one iteration ---------------------------------------------------------------------------------------
    def _batch(self, iteration: int) -> dict:
        idx = batch_indices(self.seed, iteration, self.batch_size, len(self.train_data))
        items = [self.train_data[i] for i in idx]
        for i, item in zip(idx, items):
            if not _is_sample(item):
                raise TypeError(f"train_data[{i}] must be a sample dict with 'fixed' and 'moving', got "
                                f"{type(item).__name__}")
        if len(items) == 1:
            return items[0]
        return _collate([{"fixed": s["fixed"], "moving": s["moving"]} for s in items])

    def _step(self, batch: Mapping) -> dict:
        """One iteration's work on ``batch``: :meth:`_forward_backward`, then :meth:`_update`."""
        stats = self._forward_backward(batch)
        self._update()
        return stats

    def _diverged(self, what: str) -> TrainingDivergedError:
        self.optimizer.zero_grad(set_to_none=True)
        return TrainingDivergedError(
            f"training diverged at iteration {self.iteration + 1}: {what} (method {self.method.name!r}, "
            f"lr={self.optimizer.param_groups[0]['lr']:g}). Lower the learning rate, or raise the regularisation "
            f"weight lambda of the loss; clipping the gradients (grad_clip=) and images normalised to [0, 1] help "
            f"too. The parameters are those before this iteration; the last checkpoint, if any, is in "
            f"{self.checkpoint_dir}")

    def _forward_backward(self, batch: Mapping) -> dict:
        """Zero the gradients, run ``training_step`` (which calls ``backward``), check and return its stats.

        Raises:
            TrainingDivergedError: the loss is NaN or inf, or the method's own checks found NaN or inf values
                (in a displacement, a loss term, ...) although the batch is finite.
        """
        fixed = batch["fixed"].to(self.device, non_blocking=True)
        moving = batch["moving"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            if self.amp:  # autocast around the forward; the backward outside it (and scaled, for fp16)
                scaler, dev = self.scaler, self.device.type

                def backward(loss: Tensor) -> None:
                    with torch.autocast(dev, enabled=False):
                        (scaler.scale(loss) if scaler is not None else loss).backward()

                with torch.autocast(dev, dtype=_AMP_DTYPES[self.amp_mode]):
                    stats = self.method.training_step(fixed, moving, self.loss_fn, backward=backward)
            else:
                stats = self.method.training_step(fixed, moving, self.loss_fn, backward=Tensor.backward)
        except NonFiniteError as exc:
            # A method or loss check that found NaN/inf in something computed from finite images: divergence,
            # not bad input. (Non-finite images keep their input-check message.)
            if _all_finite(fixed, moving):
                raise self._diverged(f"{exc}") from exc
            raise
        if not isinstance(stats, Mapping) or "loss" not in stats:
            raise TypeError(f"{type(self.method).__name__}.training_step must return a dict with 'loss', got "
                            f"{stats!r}")
        stats = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in stats.items()
                 if isinstance(v, (numbers.Real, Tensor))}
        stats = self._after_backward(stats)
        if not math.isfinite(stats["loss"]):
            raise self._diverged(f"the training loss became {stats['loss']}")
        return stats

    def _update(self) -> None:
        """Clip the gradients (if asked) and step the optimizer (and the AMP scaler)."""
        if self.scaler is not None:
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
            self.optimizer.step()

    def _after_backward(self, stats: dict) -> dict:
        """Called between ``training_step`` (gradients are in ``.grad``) and the optimizer step; returns the
        stats to log. A no-op here; data-parallel training averages gradients and stats across processes."""
        return stats

    def _flush_window(self) -> None:
        if not self._window:
            return
        keys = dict.fromkeys(k for r in self._window for k in r)
        row = {"split": "train", "iteration": self.iteration}
        for k in keys:
            vals = [r[k] for r in self._window if k in r]
            row[k] = float(sum(vals) / len(vals))
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        self._window = []
        self._log(row)

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self) -> dict | None:
        """Evaluate on ``val_data`` (mean Dice, folding %, SDlogJ); append the row to the history and return it.

        Runs in eval mode under ``no_grad`` with the RNG states saved and restored, so training is unaffected.
        """
        if not self.val_data:
            return None
        with eval_mode(self.method), isolated_rng():
            s = self.validate_fn(self.method, self.val_data, self.val_steps)
        row = {"split": "val", "iteration": self.iteration}
        for k in ("dice", "dice_std", "folding_pct", "folding_pct_std", "sdlogj", "sdlogj_std", "tre_mm",
                  "tre_mm_std", "time_s"):
            if k in s:
                row[k] = s[k]
        self._last_val = self.iteration
        self._log(row)
        dice = row.get("dice", float("nan"))
        if self.checkpoint_dir is not None and math.isfinite(dice) and dice > self._best_dice:
            self._best_dice = dice
            self.save(self.checkpoint_dir / "best.pt")
        return row

    # -- the loop --------------------------------------------------------------------------------------------
    def _val_due(self, iteration: int) -> bool:
        return bool(self.val_data) and iteration > 0 and (
            bool(self.val_every and iteration % self.val_every == 0) or iteration == self.iterations)

    def _save_last(self) -> None:
        """Write ``last.pt`` unless it already holds exactly this state (same iteration and history)."""
        if self.checkpoint_dir is None:
            return
        key = (self.iteration, len(self.history), self._last_val)
        if self._saved != key:
            self.save()
            self._saved = key

    def _validate_between_checkpoints(self) -> None:
        self._save_last()  # before: an error in validation loses no training
        self.validate()
        self._save_last()  # after: with the validation row (and best.pt when it improved)

    def _start_fresh(self) -> None:
        found = existing_run_files(self.checkpoint_dir, self.log_path)
        if found and not self.overwrite:
            raise RunExistsError(
                f"a fresh run would replace an earlier run's files: {', '.join(str(p) for p in found)}. Resume it "
                "(Trainer.resume(); CLI: --resume), choose another checkpoint_dir / log_path (CLI: --out), or pass "
                "overwrite=True (CLI: --overwrite) to replace it")
        for p in found:
            if p.suffix == ".pt":
                p.unlink()
        seed_everything(self.seed)
        self._started = True
        if self.log_path is not None:
            self._rewrite_log()

    def _interrupted(self, rng_state: dict | None) -> None:
        """Ctrl-C: roll back an unfinished iteration and write ``last.pt`` of the last completed one."""
        if self._phase == "update":
            warnings.warn(f"interrupted inside the optimizer update of iteration {self.iteration + 1}: the "
                          "parameters are partly updated, so last.pt was not rewritten", stacklevel=3)
            return
        if self._phase == "step":  # training_step did not finish: undo its RNG draws and drop its gradients
            if rng_state is not None:
                set_rng_state(rng_state)
            self.optimizer.zero_grad(set_to_none=True)
        if self.checkpoint_dir is not None:
            self.method.train()
            self._save_last()

    def fit(self, until: int | None = None) -> list[dict]:
        """Train up to iteration ``until`` (default ``iterations``); return the history.

        Validates every ``val_every`` iterations and at ``iterations``; writes ``checkpoint_dir/last.pt`` every
        ``checkpoint_every`` iterations, before and after each validation, and when it returns. A fresh run
        (not resumed) refuses a ``checkpoint_dir`` / ``log_path`` that holds an earlier run unless
        ``overwrite=True``. A resumed checkpoint whose validation did not complete is validated first.

        On ``KeyboardInterrupt`` (Ctrl-C) it writes ``last.pt`` of the last completed iteration (the interrupted
        one is rolled back, so resuming reproduces an uninterrupted run) and re-raises.

        Raises:
            TrainingDivergedError: the loss (or a displacement computed from finite images) became NaN or inf;
                the message names the iteration.
            RunExistsError: a fresh run would replace an earlier run's files (see ``overwrite``).
            KeyboardInterrupt: after the checkpoint is written.
        """
        until = self.iterations if until is None else _check_int(until, "until", 0)
        if until > self.iterations:
            raise ValueError(f"until ({until}) must be <= iterations ({self.iterations})")
        if not self._started:  # a fresh run: refuse to replace an earlier one, seed, start a fresh log
            self._start_fresh()
        if self.checkpoint_dir is not None:
            remove_stale_temps(self.checkpoint_dir)
        self.method.train()
        bar = tqdm(total=until, initial=self.iteration, disable=not self.progress, desc=f"train {self.method.name}",
                   dynamic_ncols=True)
        rng_state, self._phase = None, "idle"
        try:
            if self._val_due(self.iteration) and self._last_val != self.iteration:
                self._validate_between_checkpoints()  # a resumed checkpoint whose validation did not complete
            while self.iteration < until:
                rng_state = get_rng_state()
                self._phase = "step"
                t0 = time.perf_counter()
                stats = self._forward_backward(self._batch(self.iteration))
                with _sigint_deferred():  # a real Ctrl-C waits for the update and the bookkeeping (microseconds)
                    self._phase = "update"
                    self._update()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    stats["time_s"] = time.perf_counter() - t0
                    self._window.append(stats)
                    self.iteration += 1
                    self._phase = "done"
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
                if self.iteration % self.log_every == 0 or self.iteration == self.iterations:
                    self._flush_window()
                if self._val_due(self.iteration):
                    self._validate_between_checkpoints()
                elif self.checkpoint_every and self.iteration % self.checkpoint_every == 0:
                    self._save_last()
            self._phase = "idle"
        except KeyboardInterrupt:
            self._interrupted(rng_state)
            raise
        finally:
            bar.close()
        self._save_last()
        return self.history


def _all_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a SIGINT (Ctrl-C) that arrives inside the block until its end (main thread, default handler only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt
