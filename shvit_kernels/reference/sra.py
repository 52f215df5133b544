"""Spatial-Reduction Attention of PVT v1/v2: queries from every token, keys/values from a reduced map.

Reduction: Conv2d(C, C, kernel = stride = sr_ratio) + LayerNorm (v1 and v2 with sr_ratio > 1), none
(sr_ratio == 1), or with `linear=True` (PVTv2-li) AdaptiveAvgPool2d(7) + 1x1 Conv2d + LayerNorm + GELU.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def check_sra_config(dim: int, num_heads: int, sr_ratio: int) -> None:
    for name, val in (("dim", dim), ("num_heads", num_heads), ("sr_ratio", sr_ratio)):
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"SRA: {name} must be a positive int, got {val!r}")
    if dim % num_heads:
        raise ValueError(f"SRA: dim ({dim}) must be divisible by num_heads ({num_heads})")


class SRA(nn.Module):
    """The stock module (PVT's `Attention`). Keys `q`, `kv`, `proj`, and `sr`, `norm` when reducing."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, sr_ratio: int = 1, linear: bool = False):
        super().__init__()
        check_sra_config(dim, num_heads, sr_ratio)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.linear = linear
        self.sr_ratio = sr_ratio
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)

    def reduce(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, N, C) tokens -> (B, M, C) key/value tokens."""
        if not self.linear and self.sr_ratio == 1:
            return x
        b, n, c = x.shape
        img = x.transpose(1, 2).reshape(b, c, h, w)
        if self.linear:
            return self.act(self.norm(self.sr(self.pool(img)).flatten(2).transpose(1, 2)))
        return self.norm(self.sr(img).flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        b, n, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, n, heads, hd).transpose(1, 2)
        k, v = self.kv(self.reduce(x, H, W)).reshape(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def _init_weights(m: nn.Module) -> None:
    """PVT's initialisation: truncated-normal Linear, unit LayerNorm, He-style (fan-out) Conv2d."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---- functional spec of the fused ops ----------------------------------------------------------------------
# reduce_fwd(x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear) -> red (B, M, C)
# reduce_bwd(g_red, <reduce_fwd args>) -> (gx, g_sr_w, g_sr_b, g_ln_w, g_ln_b)
# attn_fwd(x, red, q_w, q_b, kv_w, kv_b, num_heads, scale) -> (o (B, N, C) before proj, lse (B, heads, N))
# attn_bwd(g_o, x, red, q_w, q_b, kv_w, kv_b, o, lse, num_heads, scale) -> (gx, g_red, g_q_w, g_q_b, g_kv_w, g_kv_b)
# q_b / kv_b may be None (qkv_bias=False); their grads are returned all the same (the schema has no optional
# returns). The backward is written out: it specifies the kernels'.

def _acc(t):
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


