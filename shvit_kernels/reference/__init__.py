"""Pure-PyTorch spec of every block (float64-capable): the tests' oracle and the "reference" backend."""
from .blocks import BasicBlock, residual_dwconv
from .conv_bn import BN_Linear, Conv2d_BN, bn_scale_shift
from .ffn import FFN
from .norm import GroupNorm1
from .patch_merging import PatchMerging, SqueezeExcite, make_divisible
from .residual import Residual
from .shsa import SHSA
from .sra import SRA

__all__ = ["BasicBlock", "BN_Linear", "Conv2d_BN", "FFN", "GroupNorm1", "PatchMerging", "Residual", "SHSA",
           "SRA", "SqueezeExcite", "bn_scale_shift", "make_divisible", "residual_dwconv"]
