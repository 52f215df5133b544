"""convert(model): swap stock SHViT modules for fused drop-ins in place; state_dict keys and values unchanged
(the fused modules adopt the stock modules' own parameters and buffers). convert(model, inference=True)
then folds every BatchNorm for deployment (the official SHViT deploy layout and keys)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .nn import SHSA, ConvBN, FusedPatchMerging, FusedReLU, ResidualDWConvBN, ResidualFFN, ResidualSHSA, is_conv_bn, \
    is_depthwise, is_ffn, is_patch_merging, is_residual, is_shsa
from .nn.folded import DWConv, FoldedPatchMerging, FoldedResidualFFN, FoldedResidualSHSA, FoldedSHSA, \
    fold_bn_linear, fold_conv_bn

_FUSED = (SHSA, ResidualSHSA, ResidualDWConvBN, FusedPatchMerging, ResidualFFN, ConvBN, FusedReLU)
_FOLDED = (DWConv, FoldedSHSA, FoldedResidualSHSA, FoldedPatchMerging, FoldedResidualFFN)


def _replacement(m: nn.Module) -> nn.Module | None:
    if isinstance(m, _FUSED + _FOLDED):  # already converted: convert() is idempotent
        return None
    if is_residual(m) and is_shsa(m.m):
        return ResidualSHSA.from_module(m)
    if is_residual(m) and is_depthwise(m.m, stride=1):
        return ResidualDWConvBN.from_module(m)
    if is_residual(m) and is_ffn(m.m):
        return ResidualFFN.from_module(m)
    if is_patch_merging(m):
        return FusedPatchMerging.from_module(m)
    if is_shsa(m):
        return SHSA.from_module(m)
    return None


def _is_bn_linear(m: nn.Module) -> bool:
    """BatchNorm1d `bn` then Linear `l` (official BN_Linear, timm NormLinear: the classifier heads)."""
    return isinstance(getattr(m, "bn", None), nn.BatchNorm1d) and isinstance(getattr(m, "l", None), nn.Linear) \
        and len(list(m.children())) == 2


def _folded(m: nn.Module) -> nn.Module | None:
    """The deploy form of a fused module (run after the swap, so stock SHSA / PatchMerging are fused ones)."""
    if isinstance(m, _FOLDED):
        return None
    if isinstance(m, ResidualSHSA):
        return FoldedResidualSHSA(FoldedSHSA.from_module(m.m))
    if isinstance(m, SHSA):
        return FoldedSHSA.from_module(m)
    if isinstance(m, ResidualDWConvBN):
        return fold_conv_bn(m.m, identity=True)
    if isinstance(m, FusedPatchMerging):
        return FoldedPatchMerging.from_module(m, m._act1)
    if isinstance(m, ResidualFFN):
        return FoldedResidualFFN.from_module(m)
    if isinstance(m, FusedReLU):  # its ConvBN folds to a plain conv: the ReLU comes back
        return nn.ReLU()
    if is_conv_bn(m):  # stem, any other conv-BN pair (a depthwise one becomes a fused DWConv)
        return fold_conv_bn(m)
    if _is_bn_linear(m):
        return fold_bn_linear(m)
    return None


def _swap(parent: nn.Module, replacement) -> int:
    count = 0
    for name, child in parent.named_children():
        new = replacement(child)
        if new is None:
            count += _swap(child, replacement)
        else:
            setattr(parent, name, new)
            count += 1
    return count


def _swap_conv_bn(parent: nn.Module) -> int:
    """Every conv-BN pair left outside the fused modules (the stem) becomes a ConvBN; one followed by a ReLU in
    a Sequential takes the ReLU in, whose slot keeps a FusedReLU (no state: the keys do not change)."""
    count = 0
    kids = list(parent.named_children())
    for i, (name, child) in enumerate(kids):
        if isinstance(child, _FUSED + _FOLDED):  # their own conv-BN pairs run inside their ops
            continue
        if is_conv_bn(child):
            relu = isinstance(parent, nn.Sequential) and i + 1 < len(kids) and type(kids[i + 1][1]) is nn.ReLU
            setattr(parent, name, ConvBN.from_module(child, relu))
            if relu:
                setattr(parent, kids[i + 1][0], FusedReLU())
            count += 1
        else:
            count += _swap_conv_bn(child)
    return count


def _to_channels_last(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: an fp32 / fp64 image batch on the CPU enters the model channels_last (see convert). Not
    under CPU autocast: there the fused ops run their reference kernels in fp16 / bf16 (the C++ ones are fp32 /
    fp64), the layout buys nothing, and oneDNN's reduced-precision convolutions round differently per layout."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" \
            and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu"):
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def _set_channels_last(model: nn.Module, on: bool) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _to_channels_last:
            del model._forward_pre_hooks[key]
    if on:
        model.register_forward_pre_hook(_to_channels_last)


def convert(model: nn.Module, inference: bool = False, channels_last: bool = True) -> nn.Module:
    """Replace every fusable module of an official-layout or timm SHViT (or any model holding its blocks) in place.

    Swaps Residual(SHSA), SHSA, Residual(depthwise Conv2d_BN), Residual(FFN) and PatchMerging for their fused
    drop-ins, with the same state_dict keys and values. Returns the model; warns and returns it unchanged when
    nothing was fusable.

    inference=True (deployment): additionally folds every BatchNorm from its running statistics, once, and
    returns the model in eval mode. Every Conv2d_BN becomes a Conv2d with bias (a depthwise one a fused
    `DWConv`), each residual depthwise block one DWConv with the identity in its centre tap, BN_Linear a
    Linear, SHSA a `FoldedSHSA` and Residual(FFN) a `FoldedResidualFFN` on the fused ops. Outputs equal the
    stock model's in eval mode. The state_dict keys CHANGE (no `bn.*`, `c.weight` -> `weight` + `bias`): they
    are those of the official SHViT deploy model (its `replace_batchnorm`). The folded model is meant for
    inference; training it trains the BN-free network.

    channels_last=True (default): on the CPU, a 4-D fp32 / fp64 input of the model (outside autocast) is made
    channels_last on entry (a forward pre-hook; not part of the state_dict), so that every layer runs in the
    layout in which oneDNN's convolutions and the C++ kernels are fastest and no fused op transposes its
    activations. Outputs are equal; a 4-D output (a feature map) comes back channels_last. CUDA inputs are left
    as they are. False removes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if _replacement(model) is not None:
        raise TypeError("convert: pass the model that holds the block, not the block itself "
                        "(or use the drop-in's from_module)")
    count = _swap(model, _replacement)
    if count:  # an SHViT (not just any network with a conv-BN pair): its stem too
        count += _swap_conv_bn(model)
    if inference:
        count += _swap(model, _folded)
        model.eval()
    if any(isinstance(m, _FUSED + _FOLDED) for m in model.modules()):  # converted now or before
        _set_channels_last(model, channels_last)
    if count == 0:
        warnings.warn("shvit_kernels.convert: nothing to convert in this model; returned unchanged", UserWarning,
                      stacklevel=2)
    return model
