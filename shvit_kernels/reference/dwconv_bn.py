"""Spec of the fused depthwise conv + BatchNorm (+ residual) (+ ReLU), in any dtype (fp64 for the oracle).

Every backend implements these three functions with the same signatures:
  fwd(x, weight, bias, stride, relu) -> y                          eval: BN (and identity) folded
  train_fwd(x, weight, bn_w, bn_b, eps, stride, residual, relu) -> (y, mean, biased var)
  train_bwd(gy, x, weight, bn_w, mean, var, y, eps, stride, residual, relu) -> (gx, gw, gbn_w, gbn_b)
Half-precision inputs are computed in fp32 and rounded once at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _conv(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    return F.conv2d(_acc(x), _acc(weight), None, stride, weight.shape[-1] // 2, 1, weight.shape[0])


def fwd(x, weight, bias, stride: int, relu: bool):
    y = _conv(x, weight, stride) + _acc(bias)[:, None, None]
    return (y.relu() if relu else y).to(x.dtype)


def train_fwd(x, weight, bn_weight, bn_bias, eps: float, stride: int, residual: bool, relu: bool):
    z = _conv(x, weight, stride)
    mean = z.mean((0, 2, 3))  # as nn.BatchNorm2d: sum / count (an Inf input gives an Inf mean, var_mean's is NaN)
    var = (z - mean[:, None, None]).square().mean((0, 2, 3))
    y = (z - mean[:, None, None]) * torch.rsqrt(var + eps)[:, None, None] * _acc(bn_weight)[:, None, None] \
        + _acc(bn_bias)[:, None, None]
    if residual:
        y = y + _acc(x)
    if relu:
        y = y.relu()
    return y.to(x.dtype), mean, var


def train_bwd(grad_y, x, weight, bn_weight, mean, var, y, eps: float, stride: int, residual: bool, relu: bool):
    g = _acc(grad_y)
    if relu:
        g = g * (y > 0)
    z = _conv(x, weight, stride)
    invstd = torch.rsqrt(var + eps)[:, None, None]
    zhat = (z - mean[:, None, None]) * invstd
    grad_bias = g.sum((0, 2, 3))
    grad_bn_weight = (g * zhat).sum((0, 2, 3))
    count = z.numel() // z.shape[1]
    gz = (g - (grad_bias[:, None, None] + zhat * grad_bn_weight[:, None, None]) / count) \
        * invstd * _acc(bn_weight)[:, None, None]
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gz, _acc(x), _acc(weight), None, [stride] * 2, [weight.shape[-1] // 2] * 2, [1, 1], False, [0, 0],
        weight.shape[0], [True, True, False])
    if residual:
        gx = gx + g
    pd = bn_weight.dtype
    return gx.to(x.dtype), gw.to(weight.dtype), grad_bn_weight.to(pd), grad_bias.to(pd)
