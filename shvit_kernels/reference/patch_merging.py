"""PatchMerging (SHViT's downsampling): 1x1 expand x4, ReLU, depthwise 3x3 stride 2, ReLU,
Squeeze-Excite, 1x1 to the next stage's width."""
from __future__ import annotations

import torch
from torch import nn

from .conv_bn import Conv2d_BN


def make_divisible(v: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor` to v, at least `divisor` (SE's reduced width; never rounded up
    for being more than 10% below v, matching the SE of timm with round_limit=0)."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean_hw(x))))); fc1/fc2 are 1x1 convs with bias. Keys `fc1`, `fc2`."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, rd_divisor: int = 8):
        super().__init__()
        rd = make_divisible(channels * rd_ratio, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class PatchMerging(nn.Module):
    """Keys `conv1`, `conv2`, `se`, `conv3`; halves H and W, dim -> out_dim."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hid = dim * 4
        self.conv1 = Conv2d_BN(dim, hid, 1, 1, 0)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hid, hid, 3, 2, 1, groups=hid)
        self.se = SqueezeExcite(hid, 0.25)
        self.conv3 = Conv2d_BN(hid, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.conv3(self.se(x))


