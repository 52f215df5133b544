"""Conv2d_BN and BN_Linear: a bias-free conv (linear) paired with BatchNorm, and their eval-time fold."""
from __future__ import annotations

import torch
from torch import nn


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with bn(x) == x * scale + shift in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


class Conv2d_BN(nn.Sequential):
    """Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False) then BatchNorm2d(b); keys `c`, `bn`."""

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, dilation: int = 1,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """One Conv2d with bias equal to this module in eval mode."""
        c = self.c
        scale, shift = bn_scale_shift(self.bn)
        fused = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                          c.groups, bias=True, device=c.weight.device, dtype=c.weight.dtype)
        fused.weight.copy_(c.weight * scale[:, None, None, None])
        fused.bias.copy_(shift)
        return fused


class BN_Linear(nn.Sequential):
    """BatchNorm1d(a) then Linear(a, b); keys `bn`, `l` (the classifier head)."""

    def __init__(self, a: int, b: int, bias: bool = True, std: float = 0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.constant_(self.l.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """One Linear equal to this module in eval mode."""
        scale, shift = bn_scale_shift(self.bn)
        lin = self.l
        fused = nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype)
        fused.weight.copy_(lin.weight * scale[None, :])
        bias = lin.weight @ shift
        fused.bias.copy_(bias if lin.bias is None else bias + lin.bias)
        return fused
