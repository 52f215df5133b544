"""PVT's spatial-reduction attention as two fused ops: `shvit::sra_reduce` (patchify conv + LayerNorm, or
pool + 1x1 conv + LayerNorm + GELU for PVTv2-li) and `shvit::sra_attention` (q and kv projections fused with
multi-head softmax attention over the M reduced keys), each with a backward op, fake impl and autograd."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .. import backends
from ..reference import sra as ref
from ._autograd import mark_extra_outputs, none_without_grad
from ._checks import autocast, check_same_device, check_same_dtype, check_tensor, check_tokens, empty_result
from ._dispatch import call, custom_op

OP = "sra"
_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
backends.register(OP, "reference", ref, ("cpu", "cuda"), _ALL)
backends.register(OP, "triton", "shvit_kernels.triton.sra", ("cuda", "cpu"), _ALL)
backends.register(OP, "cpu", SimpleNamespace(
    reduce_fwd=lambda *a: torch.ops.shvit.sra_reduce_fwd_cpu(*a),
    reduce_bwd=lambda *a: torch.ops.shvit.sra_reduce_bwd_cpu(*a),
    attn_fwd=lambda *a: torch.ops.shvit.sra_attn_fwd_cpu(*a),
    attn_bwd=lambda *a: torch.ops.shvit.sra_attn_bwd_cpu(*a)), ("cpu",), (torch.float32, torch.float64))


def _reduced_hw(h: int, w: int, sr_ratio: int, linear: bool) -> tuple[int, int]:
    return (7, 7) if linear else (h // sr_ratio, w // sr_ratio)


# ---- spatial reduction -------------------------------------------------------------------------------------

@custom_op("shvit::sra_reduce")
def _reduce(x: Tensor, h: int, w: int, sr_w: Tensor, sr_b: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float,
            sr_ratio: int, linear: bool) -> Tensor:
    return backends.kernel(OP, x).reduce_fwd(x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear)


@_reduce.register_fake
def _(x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear):
    ho, wo = _reduced_hw(h, w, sr_ratio, linear)
    return x.new_empty((x.shape[0], ho * wo, x.shape[2]))


@custom_op("shvit::sra_reduce_backward")
def _reduce_backward(g_red: Tensor, x: Tensor, h: int, w: int, sr_w: Tensor, sr_b: Tensor, ln_w: Tensor,
                     ln_b: Tensor, eps: float, sr_ratio: int,
                     linear: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).reduce_bwd(g_red, x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear)


@_reduce_backward.register_fake
def _(g_red, x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear):
    return tuple(torch.empty_like(t) for t in (x, sr_w, sr_b, ln_w, ln_b))


def _reduce_setup(ctx, inputs, output):
    x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear = inputs
    ctx.options = (h, w, eps, sr_ratio, linear)
    ctx.save_for_backward(x, sr_w, sr_b, ln_w, ln_b)


def _reduce_grad(ctx, g_red):
    x, sr_w, sr_b, ln_w, ln_b = ctx.saved_tensors
    h, w, eps, sr_ratio, linear = ctx.options
    gx, gsw, gsb, glw, glb = call(_reduce_backward, g_red.contiguous(), x, h, w, sr_w, sr_b, ln_w, ln_b, eps,
                                  sr_ratio, linear)
    return gx, None, None, gsw, gsb, glw, glb, None, None, None


_reduce.register_autograd(_reduce_grad, setup_context=_reduce_setup)


# ---- attention -----------------------------------------------------------------------------------------------

@custom_op("shvit::sra_attention")
def _attention(x: Tensor, red: Tensor, q_w: Tensor, q_b: Tensor | None, kv_w: Tensor, kv_b: Tensor | None,
               num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    return backends.kernel(OP, x).attn_fwd(x, red, q_w, q_b, kv_w, kv_b, num_heads, scale)


@_attention.register_fake
def _(x, red, q_w, q_b, kv_w, kv_b, num_heads, scale):
    lse_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x), x.new_empty((x.shape[0], num_heads, x.shape[1]), dtype=lse_dtype)


@custom_op("shvit::sra_attention_backward")
def _attention_backward(g_o: Tensor, x: Tensor, red: Tensor, q_w: Tensor, q_b: Tensor | None, kv_w: Tensor,
                        kv_b: Tensor | None, o: Tensor, lse: Tensor, num_heads: int, scale: float
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # Bias grads are always returned (schemas cannot return optionals); autograd drops them when bias is None.
    return backends.kernel(OP, x).attn_bwd(g_o, x, red, q_w, q_b, kv_w, kv_b, o, lse, num_heads, scale)


@_attention_backward.register_fake
def _(g_o, x, red, q_w, q_b, kv_w, kv_b, o, lse, num_heads, scale):
    c = x.shape[2]
    return (torch.empty_like(x), torch.empty_like(red), torch.empty_like(q_w), q_w.new_empty(c),
            torch.empty_like(kv_w), kv_w.new_empty(2 * c))


def _attention_setup(ctx, inputs, output):
    x, red, q_w, q_b, kv_w, kv_b, num_heads, scale = inputs
    o, lse = output
    mark_extra_outputs(ctx, lse)
    ctx.options = (num_heads, scale)
    ctx.has_bias = (q_b is not None, kv_b is not None)
    ctx.save_for_backward(x, red, q_w, q_b, kv_w, kv_b, o, lse)


@none_without_grad
def _attention_grad(ctx, g_o, _g_lse):
    x, red, q_w, q_b, kv_w, kv_b, o, lse = ctx.saved_tensors
    gx, g_red, g_qw, g_qb, g_kvw, g_kvb = call(_attention_backward, g_o.contiguous(), x, red, q_w, q_b, kv_w, kv_b,
                                               o, lse, *ctx.options)
    has_qb, has_kvb = ctx.has_bias
    return gx, g_red, g_qw, g_qb if has_qb else None, g_kvw, g_kvb if has_kvb else None, None, None


_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


# ---- public functions ----------------------------------------------------------------------------------------

def sra_reduce(x: Tensor, h: int, w: int, sr_weight: Tensor, sr_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
               eps: float = 1e-5, sr_ratio: int = 1, linear: bool = False) -> Tensor:
    """Key/value tokens (B, M, C) from x (B, N = h*w, C): LayerNorm(Conv2d(k = stride = sr_ratio)) with
    M = (h // sr_ratio) * (w // sr_ratio), or with `linear` GELU(LayerNorm(Conv1x1(AdaptiveAvgPool(7)))), M = 49."""
    x, sr_weight = autocast(x, sr_weight)
    check_tokens(x, h, w)
    c = x.shape[2]
    k = 1 if linear else sr_ratio
    if not linear and (not isinstance(sr_ratio, int) or sr_ratio < 2 or h < sr_ratio or w < sr_ratio):
        raise ValueError(f"sr_ratio must be an int in 2..min(H, W) = {min(h, w)}, got {sr_ratio!r}")
    why = f" for x with {c} channels"
    check_tensor("sr_weight", sr_weight, shape=(c, c, k, k), why=why)
    for name, t in (("sr_bias", sr_bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(name, t, shape=(c,), why=why)
    check_same_device("x", x, sr_weight=sr_weight, sr_bias=sr_bias, ln_weight=ln_weight, ln_bias=ln_bias)
    check_same_dtype("x", x, sr_weight=sr_weight)
    ho, wo = _reduced_hw(h, w, sr_ratio, linear)
    if x.shape[0] == 0:
        return empty_result((0, ho * wo, c), x, sr_weight, sr_bias, ln_weight, ln_bias)
    return call(_reduce, x.contiguous(), h, w, sr_weight, sr_bias, ln_weight, ln_bias, float(eps), sr_ratio, linear)


def sra_attention(x: Tensor, red: Tensor, q_weight: Tensor, q_bias: Tensor | None, kv_weight: Tensor,
                  kv_bias: Tensor | None, num_heads: int, scale: float) -> Tensor:
    """Multi-head attention of q = x W_q^T + b_q over k, v = split(red W_kv^T + b_kv): (B, N, C), before `proj`."""
    x, red, q_weight, kv_weight = autocast(x, red, q_weight, kv_weight)
    check_tensor("x", x, ndim=3)
    check_tensor("red", red, ndim=3)
    b, n, c = x.shape
    if red.shape[0] != b or red.shape[2] != c or red.shape[1] == 0:
        raise ValueError(f"red must have shape ({b}, M >= 1, {c}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(red.shape)}")
    if not isinstance(num_heads, int) or num_heads <= 0 or c % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of C={c}, got {num_heads!r}")
    why = f" for x with {c} channels"
    check_tensor("q_weight", q_weight, shape=(c, c), why=why)
    check_tensor("kv_weight", kv_weight, shape=(2 * c, c), why=why)
    biases = {k: t for k, t in (("q_bias", q_bias), ("kv_bias", kv_bias)) if t is not None}
    for name, t in biases.items():
        check_tensor(name, t, shape=(c if name == "q_bias" else 2 * c,), why=why)
    check_same_device("x", x, red=red, q_weight=q_weight, kv_weight=kv_weight, **biases)
    check_same_dtype("x", x, red=red, q_weight=q_weight, kv_weight=kv_weight)
    if b == 0 or n == 0:
        return empty_result(x.shape, x, red, q_weight, q_bias, kv_weight, kv_bias)
    return call(_attention, x.contiguous(), red.contiguous(), q_weight, q_bias, kv_weight, kv_bias, num_heads,
                float(scale))[0]
