"""Fused SHSA drop-ins: `SHSA` (same constructor, keys and outputs as the official/timm module) and
`ResidualSHSA` (Residual(SHSA) with the residual add fused into the op)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops._checks import check_tensor
from ..reference import Residual
from ..reference import SHSA as StockSHSA
from ..reference.conv_bn import bn_scale_shift
from ._bn import FoldCache, fold_inputs, update_running_stats, uses_batch_stats
from ._match import is_residual, is_shsa


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.flatten(1)


def shsa_forward(m: StockSHSA, cache: FoldCache, x: torch.Tensor, residual: bool) -> torch.Tensor:
    check_tensor("x", x, ndim=4, shape=("B", m.dim, "H", "W"))
    qkv, proj = m.qkv, m.proj[1]
    train_qkv, train_proj = uses_batch_stats(qkv.bn), uses_batch_stats(proj.bn)
    if train_qkv != train_proj:  # one BN in train mode and one in eval: rare enough for the stock path
        y = StockSHSA.forward(m, x)
        return x + y if residual else y
    if train_qkv:
        y, st = ops.shsa_train(x, m.pre_norm.weight, m.pre_norm.bias, _matrix(qkv.c), qkv.bn.weight, qkv.bn.bias,
                               _matrix(proj.c), proj.bn.weight, proj.bn.bias, m.qk_dim, m.pre_norm.eps, qkv.bn.eps,
                               proj.bn.eps, residual)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        update_running_stats(qkv.bn, st.qkv_mean, st.qkv_var, count)
        update_running_stats(proj.bn, st.proj_mean, st.proj_var, count)
        return y

    def fold():
        qs, qb = bn_scale_shift(qkv.bn)
        ps, pb = bn_scale_shift(proj.bn)
        return (_matrix(qkv.c) * qs[:, None]).to(x.dtype), qb.to(x.dtype), \
            (_matrix(proj.c) * ps[:, None]).to(x.dtype), pb.to(x.dtype)

    qw, qb, pw, pb = cache.get(fold_inputs(qkv.c, qkv.bn) + fold_inputs(proj.c, proj.bn), fold, x.dtype)
    return ops.shsa(x, m.pre_norm.weight, m.pre_norm.bias, qw, qb, pw, pb, m.qk_dim, m.pre_norm.eps, residual)


class SHSA(StockSHSA):
    """Single-head self-attention on fused kernels. Keys `pre_norm`, `qkv.c`, `qkv.bn`, `proj.1.c`, `proj.1.bn`."""

    def __init__(self, dim: int, qk_dim: int, pdim: int):
        super().__init__(dim, qk_dim, pdim)
        self._fold = FoldCache()

    @classmethod
    def from_module(cls, stock: nn.Module) -> "SHSA":
        """A fused SHSA sharing the parameters and buffers of a stock (official or timm) SHSA."""
        if not is_shsa(stock):
            raise TypeError(f"SHSA.from_module: {type(stock).__name__} is not an SHSA (GroupNorm(1) pre_norm, "
                            "conv-BN qkv, ReLU + conv-BN proj)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim, new.qk_dim, new.pdim, new.scale = stock.dim, stock.qk_dim, stock.pdim, stock.qk_dim ** -0.5
        new.pre_norm, new.qkv, new.proj = stock.pre_norm, stock.qkv, stock.proj
        new._fold = FoldCache()
        new.train(stock.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shsa_forward(self, self._fold, x, residual=False)


class ResidualSHSA(Residual):
    """Residual(SHSA) with the add fused into the op; keys `m.pre_norm`, `m.qkv.*`, `m.proj.1.*`."""

    def __init__(self, m: nn.Module, drop: float = 0.0):
        """m: a fused SHSA, or a stock (official or timm) one whose parameters it adopts."""
        if not is_shsa(m):
            raise TypeError(f"ResidualSHSA: m must be an SHSA (fused or stock), got {type(m).__name__}")
        super().__init__(m if isinstance(m, SHSA) else SHSA.from_module(m), drop)

    @classmethod
    def from_module(cls, stock: nn.Module) -> "ResidualSHSA":
        if not is_residual(stock):
            raise TypeError(f"ResidualSHSA.from_module: {type(stock).__name__} is not a Residual")
        new = cls.__new__(cls)
        Residual.__init__(new, SHSA.from_module(stock.m), getattr(stock, "drop", 0.0))
        new.train(stock.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop > 0:
            return super().forward(x)
        return shsa_forward(self.m, self.m._fold, x, residual=True)
