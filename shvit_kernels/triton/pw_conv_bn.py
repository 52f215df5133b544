"""Triton kernels: pointwise (1x1) Conv2d_BN (+ReLU) with an optional per-sample gate on the input channels (the
backend interface of `shvit_kernels.ops.pw_conv_bn`; spec and signatures: shvit_kernels/reference/pw_conv_bn.py),
on the shared token GEMMs of _token_gemm.py. K input channels, O output channels, N = H*W tokens; x, grad_y, y and
grad_x keep x's layout (NCHW or channels_last, no copy); z is saved channels_last. The gate is applied in the GEMM
operand loads (PRO 3), so the gated activation is never written, forward or backward.

Eval forward (1 launch): y = [relu](W (gate * x) + b); read x, write y. _resident_kernel where _resident_gemm takes
  it (fp16 / bf16 on a GPU with K <= 512, N % 16 == 0 and at least 64 tokens a tile; always under the interpreter):
  a program holds the (gated) x tile of up to 128 flattened tokens and streams all of W once, row block by row block
  (PatchMerging's conv1 at S4 stage 1, batch 256: W read 512 times instead of 1024, x once instead of once per 64
  output rows: 411 -> 117 M elements from L2). Otherwise _gemm_kernel PRO 3 (gate) EPI 4 / 5.
Eval backward (2 launches + sums): _gemm_kernel (W^T) PRO 4 (grad_y masked by y > 0) EPI 6: grad_x = gate * gv and
  the gate's gradient sum_t gv * x per token tile; _wgrad_kernel: grad W = sum a (gate * x)^T with the bias grad.
Training forward (2 launches + Welford merge): _gemm_kernel EPI 0: z and its Welford partials; _bn_apply_kernel:
  y = [relu](bn(z)).
Training backward (3 launches + sums): _bn_sums_kernel: bn's gradient sums of grad_y (masked by bn(z) > 0 with
  ReLU); _gemm_kernel (W^T) PRO 2 / 5 (bn's backward in the load) EPI 6; _wgrad_kernel: grad W.
"""
from __future__ import annotations

import torch

from ._common import _BN, _cast, _welford
from ._token_gemm import (_Dims, _bn_apply, _bn_operand, _bn_sums, _dense, _gate_operand, _gemm_launch, _no_bn,
                          _resident_gemm, _resident_launch, _st, _t, _wgrad)


def _gate(gate: torch.Tensor | None) -> torch.Tensor | None:
    return None if gate is None else gate.contiguous()


def _input_grads(dm: _Dims, w: torch.Tensor, gy: torch.Tensor, pro: int, g_args: tuple, x: torch.Tensor,
                 gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x = gate * (W^T a) with a = grad_y through its prologue (the ReLU / BN backward), and the gate's
    gradient (B, K), or an empty (0,) tensor without a gate."""
    K = w.shape[1]
    gx = dm.like(x, K)
    if gate is None:
        _gemm_launch(dm, _t(w), K, dm.HD, gy, pro, g_args, gx, 3)
        return gx, x.new_empty(0)
    part = _gemm_launch(dm, _t(w), K, dm.HD, gy, pro, g_args, gx, 6, e=x, gate=gate)
    return gx, part.view(dm.B, dm.n_tblk, K).sum(1).to(gate.dtype)  # each sample's tiles, in a fixed order


def fwd(x, w, b, gate, relu):
    dm = _Dims(x, w.shape[0])
    x, gate = _dense(x, dm.fmt), _gate(gate)
    y = dm.like(x, dm.HD)
    tiles = _resident_gemm(dm, dm.C, dm.HD)
    if tiles is not None:
        _resident_launch(dm, w, b, x, gate, relu, y, tiles)
        return y
    pro, a_args = _gate_operand(x, gate)
    _gemm_launch(dm, (w, *w.stride()), dm.HD, dm.C, x, pro, a_args, y, 5 if relu else 4, bias=b)
    return y


def bwd(gy, x, w, b, gate, relu, y):
    dm = _Dims(x, w.shape[0])
    x, gy, gate = _dense(x, dm.fmt), _dense(gy, dm.fmt), _gate(gate)
    pro, g_args = (4, _no_bn(gy, y, _st(y))) if relu else (0, _no_bn(gy))
    gx, ggate = _input_grads(dm, w, gy, pro, g_args, x, gate)
    r_pro, _ = _gate_operand(x, gate)
    gw, gb = _wgrad(dm, gy, pro, g_args, x, r_pro, None, rowsum=True, r_gate=gate)
    return gx, _cast(gw, w), _cast(gb, b), ggate


def train_fwd(x, w, bn_w, bn_b, eps, gate, relu):
    dm = _Dims(x, w.shape[0])
    x, gate = _dense(x, dm.fmt), _gate(gate)
    z = dm.like(x, dm.HD, torch.channels_last)
    pro, a_args = _gate_operand(x, gate)
    part = _gemm_launch(dm, (w, *w.stride()), dm.HD, dm.C, x, pro, a_args, z, 0)
    bn = _BN(*_welford(part), bn_w, bn_b, eps, dm.acc)
    return _bn_apply(dm, z, bn, dm.like(x, dm.HD), relu=relu), bn.mean, bn.var, z


def train_bwd(gy, x, w, bn_w, bn_b, eps, gate, relu, mean, var, z):
    dm = _Dims(x, w.shape[0])
    x, gy, z, gate = _dense(x, dm.fmt), _dense(gy, dm.fmt), _dense(z, None), _gate(gate)
    bn = _BN(mean, var, bn_w, bn_b, eps, dm.acc)
    O = dm.HD
    sums = _bn_sums(dm, gy, z, bn, relu)  # [sum g | sum g * zhat] of g = grad_y through the ReLU
    pro, g_args = 5 if relu else 2, _bn_operand(bn, z, sums)
    gx, ggate = _input_grads(dm, w, gy, pro, g_args, x, gate)
    r_pro, _ = _gate_operand(x, gate)
    gw, _ = _wgrad(dm, gy, pro, g_args, x, r_pro, None, rowsum=False, r_gate=gate)
    return gx, _cast(gw, w), _cast(sums[O:], bn_w), _cast(sums[:O], bn_b), ggate
