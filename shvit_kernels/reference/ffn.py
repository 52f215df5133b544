"""FFN: Conv2d_BN 1x1 (ed -> h), ReLU, Conv2d_BN 1x1 (h -> ed, BN weight initialised to 0); in SHViT always
inside Residual, and the fused op is that residual block: y = x + FFN(x)."""
from __future__ import annotations

import torch
from torch import nn

from .conv_bn import Conv2d_BN
from .shsa import _acc, _BatchNorm, _Bias  # the BatchNorm / bias spec over (B, C, tokens), shared with SHSA


class FFN(nn.Module):
    """Keys `pw1.c`, `pw1.bn`, `pw2.c`, `pw2.bn`."""

    def __init__(self, ed: int, h: int):
        super().__init__()
        self.pw1 = Conv2d_BN(ed, h)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(h, ed, bn_weight_init=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


# ---- functional spec of the fused residual FFN -------------------------------------------------------------
# x (B, d, H, W) as d x N token matrices (N = H*W); weights as matrices w1 (h, d), w2 (d, h). Every backend
# implements, with the same signatures:
#   fwd(x, w1, b1, w2, b2) -> y                       eval, BNs folded: y = x + w2 relu(w1 x + b1) + b2
#   bwd(gy, x, w1, b1, w2, b2) -> (gx, gw1, gb1, gw2, gb2)
#   train_fwd(x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, eps2) -> (y, mean1, var1, mean2, var2, z1, z2)
#       z1 = w1 x, h = relu(bn1(z1)), z2 = w2 h, y = x + bn2(z2); biased batch variances over (B, H, W);
#       z1 (B, h, H, W) and z2 (B, d, H, W) are kept for the backward (x's dtype; channels_last whatever x's
#       layout: the CPU kernel's token-major working layout, so that an NCHW x costs no transposes of them)
#   train_bwd(gy, x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, eps2, mean1, var1, mean2, var2, z1, z2)
#       -> (gx, gw1, gbn1_w, gbn1_b, gw2, gbn2_w, gbn2_b)
# The backwards are written out (no autograd): they are the spec of the kernels' backward, which recompute the
# ReLU'd hidden h from z1 (eval: from x) instead of storing it.

def _tokens(t: torch.Tensor) -> torch.Tensor:
    return _acc(t).flatten(2)


def _like(t: torch.Tensor, x: torch.Tensor, fmt: torch.memory_format | None = None) -> torch.Tensor:
    """(B, C, N) -> a (B, C, H, W) tensor of x's dtype, in memory format fmt (default: x's)."""
    return t.reshape(x.shape[0], t.shape[1], *x.shape[2:]).to(x.dtype).contiguous(memory_format=fmt or memory_format(x))


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last-dense x (that is not also NCHW-contiguous), else contiguous_format."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _forward(x, w1, norm1, w2, norm2):
    xt = _tokens(x)
    z1 = _acc(w1) @ xt
    h = norm1.forward(z1).relu()
    z2 = _acc(w2) @ h
    return norm2.forward(z2) + xt, z1, h, z2


def _backward(gy, x, w1, norm1, w2, norm2, h):
    xt, g = _tokens(x), _tokens(gy)
    gz2, g_norm2 = norm2.backward(g)
    gw2 = (gz2 @ h.mT).sum(0)
    gz1, g_norm1 = norm1.backward((_acc(w2).t() @ gz2) * (h > 0))
    gw1 = (gz1 @ xt.mT).sum(0)
    gx = _acc(w1).t() @ gz1 + g
    return _like(gx, x), gw1, g_norm1, gw2, g_norm2


def fwd(x, w1, b1, w2, b2):
    return _like(_forward(x, w1, _Bias(b1), w2, _Bias(b2))[0], x)


def bwd(gy, x, w1, b1, w2, b2):
    n1, n2 = _Bias(b1), _Bias(b2)
    h = n1.forward(_acc(w1) @ _tokens(x)).relu()  # recomputed from x
    gx, gw1, (gb1,), gw2, (gb2,) = _backward(gy, x, w1, n1, w2, n2, h)
    return gx, gw1.to(w1.dtype), gb1.to(b1.dtype), gw2.to(w2.dtype), gb2.to(b2.dtype)


def train_fwd(x, w1, bn1_w, bn1_b, eps1: float, w2, bn2_w, bn2_b, eps2: float):
    n1, n2 = _BatchNorm(bn1_w, bn1_b, eps1), _BatchNorm(bn2_w, bn2_b, eps2)
    y, z1, _, z2 = _forward(x, w1, n1, w2, n2)
    cl = torch.channels_last
    return _like(y, x), n1.mean, n1.var, n2.mean, n2.var, _like(z1, x, cl), _like(z2, x, cl)


def train_bwd(gy, x, w1, bn1_w, bn1_b, eps1: float, w2, bn2_w, bn2_b, eps2: float, mean1, var1, mean2, var2, z1,
              z2):
    n1 = _BatchNorm(bn1_w, bn1_b, eps1, _acc(mean1), _acc(var1))
    n2 = _BatchNorm(bn2_w, bn2_b, eps2, _acc(mean2), _acc(var2))
    h = n1.forward(_tokens(z1)).relu()  # recomputed from z1: elementwise, no GEMM
    n2.forward(_tokens(z2))  # (sets n2's normalised input for its backward)
    gx, gw1, (g1w, g1b), gw2, (g2w, g2b) = _backward(gy, x, w1, n1, w2, n2, h)
    return (gx, gw1.to(w1.dtype), g1w.to(bn1_w.dtype), g1b.to(bn1_b.dtype), gw2.to(w2.dtype), g2w.to(bn2_w.dtype),
            g2b.to(bn2_b.dtype))
