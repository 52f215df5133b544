"""SHViT in the official layout (`patch_embed`, `blocks1..3`, `head`, optional `head_dist`)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import BasicBlock, BN_Linear, Conv2d_BN, FFN, PatchMerging, Residual, residual_dwconv

# name -> (embed_dim, depth, partial_dim); qk_dim 16 and block types i, s, s for all four.
CONFIGS = {
    "shvit_s1": ((128, 224, 320), (2, 4, 5), (32, 48, 68)),
    "shvit_s2": ((128, 308, 448), (2, 4, 5), (32, 66, 96)),
    "shvit_s3": ((192, 352, 448), (3, 5, 5), (48, 75, 96)),
    "shvit_s4": ((224, 336, 448), (4, 7, 6), (48, 72, 96)),
}


def _dw_ffn(dim: int) -> nn.Sequential:
    """Residual depthwise conv + residual FFN, which sits on either side of every PatchMerging."""
    return nn.Sequential(residual_dwconv(dim), Residual(FFN(dim, dim * 2)))


class SHViT(nn.Module):
    def __init__(self, in_chans: int = 3, num_classes: int = 1000, embed_dim: Sequence[int] = (128, 256, 384),
                 partial_dim: Sequence[int] = (32, 64, 96), qk_dim: Sequence[int] = (16, 16, 16),
                 depth: Sequence[int] = (1, 2, 3), types: Sequence[str] = ("s", "s", "s"),
                 down_ops: Sequence[Sequence] = (("subsample", 2), ("subsample", 2), ("",)),
                 distillation: bool = False):
        super().__init__()
        e0 = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_chans, e0 // 8, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 8, e0 // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 4, e0 // 2, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 2, e0, 3, 2, 1))
        stages: list[list[nn.Module]] = [[] for _ in embed_dim]
        for i, (ed, kd, pd, n, t) in enumerate(zip(embed_dim, qk_dim, partial_dim, depth, types)):
            stages[i] += [BasicBlock(ed, kd, pd, t) for _ in range(n)]
            if down_ops[i][0] == "subsample":
                # The downsampling of stage i lives at the head of stage i + 1 (official layout).
                stages[i + 1] += [_dw_ffn(ed), PatchMerging(ed, embed_dim[i + 1]), _dw_ffn(embed_dim[i + 1])]
        self.blocks1, self.blocks2, self.blocks3 = (nn.Sequential(*s) for s in stages)
        self.num_features = embed_dim[-1]
        self.head = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.distillation = distillation
        if distillation:
            self.head_dist = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks3(self.blocks2(self.blocks1(self.patch_embed(x))))

    def forward(self, x: torch.Tensor):
        x = F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)
        if not self.distillation:
            return self.head(x)
        out = self.head(x), self.head_dist(x)
        return out if self.training else (out[0] + out[1]) / 2


def _build(name: str, num_classes: int, fused: bool, **kwargs) -> nn.Module:
    embed_dim, depth, pdim = CONFIGS[name]
    model = SHViT(num_classes=num_classes, embed_dim=embed_dim, partial_dim=pdim, depth=depth,
                  types=("i", "s", "s"), **kwargs)
    if fused:
        from ..convert import convert

        model = convert(model)
    return model


def shvit_s1(num_classes: int = 1000, fused: bool = True, **kwargs) -> nn.Module:
    return _build("shvit_s1", num_classes, fused, **kwargs)


def shvit_s2(num_classes: int = 1000, fused: bool = True, **kwargs) -> nn.Module:
    return _build("shvit_s2", num_classes, fused, **kwargs)


def shvit_s3(num_classes: int = 1000, fused: bool = True, **kwargs) -> nn.Module:
    return _build("shvit_s3", num_classes, fused, **kwargs)


def shvit_s4(num_classes: int = 1000, fused: bool = True, **kwargs) -> nn.Module:
    return _build("shvit_s4", num_classes, fused, **kwargs)
