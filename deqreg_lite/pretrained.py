"""Small pretrained 2D checkpoints of the six learned methods, shipped in ``data/checkpoints``.

``load_pretrained(name)`` returns a ready method, in eval mode, for ``"voxelmorph"``, ``"unrolling"`` (T = 3),
``"gradirn"``, ``"riir"``, ``"deqreg"`` and ``"deqreg12"``. Each takes ``(B, 1, 160, 192)`` images in [0, 1] (the
shipped ``brain2d`` pair) and returns ``(B, 2, 160, 192)`` displacements in voxels of that grid::

    from deqreg_lite.pretrained import load_pretrained
    model = load_pretrained("deqreg")
    result = model(fixed, moving, steps=96, return_states=True)

**The models work at half resolution, 80 x 96, internally.** To fit a CPU budget they were trained on 80 x 96 pairs
(4x cheaper than 160 x 192); :class:`HalfResolution` wraps each one: it downsamples ``fixed`` and ``moving`` by 2
(a small box blur, then bilinear resampling with ``align_corners=True``, the grid convention of
:func:`~deqreg_lite.warp.resize_disp`), runs the method, and upsamples the displacement and every state back to the
input size with :func:`~deqreg_lite.warp.resize_disp` (values rescaled to the finer voxels). So the fields are
smooth on a 2-voxel scale by construction, and the numbers are those of 80 x 96 models.

How they were made (``python scripts/train_pretrained.py``, see ``data/checkpoints/README.md`` for the measured
numbers): :func:`train_pretrained` trains each method on generated ``PairDataset("train", size=(80, 96),
kinds=("brain", "inter"))`` pairs with AdamW and ``RegistrationLoss(lam=1)``, at the learning rates and iteration
counts of :data:`SETTINGS` (deviations from the paper: lr 1e-3, not 1e-4, and far fewer iterations, for a CPU).

Checkpoints use the trainer's format (:func:`deqreg_lite.train.save_checkpoint`, no optimizer, no RNG state;
``torch.load(weights_only=True)`` reads them; :func:`deqreg_lite.train.load_method` rebuilds the bare 80 x 96
method). ``extra["pretrained"]`` holds the training record (iterations, lr, lambda, time, validation numbers) and
``extra["factor"]`` the resolution factor. The folder is ``data/checkpoints`` of the repository, or
``DEQREG_CHECKPOINTS_DIR`` when set.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .config import REPO_ROOT
from .result import RegistrationResult
from .warp import resize_disp, resize_image

__all__ = ["PRETRAINED", "SETTINGS", "HalfResolution", "checkpoints_dir", "checkpoint_path", "available_pretrained",
           "load_pretrained", "train_pretrained", "TRAIN_ORDER", "TRAIN_SIZE", "INPUT_SIZE", "TRAIN_KINDS"]

#: names of the shipped checkpoints.
PRETRAINED = ("voxelmorph", "unrolling", "gradirn", "riir", "deqreg", "deqreg12")
#: the order in which the script trains them (a warm-started model after its source).
TRAIN_ORDER = ("voxelmorph", "unrolling", "deqreg", "deqreg12", "gradirn", "riir")
#: the size the models were trained at (and run at internally), and the input size they are meant for.
TRAIN_SIZE = (80, 96)
INPUT_SIZE = (160, 192)
#: kinds of training pairs (``"synth"`` is left out: its two images get independent random intensities, which LNCC
#: training at this budget did not learn from).
TRAIN_KINDS = ("brain", "inter")
LAM = 1.0

#: per method: constructor options, iterations, AdamW learning rate, and an optional warm start (``init``: the
#: name of a checkpoint whose weights initialise this method; same update map and U-Net).
SETTINGS: dict[str, dict] = {
    "voxelmorph": {"kwargs": {}, "iterations": 1500, "lr": 1e-3},
    "unrolling": {"kwargs": {"T": 3}, "iterations": 1500, "lr": 1e-3},
    "gradirn": {"kwargs": {}, "iterations": 800, "lr": 1e-3},
    "riir": {"kwargs": {}, "iterations": 600, "lr": 1e-3},
    "deqreg12": {"kwargs": {}, "iterations": 400, "lr": 1e-3, "init": "unrolling"},
    # warm start (both DEQ models): trained from scratch at lr 1e-3, DEQReg still sat at identity level after 150
    # iterations (~4 min here), beyond this CPU budget; so DEQReg and DEQReg-12 start from the Unrolling (T = 3)
    # weights (same U-Net, same input [If, Im o phi, phi]) and are then trained with their own phantom-gradient
    # losses (DEQReg: T = 48, S = 3, Eq. 9; DEQReg-12: T = 12, S = 0).
    # 200 iterations: early stopping read off the validation curve of a 400-iteration run (val Dice 0.611 at the
    # warm start, 0.705 / 0.702 / 0.687 / 0.586 at 100 / 200 / 300 / 400 iterations, folding 0.35 / 0.30 / 0.44 /
    # 2.95%): at lr 1e-3 the DEQ fine-tune degraded after ~300 iterations.
    "deqreg": {"kwargs": {}, "iterations": 200, "lr": 1e-3, "init": "unrolling"},
}

_HOW = "python scripts/train_pretrained.py --names {name}"


def checkpoints_dir() -> Path:
    """Folder of the pretrained checkpoints: ``DEQREG_CHECKPOINTS_DIR``, else ``<repo>/data/checkpoints``."""
    env = os.environ.get("DEQREG_CHECKPOINTS_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "data" / "checkpoints"


def checkpoint_path(name: str) -> Path:
    """``checkpoints_dir() / f"{name}.pt"`` (it may not exist); ``ValueError`` for an unknown name."""
    _check_name(name)
    return checkpoints_dir() / f"{name}.pt"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {list(PRETRAINED)}")


def available_pretrained() -> dict[str, bool]:
    """``{name: whether its checkpoint file exists}`` for every name in :data:`PRETRAINED`."""
    return {name: (checkpoints_dir() / f"{name}.pt").is_file() for name in PRETRAINED}


# ---------------------------------------------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------------------------------------------
class HalfResolution(nn.Module):
    """Run a registration method at ``1 / factor`` of the input resolution (the pretrained models work at 80 x 96).

    ``forward(fixed, moving, steps=None, return_states=False)`` has the method's signature: ``fixed`` and
    ``moving`` ``(B, 1, *spatial)`` are blurred and resampled to ``max(2, s // factor)`` per axis
    (``align_corners=True``), the wrapped method runs there, and the displacement and every state come back at the
    input size via :func:`~deqreg_lite.warp.resize_disp` (in voxels of the input grid). ``info``, ``state_steps``
    and the trace are the method's; ``info["internal_size"]`` records the working size. ``name``,
    ``trained_steps``, ``ndim`` and ``config()`` are the wrapped method's; :meth:`training_step` trains it on the
    downsampled pair.
    """

    def __init__(self, method: nn.Module, factor: int = 2) -> None:
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        self.method = method
        self.factor = factor

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def trained_steps(self) -> int:
        return self.method.trained_steps

    @property
    def ndim(self) -> int:
        return self.method.ndim

    def config(self) -> dict:
        """The wrapped method's constructor options (``build_method(name, **config())`` rebuilds it unwrapped)."""
        return self.method.config()

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def internal_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The working size for an input of size ``spatial``."""
        return tuple(max(2, int(s) // self.factor) for s in spatial)

    def downsample(self, fixed: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
        """The images as the wrapped method sees them: ``(B, 1, *spatial)`` -> ``(B, 1, *internal_size)``.

        The inputs are checked first, as the wrapped method would (:func:`deqreg_lite.methods._common.check_pair`):
        same shape, floating point of the model's dtype, intensities in [0, 1]; ``ValueError`` otherwise."""
        from .methods._common import check_pair

        check_pair(fixed, moving, self.ndim, model=self.method)
        size = self.internal_size(fixed.shape[2:])
        return resize_image(fixed, size), resize_image(moving, size)

    def forward(self, fixed: Tensor, moving: Tensor, steps: Optional[int] = None,
                return_states: bool = False) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (``(B, 1, *spatial)``) at ``1 / factor`` resolution; the fields come
        back at the input size."""
        t0 = time.perf_counter()
        spatial = tuple(fixed.shape[2:])
        f, m = self.downsample(fixed, moving)
        res = self.method(f, m, steps=steps, return_states=return_states)
        info = dict(res.info)
        info["internal_size"] = tuple(f.shape[2:])
        info["factor"] = self.factor
        return RegistrationResult(disp=resize_disp(res.disp, spatial),
                                  states=[resize_disp(s, spatial) for s in res.states],
                                  state_steps=list(res.state_steps), trace=dict(res.trace), info=info,
                                  time=time.perf_counter() - t0)

    def training_step(self, fixed: Tensor, moving: Tensor, loss_fn: Callable, backward=Tensor.backward) -> dict:
        """The wrapped method's training step on the downsampled pair (``loss_fn`` sees the working size)."""
        f, m = self.downsample(fixed, moving)
        return self.method.training_step(f, m, loss_fn, backward)


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------
def load_pretrained(name: str, device: str | torch.device | None = None,
                    train_if_missing: bool = False) -> HalfResolution:
    """The pretrained ``name`` model, wrapped to take ``(B, 1, 160, 192)`` images, in eval mode.

    Args:
        name: one of :data:`PRETRAINED`.
        device: where the model goes (default the CPU: the checkpoints are small 2D models).
        train_if_missing: train it with :func:`train_pretrained` (the shipped settings; minutes on a CPU) when the
            file is missing, and save it there.
    Returns:
        a :class:`HalfResolution` around the method (which works at 80 x 96 internally).
    Raises:
        ValueError: unknown name (the message lists the names), or a corrupt or truncated checkpoint file (the
            message names the file and says how to remake it; it never suggests ``weights_only=False``).
        FileNotFoundError: no checkpoint file (the message says how to make one).
    """
    from .methods import build_method
    from .train import load_checkpoint

    _check_name(name)
    path = checkpoints_dir() / f"{name}.pt"
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"no pretrained checkpoint for {name!r} at {path}; make it with "
                                    f"`{_HOW.format(name=name)}` (or load_pretrained({name!r}, "
                                    "train_if_missing=True))")
        train_pretrained([name], out=path.parent)
    try:
        ckpt = load_checkpoint(path, "cpu", name=name)
    except ValueError as exc:  # corrupt / truncated / foreign file: the message names it; say how to remake it
        raise ValueError(f"{exc}. To remake the pretrained {name!r} checkpoint, delete {path} and run "
                         f"`{_HOW.format(name=name)}`") from None
    cfg = dict(ckpt["config"])
    ndim = cfg.pop("ndim", ckpt.get("ndim"))
    method = build_method(name, ndim, **cfg)
    method.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    factor = int((ckpt.get("extra") or {}).get("factor", 2))
    model = HalfResolution(method, factor=factor)
    return model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
