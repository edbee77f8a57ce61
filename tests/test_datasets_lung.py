"""The shipped lung sample (data/samples/lung3d.npz and its NLST-style keypoint CSVs): contents and exact truth."""
import numpy as np
import pytest
import torch

from deqreg_lite.config import samples_dir
from deqreg_lite.datasets import load_sample
from deqreg_lite.metrics import tre
from deqreg_lite.warp import warp

SHAPE = (96, 96, 96)
N_KP = 200


def invert_on_grid(disp: torch.Tensor, iterations: int = 200, tol: float = 1e-5) -> torch.Tensor:
    """u with u(x) = -disp(x + u(x)) on the grid (fixed-point iteration), so that warp(warp(f, disp), u) ~ f."""
    u = -disp
    for _ in range(iterations):
        new = -warp(disp, u)
        change = float((new - u).abs().max())
        u = new
        if change < tol:
            break
    return u


@pytest.fixture(scope="module")
def lung():
    return load_sample("lung3d")


def test_shapes_dtypes_ranges(lung):
    for key in ("fixed", "moving"):
        assert lung[key].shape == (1, 1, *SHAPE) and lung[key].dtype == torch.float32
        assert float(lung[key].min()) >= 0.0 and float(lung[key].max()) <= 1.0
    for key in ("fixed_seg", "moving_seg", "fixed_mask", "moving_mask"):
        assert lung[key].shape == (1, 1, *SHAPE) and lung[key].dtype == torch.int64
        assert set(torch.unique(lung[key]).tolist()) == {0, 1}
    assert torch.equal(lung["fixed_mask"], lung["fixed_seg"])
    assert lung["true_disp"].shape == (1, 3, *SHAPE) and lung["true_disp"].dtype == torch.float32
    for key in ("fixed_kp", "moving_kp"):
        assert lung[key].shape == (N_KP, 3) and lung[key].dtype == torch.float32
    assert lung["spacing"] == (3.0, 3.0, 3.0)
    assert lung["labels"] == [1] and lung["label_names"] == {1: "lung"}
    assert len(lung["ids"]) == 2
    frac = float(lung["fixed_seg"].float().mean())
    assert 0.08 < frac < 0.3  # lungs are a good part of a chest crop
    # exhale: smaller lungs in the moving image
    assert float(lung["moving_seg"].float().mean()) < frac


def test_moving_is_the_warped_fixed(lung):
    assert torch.allclose(lung["moving"], warp(lung["fixed"], lung["true_disp"]).clamp(0, 1), atol=1e-6)
    assert torch.equal(lung["moving_seg"], warp(lung["fixed_seg"], lung["true_disp"], mode="nearest"))


def test_csv_keypoints_match_npz(lung):
    folder = samples_dir() / "lung3d_keypoints"
    fixed = np.loadtxt(folder / "LUNG_0001_0000.csv", delimiter=",", dtype=np.float64)
    moving = np.loadtxt(folder / "LUNG_0001_0001.csv", delimiter=",", dtype=np.float64)
    assert fixed.shape == moving.shape == (N_KP, 3)
    np.testing.assert_allclose(fixed, lung["fixed_kp"].double().numpy(), atol=1e-5)
    np.testing.assert_allclose(moving, lung["moving_kp"].double().numpy(), atol=1e-5)


def test_keypoints_inside_lung_mask(lung):
    idx = torch.round(lung["fixed_kp"]).long()
    assert bool((idx >= 0).all()) and bool((idx < torch.tensor(SHAPE)).all())
    assert bool(lung["fixed_seg"][0, 0][idx[:, 0], idx[:, 1], idx[:, 2]].bool().all())


def test_moving_keypoints_are_exact_correspondences(lung):
    # moving(y) = fixed(y + true_disp(y)): the moving keypoint q shows the fixed keypoint p = q + true_disp(q)
    from deqreg_lite.metrics import sample_disp

    q = lung["moving_kp"][None]
    p = q + sample_disp(lung["true_disp"], q)
    assert float((p[0] - lung["fixed_kp"]).abs().max()) < 1e-3


def test_tre_of_exact_answer_is_near_zero(lung):
    spacing = lung["spacing"]
    zero = tre(lung["fixed_kp"], lung["moving_kp"], torch.zeros(1, 3, *SHAPE), spacing)
    expected = ((lung["moving_kp"] - lung["fixed_kp"]) * torch.tensor(spacing)).norm(dim=1)
    assert torch.allclose(zero, expected, atol=1e-4)
    assert 3.0 < float(zero.mean()) < 15.0  # several mm of breathing motion
    u = invert_on_grid(lung["true_disp"])
    exact = tre(lung["fixed_kp"], lung["moving_kp"], u, spacing)
    assert float(exact.mean()) < 0.1 and float(exact.max()) < 0.3
