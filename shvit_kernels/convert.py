"""convert(model): swap stock SHViT modules for fused drop-ins in place; state_dict keys and values unchanged
(the fused modules adopt the stock modules' own parameters and buffers)."""
from __future__ import annotations

import warnings

from torch import nn

from .nn import SHSA, FusedPatchMerging, ResidualDWConvBN, ResidualSHSA, is_depthwise, is_patch_merging, \
    is_residual, is_shsa

_FUSED = (SHSA, ResidualSHSA, ResidualDWConvBN, FusedPatchMerging)


def _replacement(m: nn.Module) -> nn.Module | None:
    if isinstance(m, _FUSED):  # already converted: convert() is idempotent
        return None
    if is_residual(m) and is_shsa(m.m):
        return ResidualSHSA.from_module(m)
    if is_residual(m) and is_depthwise(m.m, stride=1):
        return ResidualDWConvBN.from_module(m)
    if is_patch_merging(m):
        return FusedPatchMerging.from_module(m)
    if is_shsa(m):
        return SHSA.from_module(m)
    return None


def _convert(parent: nn.Module) -> int:
    count = 0
    for name, child in parent.named_children():
        new = _replacement(child)
        if new is None:
            count += _convert(child)
        else:
            setattr(parent, name, new)
            count += 1
    return count


def convert(model: nn.Module) -> nn.Module:
    """Replace every fusable module of an official-layout or timm SHViT (or any model holding its blocks) in place.

    Swaps Residual(SHSA), SHSA, Residual(depthwise Conv2d_BN) and PatchMerging for their fused drop-ins.
    Returns the model; warns and returns it unchanged when nothing was fusable.
    """
    if _replacement(model) is not None:
        raise TypeError("convert: pass the model that holds the block, not the block itself "
                        "(or use the drop-in's from_module)")
    if _convert(model) == 0:
        warnings.warn("shvit_kernels.convert: nothing to convert in this model; returned unchanged", UserWarning,
                      stacklevel=2)
    return model
