"""Triton kernels: fused residual FFN of SHViT, y = x + BN2(W2 relu(BN1(W1 x))) with 1x1 convs d -> h -> d (the
backend interface of `shvit_kernels.ops.ffn`; the spec and signatures are shvit_kernels/reference/ffn.py's). The
training form's kernels are the shared token GEMMs of _token_gemm.py.

Sizes: d channels, h hidden rows, N = H*W tokens. Every activation is indexed through its (sample, channel, token)
strides: x, grad_y, y and grad_x are NCHW (token stride 1) or channels_last (channel stride 1) and keep x's layout,
with no layout copy; z1 (B, h, H, W) and z2 (B, d, H, W) are saved channels_last, as the spec says. One activation
element below = one element of x; "h/d x" counts a hidden-size tensor.

Eval forward (1 launch, 1 pass): _fused_fwd_kernel, grid (token tiles of the flattened B*N tokens, d row blocks).
  Per tile of BLOCK_T tokens (which may span samples), a loop over hidden blocks: z = W1[hb] x + b1, relu,
  acc += W2[:, hb] relu(z). The hidden activation exists only as one [BLOCK_H, BLOCK_T] register tile and the
  [d rows, BLOCK_T] accumulator stays in registers; read x, write y. Every program streams all of W1 and W2 from
  L2, which bounds the kernel (S4 stage 1, batch 256: 401 KB per program), so the tile is made long: with x
  resident (fp16 / bf16 on a GPU; _resident_blocks) x's whole [d, BLOCK_T] tile is loaded once and each hidden
  block's first GEMM is one dot over all d channels, which lets BLOCK_T reach 128 (W1 + W2 streamed 512 times at
  that shape instead of 2048, and x read once instead of once per hidden block). Otherwise (FMA dots: GPU fp32 /
  fp64) the first GEMM steps through d in BLOCK_K chunks of x. When d is wider than BLOCK_D, the output rows are
  split over programs and each recomputes the hidden for its row block: n_dblk times the first GEMM's FLOPs.
Eval backward (gets only the inputs; 3 launches + 4 small sums):
  _fused_bwd_kernel (token tiles, d row blocks): per hidden block, recompute z = W1[hb] x + b1 and gh =
            W2[:, hb]^T grad_y, gz1 = gh * (z > 0); acc += W1[hb]^T gz1; grad_x = grad_y + acc. Read x, grad_y;
            write grad_x and, from row block 0, h = relu(z) and gz1 (h/d x each, the weight grads' operands).
  _wgrad_kernel x2 (row blocks, col blocks, token splits): grad W1 = sum gz1 x^T (+ row sums: grad b1), grad W2 =
            sum grad_y h^T (+ grad b2), as split-K partials; _sum_kernel adds them in a fixed order.
Training forward (3 passes, each BN's batch statistics force a boundary; 3 launches + 2 small Welford merges):
  _gemm_kernel EPI 0 (token tiles, h row blocks)  z1 = W1 x; read x, write z1 (h/d x); Welford partials
  _gemm_kernel EPI 0 (token tiles, d row blocks)  z2 = W2 relu(bn1(z1)), bn1 + ReLU applied in the operand load;
            read z1 once per d row block (of 64), write z2; Welford partials
  _bn_apply_kernel (B*token tiles, d blocks)  y = bn2(z2) + x; read z2, x, write y
Training backward (relu(bn1(z1)) recomputed in the loads, never stored; 5 launches + 2 small sums):
  _bn_sums_kernel  read grad_y, z2 -> per-tile sums of g, g * zhat2 (bn2's backward needs their totals)
  _gemm_kernel EPI 1 (token tiles, h row blocks)  g1 = (W2^T bn2_bwd(grad_y)) * relu'(bn1(z1)), bn2's backward
            in the operand load; read grad_y, z2 once per h row block, z1; write g1 (h/d x); sums of g1, g1 * zhat1
  _gemm_kernel EPI 2 (token tiles, d row blocks)  grad_x = grad_y + W1^T bn1_bwd(g1); read g1, z1, grad_y
  _wgrad_kernel  grad W1 = sum bn1_bwd(g1) x^T;  _wgrad_kernel  grad W2 = sum bn2_bwd(grad_y) relu(bn1(z1))^T
Where N % 16 == 0 (_Shape.flat), token tiles run over the flattened B*N tokens (_tile_tokens): a tile may span
samples. The eval forward's always do.
Deterministic: every cross-program reduction writes per-tile partials that _sum/_welford reduce in a fixed order.
Accumulation is fp32 (fp64 for fp64 inputs); dots take activation-dtype operands (the hidden is rounded to it, as
stock PyTorch stores it), and fp32/fp64 dots are IEEE (no TF32). Offsets are 64-bit from the sample index on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _BLOCK_T, _BN, _cast, _mm, _p2, _relu, _sum, _tile_tokens, _welford
from ._token_gemm import (RESIDENT_W, _Dims, _bn_apply, _bn_operand, _bn_sums, _dense, _gemm, _gemm_launch, _no_bn,
                          _ptrs, _resident_tokens, _row_block, _st, _t, _wgrad, _x_tile)

# Fused eval kernels' tiles; module-level so that tests can shrink them to reach the multi-block paths.
FUSED_ROWS = 256  # most output channels per program (a [FUSED_ROWS, tokens] fp32 accumulator in registers)
FUSED_HIDDEN = 32  # hidden rows per step
FUSED_K = 64  # channels per step of the first GEMM (W1[hb] x)
_FUSED_ACC = 8192  # accumulator elements per program: 32 fp32 registers a thread at 8 warps
_FWD_ACC = 32768  # forward with x resident: accumulator elements per program (64 fp32 registers a thread at 16 warps)

@triton.jit
def _hidden(w1_ptr, sw1h, sw1c, b1_ptr, x_ptr, sxb, sxc, sxt, b, hr, hm, t, tm, D, ACC: tl.constexpr,
            DOT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # z = W1[hr] x[:, t] + b1[hr] (eval form), [BLOCK_H, BLOCK_T]
    z = _gemm(w1_ptr, sw1h, sw1c, hr, hm, x_ptr, sxb, sxc, sxt, x_ptr, 0, 0, 0, x_ptr, x_ptr, x_ptr, x_ptr, x_ptr,
              0.0, 1, b, t, tm, D, 0, ACC, DOT, BLOCK_H, BLOCK_K, BLOCK_T)
    return z + tl.load(b1_ptr + hr, mask=hm, other=0.0).to(ACC)[:, None]


# ---- eval form: the hidden never leaves the chip --------------------------------------------------------------

@triton.jit
def _fused_fwd_kernel(x_ptr, sxb, sxc, sxt, w1_ptr, sw1h, sw1c, b1_ptr, w2_ptr, sw2c, sw2h, b2_ptr,
                      y_ptr, syb, syc, syt, D, HD, N, BN,
                      ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, X_RESIDENT: tl.constexpr):
    # y[c, t] = x + W2[c] relu(W1 x + b1) + b2 for BLOCK_D channels c x BLOCK_T tokens, over hidden blocks.
    # Tokens are (sample, token) pairs of the flattened index: a tile spans samples where N is short (S4's last
    # stage has 16 tokens a sample), so the weights are read once per BLOCK_T tokens, not per sample.
    # X_RESIDENT: BLOCK_K covers all D channels and the x tile is loaded once, before the hidden loop
    b, t, tm = _tile_tokens(tl.program_id(0), N, BN, 1, True, BLOCK_T)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < D
    acc = tl.zeros([BLOCK_D, BLOCK_T], ACC)
    if X_RESIDENT:  # x[:, t] read once; each hidden block's first GEMM then takes all D channels in one dot
        xs = _x_tile(x_ptr, sxb, sxc, sxt, x_ptr, 0, 0, b, t, tm, D, False, ACC, DOT, BLOCK_K)
    for h0 in range(0, HD, BLOCK_H):
        hr = h0 + tl.arange(0, BLOCK_H)
        hm = hr < HD
        if X_RESIDENT:
            z = _row_block(w1_ptr, sw1h, sw1c, hr, hm, xs, D, ACC, DOT, BLOCK_H, BLOCK_K, BLOCK_T)
            z += tl.load(b1_ptr + hr, mask=hm, other=0.0).to(ACC)[:, None]
        else:
            z = _hidden(w1_ptr, sw1h, sw1c, b1_ptr, x_ptr, sxb, sxc, sxt, b, hr, hm, t, tm, D, ACC, DOT, BLOCK_H,
                        BLOCK_K, BLOCK_T)
        h = _relu(z)
        w2 = tl.load(w2_ptr + c[:, None] * sw2c + hr[None, :] * sw2h, mask=cm[:, None] & hm[None, :], other=0.0)
        acc = _mm(w2.to(DOT), h.to(DOT), acc, ACC)
    mask = cm[:, None] & tm[None, :]
    acc += tl.load(b2_ptr + c, mask=cm, other=0.0).to(ACC)[:, None]
    acc += tl.load(_ptrs(x_ptr, b, sxb, c, sxc, t, sxt), mask=mask, other=0.0).to(ACC)
    tl.store(_ptrs(y_ptr, b, syb, c, syc, t, syt), acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_bwd_kernel(x_ptr, sxb, sxc, sxt, gy_ptr, sgb, sgc, sgt, w1_ptr, sw1h, sw1c, b1_ptr, w2_ptr, sw2c, sw2h,
                      gx_ptr, sob, soc, sot, h_ptr, gh_ptr, shb, shr, sht, D, HD, N, BN, n_tblk,
                      FLAT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # grad_x[c, t] = grad_y + W1[:, c]^T gz1, gz1 = (W2^T grad_y) * (W1 x + b1 > 0), over hidden blocks; row block 0
    # also stores h = relu(W1 x + b1) and gz1 for the weight grads. FLAT: tiles of the flattened B*N tokens
    b, t, tm = _tile_tokens(tl.program_id(0), N, BN, n_tblk, FLAT, BLOCK_T)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < D
    kept_rows = tl.where(tl.program_id(1) == 0, HD, 0)  # row block 0 keeps h and gz1; the others store none
    acc = tl.zeros([BLOCK_D, BLOCK_T], ACC)
    for h0 in range(0, HD, BLOCK_H):
        hr = h0 + tl.arange(0, BLOCK_H)
        hm = hr < HD
        z = _hidden(w1_ptr, sw1h, sw1c, b1_ptr, x_ptr, sxb, sxc, sxt, b, hr, hm, t, tm, D, ACC, DOT, BLOCK_H, BLOCK_K,
                    BLOCK_T)
        gh = _gemm(w2_ptr, sw2h, sw2c, hr, hm, gy_ptr, sgb, sgc, sgt, gy_ptr, 0, 0, 0, gy_ptr, gy_ptr, gy_ptr, gy_ptr,
                   gy_ptr, 0.0, 1, b, t, tm, D, 0, ACC, DOT, BLOCK_H, BLOCK_K, BLOCK_T)
        g = tl.where(z > 0, gh, 0.0).to(DOT)
        kept = (hr < kept_rows)[:, None] & tm[None, :]
        tl.store(_ptrs(h_ptr, b, shb, hr, shr, t, sht), _relu(z).to(h_ptr.dtype.element_ty), mask=kept)
        tl.store(_ptrs(gh_ptr, b, shb, hr, shr, t, sht), g.to(gh_ptr.dtype.element_ty), mask=kept)
        w1_t = tl.load(w1_ptr + hr[None, :] * sw1h + c[:, None] * sw1c, mask=cm[:, None] & hm[None, :], other=0.0)
        acc = _mm(w1_t.to(DOT), g, acc, ACC)
    mask = cm[:, None] & tm[None, :]
    acc += tl.load(_ptrs(gy_ptr, b, sgb, c, sgc, t, sgt), mask=mask, other=0.0).to(ACC)
    tl.store(_ptrs(gx_ptr, b, sob, c, soc, t, sot), acc.to(gx_ptr.dtype.element_ty), mask=mask)


# ---- host side -------------------------------------------------------------------------------------------

def _fused_blocks(dm: _Dims, tokens: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_H, BLOCK_K, BLOCK_T) of the fused eval kernels over tiles of `tokens` tokens: the [BLOCK_D,
    BLOCK_T] fp32 accumulator at most _FUSED_ACC elements (halved, and the hidden / K steps too, for GPU fp32/fp64:
    FMA dots hold operands in registers)."""
    shrink = 2 if dm.fma else 1
    block_d = min(_p2(dm.D), FUSED_ROWS // shrink)
    block_t = max(16, min(_BLOCK_T, _p2(tokens), _FUSED_ACC // shrink // block_d))
    block_h = max(16, min(FUSED_HIDDEN // shrink, _p2(dm.HD)))
    block_k = max(16, min(FUSED_K // shrink, _p2(dm.D)))
    return block_d, block_h, block_k, block_t


def _resident_blocks(dm: _Dims) -> tuple[int, int, int, int] | None:
    """(BLOCK_D, BLOCK_H, BLOCK_K, BLOCK_T) of the forward with x's [D, BLOCK_T] tile on chip for the whole hidden
    loop (_token_gemm._resident_tokens: the tile length, or None), the W1 and W2 steps sharing RESIDENT_W: at S4
    stage 1 and batch 256, 128 tokens, where the K-step path takes 32 and reads x once per hidden block. None also
    where a 16-row step of W1 and of W2 would not fit RESIDENT_W (d > 512 at the defaults: next to x's tile, their
    pipeline stages would overflow an H100's shared memory)."""
    tiles = _resident_tokens(dm, dm.D)
    if tiles is None or 16 * tiles[0] > RESIDENT_W // 2:
        return None
    k, block_t = tiles
    block_h = min(FUSED_HIDDEN, _p2(dm.HD), RESIDENT_W // 2 // k)
    return min(k, _FWD_ACC // block_t), block_h, k, block_t


def _fused_grid(dm: _Dims, forward: bool = False) -> tuple[tuple[int, int], tuple, dict]:
    """Grid, size arguments and meta of the fused eval kernels. The forward tiles the flattened tokens (a tile may
    span samples) and keeps x's tile on chip where _resident_blocks allows; the backward does where dm.flat."""
    blocks = _resident_blocks(dm) if forward else None
    flat = forward or dm.flat
    block_d, block_h, block_k, block_t = blocks or _fused_blocks(dm, dm.B * dm.N if flat else dm.N)
    acc = block_d * block_t
    # resident: at most 64 accumulator registers a thread (16 warps at S4 stage 1); K steps: at most 32
    warps = min(16, max(4, acc // 2048)) if blocks else 8 if acc >= 4096 else 4
    meta = dict(BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_T=block_t, num_warps=warps, **dm.meta)
    n_dblk = triton.cdiv(dm.D, block_d)
    if forward:
        meta["X_RESIDENT"] = blocks is not None
        return (triton.cdiv(dm.B * dm.N, block_t), n_dblk), (dm.D, dm.HD, dm.N, dm.B * dm.N), meta
    n_tblk = triton.cdiv(dm.N, block_t)
    tiles = triton.cdiv(dm.B * dm.N, block_t) if flat else dm.B * n_tblk
    return (tiles, n_dblk), (dm.D, dm.HD, dm.N, dm.B * dm.N, n_tblk), meta | {"FLAT": flat}


def fwd(x, w1, b1, w2, b2):
    dm = _Dims(x, w1.shape[0])
    x = _dense(x, dm.fmt)
    y = dm.like(x, dm.D)
    grid, sizes, meta = _fused_grid(dm, forward=True)
    _fused_fwd_kernel[grid](x, *_st(x), w1, *w1.stride(), b1, w2, *w2.stride(), b2, y, *_st(y), *sizes, **meta)
    return y


def bwd(gy, x, w1, b1, w2, b2):
    dm = _Dims(x, w1.shape[0])
    x, gy = _dense(x, dm.fmt), _dense(gy, dm.fmt)
    gx = dm.like(x, dm.D)
    h, g = dm.like(x, dm.HD), dm.like(x, dm.HD)  # relu(W1 x + b1) and its grad gz1, for the weight grads
    grid, sizes, meta = _fused_grid(dm)
    _fused_bwd_kernel[grid](x, *_st(x), gy, *_st(gy), w1, *w1.stride(), b1, w2, *w2.stride(), gx, *_st(gx), h, g,
                            *_st(h), *sizes, **meta)
    gw1, gb1 = _wgrad(dm, g, 0, _no_bn(g), x, 0, None, rowsum=True)
    gw2, gb2 = _wgrad(dm, gy, 0, _no_bn(gy), h, 0, None, rowsum=True)
    return gx, _cast(gw1, w1), _cast(gb1, b1), _cast(gw2, w2), _cast(gb2, b2)


def train_fwd(x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, eps2):
    dm = _Dims(x, w1.shape[0])
    x = _dense(x, dm.fmt)
    cl = torch.channels_last
    z1, z2 = dm.like(x, dm.HD, cl), dm.like(x, dm.D, cl)
    part = _gemm_launch(dm, (w1, *w1.stride()), dm.HD, dm.D, x, 0, _no_bn(x), z1, 0)
    bn1 = _BN(*_welford(part), bn1_w, bn1_b, eps1, dm.acc)
    part = _gemm_launch(dm, (w2, *w2.stride()), dm.D, dm.HD, z1, 1, _bn_operand(bn1, z1, None), z2, 0)
    bn2 = _BN(*_welford(part), bn2_w, bn2_b, eps2, dm.acc)
    y = _bn_apply(dm, z2, bn2, dm.like(x, dm.D), res=x)
    return y, bn1.mean, bn1.var, bn2.mean, bn2.var, z1, z2


def train_bwd(gy, x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, eps2, mean1, var1, mean2, var2, z1, z2):
    dm = _Dims(x, w1.shape[0])
    x, gy, z1, z2 = _dense(x, dm.fmt), _dense(gy, dm.fmt), _dense(z1, None), _dense(z2, None)
    bn1 = _BN(mean1, var1, bn1_w, bn1_b, eps1, dm.acc)
    bn2 = _BN(mean2, var2, bn2_w, bn2_b, eps2, dm.acc)
    sums2 = _bn_sums(dm, gy, z2, bn2)  # bn2's backward needs [sum g | sum g * zhat2] of g = grad_y
    # g1: the grad of bn1's output (W2^T bn2_bwd(grad_y), masked by the ReLU), and its sums for bn1's backward
    g1 = torch.empty_like(z1)
    part = _gemm_launch(dm, _t(w2), dm.HD, dm.D, gy, 2, _bn_operand(bn2, z2, sums2), g1, 1, e=z1, e_bn=bn1)
    sums1 = _sum(part)
    gx = dm.like(x, dm.D)
    _gemm_launch(dm, _t(w1), dm.D, dm.HD, g1, 2, _bn_operand(bn1, z1, sums1), gx, 2, e=gy)
    gw1, _ = _wgrad(dm, g1, 2, _bn_operand(bn1, z1, sums1), x, 0, None, rowsum=False)
    gw2, _ = _wgrad(dm, gy, 2, _bn_operand(bn2, z2, sums2), z1, 1, bn1, rowsum=False)
    H, D = dm.HD, dm.D
    return (gx, _cast(gw1, w1), _cast(sums1[H:], bn1_w), _cast(sums1[:H], bn1_b), _cast(gw2, w2),
            _cast(sums2[D:], bn2_w), _cast(sums2[:D], bn2_b))
