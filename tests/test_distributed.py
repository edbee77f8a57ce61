"""Data-parallel training (deqreg_lite.distributed): 2 CPU processes under torchrun with gloo give the same averaged
gradients, and the same parameters after one AdamW step, as one process on the concatenated batch.

This file is also the worker: ``python -m torch.distributed.run ... tests/test_distributed.py --worker OUT``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SIZE = (32, 32)
BATCH = 4


def _data() -> list[dict]:
    g = torch.Generator().manual_seed(123)
    pool = torch.nn.functional.avg_pool2d
    out = []
    for _ in range(BATCH):
        f = pool(torch.rand(1, 1, *SIZE, generator=g), 5, 1, 2)
        m = pool(torch.rand(1, 1, *SIZE, generator=g), 5, 1, 2)
        out.append({"fixed": f, "moving": m})
    return out


def _build(seed: int = 0):
    from deqreg_lite.methods import RegistrationLoss, build_method

    torch.manual_seed(seed)
    method = build_method("voxelmorph", 2)
    with torch.no_grad():  # a non-trivial head, so every layer has a sizeable gradient
        for p in method.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return method, RegistrationLoss(lam=1.0)


def _one_step(trainer_cls, out_dir):
    method, loss = _build()
    trainer = trainer_cls(method, loss, _data(), batch_size=BATCH, iterations=1, lr=1e-3, device="cpu",
                          progress=False, log_every=1, checkpoint_dir=out_dir, seed=0)
    trainer.fit()
    return {"grads": {n: p.grad.detach().clone() for n, p in method.named_parameters()},
            "params": {n: p.detach().clone() for n, p in method.named_parameters()},
            "loss": trainer.history[0]["loss"]}


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    from deqreg_lite import distributed as D

    info = D.init_from_env()
    assert info["distributed"] and info["backend"] == "gloo" and D.world_size() == 2
    # different initial seeds per rank: broadcast_parameters must make them equal
    torch.manual_seed(1000 + D.rank())
    res = _one_step(D.DistributedTrainer, out / "ckpt")
    res["rank"] = D.rank()
    res["indices"] = D.rank_indices(0, 0, BATCH, BATCH)
    torch.save(res, out / f"rank{D.rank()}.pt")
    D.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_indices_split_the_global_batch():
    from deqreg_lite.distributed import rank_indices
    from deqreg_lite.train import batch_indices

    for it in range(3):
        full = batch_indices(7, it, 6, 10)
        assert rank_indices(7, it, 6, 10, 0, 2) + rank_indices(7, it, 6, 10, 1, 2) == full
        assert sum((rank_indices(7, it, 6, 10, r, 3) for r in range(3)), []) == full
    with pytest.raises(ValueError, match="multiple"):
        rank_indices(0, 0, 5, 10, 0, 2)


def test_not_distributed_is_a_noop(monkeypatch):
    from deqreg_lite import distributed as D

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.init_from_env()
    assert info["distributed"] is False and D.is_main() and D.world_size() == 1
    method, _ = _build()
    D.average_gradients(method)  # no-op, no error


def test_two_gloo_processes_match_one_process(tmp_path):
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()),
           "--worker", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    from deqreg_lite.train import Trainer, batch_indices

    assert r0["indices"] + r1["indices"] == batch_indices(0, 0, BATCH, BATCH)
    ref = _one_step(Trainer, tmp_path / "single")
    assert abs(r0["loss"] - ref["loss"]) < 1e-6 and r0["loss"] == r1["loss"]
    for key in ("grads", "params"):
        for name, want in ref[key].items():
            for r in (r0, r1):
                torch.testing.assert_close(r[key][name], want, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
        nonzero = sum(int(g.abs().max() > 0) for g in ref["grads"].values())
        assert nonzero == len(ref["grads"])
    # rank 0 alone wrote the checkpoint, which holds the averaged step
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 1
    for name, want in ref["params"].items():
        torch.testing.assert_close(ckpt["model"][name], want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]))
