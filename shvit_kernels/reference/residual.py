"""Residual(m): x + m(x), with optional stochastic depth and the depthwise identity fold."""
from __future__ import annotations

import torch
from torch import nn

from .conv_bn import Conv2d_BN


class Residual(nn.Module):
    """x + m(x); key `m`. In training with drop > 0, m(x) is dropped per sample (stochastic depth)."""

    def __init__(self, m: nn.Module, drop: float = 0.0):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop)
            return x + self.m(x) * keep.to(x.dtype)
        return x + self.m(x)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """For a depthwise Conv2d_BN with 'same' padding: one Conv2d whose centre tap absorbs the identity."""
        if not isinstance(self.m, Conv2d_BN):
            return self
        conv = self.m.fuse()
        k = conv.kernel_size
        if conv.groups != conv.in_channels or conv.in_channels != conv.out_channels or conv.stride != (1, 1) \
                or conv.padding != (k[0] // 2, k[1] // 2) or k[0] % 2 == 0 or k[1] % 2 == 0:
            raise ValueError("Residual.fuse: only a stride-1, odd-kernel, same-padded depthwise conv folds the identity")
        conv.weight[:, 0, k[0] // 2, k[1] // 2] += 1
        return conv
