"""nn.Module drop-ins on the fused ops, state_dict-compatible with the official / timm / PVT modules."""
from ._match import is_conv_bn, is_depthwise, is_ffn, is_patch_merging, is_residual, is_shsa
from .conv_bn import ConvBN, FusedReLU
from .dwconv_bn import FusedPatchMerging, ResidualDWConvBN
from .ffn import ResidualFFN
from .folded import DWConv, FoldedPatchMerging, FoldedResidualFFN, FoldedResidualSHSA, FoldedSHSA
from .shsa import SHSA, ResidualSHSA
from .sra import SRA

__all__ = ["ConvBN", "DWConv", "FoldedPatchMerging", "FoldedResidualFFN", "FoldedResidualSHSA", "FoldedSHSA",
           "FusedPatchMerging", "FusedReLU", "ResidualDWConvBN", "ResidualFFN", "ResidualSHSA", "SHSA", "SRA",
           "is_conv_bn", "is_depthwise", "is_ffn", "is_patch_merging", "is_residual", "is_shsa"]
