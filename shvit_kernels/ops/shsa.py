"""Fused single-head self-attention (SHViT's SHSA): GroupNorm(1) on the first pdim channels, 1x1 QKV
projection (+BN), softmax attention over the H*W tokens, concat with the untouched channels, ReLU, 1x1
projection (+BN), optional residual add. Ops `shvit::shsa` (eval, BN folded) and `shvit::shsa_train`
(BatchNorm with batch statistics), each with a backward op, fake impls and autograd."""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

from .. import backends
from ..reference import shsa as ref
from ..reference.ffn import memory_format
from ._autograd import mark_extra_outputs, none_without_grad
from ._checks import autocast, check_same_device, check_same_dtype, check_tensor, empty_result
from ._dispatch import call, custom_op

OP = "shsa"
_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cpu_train_fwd(x, *args):
    # Keeps the pre-BN projection: recomputing it would be the backward's largest GEMM.
    z = torch.empty_like(x)
    return (*torch.ops.shvit.shsa_train_fwd_cpu(x, *args, z), z)


backends.register(OP, "reference", ref, ("cpu", "cuda"), _ALL)
backends.register(OP, "triton", "shvit_kernels.triton.shsa", ("cuda", "cpu"), _ALL)
backends.register(OP, "cpu", SimpleNamespace(
    fwd=lambda *a: torch.ops.shvit.shsa_fwd_cpu(*a),
    bwd=lambda *a: torch.ops.shvit.shsa_bwd_cpu(*a),
    train_fwd=_cpu_train_fwd,
    train_bwd=lambda *a, kept=None: torch.ops.shvit.shsa_train_bwd_cpu(*a, kept), takes_kept=True), ("cpu",),
    (torch.float32, torch.float64))
backends.register(OP, "cuda", SimpleNamespace(
    fwd=lambda *a: torch.ops.shvit.shsa_fwd_cuda(*a),
    bwd=lambda *a: torch.ops.shvit.shsa_bwd_cuda(*a),
    train_fwd=lambda *a: torch.ops.shvit.shsa_train_fwd_cuda(*a),
    train_bwd=lambda *a: torch.ops.shvit.shsa_train_bwd_cuda(*a)),
    ("cuda",), (torch.float16, torch.bfloat16, torch.float32))


# ---- eval form -----------------------------------------------------------------------------------------------

@custom_op("shvit::shsa")
def _shsa(x: Tensor, gn_w: Tensor, gn_b: Tensor, gn_eps: float, qkv_w: Tensor, qkv_b: Tensor, proj_w: Tensor,
          proj_b: Tensor, qk_dim: int, residual: bool) -> Tensor:
    return backends.kernel(OP, x).fwd(x, gn_w, gn_b, gn_eps, qkv_w, qkv_b, proj_w, proj_b, qk_dim, residual)


@_shsa.register_fake
def _(x, gn_w, gn_b, gn_eps, qkv_w, qkv_b, proj_w, proj_b, qk_dim, residual):
    return torch.empty_like(x)


@custom_op("shvit::shsa_backward")
def _shsa_backward(grad_y: Tensor, x: Tensor, gn_w: Tensor, gn_b: Tensor, gn_eps: float, qkv_w: Tensor,
                   qkv_b: Tensor, proj_w: Tensor, proj_b: Tensor, qk_dim: int,
                   residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel(OP, x).bwd(grad_y, x, gn_w, gn_b, gn_eps, qkv_w, qkv_b, proj_w, proj_b, qk_dim, residual)


@_shsa_backward.register_fake
def _(grad_y, x, *params_and_options):
    tensors = [t for t in params_and_options if isinstance(t, Tensor)]
    return (torch.empty_like(x), *(torch.empty_like(t) for t in tensors))


def _eval_setup(ctx, inputs, output):
    ctx.inputs = tuple(t if not isinstance(t, Tensor) else None for t in inputs)
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)))


def _merge(ctx) -> list:
    """The forward's inputs: saved tensors put back among the non-tensor options."""
    saved = iter(ctx.saved_tensors)
    return [next(saved) if a is None else a for a in ctx.inputs]


def _eval_backward(ctx, grad_y):
    args = _merge(ctx)
    gx, *gp = call(_shsa_backward, grad_y.contiguous(), *args)
    ggw, ggb, gqw, gqb, gpw, gpb = gp
    return gx, ggw, ggb, None, gqw, gqb, gpw, gpb, None, None


_shsa.register_autograd(_eval_backward, setup_context=_eval_setup)


# ---- training form ---------------------------------------------------------------------------------------

