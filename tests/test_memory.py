"""SavedBytes counts the bytes autograd saves for backward: growth with depth, freeing, peak vs total."""
import torch

from deqreg_lite.memory import SavedBytes


def chain(x, depth):
    for _ in range(depth):
        x = torch.tanh(x)  # tanh saves its output: one new tensor per step
    return x.sum()


def test_bytes_grow_with_depth_and_are_freed_by_backward():
    x = torch.rand(1000, requires_grad=True)  # 4000 bytes per saved float32 tensor
    sizes = []
    for depth in (1, 2, 4):
        with SavedBytes() as mem:
            loss = chain(x, depth)
        assert mem.now == mem.peak == mem.total == 4000 * depth
        loss.backward()
        del loss
        sizes.append(mem.now)
    assert sizes == [0, 0, 0]


def test_peak_counts_graphs_alive_together_once_per_storage():
    x = torch.rand(1000, requires_grad=True)
    with SavedBytes() as mem:
        chain(x, 3).backward()  # built and freed
        chain(x, 3).backward()
    assert mem.peak == 12000 and mem.total == 24000
    with SavedBytes() as mem:
        loss = (x * x).sum()  # mul saves both operands: the same storage, counted once
    assert mem.total == mem.peak == 4000
    del loss
