"""nn.Module drop-ins on the fused ops, state_dict-compatible with the official / timm / PVT modules."""
from .dwconv_bn import FusedPatchMerging, ResidualDWConvBN, is_depthwise
from .shsa import SHSA, ResidualSHSA

__all__ = ["FusedPatchMerging", "ResidualDWConvBN", "ResidualSHSA", "SHSA", "is_depthwise"]