@custom_op("shvit::shsa_train")
def _shsa_train(x: Tensor, gn_w: Tensor, gn_b: Tensor, gn_eps: float, qkv_w: Tensor, qkv_bn_w: Tensor,
                qkv_bn_b: Tensor, qkv_eps: float, proj_w: Tensor, proj_bn_w: Tensor, proj_bn_b: Tensor,
                proj_eps: float, qk_dim: int, residual: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, qkv_mean, qkv_var, proj_mean, proj_var, kept): kept is what the backend's train_fwd returned after
    the statistics for its train_bwd (the C++ kernel's pre-BN projection), flattened; empty when nothing."""
    y, *stats = backends.kernel(OP, x).train_fwd(x, gn_w, gn_b, gn_eps, qkv_w, qkv_bn_w, qkv_bn_b, qkv_eps, proj_w,
                                                 proj_bn_w, proj_bn_b, proj_eps, qk_dim, residual)
    return y, *stats[:4], stats[4].view(-1) if len(stats) > 4 else x.new_empty(0)


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_shsa_train.register_fake
def _(x, gn_w, gn_b, gn_eps, qkv_w, qkv_bn_w, qkv_bn_b, qkv_eps, proj_w, proj_bn_w, proj_bn_b, proj_eps, qk_dim,
      residual):
    o, c = qkv_w.shape[0], x.shape[1]
    sd = _stat_dtype(x)
    # kept's size depends on the backend chosen at run time; meta tensors (no such choice) keep nothing.
    kept = x.new_empty(0 if x.is_meta else torch.library.get_ctx().new_dynamic_size())
    return (torch.empty_like(x), x.new_empty(o, dtype=sd), x.new_empty(o, dtype=sd), x.new_empty(c, dtype=sd),
            x.new_empty(c, dtype=sd), kept)


@custom_op("shvit::shsa_train_backward")
def _shsa_train_backward(grad_y: Tensor, x: Tensor, gn_w: Tensor, gn_b: Tensor, gn_eps: float, qkv_w: Tensor,
                         qkv_bn_w: Tensor, qkv_bn_b: Tensor, qkv_eps: float, proj_w: Tensor, proj_bn_w: Tensor,
                         proj_bn_b: Tensor, proj_eps: float, qkv_mean: Tensor, qkv_var: Tensor, proj_mean: Tensor,
                         proj_var: Tensor, kept: Tensor, qk_dim: int, residual: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = backends.kernel(OP, x)
    # kept is the C++ kernel's; a backward run under another backend than the forward recomputes instead.
    extra = {"kept": kept.view(x.shape)} if kept.numel() and getattr(impl, "takes_kept", False) else {}
    return impl.train_bwd(grad_y, x, gn_w, gn_b, gn_eps, qkv_w, qkv_bn_w, qkv_bn_b, qkv_eps,
                                            proj_w, proj_bn_w, proj_bn_b, proj_eps, qkv_mean, qkv_var, proj_mean,
                                            proj_var, qk_dim, residual, **extra)


@_shsa_train_backward.register_fake
def _(grad_y, x, gn_w, gn_b, gn_eps, qkv_w, qkv_bn_w, qkv_bn_b, qkv_eps, proj_w, proj_bn_w, proj_bn_b, proj_eps,
      *stats_and_options):
    params = (gn_w, gn_b, qkv_w, qkv_bn_w, qkv_bn_b, proj_w, proj_bn_w, proj_bn_b)
    return (torch.empty_like(x), *(torch.empty_like(t) for t in params))


def _train_setup(ctx, inputs, output):
    _, *stats = output
    mark_extra_outputs(ctx, *stats)
    ctx.inputs = tuple(t if not isinstance(t, Tensor) else None for t in inputs)
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)), *stats)


@none_without_grad
def _train_backward(ctx, grad_y, *_grad_stats):
    saved = ctx.saved_tensors
    stats = saved[-5:]  # the four statistics and kept
    ctx_inputs = iter(saved[:-5])
    args = [next(ctx_inputs) if a is None else a for a in ctx.inputs]
    grads = call(_shsa_train_backward, grad_y.contiguous(), *args[:12], *stats, *args[12:])
    gx, ggw, ggb, gqw, gqbw, gqbb, gpw, gpbw, gpbb = grads
    return gx, ggw, ggb, None, gqw, gqbw, gqbb, None, gpw, gpbw, gpbb, None, None, None


_shsa_train.register_autograd(_train_backward, setup_context=_train_setup)


# ---- public functions ------------------------------------------------------------------------------------

class TrainStats(NamedTuple):
    """Batch statistics of the two BatchNorms (mean and biased var), for the running-stat update."""
    qkv_mean: Tensor
    qkv_var: Tensor
    proj_mean: Tensor
    proj_var: Tensor


