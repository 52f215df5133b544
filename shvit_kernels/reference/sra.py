"""Spatial-Reduction Attention of PVT v1/v2: queries from every token, keys/values from a reduced map.

Reduction: Conv2d(C, C, kernel = stride = sr_ratio) + LayerNorm (v1 and v2 with sr_ratio > 1), none
(sr_ratio == 1), or with `linear=True` (PVTv2-li) AdaptiveAvgPool2d(7) + 1x1 Conv2d + LayerNorm + GELU.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def check_sra_config(dim: int, num_heads: int, sr_ratio: int) -> None:
    for name, val in (("dim", dim), ("num_heads", num_heads), ("sr_ratio", sr_ratio)):
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"SRA: {name} must be a positive int, got {val!r}")
    if dim % num_heads:
        raise ValueError(f"SRA: dim ({dim}) must be divisible by num_heads ({num_heads})")


class SRA(nn.Module):
    """The stock module (PVT's `Attention`). Keys `q`, `kv`, `proj`, and `sr`, `norm` when reducing."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, sr_ratio: int = 1, linear: bool = False):
        super().__init__()
        check_sra_config(dim, num_heads, sr_ratio)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.linear = linear
        self.sr_ratio = sr_ratio
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)

    def reduce(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, N, C) tokens -> (B, M, C) key/value tokens."""
        if not self.linear and self.sr_ratio == 1:
            return x
        b, n, c = x.shape
        img = x.transpose(1, 2).reshape(b, c, h, w)
        if self.linear:
            return self.act(self.norm(self.sr(self.pool(img)).flatten(2).transpose(1, 2)))
        return self.norm(self.sr(img).flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        b, n, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, n, heads, hd).transpose(1, 2)
        k, v = self.kv(self.reduce(x, H, W)).reshape(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def _init_weights(m: nn.Module) -> None:
    """PVT's initialisation: truncated-normal Linear, unit LayerNorm, He-style (fan-out) Conv2d."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
