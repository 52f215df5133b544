"""Fused drop-ins for SHViT's depthwise Conv2d_BN blocks: the residual 3x3 block and PatchMerging."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops._checks import check_positive_ints, check_same_device, check_tensor
from ..reference import Conv2d_BN, PatchMerging, Residual
from ..reference.conv_bn import bn_scale_shift
from ._bn import FoldCache, fold_inputs, update_running_stats, uses_batch_stats
from .conv_bn import ConvBN
from ._match import is_depthwise, is_patch_merging, is_residual, is_squeeze_excite, patch_merging_acts, \
    squeeze_excite_gate


def dwconv_bn_forward(m: nn.Module, cache: FoldCache, x: torch.Tensor, residual: bool, relu: bool) -> torch.Tensor:
    """[relu](BN(dwconv(x)) [+ x]) through the fused ops; running stats updated as nn.BatchNorm2d."""
    conv, bn = m.c, m.bn
    stride = conv.stride[0]
    if uses_batch_stats(bn):
        y, mean, var = ops.dwconv_bn_train(x, conv.weight, bn.weight, bn.bias, bn.eps, stride, residual, relu)
        update_running_stats(bn, mean, var, y.numel() // max(y.shape[1], 1))
        return y

    def fold():
        scale, shift = bn_scale_shift(bn)
        w = conv.weight * scale[:, None, None, None]
        if residual:  # x + conv(x) == conv'(x) with 1 added to the centre tap
            k = w.shape[-1]
            w = w + nn.functional.pad(torch.ones_like(w[..., :1, :1]), [k // 2] * 4)
        return w.to(x.dtype), shift.to(x.dtype)

    w, b = cache.get(fold_inputs(conv, bn), fold, x.dtype)
    return ops.dwconv_bn(x, w, b, stride, relu)


class ResidualDWConvBN(Residual):
    """x + BN(DWConv(x)): drop-in for `Residual(Conv2d_BN(d, d, k, 1, k//2, groups=d))` (keys `m.c`, `m.bn`)."""

    def __init__(self, dim: int, ks: int = 3, bn_weight_init: float = 1.0):
        check_positive_ints("ResidualDWConvBN", dim=dim, ks=ks)
        if ks % 2 == 0 or ks > 7:
            raise ValueError(f"ResidualDWConvBN: ks must be odd and at most 7, got {ks}")
        super().__init__(Conv2d_BN(dim, dim, ks, 1, ks // 2, groups=dim, bn_weight_init=bn_weight_init))
        self._fold = FoldCache()

    @classmethod
    def from_module(cls, stock: nn.Module) -> "ResidualDWConvBN":
        """Wrap a stock Residual(depthwise Conv2d_BN), sharing its parameters and buffers."""
        if not (is_residual(stock) and is_depthwise(stock.m, stride=1)):
            raise TypeError("ResidualDWConvBN.from_module needs a Residual around a stride-1 depthwise Conv2d_BN")
        new = cls.__new__(cls)
        Residual.__init__(new, stock.m, getattr(stock, "drop", 0.0))
        new._fold = FoldCache()
        new.train(stock.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=4, shape=("B", self.m.c.in_channels, "H", "W"))
        if self.training and self.drop > 0:  # stochastic depth scales the branch alone: no identity fold
            return super().forward(x)
        return dwconv_bn_forward(self.m, self._fold, x, residual=True, relu=False)


class FusedPatchMerging(PatchMerging):
    """PatchMerging whose stride-2 depthwise Conv2d_BN + ReLU runs as one fused op, and whose 1x1 convs are
    ConvBNs (BN folded in eval; conv1 takes in the first ReLU, conv3 the SqueezeExcite's gate, applied inside the
    pw_conv_bn op where ConvBN runs it). Same keys."""

    def __init__(self, dim: int, out_dim: int):
        check_positive_ints("FusedPatchMerging", dim=dim, out_dim=out_dim)
        super().__init__(dim, out_dim)
        self._adopt("act")

    @classmethod
    def from_module(cls, stock: nn.Module) -> "FusedPatchMerging":
        """A fused PatchMerging sharing the children of a stock (official or timm) one."""
        if not is_patch_merging(stock):
            raise TypeError("FusedPatchMerging.from_module needs a PatchMerging with a stride-2 depthwise conv2")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in stock.named_children():
            new.add_module(name, child)
        new._adopt(patch_merging_acts(stock)[0])
        new.train(stock.training)
        return new

    def _adopt(self, act1: str) -> None:
        # Both ReLUs run inside the convs before them; the ReLU modules stay (no state) for the inference fold.
        self._fold = FoldCache()
        self._act1 = act1
        self.conv1 = self.conv1 if isinstance(self.conv1, ConvBN) else ConvBN.from_module(self.conv1, relu=True)
        self.conv3 = self.conv3 if isinstance(self.conv3, ConvBN) else ConvBN.from_module(self.conv3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv1.c.weight
        check_tensor("x", x, ndim=4, shape=("B", w.shape[1], "H", "W"))
        check_same_device("x", x, **{"conv1.c.weight": w})
        x = self.conv1(x)
        x = dwconv_bn_forward(self.conv2, self._fold, x, residual=False, relu=True)
        if is_squeeze_excite(self.se):  # conv3 applies the gate: in its op's GEMM input where that runs
            return self.conv3(x, gate=squeeze_excite_gate(self.se, x))
        return self.conv3(self.se(x))