def _check(x: Tensor, gn_w: Tensor, qkv_w: Tensor, proj_w: Tensor, qk_dim: int, **vectors: Tensor) -> None:
    check_tensor("x", x, ndim=4)
    if not isinstance(qk_dim, int) or isinstance(qk_dim, bool) or qk_dim <= 0:
        raise ValueError(f"qk_dim must be a positive int, got {qk_dim!r}")
    c = x.shape[1]
    check_tensor("gn_weight", gn_w, ndim=1)
    p = gn_w.shape[0]
    if not 0 < p <= c:
        raise ValueError(f"gn_weight: pdim ({p}) must be in 1..dim, and x has dim={c} channels")
    check_tensor("qkv_weight", qkv_w, shape=(2 * qk_dim + p, p), why=f" for qk_dim={qk_dim}, pdim={p}")
    check_tensor("proj_weight", proj_w, shape=(c, c), why=f" for x with {c} channels")
    sizes = {"gn_bias": p, "qkv_bias": 2 * qk_dim + p, "qkv_bn_weight": 2 * qk_dim + p,
             "qkv_bn_bias": 2 * qk_dim + p, "proj_bias": c, "proj_bn_weight": c, "proj_bn_bias": c}
    for name, t in vectors.items():
        check_tensor(name, t, shape=(sizes[name],))
    check_same_device("x", x, gn_weight=gn_w, qkv_weight=qkv_w, proj_weight=proj_w, **vectors)
    check_same_dtype("x", x, qkv_weight=qkv_w, proj_weight=proj_w)
    if 0 in x.shape[1:]:
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {tuple(x.shape)}")


def _contig(x: Tensor) -> Tensor:
    # The kernels index NCHW tokens; channels_last input is gathered once here (the op's output is NCHW).
    return x.contiguous()


def _like_input(y: Tensor, x: Tensor) -> Tensor:
    # The NCHW output back in x's layout, so that a channels_last model stays channels_last after SHSA.
    return y.contiguous(memory_format=memory_format(x))


def shsa(x: Tensor, gn_weight: Tensor, gn_bias: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, proj_weight: Tensor,
         proj_bias: Tensor, qk_dim: int = 16, gn_eps: float = 1e-5, residual: bool = False) -> Tensor:
    """Eval-form SHSA with both BatchNorms folded into (qkv_weight, qkv_bias) and (proj_weight, proj_bias).

    x (B, dim, H, W); gn_weight/gn_bias (pdim,); qkv_weight (2*qk_dim + pdim, pdim); qkv_bias (2*qk_dim + pdim,);
    proj_weight (dim, dim); proj_bias (dim,). Returns y (B, dim, H, W) [+ x when residual] in x's layout
    (NCHW or channels_last).
    """
    x, qkv_weight, proj_weight = autocast(x, qkv_weight, proj_weight)
    _check(x, gn_weight, qkv_weight, proj_weight, qk_dim, gn_bias=gn_bias, qkv_bias=qkv_bias, proj_bias=proj_bias)
    if x.shape[0] == 0:
        return empty_result(x.shape, x, gn_weight, gn_bias, qkv_weight, qkv_bias, proj_weight, proj_bias)
    return _like_input(call(_shsa, _contig(x), gn_weight, gn_bias, float(gn_eps), qkv_weight, qkv_bias, proj_weight,
                            proj_bias, qk_dim, residual), x)


def shsa_train(x: Tensor, gn_weight: Tensor, gn_bias: Tensor, qkv_weight: Tensor, qkv_bn_weight: Tensor,
               qkv_bn_bias: Tensor, proj_weight: Tensor, proj_bn_weight: Tensor, proj_bn_bias: Tensor,
               qk_dim: int = 16, gn_eps: float = 1e-5, qkv_eps: float = 1e-5, proj_eps: float = 1e-5,
               residual: bool = False) -> tuple[Tensor, TrainStats]:
    """Training-form SHSA: both BatchNorms normalise with batch statistics over (B, H*W).

    Returns (y, TrainStats) with the batch mean and biased variance of each BatchNorm's input.
    """
    x, qkv_weight, proj_weight = autocast(x, qkv_weight, proj_weight)
    _check(x, gn_weight, qkv_weight, proj_weight, qk_dim, gn_bias=gn_bias, qkv_bn_weight=qkv_bn_weight,
           qkv_bn_bias=qkv_bn_bias, proj_bn_weight=proj_bn_weight, proj_bn_bias=proj_bn_bias)
    if x.shape[0] == 0:
        sd = _stat_dtype(x)
        nan = [x.new_full((n,), float("nan"), dtype=sd) for n in (qkv_weight.shape[0],) * 2 + (x.shape[1],) * 2]
        y = empty_result(x.shape, x, gn_weight, gn_bias, qkv_weight, qkv_bn_weight, qkv_bn_bias, proj_weight,
                         proj_bn_weight, proj_bn_bias)
        return y, TrainStats(*nan)
    if x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"x: BatchNorm training needs more than 1 value per channel, got shape {tuple(x.shape)}")
    y, *stats, _ = call(_shsa_train, _contig(x), gn_weight, gn_bias, float(gn_eps), qkv_weight, qkv_bn_weight,
                        qkv_bn_bias, float(qkv_eps), proj_weight, proj_bn_weight, proj_bn_bias, float(proj_eps), qk_dim,
                        residual)
    return _like_input(y, x), TrainStats(*stats)
