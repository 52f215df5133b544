"""nn.Module drop-ins on the fused ops, state_dict-compatible with the official / timm / PVT modules."""
from ._match import is_conv_bn, is_depthwise, is_patch_merging, is_residual, is_shsa
from .dwconv_bn import FusedPatchMerging, ResidualDWConvBN
from .folded import DWConv, FoldedPatchMerging, FoldedResidualSHSA, FoldedSHSA
from .shsa import SHSA, ResidualSHSA
from .sra import SRA

__all__ = ["DWConv", "FoldedPatchMerging", "FoldedResidualSHSA", "FoldedSHSA", "FusedPatchMerging",
           "ResidualDWConvBN", "ResidualSHSA", "SHSA", "SRA", "is_conv_bn", "is_depthwise", "is_patch_merging",
           "is_residual", "is_shsa"]
