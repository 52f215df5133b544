"""GroupNorm with one group: per-sample statistics over all of (C, H, W), per-channel affine."""
from __future__ import annotations

from torch import nn


class GroupNorm1(nn.GroupNorm):
    """`nn.GroupNorm(1, num_channels)`; keys `weight`, `bias` (SHSA's `pre_norm`)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(1, num_channels, eps=eps, affine=affine)
