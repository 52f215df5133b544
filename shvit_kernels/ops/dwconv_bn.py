"""Fused depthwise k x k conv + BatchNorm (+ residual add) (+ ReLU): ops `shvit::dwconv_bn` (eval, BN folded)
and `shvit::dwconv_bn_train` (batch statistics), with fake impls, autograd and per-call backend choice."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .. import backends
from ..reference import dwconv_bn as ref
from ..reference.ffn import memory_format
from ._autograd import mark_extra_outputs, none_without_grad
from ._checks import autocast, check_same_device, check_same_dtype, check_tensor, empty_result
from ._dispatch import call, custom_op

OP = "dwconv_bn"
_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
backends.register(OP, "reference", ref, ("cpu", "cuda"), _ALL)
backends.register(OP, "cpu", SimpleNamespace(
    fwd=lambda *a: torch.ops.shvit.dwconv_bn_fwd_cpu(*a),
    train_fwd=lambda *a: torch.ops.shvit.dwconv_bn_train_fwd_cpu(*a),
    train_bwd=lambda *a: torch.ops.shvit.dwconv_bn_train_bwd_cpu(*a)), ("cpu",), (torch.float32, torch.float64))
backends.register(OP, "triton", "shvit_kernels.triton.dwconv_bn", ("cuda", "cpu"), _ALL)
backends.register(OP, "cuda", SimpleNamespace(
    fwd=lambda *a: torch.ops.shvit.dwconv_bn_fwd_cuda(*a),
    train_fwd=lambda *a: torch.ops.shvit.dwconv_bn_train_fwd_cuda(*a),
    train_bwd=lambda *a: torch.ops.shvit.dwconv_bn_train_bwd_cuda(*a)),
    ("cuda",), (torch.float16, torch.bfloat16, torch.float32))


def _out_hw(h: int, w: int, k: int, stride: int) -> tuple[int, int]:
    p = k // 2
    return (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1


def _like(x: Tensor, c: int, h: int, w: int) -> Tensor:
    return torch.empty((x.shape[0], c, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- eval form: y = [relu](dwconv(x, weight) + bias) -------------------------------------------------------

@custom_op("shvit::dwconv_bn")
def _dwconv_bn(x: Tensor, weight: Tensor, bias: Tensor, stride: int, relu: bool) -> Tensor:
    return backends.kernel(OP, x).fwd(x, weight, bias, stride, relu)


@_dwconv_bn.register_fake
def _(x, weight, bias, stride, relu):
    return _like(x, x.shape[1], *_out_hw(x.shape[2], x.shape[3], weight.shape[-1], stride))


def _eval_setup(ctx, inputs, output):
    x, weight, _, stride, relu = inputs
    ctx.stride, ctx.relu = stride, relu
    ctx.save_for_backward(x, weight, output if relu else None)


def _eval_backward(ctx, grad):
    # Backward of a plain depthwise conv + bias: ATen's kernel on every backend (BN is already folded).
    x, weight, y = ctx.saved_tensors
    if ctx.relu:
        grad = grad * (y > 0)
    k = weight.shape[-1]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]], [ctx.stride] * 2, [k // 2] * 2, [1, 1], False, [0, 0], weight.shape[0],
        list(ctx.needs_input_grad[:3]))
    return gx, gw, gb, None, None


_dwconv_bn.register_autograd(_eval_backward, setup_context=_eval_setup)


# ---- training form: batch statistics --------------------------------------------------------------------

@custom_op("shvit::dwconv_bn_train")
def _dwconv_bn_train(x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, eps: float, stride: int,
                     residual: bool, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).train_fwd(x, weight, bn_weight, bn_bias, eps, stride, residual, relu)


@_dwconv_bn_train.register_fake
def _(x, weight, bn_weight, bn_bias, eps, stride, residual, relu):
    c = x.shape[1]
    y = _like(x, c, *_out_hw(x.shape[2], x.shape[3], weight.shape[-1], stride))
    return y, x.new_empty(c, dtype=_stat_dtype(x)), x.new_empty(c, dtype=_stat_dtype(x))


@custom_op("shvit::dwconv_bn_train_backward")
def _dwconv_bn_train_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, mean: Tensor,
                              var: Tensor, y: Tensor, eps: float, stride: int, residual: bool,
                              relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).train_bwd(grad_y, x, weight, bn_weight, mean, var, y, eps, stride, residual, relu)


@_dwconv_bn_train_backward.register_fake
def _(grad_y, x, weight, bn_weight, mean, var, y, eps, stride, residual, relu):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bn_weight), torch.empty_like(bn_weight)


def _train_setup(ctx, inputs, output):
    x, weight, bn_weight, _, eps, stride, residual, relu = inputs
    y, mean, var = output
    mark_extra_outputs(ctx, mean, var)
    ctx.args = (eps, stride, residual, relu)
    ctx.save_for_backward(x, weight, bn_weight, mean, var, y)


@none_without_grad
def _train_backward(ctx, grad_y, _grad_mean, _grad_var):
    x, weight, bn_weight, mean, var, y = ctx.saved_tensors
    gx, gw, gbw, gbb = call(_dwconv_bn_train_backward, grad_y.contiguous(memory_format=memory_format(y)), x, weight,
                            bn_weight, mean, var, y, *ctx.args)
    return gx, gw, gbw, gbb, None, None, None, None


_dwconv_bn_train.register_autograd(_train_backward, setup_context=_train_setup)


# ---- public functions --------------------------------------------------------------------------------------

def _check(x: Tensor, weight: Tensor, stride: int, residual: bool, **params: Tensor) -> None:
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    c, k = x.shape[1], weight.shape[-1]
    if weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] != k:
        raise ValueError(f"weight must have shape ({c}, 1, k, k) for x with {c} channels, got {tuple(weight.shape)}")
    if k % 2 == 0 or k > 7:
        raise ValueError(f"weight: kernel size must be odd and at most 7, got {k}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    if residual and stride != 1:
        raise ValueError("residual=True needs stride=1 (the output must have the input's shape)")
    for name, t in params.items():
        check_tensor(name, t, shape=(c,), why=f" for x with {c} channels")
    check_same_device("x", x, weight=weight, **params)
    check_same_dtype("x", x, weight=weight)
    if x.dim() == 4 and 0 in x.shape[1:]:
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {tuple(x.shape)}")


def _empty_batch(x: Tensor, weight: Tensor, stride: int, *params: Tensor) -> Tensor:
    return empty_result((0, x.shape[1], *_out_hw(x.shape[2], x.shape[3], weight.shape[-1], stride)), x, weight,
                        *params)


def dwconv_bn(x: Tensor, weight: Tensor, bias: Tensor, stride: int = 1, relu: bool = False) -> Tensor:
    """Eval form: [relu](depthwise_conv2d(x, weight, padding=k//2, stride) + bias).

    x (B, C, H, W), NCHW or channels_last (the output keeps the layout); weight (C, 1, k, k), odd k <= 7,
    with BatchNorm (and, for the residual block, the identity tap) already folded in; bias (C,).
    Differentiable in x, weight and bias.
    """
    x, weight = autocast(x, weight)
    _check(x, weight, stride, False, bias=bias)
    if x.shape[0] == 0:
        return _empty_batch(x, weight, stride, bias)
    return call(_dwconv_bn, x, weight, bias.to(x.dtype), stride, relu)


def dwconv_bn_train(x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, eps: float = 1e-5,
                    stride: int = 1, residual: bool = False, relu: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Training form with batch statistics: returns (y, mean, var).

    z = depthwise_conv2d(x, weight); y = [relu](batch_norm(z) * bn_weight + bn_bias [+ x]); mean and the
    biased var of z per channel (fp32, fp64 for fp64 inputs) for the caller's running-stat update.
    Differentiable in x, weight, bn_weight and bn_bias; deterministic on every backend.
    """
    x, weight = autocast(x, weight)
    _check(x, weight, stride, residual, bn_weight=bn_weight, bn_bias=bn_bias)
    k = weight.shape[-1]
    ho, wo = _out_hw(x.shape[2], x.shape[3], k, stride)
    if x.shape[0] * ho * wo <= 1 and x.shape[0] > 0:
        raise ValueError(f"x: BatchNorm training needs more than 1 value per channel, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        nan = x.new_full((x.shape[1],), float("nan"), dtype=_stat_dtype(x))
        return _empty_batch(x, weight, stride, bn_weight, bn_bias), nan, nan.clone()
    return call(_dwconv_bn_train, x, weight, bn_weight, bn_bias, float(eps), stride, residual, relu)