def _reduce_parts(x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear):
    b, n, c = x.shape
    img = _acc(x).transpose(1, 2).reshape(b, c, h, w)
    pooled = torch.nn.functional.adaptive_avg_pool2d(img, 7) if linear else img
    stride = 1 if linear else sr_ratio
    z = torch.nn.functional.conv2d(pooled, _acc(sr_w), _acc(sr_b), stride).flatten(2).transpose(1, 2)
    var, mean = torch.var_mean(z, -1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    zhat = (z - mean) * rstd
    t = zhat * _acc(ln_w) + _acc(ln_b)
    return img, pooled, zhat, rstd, t


def reduce_fwd(x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear):
    *_, t = _reduce_parts(x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear)
    return (torch.nn.functional.gelu(t) if linear else t).to(x.dtype)


def reduce_bwd(g_red, x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear):
    img, pooled, zhat, rstd, t = _reduce_parts(x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear)
    g = _acc(g_red)
    if linear:  # d gelu(t) = Phi(t) + t phi(t)
        g = g * (0.5 * (1 + torch.erf(t * 0.5 ** 0.5)) + t * torch.exp(-0.5 * t * t) * (2 * math.pi) ** -0.5)
    g_ln_w, g_ln_b = (g * zhat).sum((0, 1)), g.sum((0, 1))
    gzhat = g * _acc(ln_w)
    gz = rstd * (gzhat - gzhat.mean(-1, keepdim=True) - zhat * (gzhat * zhat).mean(-1, keepdim=True))
    b, m, c = gz.shape
    ho = 7 if linear else h // sr_ratio
    gz = gz.transpose(1, 2).reshape(b, c, ho, m // ho)
    g_in, g_sr_w, g_sr_b = torch.ops.aten.convolution_backward(
        gz, pooled, _acc(sr_w), [c], [1 if linear else sr_ratio] * 2, [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, True])
    if linear:
        g_in = adaptive_avg_pool2d_backward(g_in, img)
    gx = g_in.reshape(b, c, h * w).transpose(1, 2)
    return (gx.to(x.dtype), g_sr_w.to(sr_w.dtype), g_sr_b.to(sr_b.dtype), g_ln_w.to(ln_w.dtype),
            g_ln_b.to(ln_b.dtype))


def _pool_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) averaging matrix of adaptive average pooling along one axis: row i averages inputs
    floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1, as ATen's bins."""
    i = torch.arange(n_out, device=like.device)
    start, end = (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out
    j = torch.arange(n_in, device=like.device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def adaptive_avg_pool2d_backward(g: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. img of adaptive_avg_pool2d(img, g.shape[-2:]), from the pooled grad g.

    ATen's CUDA kernel scatters with atomicAdd and raises under torch.use_deterministic_algorithms(True); there
    (and only there) the gradient is computed as Ph^T g Pw with the pooling matrices instead: fixed-order GEMMs."""
    if not (img.is_cuda and torch.are_deterministic_algorithms_enabled()):
        return torch.ops.aten._adaptive_avg_pool2d_backward(g, img)
    return adaptive_avg_pool2d_backward_gemm(g, img)


def adaptive_avg_pool2d_backward_gemm(g: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """adaptive_avg_pool2d_backward through the pooling matrices (deterministic on every device)."""
    (h, w), (ho, wo) = img.shape[-2:], g.shape[-2:]
    ph, pw = _pool_matrix(h, ho, g), _pool_matrix(w, wo, g)
    return (ph.t() @ g @ pw).to(img.dtype)


def _heads(t, num_heads):  # (B, L, C) -> (B, heads, L, C // heads)
    b, length, c = t.shape
    return t.reshape(b, length, num_heads, c // num_heads).transpose(1, 2)


def _qkv(x, red, q_w, q_b, kv_w, kv_b, num_heads):
    q = torch.nn.functional.linear(_acc(x), _acc(q_w), _acc(q_b))
    k, v = torch.nn.functional.linear(_acc(red), _acc(kv_w), _acc(kv_b)).chunk(2, -1)
    return _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads)


def attn_fwd(x, red, q_w, q_b, kv_w, kv_b, num_heads, scale):
    q, k, v = _qkv(x, red, q_w, q_b, kv_w, kv_b, num_heads)
    s = (q @ k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(s, -1)
    o = (torch.exp(s - lse[..., None]) @ v).transpose(1, 2).flatten(2)
    return o.to(x.dtype), lse


def attn_bwd(g_o, x, red, q_w, q_b, kv_w, kv_b, o, lse, num_heads, scale):
    q, k, v = _qkv(x, red, q_w, q_b, kv_w, kv_b, num_heads)
    p = torch.exp((q @ k.transpose(-2, -1)) * scale - lse[..., None])  # recomputed from the saved logsumexp
    go = _heads(_acc(g_o), num_heads)
    dv = p.transpose(-2, -1) @ go
    d = (go * _heads(_acc(o), num_heads)).sum(-1, keepdim=True)  # rowsum(dP * P) == rowsum(dO * O)
    ds = p * (go @ v.transpose(-2, -1) - d) * scale
    dq = (ds @ k).transpose(1, 2).flatten(2)
    dkv = torch.cat([(ds.transpose(-2, -1) @ q).transpose(1, 2).flatten(2), dv.transpose(1, 2).flatten(2)], -1)
    gx = dq @ _acc(q_w)
    g_red = dkv @ _acc(kv_w)
    g_q_w = dq.flatten(0, 1).t() @ _acc(x).flatten(0, 1)
    g_kv_w = dkv.flatten(0, 1).t() @ _acc(red).flatten(0, 1)
    return (gx.to(x.dtype), g_red.to(red.dtype), g_q_w.to(q_w.dtype), dq.sum((0, 1)).to(q_w.dtype),
            g_kv_w.to(kv_w.dtype), dkv.sum((0, 1)).to(kv_w.dtype))
