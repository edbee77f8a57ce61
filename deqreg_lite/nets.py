"""The U-Net of VoxelMorph's default configuration, for 2D and 3D.

Encoder features 16-32-32-32 (one 3x3 convolution per level, then max-pooling), decoder 32-32-32-32 (one
convolution per level, then upsampling and concatenation with the skip connection), then 32-16-16 at full
resolution and a final 3x3 convolution to ``out_channels``. LeakyReLU(0.2) throughout. The last convolution starts
near zero (normal, std ``final_init_std``), so an untrained network predicts an almost-zero update.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "VXM_ENCODER", "VXM_DECODER"]

VXM_ENCODER = (16, 32, 32, 32)
VXM_DECODER = (32, 32, 32, 32, 32, 16, 16)


class _ConvAct(nn.Module):
    def __init__(self, ndim: int, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = (nn.Conv2d if ndim == 2 else nn.Conv3d)(cin, cout, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class UNet(nn.Module):
    """VoxelMorph-style U-Net.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: input channels (e.g. 2 for ``[fixed, moving]``; ``2 + ndim`` for ``[fixed, warped, disp]``).
        out_channels: output channels (``ndim`` for a displacement or an update).
        encoder, decoder: feature counts; the decoder's first ``len(encoder)`` entries are used on the way up,
            the rest at full resolution.
        final_init_std: std of the normal init of the last convolution (its bias starts at 0).
    Input ``(B, in_channels, *spatial)`` with every spatial size divisible by ``2**len(encoder)``; output
    ``(B, out_channels, *spatial)``.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, encoder: Sequence[int] = VXM_ENCODER,
                 decoder: Sequence[int] = VXM_DECODER, final_init_std: float = 1e-5) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if len(decoder) < len(encoder):
            raise ValueError(f"decoder needs at least {len(encoder)} entries, got {len(decoder)}")
        self.ndim, self.in_channels, self.out_channels = ndim, in_channels, out_channels
        self.levels = len(encoder)
        self.down = nn.ModuleList()
        c = in_channels
        skips = []
        for f in encoder:
            self.down.append(_ConvAct(ndim, c, f))
            skips.append(f)
            c = f
        self.up = nn.ModuleList()
        for i, f in enumerate(decoder[: self.levels]):
            self.up.append(_ConvAct(ndim, c, f))
            c = f + skips[-1 - i]
        self.extra = nn.ModuleList()
        for f in decoder[self.levels:]:
            self.extra.append(_ConvAct(ndim, c, f))
            c = f
        self.head = (nn.Conv2d if ndim == 2 else nn.Conv3d)(c, out_channels, 3, padding=1)
        nn.init.normal_(self.head.weight, std=final_init_std)
        nn.init.zeros_(self.head.bias)
        self._pool = F.max_pool2d if ndim == 2 else F.max_pool3d
        self._mode = "bilinear" if ndim == 2 else "trilinear"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, *{self.ndim} spatial axes), got {tuple(x.shape)}")
        factor = 2 ** self.levels
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"every spatial size must be divisible by {factor}, got {tuple(x.shape[2:])}")
        skips = []
        for conv in self.down:
            x = conv(x)
            skips.append(x)
            x = self._pool(x, 2)
        for conv in self.up:
            x = conv(x)
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
        for conv in self.extra:
            x = conv(x)
        return self.head(x)
