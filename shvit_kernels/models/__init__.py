"""SHViT S1-S4 in the official layout; `fused=True` (default) swaps in the fused modules."""
from .shvit import CONFIGS, SHViT, shvit_s1, shvit_s2, shvit_s3, shvit_s4

__all__ = ["CONFIGS", "SHViT", "shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"]
