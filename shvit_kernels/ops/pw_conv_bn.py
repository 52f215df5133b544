"""Pointwise (1x1) Conv2d_BN (+ReLU) with an optional per-sample gate on the input channels, applied in the GEMM's
prologue: PatchMerging's conv1 (ReLU) and conv3 (gate = its SqueezeExcite's). Ops `shvit::pw_conv_bn` (eval, BN
folded) and `shvit::pw_conv_bn_train` (batch statistics), each with a backward op, fake impls, autograd and
per-call backend choice. Spec: shvit_kernels/reference/pw_conv_bn.py."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .. import backends
from ..reference import pw_conv_bn as ref
from ..reference.ffn import memory_format
from ._autograd import mark_extra_outputs, none_without_grad
from ._checks import autocast, check_same_device, check_same_dtype, check_tensor, empty_result
from ._dispatch import call, custom_op

OP = "pw_conv_bn"
_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
backends.register(OP, "reference", ref, ("cpu", "cuda"), _ALL)
backends.register(OP, "triton", "shvit_kernels.triton.pw_conv_bn", ("cuda", "cpu"), _ALL)
backends.register(OP, "cpu", SimpleNamespace(
    fwd=lambda *a: torch.ops.shvit.pw_conv_bn_fwd_cpu(*a),
    bwd=lambda *a: torch.ops.shvit.pw_conv_bn_bwd_cpu(*a),
    train_fwd=lambda *a: torch.ops.shvit.pw_conv_bn_train_fwd_cpu(*a),
    train_bwd=lambda *a: torch.ops.shvit.pw_conv_bn_train_bwd_cpu(*a)), ("cpu",), (torch.float32, torch.float64))


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out(x: Tensor, o: int, fmt: torch.memory_format | None = None) -> Tensor:
    return torch.empty((x.shape[0], o, *x.shape[2:]), dtype=x.dtype, device=x.device,
                       memory_format=fmt or memory_format(x))


def _gate_grad(x: Tensor, gate: Tensor | None) -> Tensor:
    return x.new_empty(0) if gate is None else torch.empty_like(gate)


def _dense(t: Tensor) -> Tensor:
    # The kernels take NCHW- or channels_last-contiguous activations; any other strides are gathered once here.
    return t.contiguous(memory_format=memory_format(t))


# ---- eval form ---------------------------------------------------------------------------------------------

@custom_op("shvit::pw_conv_bn")
def _pw(x: Tensor, w: Tensor, b: Tensor, gate: Tensor | None, relu: bool) -> Tensor:
    return backends.kernel(OP, x).fwd(x, w, b, gate, relu)


@_pw.register_fake
def _(x, w, b, gate, relu):
    return _out(x, w.shape[0])


@custom_op("shvit::pw_conv_bn_backward")
def _pw_backward(grad_y: Tensor, x: Tensor, w: Tensor, b: Tensor, gate: Tensor | None, relu: bool,
                 y: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).bwd(grad_y, x, w, b, gate, relu, y)


@_pw_backward.register_fake
def _(grad_y, x, w, b, gate, relu, y):
    return torch.empty_like(x), torch.empty_like(w), torch.empty_like(b), _gate_grad(x, gate)


def _eval_setup(ctx, inputs, output):
    x, w, b, gate, relu = inputs
    ctx.relu, ctx.has_gate = relu, gate is not None
    ctx.save_for_backward(x, w, b, gate, output if relu else None)  # the output is the ReLU's mask


def _eval_backward(ctx, grad_y):
    x, w, b, gate, y = ctx.saved_tensors
    gx, gw, gb, ggate = call(_pw_backward, grad_y.contiguous(memory_format=memory_format(x)), x, w, b, gate, ctx.relu,
                             y)
    return gx, gw, gb, ggate if ctx.has_gate else None, None


_pw.register_autograd(_eval_backward, setup_context=_eval_setup)


# ---- training form -----------------------------------------------------------------------------------------

@custom_op("shvit::pw_conv_bn_train")
def _pw_train(x: Tensor, w: Tensor, bn_w: Tensor, bn_b: Tensor, eps: float, gate: Tensor | None,
              relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).train_fwd(x, w, bn_w, bn_b, eps, gate, relu)


@_pw_train.register_fake
def _(x, w, bn_w, bn_b, eps, gate, relu):
    o, sd = w.shape[0], _stat_dtype(x)
    return _out(x, o), x.new_empty(o, dtype=sd), x.new_empty(o, dtype=sd), _out(x, o, torch.channels_last)


@custom_op("shvit::pw_conv_bn_train_backward")
def _pw_train_backward(grad_y: Tensor, x: Tensor, w: Tensor, bn_w: Tensor, bn_b: Tensor, eps: float,
                       gate: Tensor | None, relu: bool, mean: Tensor, var: Tensor,
                       z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).train_bwd(grad_y, x, w, bn_w, bn_b, eps, gate, relu, mean, var, z)


@_pw_train_backward.register_fake
def _(grad_y, x, w, bn_w, bn_b, eps, gate, relu, mean, var, z):
    return (torch.empty_like(x), torch.empty_like(w), torch.empty_like(bn_w), torch.empty_like(bn_b),
            _gate_grad(x, gate))


def _train_setup(ctx, inputs, output):
    x, w, bn_w, bn_b, eps, gate, relu = inputs
    _, *saved = output  # batch statistics and z
    mark_extra_outputs(ctx, *saved)
    ctx.eps, ctx.relu, ctx.has_gate = eps, relu, gate is not None
    ctx.save_for_backward(x, w, bn_w, bn_b, gate, *saved)


@none_without_grad
def _train_backward(ctx, grad_y, *_grad_saved):
    x, w, bn_w, bn_b, gate, mean, var, z = ctx.saved_tensors
    gx, gw, gbn_w, gbn_b, ggate = call(_pw_train_backward, grad_y.contiguous(memory_format=memory_format(x)), x, w,
                                       bn_w, bn_b, ctx.eps, gate, ctx.relu, mean, var, z)
    return gx, gw, gbn_w, gbn_b, None, ggate if ctx.has_gate else None, None


_pw_train.register_autograd(_train_backward, setup_context=_train_setup)


# ---- public functions --------------------------------------------------------------------------------------

def _check(x: Tensor, w: Tensor, gate: Tensor | None, **vectors: Tensor) -> None:
    check_tensor("x", x, ndim=4)
    k = x.shape[1]
    check_tensor("weight", w, ndim=2)
    check_tensor("weight", w, shape=("O", k), why=f" for x with {k} channels")
    for name, t in vectors.items():
        check_tensor(name, t, shape=(w.shape[0],))
    if gate is not None:
        check_tensor("gate", gate, shape=(x.shape[0], k), why=f" for x of shape {tuple(x.shape)}")
    tensors = dict(vectors, weight=w, **({} if gate is None else {"gate": gate}))
    check_same_device("x", x, **tensors)
    check_same_dtype("x", x, weight=w)
    if 0 in x.shape[1:] or w.shape[0] == 0:
        raise ValueError(f"x must have non-empty channel and spatial dims and weight a non-empty output dim, got "
                         f"shapes {tuple(x.shape)} and {tuple(w.shape)}")


def pw_conv_bn(x: Tensor, weight: Tensor, bias: Tensor, gate: Tensor | None = None, relu: bool = False) -> Tensor:
    """Eval-form 1x1 conv with its BatchNorm folded: y = [relu](weight (gate * x) + bias) over the H*W tokens of each
    sample, the gate (if given) scaling x's channels per sample inside the kernel (no gated copy of x is written).

    x (B, K, H, W), NCHW or channels_last (the output keeps the layout); weight (O, K); bias (O,); gate (B, K)
    (PatchMerging: sigmoid of its SqueezeExcite). Differentiable in x, weight, bias and gate.
    """
    x, weight = autocast(x, weight)
    _check(x, weight, gate, bias=bias)
    if x.shape[0] == 0:
        return empty_result((0, weight.shape[0], *x.shape[2:]), x, weight, bias, gate)
    gate = None if gate is None else gate.to(x.dtype)
    return call(_pw, _dense(x), weight, bias.to(x.dtype), gate, bool(relu))


def pw_conv_bn_train(x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, eps: float = 1e-5,
                     gate: Tensor | None = None, relu: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Training-form 1x1 Conv2d_BN: z = weight (gate * x); y = [relu](BN(z)) with batch statistics over (B, H, W).

    Returns (y, mean, var): the batch mean and biased variance of z (fp32, fp64 for fp64 inputs) for the caller's
    running-stat update. Shapes as `pw_conv_bn`.
    """
    x, weight = autocast(x, weight)
    _check(x, weight, gate, bn_weight=bn_weight, bn_bias=bn_bias)
    o = weight.shape[0]
    if x.shape[0] == 0:
        nan = x.new_full((o,), float("nan"), dtype=_stat_dtype(x))
        return empty_result((0, o, *x.shape[2:]), x, weight, bn_weight, bn_bias, gate), nan, nan.clone()
    if x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"x: BatchNorm training needs more than 1 value per channel, got shape {tuple(x.shape)}")
    gate = None if gate is None else gate.to(x.dtype)
    y, mean, var, _ = call(_pw_train, _dense(x), weight, bn_weight, bn_bias, float(eps), gate, bool(relu))
    return y, mean, var
