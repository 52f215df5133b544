"""FFN: Conv2d_BN 1x1 (ed -> h), ReLU, Conv2d_BN 1x1 (h -> ed, BN weight initialised to 0)."""
from __future__ import annotations

import torch
from torch import nn

from .conv_bn import Conv2d_BN


class FFN(nn.Module):
    """Keys `pw1.c`, `pw1.bn`, `pw2.c`, `pw2.bn`."""

    def __init__(self, ed: int, h: int):
        super().__init__()
        self.pw1 = Conv2d_BN(ed, h)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(h, ed, bn_weight_init=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))
