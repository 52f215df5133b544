"""Functional fused ops (torch.library namespace `shvit`), each dispatching to the backend chosen per call."""
from .dwconv_bn import dwconv_bn, dwconv_bn_train
from .ffn import FFNStats, ffn, ffn_train
from .pw_conv_bn import pw_conv_bn, pw_conv_bn_train
from .shsa import TrainStats, shsa, shsa_train
from .sra import sra_attention, sra_reduce

__all__ = ["FFNStats", "TrainStats", "dwconv_bn", "dwconv_bn_train", "ffn", "ffn_train", "pw_conv_bn",
           "pw_conv_bn_train", "shsa", "shsa_train", "sra_attention", "sra_reduce"]
