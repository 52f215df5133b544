"""Fused drop-in for SHViT's residual FFN block: `Residual(FFN(d, h))` (1x1 Conv2d_BN, ReLU, 1x1 Conv2d_BN)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops._checks import check_positive_ints, check_tensor
from ..reference import FFN, Residual
from ..reference.conv_bn import bn_scale_shift
from ._bn import FoldCache, fold_inputs, update_running_stats, uses_batch_stats
from ._match import is_ffn, is_residual


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.flatten(1)


class ResidualFFN(Residual):
    """x + FFN(x) on the fused ops: drop-in for `Residual(FFN(dim, hidden))` (keys `m.pw1.c`, `m.pw1.bn`,
    `m.pw2.c`, `m.pw2.bn`). Eval folds both BNs once (cached); training uses batch statistics and updates the
    running statistics as nn.BatchNorm2d. Stochastic depth (`drop` > 0, training) runs the stock path."""

    def __init__(self, dim: int, hidden: int | None = None, drop: float = 0.0):
        hidden = 2 * dim if hidden is None else hidden
        check_positive_ints("ResidualFFN", dim=dim, hidden=hidden)
        super().__init__(FFN(dim, hidden), drop)
        self._fold = FoldCache()

    @classmethod
    def from_module(cls, stock: nn.Module) -> "ResidualFFN":
        """Wrap a stock (official or timm) Residual(FFN), sharing its parameters and buffers."""
        if not (is_residual(stock) and is_ffn(stock.m)):
            raise TypeError(f"ResidualFFN.from_module needs a Residual around an FFN (1x1 conv-BN pw1, ReLU act, "
                            f"1x1 conv-BN pw2), got {type(stock).__name__}")
        new = cls.__new__(cls)
        Residual.__init__(new, stock.m, getattr(stock, "drop", 0.0))
        new._fold = FoldCache()
        new.train(stock.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pw1, pw2 = self.m.pw1, self.m.pw2
        check_tensor("x", x, ndim=4, shape=("B", pw1.c.in_channels, "H", "W"))
        train1, train2 = uses_batch_stats(pw1.bn), uses_batch_stats(pw2.bn)
        if (self.training and self.drop > 0) or train1 != train2:  # rare: the stock path
            return super().forward(x)
        if train1:
            y, st = ops.ffn_train(x, _matrix(pw1.c), pw1.bn.weight, pw1.bn.bias, _matrix(pw2.c), pw2.bn.weight,
                                  pw2.bn.bias, pw1.bn.eps, pw2.bn.eps)
            count = x.shape[0] * x.shape[2] * x.shape[3]
            update_running_stats(pw1.bn, st.pw1_mean, st.pw1_var, count)
            update_running_stats(pw2.bn, st.pw2_mean, st.pw2_var, count)
            return y

        def fold():
            s1, t1 = bn_scale_shift(pw1.bn)
            s2, t2 = bn_scale_shift(pw2.bn)
            return (_matrix(pw1.c) * s1[:, None]).to(x.dtype), t1.to(x.dtype), \
                (_matrix(pw2.c) * s2[:, None]).to(x.dtype), t2.to(x.dtype)

        return ops.ffn(x, *self._fold.get(fold_inputs(pw1.c, pw1.bn) + fold_inputs(pw2.c, pw2.bn), fold, x.dtype))
