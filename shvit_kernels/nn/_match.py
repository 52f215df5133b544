"""Structural recognisers for stock SHViT modules, official layout or timm's: matched by the attributes and
child types the fused modules rely on, not by class, since timm defines its own classes with the same layout."""
from __future__ import annotations

import torch
from torch import nn


def is_conv_bn(m: nn.Module) -> bool:
    """A bias-free Conv2d `c` followed by BatchNorm2d `bn` (official Conv2d_BN, timm Conv2dNorm)."""
    c, bn = getattr(m, "c", None), getattr(m, "bn", None)
    return isinstance(c, nn.Conv2d) and c.bias is None and isinstance(bn, nn.BatchNorm2d) \
        and len(list(m.children())) == 2


def is_depthwise(m: nn.Module, stride: int | None = None) -> bool:
    """A conv-BN pair whose conv is depthwise, odd-kernel (<= 7), 'same'-padded, of stride 1 or 2."""
    if not is_conv_bn(m):
        return False
    c = m.c
    k = c.kernel_size[0]
    ok = (c.groups == c.in_channels == c.out_channels and c.kernel_size == (k, k) and k % 2 == 1 and k <= 7
          and c.padding == (k // 2, k // 2) and c.stride in ((1, 1), (2, 2)) and c.dilation == (1, 1))
    return ok and (stride is None or c.stride == (stride, stride))


def is_pointwise(m: nn.Module) -> bool:
    """A conv-BN pair whose conv is a plain 1x1 (stride 1, no padding, one group)."""
    if not is_conv_bn(m):
        return False
    c = m.c
    return c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0) and c.groups == 1


def is_ffn(m: nn.Module) -> bool:
    """SHViT's FFN: 1x1 conv-BN `pw1` (d -> h), ReLU `act`, 1x1 conv-BN `pw2` (h -> d)."""
    pw1, pw2 = getattr(m, "pw1", None), getattr(m, "pw2", None)
    return is_pointwise(pw1) and is_pointwise(pw2) and type(getattr(m, "act", None)) is nn.ReLU \
        and len(list(m.children())) == 3 and pw1.c.in_channels == pw2.c.out_channels \
        and pw1.c.out_channels == pw2.c.in_channels


def is_residual(m: nn.Module) -> bool:
    """`x + m(x)` with the branch in child `m` (official Residual, timm Residual); stochastic depth allowed."""
    return type(m).__name__ == "Residual" and isinstance(getattr(m, "m", None), nn.Module) \
        and len(list(m.children())) == 1


def is_shsa(m: nn.Module) -> bool:
    """SHViT's single-head attention: GroupNorm(1) pre_norm, conv-BN qkv, Sequential(ReLU, conv-BN) proj."""
    proj = getattr(m, "proj", None)
    norm = getattr(m, "pre_norm", None)
    return all(hasattr(m, a) for a in ("dim", "qk_dim", "pdim")) and isinstance(norm, nn.GroupNorm) \
        and norm.num_groups == 1 and is_conv_bn(getattr(m, "qkv", None)) and isinstance(proj, nn.Sequential) \
        and len(proj) == 2 and type(proj[0]) is nn.ReLU and is_conv_bn(proj[1])


def is_1x1_conv(m: nn.Module) -> bool:
    """A plain 1x1 Conv2d with bias (stride 1, no padding, one group)."""
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0) \
        and m.dilation == (1, 1) and m.groups == 1 and m.bias is not None


def is_squeeze_excite(m: nn.Module) -> bool:
    """x * sigmoid(fc2(relu(fc1(mean_hw(x))))): the official / reference SqueezeExcite (fc1, act, fc2) or timm's
    SEModule (fc1, bn = Identity, act, fc2, gate = Sigmoid, no max-pool), the gate that PatchMerging's conv3 takes
    in its prologue."""
    names = {n for n, _ in m.named_children()}
    gate = getattr(m, "gate", None)
    return names <= {"fc1", "bn", "act", "fc2", "gate"} and is_1x1_conv(getattr(m, "fc1", None)) \
        and is_1x1_conv(getattr(m, "fc2", None)) and type(getattr(m, "act", None)) is nn.ReLU \
        and type(getattr(m, "bn", nn.Identity())) is nn.Identity and not getattr(m, "add_maxpool", False) \
        and (gate is None or type(gate).__name__ == "Sigmoid" and not list(gate.parameters()))


def squeeze_excite_gate(se: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (B, C) gate by which a SqueezeExcite (is_squeeze_excite) multiplies x: sigmoid(fc2(relu(fc1(mean))))."""
    return torch.sigmoid(se.fc2(se.act(se.fc1(x.mean((2, 3), keepdim=True))))).flatten(1)


def patch_merging_acts(m: nn.Module) -> tuple[str, str] | None:
    """Names of PatchMerging's two activations: one shared `act` (official) or `act1`, `act2` (timm)."""
    names = ("act1", "act2") if hasattr(m, "act1") else ("act", "act")
    return names if all(type(getattr(m, n, None)) is nn.ReLU for n in names) else None


def is_patch_merging(m: nn.Module) -> bool:
    """SHViT's PatchMerging with a stride-2 depthwise conv2 and ReLU activations."""
    return all(hasattr(m, a) for a in ("conv1", "conv3", "se")) and patch_merging_acts(m) is not None \
        and is_depthwise(getattr(m, "conv2", None), stride=2)
