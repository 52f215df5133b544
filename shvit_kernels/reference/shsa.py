"""Single-Head Self-Attention (SHViT): attention over the first `pdim` channels only.

x1, x2 = x[:, :pdim], x[:, pdim:]; x1 = GroupNorm1(x1); q, k, v = Conv2d_BN(x1) split (qk, qk, pdim);
attn = softmax(q^T k * qk^-0.5) over the N = H*W tokens; x1 = v attn^T;
y = Conv2d_BN(ReLU(cat[x1, x2])) (projection BN weight initialised to 0).
"""
from __future__ import annotations

import torch
from torch import nn

from .conv_bn import Conv2d_BN
from .norm import GroupNorm1


def check_shsa_config(dim: int, qk_dim: int, pdim: int) -> None:
    for name, val in (("dim", dim), ("qk_dim", qk_dim), ("pdim", pdim)):
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"SHSA: {name} must be a positive int, got {val!r}")
    if pdim > dim:
        raise ValueError(f"SHSA: pdim ({pdim}) must not exceed dim ({dim})")


class SHSA(nn.Module):
    """The stock module. Keys `pre_norm`, `qkv.c`, `qkv.bn`, `proj.1.c`, `proj.1.bn`."""

    def __init__(self, dim: int, qk_dim: int, pdim: int):
        super().__init__()
        check_shsa_config(dim, qk_dim, pdim)
        self.scale = qk_dim ** -0.5
        self.qk_dim = qk_dim
        self.dim = dim
        self.pdim = pdim
        self.pre_norm = GroupNorm1(pdim)
        self.qkv = Conv2d_BN(pdim, qk_dim * 2 + pdim)
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(dim, dim, bn_weight_init=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        q, k, v = self.qkv(self.pre_norm(x1)).flatten(2).split([self.qk_dim, self.qk_dim, self.pdim], dim=1)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        x1 = (v @ attn.transpose(-2, -1)).reshape(b, self.pdim, h, w)
        return self.proj(torch.cat([x1, x2], dim=1))


# ---- functional spec of the fused op ---------------------------------------------------------------------
# Every backend implements these with the same signatures (weights as 2-D matrices, BN folded in eval):
#   fwd(x, gn_w, gn_b, gn_eps, qkv_w, qkv_b, proj_w, proj_b, qk_dim, residual) -> y
#   bwd(gy, <fwd args>) -> (gx, g_gn_w, g_gn_b, g_qkv_w, g_qkv_b, g_proj_w, g_proj_b)
#   train_fwd(x, gn_w, gn_b, gn_eps, qkv_w, qkv_bn_w, qkv_bn_b, qkv_eps, proj_w, proj_bn_w, proj_bn_b, proj_eps,
#             qk_dim, residual) -> (y, qkv_mean, qkv_var, proj_mean, proj_var)      (biased batch variances)
#   train_bwd(gy, <train_fwd args>, qkv_mean, qkv_var, proj_mean, proj_var)
#       -> (gx, g_gn_w, g_gn_b, g_qkv_w, g_qkv_bn_w, g_qkv_bn_b, g_proj_w, g_proj_bn_w, g_proj_bn_b)
# The backward is written out (no autograd) so that it is the spec of the kernels' backward: it recomputes
# the forward and never needs more than one sample's N x N attention at a time in a fused kernel.

def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _Bias:
    """Eval-mode BN, folded: a = z + b."""

    def __init__(self, b: torch.Tensor):
        self.b = _acc(b)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.b[:, None]

    def backward(self, ga: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return ga, (ga.sum((0, 2)),)


class _BatchNorm:
    """Training-mode BN over (batch, tokens) of z (B, O, N) with the given batch mean / biased var."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, eps: float, mean=None, var=None):
        self.w, self.b, self.eps, self.mean, self.var = _acc(w), _acc(b), eps, mean, var

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mean is None:  # as nn.BatchNorm2d: sum / count (an Inf input gives an Inf mean, var_mean's is NaN)
            self.mean = z.mean((0, 2))
            self.var = (z - self.mean[:, None]).square().mean((0, 2))
        self.invstd = torch.rsqrt(self.var + self.eps)
        self.zhat = (z - self.mean[:, None]) * self.invstd[:, None]
        return self.zhat * self.w[:, None] + self.b[:, None]

    def backward(self, ga: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        gb = ga.sum((0, 2))
        gw = (ga * self.zhat).sum((0, 2))
        count = ga.shape[0] * ga.shape[2]
        gz = (ga - (gb[:, None] + self.zhat * gw[:, None]) / count) * (self.invstd * self.w)[:, None]
        return gz, (gw, gb)


def _forward(x, gn_w, gn_b, gn_eps, qkv_w, qkv_norm, proj_w, proj_norm, qk_dim, residual):
    """Returns y and the intermediates the backward needs (B, *, N layout, accumulation dtype)."""
    xa = _acc(x)
    b, c, h, w = x.shape
    p = gn_w.shape[0]
    x1 = xa[:, :p].reshape(b, p, h * w)
    var, mean = torch.var_mean(x1, (1, 2), correction=0, keepdim=True)
    rstd = torch.rsqrt(var + gn_eps)
    xhat = (x1 - mean) * rstd
    n = xhat * _acc(gn_w)[:, None] + _acc(gn_b)[:, None]
    a = qkv_norm.forward(_acc(qkv_w) @ n)
    q, k, v = a.split([qk_dim, qk_dim, p], dim=1)
    attn = ((q.transpose(1, 2) @ k) * qk_dim ** -0.5).softmax(dim=-1)
    o = v @ attn.transpose(1, 2)
    u = torch.cat([o, xa[:, p:].reshape(b, c - p, h * w)], dim=1).relu()
    y = proj_norm.forward(_acc(proj_w) @ u).reshape(b, c, h, w)
    if residual:
        y = y + xa
    return y.to(x.dtype), (xhat, rstd, n, q, k, v, attn, o, u)


def _backward(gy, x, gn_w, qkv_w, qkv_norm, proj_w, proj_norm, qk_dim, residual, saved):
    xhat, rstd, n, q, k, v, attn, o, u = saved
    b, c, h, w = x.shape
    p = gn_w.shape[0]
    g = _acc(gy).reshape(b, c, h * w)
    gzp, g_proj_norm = proj_norm.backward(g)
    g_proj_w = (gzp @ u.transpose(1, 2)).sum(0)
    gu = (_acc(proj_w).t() @ gzp) * (u > 0)
    go, gx2 = gu[:, :p], gu[:, p:]
    gv = go @ attn
    gp = go.transpose(1, 2) @ v
    gs = attn * (gp - (go * o).sum(1)[:, :, None])  # rowsum(gP * P) == sum_c go * o
    scale = qk_dim ** -0.5
    gq = scale * (k @ gs.transpose(1, 2))
    gk = scale * (q @ gs)
    gz, g_qkv_norm = qkv_norm.backward(torch.cat([gq, gk, gv], dim=1))
    g_qkv_w = (gz @ n.transpose(1, 2)).sum(0)
    gn = _acc(qkv_w).t() @ gz
    g_gn_w = (gn * xhat).sum((0, 2))
    g_gn_b = gn.sum((0, 2))
    gxhat = gn * _acc(gn_w)[:, None]
    gx1 = rstd * (gxhat - gxhat.mean((1, 2), keepdim=True) - xhat * (gxhat * xhat).mean((1, 2), keepdim=True))
    gx = torch.cat([gx1, gx2], dim=1).reshape(b, c, h, w)
    if residual:
        gx = gx + _acc(gy)
    return gx, g_gn_w, g_gn_b, g_qkv_w, g_qkv_norm, g_proj_w, g_proj_norm


def _cast_grads(x, params, grads):
    return tuple(gr.to(t.dtype) for t, gr in zip((x, *params), grads))


def fwd(x, gn_w, gn_b, gn_eps, qkv_w, qkv_b, proj_w, proj_b, qk_dim, residual):
    return _forward(x, gn_w, gn_b, gn_eps, qkv_w, _Bias(qkv_b), proj_w, _Bias(proj_b), qk_dim, residual)[0]


def bwd(gy, x, gn_w, gn_b, gn_eps, qkv_w, qkv_b, proj_w, proj_b, qk_dim, residual):
    qn, pn = _Bias(qkv_b), _Bias(proj_b)
    saved = _forward(x, gn_w, gn_b, gn_eps, qkv_w, qn, proj_w, pn, qk_dim, residual)[1]
    gx, ggw, ggb, gqw, (gqb,), gpw, (gpb,) = _backward(gy, x, gn_w, qkv_w, qn, proj_w, pn, qk_dim, residual, saved)
    return _cast_grads(x, (gn_w, gn_b, qkv_w, qkv_b, proj_w, proj_b), (gx, ggw, ggb, gqw, gqb, gpw, gpb))


def train_fwd(x, gn_w, gn_b, gn_eps, qkv_w, qkv_bn_w, qkv_bn_b, qkv_eps, proj_w, proj_bn_w, proj_bn_b, proj_eps,
              qk_dim, residual):
    qn, pn = _BatchNorm(qkv_bn_w, qkv_bn_b, qkv_eps), _BatchNorm(proj_bn_w, proj_bn_b, proj_eps)
    y = _forward(x, gn_w, gn_b, gn_eps, qkv_w, qn, proj_w, pn, qk_dim, residual)[0]
    return y, qn.mean, qn.var, pn.mean, pn.var


def train_bwd(gy, x, gn_w, gn_b, gn_eps, qkv_w, qkv_bn_w, qkv_bn_b, qkv_eps, proj_w, proj_bn_w, proj_bn_b, proj_eps,
              qkv_mean, qkv_var, proj_mean, proj_var, qk_dim, residual):
    qn = _BatchNorm(qkv_bn_w, qkv_bn_b, qkv_eps, qkv_mean, qkv_var)
    pn = _BatchNorm(proj_bn_w, proj_bn_b, proj_eps, proj_mean, proj_var)
    saved = _forward(x, gn_w, gn_b, gn_eps, qkv_w, qn, proj_w, pn, qk_dim, residual)[1]
    gx, ggw, ggb, gqw, (gqbw, gqbb), gpw, (gpbw, gpbb) = _backward(gy, x, gn_w, qkv_w, qn, proj_w, pn, qk_dim,
                                                                   residual, saved)
    params = (gn_w, gn_b, qkv_w, qkv_bn_w, qkv_bn_b, proj_w, proj_bn_w, proj_bn_b)
    return _cast_grads(x, params, (gx, ggw, ggb, gqw, gqbw, gqbb, gpw, gpbw, gpbb))
