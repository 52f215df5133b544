"""SHViT's BasicBlock: residual depthwise 3x3 Conv2d_BN, then the mixer, then the residual FFN."""
from __future__ import annotations

import torch
from torch import nn

from .conv_bn import Conv2d_BN
from .ffn import FFN
from .residual import Residual
from .shsa import SHSA


def residual_dwconv(dim: int, bn_weight_init: float = 1.0) -> Residual:
    """Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)): the block SHViT repeats most."""
    return Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=bn_weight_init))


class BasicBlock(nn.Module):
    """type "s": conv, SHSA mixer, FFN; type "i": conv, identity mixer, FFN. Keys `conv.m`, `mixer.m`, `ffn.m`."""

    def __init__(self, dim: int, qk_dim: int, pdim: int, type: str):
        super().__init__()
        if type not in ("s", "i"):
            raise ValueError(f"BasicBlock: type must be 's' or 'i', got {type!r}")
        self.conv = residual_dwconv(dim, bn_weight_init=0)
        self.mixer = Residual(SHSA(dim, qk_dim, pdim)) if type == "s" else nn.Identity()
        self.ffn = Residual(FFN(dim, dim * 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(self.conv(x)))