def _quick_val(method: nn.Module, pairs: list) -> dict:
    from .evaluate import pair_metrics

    was = method.training
    method.eval()
    try:
        with torch.no_grad():
            rows = [pair_metrics(s, method(s["fixed"], s["moving"]).disp, with_hd95=False) for s in pairs]
    finally:
        method.train(was)
    mean = lambda k: float(sum(r[k] for r in rows) / len(rows))
    return {"dice": mean("dice"), "folding_pct": mean("folding_pct"), "real_dice": rows[0]["dice"]}


def train_pretrained(names: Sequence[str] = PRETRAINED, out: str | os.PathLike | None = None, *,
                     iterations: Optional[int] = None, seed: int = 0, n_train: int = 4000, n_val: int = 5,
                     val_every: int = 100, log: Callable[[str], None] = print,
                     settings: Optional[dict] = None) -> dict:
    """Train the named models at 80 x 96 and write ``<out>/<name>.pt`` and ``<out>/manifest.json``.

    Args:
        names: which models (in this order; a model with ``init`` in its settings needs that checkpoint in
            ``out`` first).
        out: folder (default :func:`checkpoints_dir`).
        iterations: override every model's iteration count (e.g. for a smoke test).
        seed: seeds the initialisation (``torch.manual_seed``) and the trainer's data order.
        n_train: size of the generated training set (``kinds=TRAIN_KINDS``, train seeds).
        n_val: validation pairs during training (the real pair at 80 x 96 plus held-out generated ones).
        val_every: iterations between validations (logged and stored in the record).
        log: where progress lines go.
        settings: override :data:`SETTINGS` entries (``{name: {...}}``).
    Returns:
        ``{name: record}`` (the records also stored in the checkpoints and the manifest).
    """
    from .datasets.pairs import PairDataset
    from .methods import RegistrationLoss, build_method
    from .train import Trainer, load_checkpoint, save_checkpoint

    out = Path(out) if out is not None else checkpoints_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        _check_name(name)
    train = PairDataset("train", n_train, TRAIN_SIZE, kinds=TRAIN_KINDS, seed=seed)
    val_ds = PairDataset("val", n_val, TRAIN_SIZE)
    val = [val_ds[i] for i in range(len(val_ds))]
    loss = RegistrationLoss(lam=LAM)
    records = {}
    for name in names:
        cfg = {**SETTINGS[name], **((settings or {}).get(name, {}))}
        its = int(iterations if iterations is not None else cfg["iterations"])
        torch.manual_seed(seed)
        method = build_method(name, 2, **cfg["kwargs"])
        init = cfg.get("init")
        if init:
            src = load_checkpoint(out / f"{init}.pt", "cpu", name=init)
            method.load_state_dict({k: v.float() for k, v in src["model"].items()})
            log(f"[{name}] warm start from {init}.pt")
        trainer = Trainer(method, loss, train, None, lr=cfg["lr"], iterations=its, log_every=25, seed=seed,
                          device="cpu", progress=False)
        vals = [{"iteration": 0, **_quick_val(method, val)}]
        log(f"[{name}] it 0 val {vals[-1]}")
        t0 = time.perf_counter()
        while trainer.iteration < its:
            trainer.fit(min(its, trainer.iteration + val_every))
            train_rows = [r for r in trainer.history if r.get("split") == "train"][-4:]
            tl = sum(r["loss"] for r in train_rows) / max(1, len(train_rows))
            vals.append({"iteration": trainer.iteration, "time_s": time.perf_counter() - t0, "train_loss": tl,
                         **_quick_val(method, val)})
            log(f"[{name}] it {trainer.iteration} {vals[-1]['time_s']:.0f}s loss {tl:.4f} val dice "
                f"{vals[-1]['dice']:.4f} real {vals[-1]['real_dice']:.4f} fold {vals[-1]['folding_pct']:.3f}%")
            if not math.isfinite(tl):
                raise RuntimeError(f"{name}: training loss became {tl}")
        elapsed = time.perf_counter() - t0
        record = {"name": name, "config": method.config(), "iterations": its, "lr": cfg["lr"], "weight_decay": 1e-2,
                  "lam": LAM, "loss": repr(loss), "batch_size": 1, "seed": seed, "train_size": list(TRAIN_SIZE),
                  "input_size": list(INPUT_SIZE), "factor": 2, "train_kinds": list(TRAIN_KINDS),
                  "n_train": n_train, "init": init or None, "train_time_s": round(elapsed, 1),
                  "threads": torch.get_num_threads(), "val_during_training": vals,
                  "final_val_dice": vals[-1]["dice"], "final_val_folding_pct": vals[-1]["folding_pct"],
                  "final_real_dice": vals[-1]["real_dice"], "torch_version": str(torch.__version__)}
        method.eval()
        save_checkpoint(out / f"{name}.pt", method, None, iteration=its, history=[], rng=False,
                        extra={"factor": 2, "pretrained": json.loads(json.dumps(record))})
        records[name] = record
        _update_manifest(out, name, record)
        log(f"[{name}] saved {out / f'{name}.pt'} ({elapsed:.0f} s)")
    return records


def _update_manifest(out: Path, name: str, record: dict) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    models = manifest.get("models", {})
    slim = {k: v for k, v in record.items() if k != "val_during_training"}
    slim["file"] = f"{name}.pt"
    slim["bytes"] = (out / f"{name}.pt").stat().st_size
    models[name] = slim
    manifest = {**{k: v for k, v in manifest.items() if k != "models"},
                "format": "deqreg_lite.pretrained", "made_by": "python scripts/train_pretrained.py",
                "internal_size": list(TRAIN_SIZE), "input_size": list(INPUT_SIZE),
                "note": "models run at 80x96 internally (HalfResolution wrapper); lr 1e-3 (paper 1e-4) and lam 1 "
                        "(voxel units) are deliberate deviations for a CPU budget",
                "models": models}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
