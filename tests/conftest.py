import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# The tests use small tensors: one thread is as fast as two on a quiet machine, and on a busy one two threads
# contend and small ops get up to ~100x slower (measured here). Subprocess tests set their own.
torch.set_num_threads(1)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def smooth_field(shape, amplitude, gen, batch=1, coarse=5):
    """A smooth random displacement (batch, ndim, *shape) in voxels, for tests."""
    ndim = len(shape)
    low = torch.randn(batch, ndim, *([coarse] * ndim), generator=gen, dtype=torch.float64) * amplitude
    mode = "bicubic" if ndim == 2 else "trilinear"
    return torch.nn.functional.interpolate(low, size=shape, mode=mode, align_corners=True)


def smooth_image(shape, gen, batch=1):
    ndim = len(shape)
    x = torch.rand(batch, 1, *shape, generator=gen, dtype=torch.float64)
    pool = torch.nn.functional.avg_pool2d if ndim == 2 else torch.nn.functional.avg_pool3d
    return pool(x, 3, 1, 1)


@pytest.fixture(scope="module")
def pair2d():
    """A small synthetic 2D pair ``(fixed, moving)``, each ``(1, 1, 32, 32)``."""
    from deqreg_lite.datasets.synthetic import synthetic_pair

    p = synthetic_pair((32, 32), seed=1, strength=1.5)
    return p["fixed"], p["moving"]


@pytest.fixture(scope="module")
def pair3d():
    """A small synthetic 3D pair ``(fixed, moving)``, each ``(1, 1, 16, 16, 16)``."""
    from deqreg_lite.datasets.synthetic import synthetic_pair

    p = synthetic_pair((16, 16, 16), seed=2, strength=1.0)
    return p["fixed"], p["moving"]

