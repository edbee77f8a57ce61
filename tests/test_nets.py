"""The VoxelMorph-configuration U-Net in 2D and 3D."""
import pytest
import torch

from deqreg_lite.nets import UNet


@pytest.mark.parametrize("ndim,shape", [(2, (32, 48)), (3, (16, 16, 32))])
def test_unet_shapes_and_near_zero_start(ndim, shape):
    net = UNet(ndim, in_channels=2 + ndim, out_channels=ndim)
    out = net(torch.rand(2, 2 + ndim, *shape))
    assert out.shape == (2, ndim, *shape)
    assert out.abs().max() < 1e-2  # the last convolution starts near zero
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_unet_vxm_feature_counts():
    net = UNet(2, 2, 2)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32, 32, 32, 32, 32, 32, 32, 16, 16, 2]


def test_unet_bad_input():
    net = UNet(2, 2, 2)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 2, 30, 32))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="ndim"):
        UNet(4, 2, 2)
