"""Fused drop-in for PVT's `Attention` (spatial-reduction attention, v1 and v2)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops._checks import check_tensor, check_tokens
from ..reference import SRA as StockSRA


class SRA(StockSRA):
    """Same constructor, `forward(x, H, W)`, keys (`q`, `kv`, `proj`, `sr`, `norm`) and outputs as PVT's Attention.

    The reduction and the attention (with the q / kv projections) run as fused ops; `proj` is one GEMM.
    Attention dropout in training has no fused kernel: with attn_drop > 0 in training mode it runs the stock path.
    """

    @classmethod
    def from_module(cls, stock: nn.Module) -> "SRA":
        """A fused SRA sharing the parameters of a stock PVT (v1 or v2) Attention."""
        for attr in ("num_heads", "q", "kv", "proj", "sr_ratio"):
            if not hasattr(stock, attr):
                raise TypeError(f"SRA.from_module: {type(stock).__name__} has no {attr!r}; not a PVT Attention")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim, new.num_heads, new.scale = stock.dim, stock.num_heads, stock.scale
        new.linear, new.sr_ratio = getattr(stock, "linear", False), stock.sr_ratio
        for name, child in stock.named_children():
            new.add_module(name, child)
        new.train(stock.training)
        return new

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if self.training and self.attn_drop.p > 0:
            return super().forward(x, H, W)
        check_tensor("x", x, ndim=3, shape=("B", "N", self.dim))
        check_tokens(x, H, W)
        red = x  # sr_ratio 1: the keys are the tokens themselves
        if self.linear or self.sr_ratio > 1:
            red = ops.sra_reduce(x, H, W, self.sr.weight, self.sr.bias, self.norm.weight, self.norm.bias,
                                 self.norm.eps, self.sr_ratio, self.linear)
        out = ops.sra_attention(x, red, self.q.weight, self.q.bias, self.kv.weight, self.kv.bias, self.num_heads,
                                self.scale)
        return self.proj_drop(self.proj(out))
