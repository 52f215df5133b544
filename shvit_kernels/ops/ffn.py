"""Fused residual FFN of SHViT: y = x + Conv2d_BN(ReLU(Conv2d_BN(x))) with 1x1 convs (d -> h -> d). Ops
`shvit::ffn` (eval, BNs folded) and `shvit::ffn_train` (BatchNorm with batch statistics), each with a backward op,
fake impls, autograd and per-call backend choice."""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

from .. import backends
from ..reference import ffn as ref
from ._autograd import mark_extra_outputs, none_without_grad
from ._checks import autocast, check_same_device, check_same_dtype, check_tensor, empty_result
from ._dispatch import call, custom_op

OP = "ffn"
_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
backends.register(OP, "reference", ref, ("cpu", "cuda"), _ALL)
backends.register(OP, "triton", "shvit_kernels.triton.ffn", ("cuda", "cpu"), _ALL)
backends.register(OP, "cpu", SimpleNamespace(
    fwd=lambda *a: torch.ops.shvit.ffn_fwd_cpu(*a),
    bwd=lambda *a: torch.ops.shvit.ffn_bwd_cpu(*a),
    train_fwd=lambda *a: torch.ops.shvit.ffn_train_fwd_cpu(*a),
    train_bwd=lambda *a: torch.ops.shvit.ffn_train_bwd_cpu(*a)), ("cpu",), (torch.float32, torch.float64))


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _saved_like(x: Tensor, c: int) -> Tensor:
    # z1 / z2 kept for the backward: channels_last whatever x's layout (see reference/ffn.py).
    return torch.empty((x.shape[0], c, *x.shape[2:]), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


# ---- eval form ---------------------------------------------------------------------------------------------

@custom_op("shvit::ffn")
def _ffn(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return backends.kernel(OP, x).fwd(x, w1, b1, w2, b2)


@_ffn.register_fake
def _(x, w1, b1, w2, b2):
    return torch.empty_like(x)


@custom_op("shvit::ffn_backward")
def _ffn_backward(grad_y: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                  b2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).bwd(grad_y, x, w1, b1, w2, b2)


@_ffn_backward.register_fake
def _(grad_y, x, *params):
    return (torch.empty_like(x), *(torch.empty_like(t) for t in params))


def _eval_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # the hidden activation is recomputed from x in the backward


def _eval_backward(ctx, grad_y):
    x = ctx.saved_tensors[0]
    return call(_ffn_backward, grad_y.contiguous(memory_format=ref.memory_format(x)), *ctx.saved_tensors)


_ffn.register_autograd(_eval_backward, setup_context=_eval_setup)


# ---- training form -----------------------------------------------------------------------------------------

@custom_op("shvit::ffn_train")
def _ffn_train(x: Tensor, w1: Tensor, bn1_w: Tensor, bn1_b: Tensor, eps1: float, w2: Tensor, bn2_w: Tensor,
               bn2_b: Tensor, eps2: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).train_fwd(x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, eps2)


@_ffn_train.register_fake
def _(x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, eps2):
    h, c, sd = w1.shape[0], x.shape[1], _stat_dtype(x)
    stats = (x.new_empty(h, dtype=sd), x.new_empty(h, dtype=sd), x.new_empty(c, dtype=sd), x.new_empty(c, dtype=sd))
    return torch.empty_like(x), *stats, _saved_like(x, h), _saved_like(x, c)


@custom_op("shvit::ffn_train_backward")
def _ffn_train_backward(grad_y: Tensor, x: Tensor, w1: Tensor, bn1_w: Tensor, bn1_b: Tensor, eps1: float, w2: Tensor,
                        bn2_w: Tensor, bn2_b: Tensor, eps2: float, mean1: Tensor, var1: Tensor, mean2: Tensor,
                        var2: Tensor, z1: Tensor, z2: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).train_bwd(grad_y, x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, eps2, mean1, var1,
                                            mean2, var2, z1, z2)


@_ffn_train_backward.register_fake
def _(grad_y, x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, *stats_and_saved):
    return (torch.empty_like(x), *(torch.empty_like(t) for t in (w1, bn1_w, bn1_b, w2, bn2_w, bn2_b)))


def _train_setup(ctx, inputs, output):
    x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, eps2 = inputs
    _, *saved = output  # batch statistics, z1 and z2
    mark_extra_outputs(ctx, *saved)
    ctx.eps = eps1, eps2
    ctx.save_for_backward(x, w1, bn1_w, bn1_b, w2, bn2_w, bn2_b, *saved)


@none_without_grad
def _train_backward(ctx, grad_y, *_grad_saved):
    x, w1, bn1_w, bn1_b, w2, bn2_w, bn2_b, *saved = ctx.saved_tensors
    eps1, eps2 = ctx.eps
    gx, gw1, g1w, g1b, gw2, g2w, g2b = call(
        _ffn_train_backward, grad_y.contiguous(memory_format=ref.memory_format(x)), x, w1, bn1_w, bn1_b, eps1, w2,
        bn2_w, bn2_b, eps2, *saved)
    return gx, gw1, g1w, g1b, None, gw2, g2w, g2b, None


_ffn_train.register_autograd(_train_backward, setup_context=_train_setup)


# ---- public functions --------------------------------------------------------------------------------------

class FFNStats(NamedTuple):
    """Batch statistics of the two BatchNorms (mean and biased var), for the running-stat update."""
    pw1_mean: Tensor
    pw1_var: Tensor
    pw2_mean: Tensor
    pw2_var: Tensor


def _check(x: Tensor, w1: Tensor, w2: Tensor, **vectors: Tensor) -> None:
    check_tensor("x", x, ndim=4)
    c = x.shape[1]
    check_tensor("pw1_weight", w1, ndim=2)
    h = w1.shape[0]
    check_tensor("pw1_weight", w1, shape=("h", c), why=f" for x with {c} channels")
    check_tensor("pw2_weight", w2, shape=(c, h), why=f" for x with {c} channels and pw1_weight's h={h}")
    for name, t in vectors.items():
        n = h if name.startswith(("pw1", "bn1")) else c
        check_tensor(name, t, shape=(n,))
    check_same_device("x", x, pw1_weight=w1, pw2_weight=w2, **vectors)
    check_same_dtype("x", x, pw1_weight=w1, pw2_weight=w2)
    if 0 in x.shape[1:] or h == 0:
        raise ValueError(f"x must have non-empty channel and spatial dims and pw1_weight a non-empty hidden dim, got "
                         f"shapes {tuple(x.shape)} and {tuple(w1.shape)}")


def _dense(x: Tensor) -> Tensor:
    # The kernels take NCHW- or channels_last-contiguous x; any other strides are gathered once here.
    return x.contiguous(memory_format=ref.memory_format(x))


def ffn(x: Tensor, pw1_weight: Tensor, pw1_bias: Tensor, pw2_weight: Tensor, pw2_bias: Tensor) -> Tensor:
    """Eval-form residual FFN with both BatchNorms folded: y = x + pw2_weight relu(pw1_weight x + pw1_bias) + pw2_bias
    over the H*W tokens of each sample (1x1 convs as matrices).

    x (B, d, H, W), NCHW or channels_last (the output keeps the layout); pw1_weight (h, d), pw1_bias (h,);
    pw2_weight (d, h), pw2_bias (d,). Differentiable in all of them.
    """
    x, pw1_weight, pw2_weight = autocast(x, pw1_weight, pw2_weight)
    _check(x, pw1_weight, pw2_weight, pw1_bias=pw1_bias, pw2_bias=pw2_bias)
    if x.shape[0] == 0:
        return empty_result(x.shape, x, pw1_weight, pw1_bias, pw2_weight, pw2_bias)
    return call(_ffn, _dense(x), pw1_weight, pw1_bias.to(x.dtype), pw2_weight, pw2_bias.to(x.dtype))


def ffn_train(x: Tensor, pw1_weight: Tensor, bn1_weight: Tensor, bn1_bias: Tensor, pw2_weight: Tensor,
              bn2_weight: Tensor, bn2_bias: Tensor, eps1: float = 1e-5, eps2: float = 1e-5
              ) -> tuple[Tensor, FFNStats]:
    """Training-form residual FFN: both BatchNorms normalise with batch statistics over (B, H, W).

    z1 = pw1_weight x; h = relu(bn1(z1)); z2 = pw2_weight h; y = x + bn2(z2). Returns (y, FFNStats) with the batch
    mean and biased variance of z1 and z2 (fp32, fp64 for fp64 inputs) for the caller's running-stat update.
    """
    x, pw1_weight, pw2_weight = autocast(x, pw1_weight, pw2_weight)
    _check(x, pw1_weight, pw2_weight, bn1_weight=bn1_weight, bn1_bias=bn1_bias, bn2_weight=bn2_weight,
           bn2_bias=bn2_bias)
    if x.shape[0] == 0:
        sd = _stat_dtype(x)
        nan = [x.new_full((n,), float("nan"), dtype=sd) for n in (pw1_weight.shape[0],) * 2 + (x.shape[1],) * 2]
        y = empty_result(x.shape, x, pw1_weight, bn1_weight, bn1_bias, pw2_weight, bn2_weight, bn2_bias)
        return y, FFNStats(*nan)
    if x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"x: BatchNorm training needs more than 1 value per channel, got shape {tuple(x.shape)}")
    y, *stats, _, _ = call(_ffn_train, _dense(x), pw1_weight, bn1_weight, bn1_bias, float(eps1), pw2_weight,
                           bn2_weight, bn2_bias, float(eps2))
    return y, FFNStats(*stats)
