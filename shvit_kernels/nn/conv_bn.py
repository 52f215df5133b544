"""Drop-in for the Conv2d_BN pairs outside the fused blocks (the stem's 3x3 stride-2 convs, PatchMerging's 1x1
convs) and the ReLU after them.

PatchMerging's 1x1 convs run the `pw_conv_bn` op (outside autocast) on CUDA: in training one GEMM whose batch
statistics, BatchNorm and ReLU are fused around it, and conv3 takes its SqueezeExcite gate in the GEMM's operand
loads (`forward(x, gate)`), in eval too. On the CPU only the gated eval conv3 runs the op (see _runs_op).
Everything else stays on the library convolution (oneDNN / cuDNN), as issue 5 allows: in eval mode (outside
autocast) with the BatchNorm folded into the conv's weight and bias (cached until a parameter or buffer changes),
so the conv output is written once instead of going through BN and ReLU passes; on the CPU the ReLU runs inside
oneDNN's convolution as a post-op. Training there is the stock conv + BatchNorm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._checks import autocast_enabled, check_same_device, check_tensor
from ..reference import Conv2d_BN
from ..reference.conv_bn import bn_scale_shift
from ._bn import FoldCache, fold_inputs, update_running_stats, uses_batch_stats
from ._match import is_conv_bn, is_pointwise


_MKLDNN = torch.backends.mkldnn.is_available()


def _onednn_ok(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor) -> bool:
    """oneDNN's fused convolution + ReLU has no autograd formula and no export / compile lowering of ours:
    plain eager inference on float32 CPU tensors only."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return (_MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def _autocast(x: torch.Tensor) -> bool:
    """Under autocast the stock conv + BN run as they are: autocast would round the BN-folded weight to 16 bits,
    another rounding than stock's, which deep ill-conditioned input gradients amplify (tests/integration)."""
    return autocast_enabled(x.device.type)


class ConvBN(Conv2d_BN):
    """[ReLU](BN(Conv2d(x))) with the keys of Conv2d_BN (`c`, `bn`); `relu` takes in the ReLU that follows."""

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, dilation: int = 1,
                 groups: int = 1, bn_weight_init: float = 1.0, relu: bool = False):
        super().__init__(a, b, ks, stride, pad, dilation, groups, bn_weight_init)
        self.relu = relu
        self._fold = FoldCache()

    @classmethod
    def from_module(cls, stock: nn.Module, relu: bool = False) -> ConvBN:
        """Wrap a stock conv-BN pair (children `c`, `bn`), sharing its parameters and buffers."""
        if not is_conv_bn(stock):
            raise TypeError(f"ConvBN.from_module needs a bias-free Conv2d `c` + BatchNorm2d `bn`, got "
                            f"{type(stock).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.add_module("c", stock.c)
        new.add_module("bn", stock.bn)
        new.relu = relu
        new._fold = FoldCache()
        new.train(stock.training)
        return new

    def _runs_op(self, x: torch.Tensor, train: bool, gated: bool) -> bool:
        """Whether the pw_conv_bn op runs this layer: a 1x1 conv outside autocast, on CUDA (Triton), or on the CPU in
        eval mode with a gate. The C++ op's training kernels time slower than, at best level with, stock's oneDNN
        convolution + BatchNorm at PatchMerging's S4 sizes (ad-hoc timing, both layouts: their MKL weight-gradient
        GEMMs), and an ungated eval conv is already one oneDNN call with BN folded and the ReLU as its post-op."""
        if not is_pointwise(self) or _autocast(x):
            return False
        return x.device.type == "cuda" or (x.device.type == "cpu" and gated and not train)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """gate (B, in_channels), optional: the conv reads x * gate (PatchMerging's SqueezeExcite)."""
        conv, bn = self.c, self.bn
        check_tensor("x", x, ndim=4, shape=("B", conv.in_channels, "H", "W"))
        check_same_device("x", x, **{"c.weight": conv.weight})
        train = uses_batch_stats(bn)
        op = self._runs_op(x, train, gate is not None)
        if gate is not None and not op:
            x, gate = x * gate[:, :, None, None], None
        if train:
            if op:
                y, mean, var = ops.pw_conv_bn_train(x, conv.weight.flatten(1), bn.weight, bn.bias, bn.eps, gate,
                                                    self.relu)
                update_running_stats(bn, mean, var, x.shape[0] * x.shape[2] * x.shape[3])
                return y
            y = bn(conv(x))
            return F.relu(y) if self.relu else y
        if _autocast(x):
            y = bn(conv(x))
            return F.relu(y) if self.relu else y

        def fold():
            scale, shift = bn_scale_shift(bn)
            return (conv.weight * scale[:, None, None, None]).to(x.dtype), shift.to(x.dtype)

        w, b = self._fold.get(fold_inputs(conv, bn), fold, x.dtype)
        if gate is not None:
            return ops.pw_conv_bn(x, w.flatten(1), b, gate, self.relu)
        if _onednn_ok(conv, x, w):
            return torch.ops.mkldnn._convolution_pointwise(x, w, b, conv.padding, conv.stride, conv.dilation,
                                                           conv.groups, "relu" if self.relu else "none", [], "")
        y = conv._conv_forward(x, w, b)
        return F.relu(y, inplace=True) if self.relu else y  # the conv's backward does not need its output

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stock math (onnx_export.reference_math): conv, BatchNorm, ReLU as separate ops."""
        y = self.bn(self.c(x))
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return "relu=True" if self.relu else ""


class FusedReLU(nn.Identity):
    """Holds the place (and the parameter-free state_dict slot) of a ReLU that the ConvBN before it applies."""
