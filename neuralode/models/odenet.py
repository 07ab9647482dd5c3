"""The ODE-Net block of Chen et al. (2018): dynamics on 64×6×6 feature maps."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class ConcatConv2d(nn.Module):
    """A convolution that sees time as one more input channel, so f can depend on t.

    ``t`` is a scalar or one time per sample (``[B]``): under per-sample solving every image
    is at its own time.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in + 1, dim_out, kernel_size, stride, padding)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        time = t.to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([time, x], 1))


class ODEFunc(nn.Module):
    """f(t, z) = GN(ConcatConv(ReLU(GN(ConcatConv(ReLU(GN(z))))))).

    GroupNorm normalises within each sample, so f treats samples independently, which
    per-sample solving requires (BatchNorm would not).
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = group_norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = group_norm(channels)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        out = self.conv1(t, torch.relu(self.norm1(z)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)
