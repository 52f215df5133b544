"""Functional spec of the pointwise Conv2d_BN (+ReLU) op with an optional per-sample gate on its input channels:
PatchMerging's 1x1 convs, conv3's gate being the SqueezeExcite of the activation it reads (conv3(x * gate)).

x (B, K, H, W) as K x N token matrices (N = H*W); w (O, K); gate (B, K) or None. Every backend implements, with
the same signatures:
  fwd(x, w, b, gate, relu) -> y                          eval, BN folded: y = act(w (gate * x) + b)
  bwd(gy, x, w, b, gate, relu, y) -> (gx, gw, gb, ggate) y: fwd's output, the ReLU's mask (None without ReLU);
                                                         ggate (B, K), or an empty (0,) tensor without a gate
  train_fwd(x, w, bn_w, bn_b, eps, gate, relu) -> (y, mean, var, z)
      z = w (gate * x), y = act(bn(z)); batch mean and biased variance over (B, H, W); z (B, O, H, W) is kept for
      the backward (x's dtype, channels_last whatever x's layout: the CPU kernel's working layout)
  train_bwd(gy, x, w, bn_w, bn_b, eps, gate, relu, mean, var, z) -> (gx, gw, gbn_w, gbn_b, ggate)
      the ReLU's mask is recomputed from z (bn(z) > 0)
y and gx keep x's layout."""
from __future__ import annotations

import torch

from .ffn import _like, _tokens
from .shsa import _acc, _BatchNorm, _Bias


def _gated(x, gate):
    xt = _tokens(x)
    return xt if gate is None else xt * _acc(gate)[:, :, None]


def _forward(x, w, norm, gate, relu):
    z = _acc(w) @ _gated(x, gate)
    y = norm.forward(z)
    return (y.relu() if relu else y), z


def _backward(gy, x, w, norm, gate, mask):
    """mask: where the ReLU passed its input (None without ReLU)."""
    g = _tokens(gy)
    gz, g_norm = norm.backward(g if mask is None else g * mask)
    gw = (gz @ _gated(x, gate).mT).sum(0)
    gv = _acc(w).t() @ gz
    if gate is None:
        return _like(gv, x), gw.to(w.dtype), g_norm, x.new_empty(0)
    ggate = (gv * _tokens(x)).sum(2).to(gate.dtype)
    return _like(gv * _acc(gate)[:, :, None], x), gw.to(w.dtype), g_norm, ggate


def fwd(x, w, b, gate, relu: bool):
    return _like(_forward(x, w, _Bias(b), gate, relu)[0], x)


def bwd(gy, x, w, b, gate, relu: bool, y):
    mask = _tokens(y) > 0 if relu else None
    gx, gw, (gb,), ggate = _backward(gy, x, w, _Bias(b), gate, mask)
    return gx, gw, gb.to(b.dtype), ggate


def train_fwd(x, w, bn_w, bn_b, eps: float, gate, relu: bool):
    norm = _BatchNorm(bn_w, bn_b, eps)
    y, z = _forward(x, w, norm, gate, relu)
    return _like(y, x), norm.mean, norm.var, _like(z, x, torch.channels_last)


def train_bwd(gy, x, w, bn_w, bn_b, eps: float, gate, relu: bool, mean, var, z):
    norm = _BatchNorm(bn_w, bn_b, eps, _acc(mean), _acc(var))
    pre = norm.forward(_tokens(z))  # (also sets the normalised input for its backward)
    gx, gw, (gbn_w, gbn_b), ggate = _backward(gy, x, w, norm, gate, pre > 0 if relu else None)
    return gx, gw, gbn_w.to(bn_w.dtype), gbn_b.to(bn_b.dtype), ggate
