"""Deployment forms of the fused modules, built by `convert(model, inference=True)`: every BatchNorm folded
once into a plain conv / linear with bias. The layout, and so the state_dict keys, are those of the official
SHViT deploy model (its `replace_batchnorm`): Conv2d_BN -> Conv2d, Residual(depthwise Conv2d_BN) -> Conv2d with
the identity in its centre tap, BN_Linear -> Linear; SHSA keeps `pre_norm`, `qkv`, `proj.1`.

`reference_forward` (where the forward runs a `shvit` op): the same math in stock PyTorch ops, which the ONNX
exporter swaps in to emit standard ONNX operators."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..reference import SHSA as StockSHSA
from ..reference import Residual
from ._match import is_1x1_conv, is_depthwise, is_squeeze_excite, squeeze_excite_gate
from .conv_bn import _autocast


def _scale_shift64(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    # Folded in float64 and rounded once, so a float32 folded weight is as close to exact as it can be.
    if bn.running_var is None:
        raise ValueError("convert(inference=True): a BatchNorm without running statistics cannot be folded")
    mean, var = bn.running_mean.double(), bn.running_var.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


@torch.no_grad()
def fold_conv_bn(m: nn.Module, identity: bool = False, relu: bool = False) -> nn.Conv2d:
    """One Conv2d (a `DWConv` for a depthwise conv) equal to the conv-BN pair `m` (children `c`, `bn`) in eval
    mode; `identity` adds x (centre tap + 1, depthwise 'same' convs only); `relu` (DWConv only) fuses a ReLU."""
    c = m.c
    scale, shift = _scale_shift64(m.bn)
    w = c.weight.double() * scale[:, None, None, None]
    kw = {"device": c.weight.device, "dtype": c.weight.dtype}
    if is_depthwise(m) and c.padding_mode == "zeros":  # the shapes the fused depthwise op takes
        new = DWConv(c.in_channels, c.kernel_size[0], c.stride[0], relu, **kw)
    elif identity or relu:
        raise ValueError("fold_conv_bn: identity / relu fold only into an odd-kernel, 'same'-padded depthwise conv")
    else:
        new = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                        bias=True, padding_mode=c.padding_mode, **kw)
    if identity:
        k = c.kernel_size[0]
        w[:, 0, k // 2, k // 2] += 1
    new.weight.copy_(w)
    new.bias.copy_(shift)
    return new


@torch.no_grad()
def fold_bn_linear(m: nn.Module) -> nn.Linear:
    """One Linear equal to BatchNorm1d `m.bn` then Linear `m.l` in eval mode (the classifier head)."""
    lin = m.l
    scale, shift = _scale_shift64(m.bn)
    new = nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype)
    new.weight.copy_(lin.weight.double() * scale[None, :])
    bias = lin.weight.double() @ shift
    new.bias.copy_(bias if lin.bias is None else bias + lin.bias.double())
    return new


class DWConv(nn.Conv2d):
    """[ReLU](depthwise k x k conv + bias) on the fused `shvit::dwconv_bn` op; keys `weight`, `bias`."""

    def __init__(self, channels: int, ks: int = 3, stride: int = 1, relu: bool = False, device=None, dtype=None):
        super().__init__(channels, channels, ks, stride, ks // 2, groups=channels, bias=True, device=device,
                         dtype=dtype)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dwconv_bn(x, self.weight, self.bias, self.stride[0], self.relu)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}"


class FoldedSHSA(StockSHSA):
    """SHSA with both BNs folded: `qkv` and `proj.1` are 1x1 Conv2d with bias; runs the `shvit::shsa` op."""

    @classmethod
    def from_module(cls, fused: nn.Module) -> FoldedSHSA:
        """Fold a (fused or stock) SHSA; pre_norm is shared, qkv / proj.1 become new folded convs."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim, new.qk_dim, new.pdim, new.scale = fused.dim, fused.qk_dim, fused.pdim, fused.qk_dim ** -0.5
        new.pre_norm = fused.pre_norm
        new.qkv = fold_conv_bn(fused.qkv)
        new.proj = nn.Sequential(fused.proj[0], fold_conv_bn(fused.proj[1]))
        return new.eval()

    def fused_forward(self, x: torch.Tensor, residual: bool) -> torch.Tensor:
        qkv, proj = self.qkv, self.proj[1]
        return ops.shsa(x, self.pre_norm.weight, self.pre_norm.bias, qkv.weight.flatten(1), qkv.bias,
                        proj.weight.flatten(1), proj.bias, self.qk_dim, self.pre_norm.eps, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused_forward(x, residual=False)

    reference_forward = StockSHSA.forward  # the attributes it reads are all here, with plain convs


class FoldedResidualSHSA(Residual):
    """x + FoldedSHSA(x) with the add inside the op; keys `m.pre_norm`, `m.qkv`, `m.proj.1`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.fused_forward(x, residual=True)

    reference_forward = Residual.forward  # x + m(x), with m on its own reference_forward under export


class FoldedResidualFFN(Residual):
    """x + FFN(x) with both BNs folded: `m.pw1`, `m.pw2` are 1x1 Conv2d with bias (the official deploy keys);
    runs the fused `shvit::ffn` op."""

    @classmethod
    def from_module(cls, ffn_block: nn.Module) -> FoldedResidualFFN:
        """Fold a (fused or stock) Residual(FFN); the FFN keeps its class, child names and activation."""
        ffn = ffn_block.m
        m = type(ffn).__new__(type(ffn))
        nn.Module.__init__(m)
        for name, child in ffn.named_children():
            m.add_module(name, fold_conv_bn(child) if name in ("pw1", "pw2") else child)
        return cls(m).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pw1, pw2 = self.m.pw1, self.m.pw2
        return ops.ffn(x, pw1.weight.flatten(1), pw1.bias, pw2.weight.flatten(1), pw2.bias)

    reference_forward = Residual.forward  # x + pw2(act(pw1(x))) with the folded convs


class FoldedPatchMerging(nn.Module):
    """PatchMerging with folded convs; `conv2` is a DWConv with the second ReLU fused; conv3 runs on the
    pw_conv_bn op with the SqueezeExcite gate applied inside it (a recognised SE, outside autocast). Keys as the
    stock one's."""

    @classmethod
    def from_module(cls, pm: nn.Module, act1: str) -> FoldedPatchMerging:
        """Fold a (fused or stock) PatchMerging whose first activation is the child named `act1`."""
        new = cls()
        for name, child in pm.named_children():  # keeps the stock child order and names (act or act1 / act2)
            if name in ("conv1", "conv3"):
                child = fold_conv_bn(child)
            elif name == "conv2":
                child = fold_conv_bn(child, relu=True)
            new.add_module(name, child)
        new._act1 = act1
        return new.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.conv2(getattr(self, self._act1)(self.conv1(x)))
        conv3 = self.conv3
        if is_squeeze_excite(self.se) and is_1x1_conv(conv3) and not _autocast(u):
            return ops.pw_conv_bn(u, conv3.weight.flatten(1), conv3.bias, squeeze_excite_gate(self.se, u))
        return conv3(self.se(u))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stock math (onnx_export.reference_math)."""
        return self.conv3(self.se(self.conv2(getattr(self, self._act1)(self.conv1(x)))))
