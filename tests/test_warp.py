"""warp, identity, compose, resize_disp, integrate_velocity: against scipy and against each other."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import smooth_field, smooth_image
from deqreg_lite.warp import Warp, compose, identity, integrate_velocity, resize_disp, resize_image, warp


@pytest.mark.parametrize("shape", [(23, 31), (11, 13, 9)])
def test_warp_matches_map_coordinates(shape, rng):
    image = smooth_image(shape, rng)
    disp = smooth_field(shape, 3.0, rng)
    ours = warp(image, disp)[0, 0].numpy()
    coords = identity(shape, dtype=torch.float64)[0] + disp[0]
    ref = ndimage.map_coordinates(image[0, 0].numpy(), coords.numpy(), order=1, mode="nearest")
    np.testing.assert_allclose(ours, ref, atol=1e-10)


@pytest.mark.parametrize("shape", [(23, 31), (11, 13, 9)])
def test_warp_nearest_labels_match_map_coordinates_order0(shape, rng):
    labels = torch.randint(0, 5, (1, 1, *shape), generator=rng)
    disp = smooth_field(shape, 3.0, rng) + 0.013  # avoid exact .5 ties
    ours = warp(labels, disp, mode="nearest")
    assert ours.dtype == labels.dtype
    coords = identity(shape, dtype=torch.float64)[0] + disp[0]
    ref = ndimage.map_coordinates(labels[0, 0].numpy(), coords.numpy(), order=0, mode="nearest")
    np.testing.assert_array_equal(ours[0, 0].numpy(), ref)


def test_warp_zero_padding_and_shift():
    image = torch.arange(12.0).view(1, 1, 3, 4)
    disp = torch.zeros(1, 2, 3, 4)
    disp[:, 1] = 1.0  # read one column to the right
    out = warp(image, disp, padding="zeros")
    assert torch.allclose(out[..., :3], image[..., 1:])
    assert torch.all(out[..., 3] == 0)
    assert torch.allclose(warp(image, disp, padding="border")[..., 3], image[..., 3])


def test_identity_and_batch_broadcast(rng):
    grid = identity((4, 5))
    assert grid.shape == (1, 2, 4, 5)
    assert grid[0, 0, 3, 2] == 3 and grid[0, 1, 3, 2] == 2
    image = smooth_image((8, 9), rng).float()
    disp = torch.zeros(3, 2, 8, 9)
    assert warp(image, disp).shape == (3, 1, 8, 9)
    assert torch.allclose(warp(image, disp)[2], image[0], atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 44), (32, 32, 32)])
def test_compose_matches_sequential_warping(shape, rng):
    image = smooth_field(shape, 1.0, rng, coarse=4)[:, :1]  # smooth, so interpolation error stays small
    u = smooth_field(shape, 1.5, rng)
    v = smooth_field(shape, 1.5, rng)
    seq = warp(warp(image, v), u)
    inner = (slice(None), slice(None)) + (slice(4, -4),) * len(shape)
    err = (seq - warp(image, compose(u, v)))[inner].abs().mean() / image.std()
    naive = (seq - warp(image, u + v))[inner].abs().mean() / image.std()  # adding fields is wrong
    assert err < 0.01
    assert err < naive / 5
    # composing with zero is the identity operation
    assert torch.allclose(compose(u, torch.zeros_like(u)), u)
    assert torch.allclose(compose(torch.zeros_like(v), v), v)


def test_resize_disp_rescales_values():
    shape = (17, 33)
    a = torch.tensor([[0.5, 0.0], [0.0, 1.5]], dtype=torch.float64)
    x = identity(shape, dtype=torch.float64)
    disp = torch.einsum("ij,bj...->bi...", a, x)  # linear field: stays exact under linear resampling
    small = resize_disp(disp, (9, 17))
    xs = identity((9, 17), dtype=torch.float64)
    assert torch.allclose(small, torch.einsum("ij,bj...->bi...", a, xs), atol=1e-10)
    assert resize_disp(disp, shape) is disp


def test_integrate_velocity_zero_and_small(rng):
    v = torch.zeros(1, 2, 10, 12)
    assert torch.equal(integrate_velocity(v), v)
    v = smooth_field((30, 30), 0.01, rng)
    assert torch.allclose(integrate_velocity(v), v, atol=1e-4)  # tiny fields: exp(v) ~ id + v


def test_warp_module_wraps_function(rng):
    image = smooth_image((8, 9), rng)
    disp = smooth_field((8, 9), 1.0, rng)
    assert torch.equal(Warp()(image, disp), warp(image, disp))
    assert "bilinear" in repr(Warp())


def test_warp_gradients_flow(rng):
    image = smooth_image((10, 12), rng)
    disp = smooth_field((10, 12), 1.0, rng).requires_grad_(True)
    warp(image, disp).sum().backward()
    assert disp.grad is not None and torch.isfinite(disp.grad).all()


def test_bad_inputs_raise_clear_errors(rng):
    image = torch.rand(1, 1, 8, 9)
    with pytest.raises(ValueError, match="spatial shape"):
        warp(image, torch.zeros(1, 2, 8, 10))
    with pytest.raises(ValueError, match="ndim=2"):
        warp(image, torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        warp(torch.rand(8, 9), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="NaN"):
        warp(image, torch.full((1, 2, 8, 9), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        warp(torch.full((1, 1, 8, 9), float("nan")), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="mode"):
        warp(image, torch.zeros(1, 2, 8, 9), mode="cubic")
    with pytest.raises(ValueError, match="nearest"):
        warp(torch.ones(1, 1, 8, 9, dtype=torch.long), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="batch"):
        warp(torch.rand(2, 1, 8, 9), torch.zeros(3, 2, 8, 9))
    with pytest.raises(TypeError):
        warp(image, torch.zeros(1, 2, 8, 9), interp="linear")
    with pytest.raises(ValueError, match="same shape"):
        compose(torch.zeros(1, 2, 8, 9), torch.zeros(1, 2, 8, 8))


def test_resize_image_keeps_corners_and_linear_ramps():
    ramp = identity((17, 33), dtype=torch.float64)[:, 1:]  # value = column index: linear, so resampling is exact
    small = resize_image(ramp, (9, 17), blur=False)
    assert torch.allclose(small, identity((9, 17), dtype=torch.float64)[:, 1:] * 2)
    assert resize_image(ramp, (17, 33)) is ramp
    blurred = resize_image(torch.rand(1, 1, 40, 40), (20, 20))
    assert blurred.shape == (1, 1, 20, 20)
    with pytest.raises(ValueError, match="entries"):
        resize_image(ramp, (9,))


# ------------------------------------------------------------------------------------------- exact label IDs
from hypothesis import given, settings, strategies as st  # noqa: E402


def test_nearest_warp_keeps_a_large_atlas_id():
    """614454277 (an Allen mouse atlas ID) became 614454272 when labels were cast to float32."""
    labels = torch.full((1, 1, 4, 5), 614454277, dtype=torch.int64)
    labels[0, 0, 1, 2] = 7
    out = warp(labels, torch.zeros(1, 2, 4, 5), mode="nearest")
    assert out.dtype == torch.int64
    assert torch.equal(out, labels)


@settings(max_examples=40, deadline=None)
@given(shape=st.one_of(st.tuples(st.integers(1, 7), st.integers(1, 7)),
                       st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5))),
       batch=st.integers(1, 2), channels=st.integers(1, 2), seed=st.integers(0, 2 ** 31 - 1),
       shift=st.lists(st.integers(-3, 3), min_size=3, max_size=3),
       padding=st.sampled_from(["border", "zeros"]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_nearest_warp_returns_exact_int64_ids(shape, batch, channels, seed, shift, padding, dtype):
    """Identity and integer shifts copy int64 IDs up to 2**62 exactly (border: clamped index; zeros: 0 outside)."""
    gen = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    labels = torch.randint(-2 ** 62, 2 ** 62, (batch, channels, *shape), generator=gen, dtype=torch.int64)
    zero = torch.zeros(batch, ndim, *shape, dtype=dtype)
    assert torch.equal(warp(labels, zero, mode="nearest", padding=padding), labels)
    shift = [k if n > 1 else 0 for k, n in zip(shift, shape)]  # a 1-voxel axis has no direction to move along
    disp = zero.clone()
    for i in range(ndim):
        disp[:, i] = shift[i]
    out = warp(labels, disp, mode="nearest", padding=padding)
    assert out.dtype == torch.int64
    src = [torch.arange(s) + shift[i] for i, s in enumerate(shape)]
    inside = torch.ones(shape, dtype=torch.bool)
    for i, s in enumerate(src):
        ok = (s >= 0) & (s < shape[i])
        inside &= ok.view(*([1] * i), -1, *([1] * (ndim - i - 1)))
    expect = labels[(slice(None), slice(None)) + torch.meshgrid(
        *[s.clamp(0, n - 1) for s, n in zip(src, shape)], indexing="ij")]
    if padding == "zeros":
        expect = expect.masked_fill(~inside, 0)
    assert torch.equal(out, expect)


def test_nearest_warp_float_and_bool_labels_keep_working(rng):
    labels = torch.randint(0, 5, (2, 1, 9, 11), generator=rng)
    disp = smooth_field((9, 11), 2.0, rng, batch=2).float() + 0.013
    as_int = warp(labels, disp, mode="nearest")
    assert torch.equal(warp(labels.float(), disp, mode="nearest"), as_int.float())
    assert torch.equal(warp(labels == 3, disp, mode="nearest"), as_int == 3)
    # one label map shared across a batch of displacements
    assert torch.equal(warp(labels[:1], disp, mode="nearest")[1], warp(labels[:1], disp[1:], mode="nearest")[0])


def test_gradient_on_grid_lines_is_the_central_difference_in_any_precision():
    """At zero displacement every sample lands on a grid line, where linear interpolation has a left and a right
    derivative; ``grid_sample`` picked one by rounding (differently in float32 and float64). The warp gives the
    central difference there, the same in both precisions; the value and the image's gradient are unchanged."""
    from deqreg_lite import warp as warp_module

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 9, 11, generator=gen, dtype=torch.float64)
    weights = torch.rand(2, 1, 9, 11, generator=gen, dtype=torch.float64)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        disp = torch.zeros(2, 2, 9, 11, dtype=dtype, requires_grad=True)
        img = image.to(dtype).clone().requires_grad_(True)
        out = warp(img, disp)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        assert torch.allclose(out.detach(), img.detach(), atol=tol)
        (out * weights.to(dtype)).sum().backward()
        assert torch.allclose(img.grad, weights.to(dtype), atol=tol)  # the identity warp's image gradient
        grads[dtype] = disp.grad.double()
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1), mode="replicate")
    central = torch.cat([(padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]) / 2,
                         (padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]) / 2], dim=1) * weights
    assert torch.allclose(grads[torch.float64], central, atol=1e-12)
    assert torch.allclose(grads[torch.float32], central, atol=1e-6)
    # off the grid lines, the exact derivative of the interpolant (finite differences)
    disp = torch.full((1, 2, 9, 11), 0.3, dtype=torch.float64, requires_grad=True)
    warp(image[:1], disp).sum().backward()
    h = 1e-6
    fd = (warp(image[:1], disp.detach() + h).sum() - warp(image[:1], disp.detach() - h).sum()) / (2 * h)
    assert float(disp.grad.sum()) == pytest.approx(float(fd), rel=1e-6)
    assert warp_module.TIE < 1e-3
