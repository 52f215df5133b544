"""nn.Module drop-ins on the fused ops, state_dict-compatible with the official / timm / PVT modules."""
from .dwconv_bn import FusedPatchMerging, ResidualDWConvBN, is_depthwise
from .shsa import SHSA, ResidualSHSA
from .sra import SRA

__all__ = ["FusedPatchMerging", "ResidualDWConvBN", "ResidualSHSA", "SHSA", "SRA", "is_depthwise"]
