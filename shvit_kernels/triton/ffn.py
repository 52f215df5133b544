"""Triton kernels: fused residual FFN of SHViT, y = x + BN2(W2 relu(BN1(W1 x))) with 1x1 convs d -> h -> d (the
backend interface of `shvit_kernels.ops.ffn`; the spec and signatures are shvit_kernels/reference/ffn.py's).

Sizes: d channels, h hidden rows, N = H*W tokens. Every activation is indexed through its (sample, channel, token)
strides: x, grad_y, y and grad_x are NCHW (token stride 1) or channels_last (channel stride 1) and keep x's layout,
with no layout copy; z1 (B, h, H, W) and z2 (B, d, H, W) are saved channels_last, as the spec says. One activation
element below = one element of x; "h/d x" counts a hidden-size tensor.

Eval forward (1 launch, 1 pass): _fused_fwd_kernel, grid (B*token tiles, d row blocks). Per tile of BLOCK_T tokens,
  a loop over hidden blocks: z = W1[hb] x + b1, relu, acc += W2[:, hb] relu(z). The hidden activation exists only as
  one [BLOCK_H, BLOCK_T] register tile and the [d rows, BLOCK_T] accumulator stays in registers; read x, write y.
  When d is wider than FUSED_ROWS, the output rows are split over programs and each recomputes the hidden for its
  row block: n_dblk times the first GEMM's FLOPs (total FLOPs x (1 + n_dblk) / 2) and n_dblk reads of x.
Eval backward (gets only the inputs; 3 launches + 4 small sums):
  _fused_bwd_kernel (same grid): per hidden block, recompute z = W1[hb] x + b1 and gh = W2[:, hb]^T grad_y, gz1 =
            gh * (z > 0); acc += W1[hb]^T gz1; grad_x = grad_y + acc. Read x, grad_y; write grad_x and, from row
            block 0, h = relu(z) and gz1 (h/d x each, the weight grads' operands).
  _wgrad_kernel x2 (row blocks, col blocks, token splits): grad W1 = sum gz1 x^T (+ row sums: grad b1), grad W2 =
            sum grad_y h^T (+ grad b2), as split-K partials; _sum_kernel adds them in a fixed order.
Training forward (3 passes, each BN's batch statistics force a boundary; 3 launches + 2 small Welford merges):
  _gemm_kernel EPI 0 (B*token tiles, h row blocks)  z1 = W1 x; read x, write z1 (h/d x); Welford partials
  _gemm_kernel EPI 0 (B*token tiles, d row blocks)  z2 = W2 relu(bn1(z1)), bn1 + ReLU applied in the operand load;
            read z1 once per d row block (of 64), write z2; Welford partials
  _bn_residual_kernel (B*token tiles, d blocks)  y = bn2(z2) + x; read z2, x, write y
Training backward (relu(bn1(z1)) recomputed in the loads, never stored; 5 launches + 2 small sums):
  _bn_sums_kernel  read grad_y, z2 -> per-tile sums of g, g * zhat2 (bn2's backward needs their totals)
  _gemm_kernel EPI 1 (B*token tiles, h row blocks)  g1 = (W2^T bn2_bwd(grad_y)) * relu'(bn1(z1)), bn2's backward
            in the operand load; read grad_y, z2 once per h row block, z1; write g1 (h/d x); sums of g1, g1 * zhat1
  _gemm_kernel EPI 2 (B*token tiles, d row blocks)  grad_x = grad_y + W1^T bn1_bwd(g1); read g1, z1, grad_y
  _wgrad_kernel  grad W1 = sum bn1_bwd(g1) x^T;  _wgrad_kernel  grad W2 = sum bn2_bwd(grad_y) relu(bn1(z1))^T
Deterministic: every cross-program reduction writes per-tile partials that _sum/_welford reduce in a fixed order.
Accumulation is fp32 (fp64 for fp64 inputs); dots take activation-dtype operands (the hidden is rounded to it, as
stock PyTorch stores it), and fp32/fp64 dots are IEEE (no TF32). Offsets are 64-bit from the sample index on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.ffn import memory_format
from ._common import (_BLOCK_K, _BLOCK_R, _BLOCK_T, _BN, _EW_TILE, _GEMM_WARPS, _WGRAD_PROGRAMS, _at, _bn_coef,
                     _bn_grad, _cast, _mm, _p2, _rstd, _Shape, _split_k, _store_wgrad, _sum, _welford, _welford_partial)

# Fused eval kernels' tiles; module-level so that tests can shrink them to reach the multi-block paths.
FUSED_ROWS = 256  # most output channels per program (a [FUSED_ROWS, tokens] fp32 accumulator in registers)
FUSED_HIDDEN = 32  # hidden rows per step
FUSED_K = 64  # channels per step of the first GEMM (W1[hb] x)
_FUSED_ACC = 8192  # accumulator elements per program: 32 fp32 registers a thread at 8 warps
INTERP_WGRAD_PROGRAMS = 1  # weight-grad programs wanted under the interpreter (tests raise it: multi-split path)


# ---- device helpers ----------------------------------------------------------------------------------------

@triton.jit
def _ptrs(ptr, b, sb, r, sr, t, st):
    # [len(r), len(t)] pointers: rows r, tokens t of sample b of a (B, R, N) activation with strides (sb, sr, st).
    # int64 throughout: B*R*N, and within a sample R*N (NCHW) or N*R (channels_last), may pass 2**31
    return ptr + tl.cast(b, tl.int64) * sb + (r.to(tl.int64) * sr)[:, None] + (t.to(tl.int64) * st)[None, :]


@triton.jit
def _relu(v):
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as torch


@triton.jit
def _operand(p, sb, sr, st, z, szb, szr, szt, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, sums_ptr, eps, count,
             b, r, rm, t, tm, R, PRO: tl.constexpr, ACC: tl.constexpr):
    # Rows r x tokens t of a (B, R, N) operand in ACC, 0 outside. PRO 0: as stored; 1: relu(bn(a)), the training
    # BN (batch mean / var) applied in the load; 2: bn's backward of the grad a of its output (z: bn's input,
    # sums [sum g | sum g * zhat], count values per row)
    mask = rm[:, None] & tm[None, :]
    a = tl.load(_ptrs(p, b, sb, r, sr, t, st), mask=mask, other=0.0).to(ACC)
    if PRO == 1:
        scale, shift = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, r, rm, True, ACC)
        a = tl.where(mask, _relu(a * scale[:, None] + shift[:, None]), 0.0)
    elif PRO == 2:
        zt = tl.load(_ptrs(z, b, szb, r, szr, t, szt), mask=mask, other=0.0).to(ACC)
        a = _bn_grad(a, zt, mean_ptr, var_ptr, bnw_ptr, sums_ptr, eps, count, r, rm, mask, R, ACC)
    return a


@triton.jit
def _gemm(w_ptr, swr, swk, r, rm, a_ptr, sab, sak, sat, z_ptr, szb, szk, szt, mean_ptr, var_ptr, bnw_ptr, bnb_ptr,
          sums_ptr, eps, count, b, t, tm, K, PRO: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # W[r, :] @ A[:, t] over the K rows of the operand A (prologue PRO, see _operand); W through its strides, so
    # that a transposed weight costs nothing
    acc = tl.zeros([BLOCK_R, BLOCK_T], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        w = tl.load(w_ptr + r[:, None] * swr + k[None, :] * swk, mask=rm[:, None] & km[None, :], other=0.0)
        a = _operand(a_ptr, sab, sak, sat, z_ptr, szb, szk, szt, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, sums_ptr, eps,
                     count, b, k, km, t, tm, K, PRO, ACC)
        acc = _mm(w.to(DOT), a.to(DOT), acc, ACC)
    return acc


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
                      y_ptr, syb, syc, syt, D, HD, N, n_tblk,
                      ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # y[c, t] = x + W2[c] relu(W1 x + b1) + b2 for BLOCK_D channels c x BLOCK_T tokens, over hidden blocks
    bt = tl.program_id(0)
    b = bt // n_tblk
    t = (bt % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < D
    acc = tl.zeros([BLOCK_D, BLOCK_T], ACC)
    for h0 in range(0, HD, BLOCK_H):
        hr = h0 + tl.arange(0, BLOCK_H)
        hm = hr < HD
        h = _relu(_hidden(w1_ptr, sw1h, sw1c, b1_ptr, x_ptr, sxb, sxc, sxt, b, hr, hm, t, tm, D, ACC, DOT, BLOCK_H,
                          BLOCK_K, BLOCK_T))
        w2 = tl.load(w2_ptr + c[:, None] * sw2c + hr[None, :] * sw2h, mask=cm[:, None] & hm[None, :], other=0.0)
        acc = _mm(w2.to(DOT), h.to(DOT), acc, ACC)
    mask = cm[:, None] & tm[None, :]
    acc += tl.load(b2_ptr + c, mask=cm, other=0.0).to(ACC)[:, None]
    acc += tl.load(_ptrs(x_ptr, b, sxb, c, sxc, t, sxt), mask=mask, other=0.0).to(ACC)
    tl.store(_ptrs(y_ptr, b, syb, c, syc, t, syt), acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_bwd_kernel(x_ptr, sxb, sxc, sxt, gy_ptr, sgb, sgc, sgt, w1_ptr, sw1h, sw1c, b1_ptr, w2_ptr, sw2c, sw2h,
                      gx_ptr, sob, soc, sot, h_ptr, gh_ptr, shb, shr, sht, D, HD, N, n_tblk,
                      ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # grad_x[c, t] = grad_y + W1[:, c]^T gz1, gz1 = (W2^T grad_y) * (W1 x + b1 > 0), over hidden blocks; row block 0
    # also stores h = relu(W1 x + b1) and gz1 for the weight grads
    bt = tl.program_id(0)
    b = bt // n_tblk
    t = (bt % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N
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


# ---- training form: GEMMs with BN prologues / statistics epilogues -------------------------------------------

@triton.jit
def _gemm_kernel(w_ptr, swr, swk, a_ptr, sab, sak, sat, az_ptr, szb, szk, szt, a_mean, a_var, a_w, a_b, a_sums, a_eps,
                 count, o_ptr, sob, sor, sot, e_ptr, seb, ser, set_, e_mean, e_var, e_w, e_b, e_eps, part_ptr,
                 R, K, N, n_tblk, S,
                 PRO: tl.constexpr, EPI: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # out = W @ A for BLOCK_R rows x BLOCK_T tokens, A through its prologue PRO (see _operand; its BN: a_*).
    # EPI 0: out and Welford partials of out (the training forward's pre-BN z1 / z2).
    # EPI 1: out = acc * relu'(bn1(e)) (e = z1, bn1 = e_*: the grad of bn1's output) and per-tile sums of out and
    #        out * zhat1, from out as stored (bn1's backward reads the stored values).
    # EPI 2: out = acc + e (e = grad_y: grad_x).
    bt = tl.program_id(0)
    b = bt // n_tblk
    tb = bt % n_tblk
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N
    acc = _gemm(w_ptr, swr, swk, r, rm, a_ptr, sab, sak, sat, az_ptr, szb, szk, szt, a_mean, a_var, a_w, a_b, a_sums,
                a_eps, count, b, t, tm, K, PRO, ACC, DOT, BLOCK_R, BLOCK_K, BLOCK_T)
    mask = rm[:, None] & tm[None, :]
    if EPI == 0:  # padded tokens hold 0: the operand is 0 there
        _welford_partial(part_ptr, bt, S, R, r, rm, acc, mask, tl.minimum(N - tb * BLOCK_T, BLOCK_T).to(ACC))
    elif EPI == 1:
        z = tl.load(_ptrs(e_ptr, b, seb, r, ser, t, set_), mask=mask, other=0.0).to(ACC)
        scale, shift = _bn_coef(e_mean, e_var, e_w, e_b, e_eps, r, rm, True, ACC)
        acc = tl.where(mask & (z * scale[:, None] + shift[:, None] > 0), acc, 0.0)
        acc = acc.to(o_ptr.dtype.element_ty).to(ACC)
        zhat = (z - tl.load(e_mean + r, mask=rm, other=0.0)[:, None]) * _rstd(e_var, r, rm, e_eps)[:, None]
        tl.store(part_ptr + _at(bt, 2 * R, r), tl.sum(acc, axis=1), mask=rm)
        tl.store(part_ptr + _at(bt, 2 * R, R + r), tl.sum(acc * zhat, axis=1), mask=rm)
    else:
        acc += tl.load(_ptrs(e_ptr, b, seb, r, ser, t, set_), mask=mask, other=0.0).to(ACC)
    tl.store(_ptrs(o_ptr, b, sob, r, sor, t, sot), acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_residual_kernel(z_ptr, szb, szc, szt, x_ptr, sxb, sxc, sxt, y_ptr, syb, syc, syt, mean_ptr, var_ptr, bnw_ptr,
                        bnb_ptr, eps, C, N, n_tblk,
                        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # y = bn(z) + x over a [BLOCK_C, BLOCK_T] tile
    bt = tl.program_id(0)
    b = bt // n_tblk
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t = (bt % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = cm[:, None] & (t < N)[None, :]
    scale, shift = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, c, cm, True, ACC)
    z = tl.load(_ptrs(z_ptr, b, szb, c, szc, t, szt), mask=mask, other=0.0).to(ACC)
    y = z * scale[:, None] + shift[:, None] + tl.load(_ptrs(x_ptr, b, sxb, c, sxc, t, sxt), mask=mask,
                                                      other=0.0).to(ACC)
    tl.store(_ptrs(y_ptr, b, syb, c, syc, t, syt), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_sums_kernel(g_ptr, sgb, sgc, sgt, z_ptr, szb, szc, szt, mean_ptr, var_ptr, eps, part_ptr, C, N, n_tblk,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # per-tile sums of g and g * zhat (zhat = bn-normalised z) at [tile, c] and [tile, C + c] of (S, 2C)
    bt = tl.program_id(0)
    b = bt // n_tblk
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t = (bt % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = cm[:, None] & (t < N)[None, :]
    g = tl.load(_ptrs(g_ptr, b, sgb, c, sgc, t, sgt), mask=mask, other=0.0).to(ACC)
    z = tl.load(_ptrs(z_ptr, b, szb, c, szc, t, szt), mask=mask, other=0.0).to(ACC)
    zhat = (z - tl.load(mean_ptr + c, mask=cm, other=0.0)[:, None]) * _rstd(var_ptr, c, cm, eps)[:, None]
    tl.store(part_ptr + _at(bt, 2 * C, c), tl.sum(g, axis=1), mask=cm)
    tl.store(part_ptr + _at(bt, 2 * C, C + c), tl.sum(tl.where(mask, g * zhat, 0.0), axis=1), mask=cm)


@triton.jit
def _wgrad_kernel(l_ptr, slb, slr, slt, lz_ptr, slzb, slzr, slzt, l_mean, l_var, l_w, l_sums, l_eps,
                  r_ptr, srb, srk, srt, r_mean, r_var, r_w, r_b, r_eps, count, part_ptr, rowsum_ptr,
                  R, K, N, n_tblk, n_tiles, per_split,
                  PRO_L: tl.constexpr, PRO_R: tl.constexpr, ROWSUM: tl.constexpr, ACC: tl.constexpr,
                  DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # Split-K weight grad: the partial over this split's token tiles of sum_{b,n} L[b, r, n] * Rt[b, k, n], both
    # operands through their prologues (L: 0 or 2, a grad behind a BN; Rt: 0 or 1, relu(bn1(z1))). ROWSUM: also the
    # partial sums of L (an eval bias grad)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < K
    sp = tl.program_id(2)
    acc = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    rs = tl.zeros([BLOCK_R], ACC)
    for tile in range(sp * per_split, tl.minimum(sp * per_split + per_split, n_tiles)):
        b = tile // n_tblk
        t = (tile % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = t < N
        g = _operand(l_ptr, slb, slr, slt, lz_ptr, slzb, slzr, slzt, l_mean, l_var, l_w, l_w, l_sums, l_eps, count,
                     b, r, rm, t, tm, R, PRO_L, ACC)
        a = _operand(r_ptr, srb, srk, srt, r_ptr, srb, srk, srt, r_mean, r_var, r_w, r_b, r_mean, r_eps, count,
                     b, k, km, t, tm, K, PRO_R, ACC)
        acc = _mm(g.to(DOT), tl.trans(a.to(DOT)), acc, ACC)
        if ROWSUM:
            rs += tl.sum(g, axis=1)
    _store_wgrad(part_ptr, rowsum_ptr, acc, rs, sp, r, rm, k, km, R, K, ROWSUM)


# ---- host side -------------------------------------------------------------------------------------------

def _st(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, token) strides of a (B, C, H, W) tensor dense in NCHW or channels_last (token n = h*W + w
    sits at n times the W stride; with W == 1 at h times the H stride)."""
    return t.stride(0), t.stride(1), t.stride(3) if t.shape[3] > 1 else t.stride(2)


class _Dims(_Shape):
    def __init__(self, x: torch.Tensor, hidden: int):
        super().__init__(x)
        self.D, self.HD = self.C, hidden
        self.fmt = memory_format(x)
        self.count = self.B * self.N  # values per channel of the BN statistics

    def like(self, x: torch.Tensor, c: int, fmt: torch.memory_format | None = None) -> torch.Tensor:
        """A (B, c, H, W) activation of x's dtype, in fmt (default: x's layout)."""
        return torch.empty((self.B, c, *x.shape[2:]), dtype=x.dtype, device=x.device,
                           memory_format=fmt or self.fmt)

    def ew_blocks(self, rows: int) -> tuple[int, int, int]:
        """(rows, tokens, token tiles) of an elementwise tile: long along x's contiguous dim."""
        if self.fmt != torch.channels_last:
            return super().ew_blocks(rows)
        block_c = min(triton.next_power_of_2(rows), 64)
        block_t = min(_p2(self.N), _EW_TILE // block_c)
        return block_c, block_t, triton.cdiv(self.N, block_t)


def _fused_blocks(dm: _Dims) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_H, BLOCK_K, BLOCK_T) of the fused eval kernels: the [BLOCK_D, BLOCK_T] fp32 accumulator at
    most _FUSED_ACC elements (halved, and the hidden / K steps too, for GPU fp32/fp64: FMA dots hold operands in
    registers)."""
    shrink = 2 if dm.fma else 1
    block_d = min(_p2(dm.D), FUSED_ROWS // shrink)
    block_t = max(16, min(_BLOCK_T, _p2(dm.N), _FUSED_ACC // shrink // block_d))
    block_h = max(16, min(FUSED_HIDDEN // shrink, _p2(dm.HD)))
    block_k = max(16, min(FUSED_K // shrink, _p2(dm.D)))
    return block_d, block_h, block_k, block_t


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return t.contiguous(memory_format=memory_format(t) if fmt is None else fmt)


def _fused_grid(dm: _Dims) -> tuple[tuple[int, int], dict]:
    block_d, block_h, block_k, block_t = _fused_blocks(dm)
    n_tblk = triton.cdiv(dm.N, block_t)
    meta = dict(BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_T=block_t,
                num_warps=8 if block_d * block_t >= 4096 else 4, **dm.meta)
    return (dm.B * n_tblk, triton.cdiv(dm.D, block_d)), (dm.D, dm.HD, dm.N, n_tblk), meta


def _no_bn(ph: torch.Tensor) -> tuple:
    """Placeholders for an operand without a BN prologue: (z, its 3 strides, mean, var, w, b, sums, eps)."""
    return ph, 0, 0, 0, ph, ph, ph, ph, ph, 0.0


def _bn_operand(bn: _BN, z: torch.Tensor, sums: torch.Tensor | None) -> tuple:
    """A BN prologue's arguments: (z, its 3 strides, mean, var, w, b, sums, eps)."""
    return z, *_st(z), bn.mean, bn.var, bn.w, bn.b, sums if sums is not None else bn.mean, bn.eps


def _gemm_launch(dm: _Dims, w_rk: tuple, R: int, K: int, a: torch.Tensor, pro: int, a_bn: tuple, out: torch.Tensor,
                 epi: int, e: torch.Tensor | None = None, e_bn: _BN | None = None) -> torch.Tensor | None:
    """out = W A through _gemm_kernel; w_rk = (W, stride over out rows, stride over K). Returns the partials of
    EPI 0 (Welford, (3, S, R)) or EPI 1 (sums, (S, 2R))."""
    w, swr, swk = w_rk
    block_r = min(_BLOCK_R, _p2(R))
    block_k = min(_BLOCK_K, _p2(K))
    S = dm.B * dm.n_tblk
    part = dm.empty(3, S, R) if epi == 0 else dm.empty(S, 2 * R) if epi == 1 else out
    e = e if e is not None else out
    eb = (e_bn.mean, e_bn.var, e_bn.w, e_bn.b, e_bn.eps) if e_bn is not None else (out, out, out, out, 0.0)
    _gemm_kernel[(S, triton.cdiv(R, block_r))](
        w, swr, swk, a, *_st(a), *a_bn, dm.count, out, *_st(out), e, *_st(e), *eb, part, R, K, dm.N, dm.n_tblk, S,
        PRO=pro, EPI=epi, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_T=dm.block_t, num_warps=_GEMM_WARPS, **dm.meta)
    return part if epi != 2 else None


def _wgrad(dm: _Dims, left: torch.Tensor, pro_l: int, l_bn: tuple, right: torch.Tensor, pro_r: int,
           r_bn: _BN | None, rowsum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum over (b, n) of L[b, :, n] Rt[b, :, n]^T (acc dtype) through the operands' prologues, and the sums of L
    when rowsum."""
    R, K = left.shape[1], right.shape[1]
    block_r, block_k = min(_BLOCK_R, _p2(R)), min(_BLOCK_R, _p2(K))
    grid_rk = triton.cdiv(R, block_r) * triton.cdiv(K, block_k)
    block_t = min(dm.block_t, 32) if dm.fma else dm.block_t  # tokens are the dot's K: FMA dots spill at 64
    n_tblk = triton.cdiv(dm.N, block_t)
    n_tiles = dm.B * n_tblk
    per_split, S = _split_k(n_tiles, grid_rk, _WGRAD_PROGRAMS if dm.gpu else INTERP_WGRAD_PROGRAMS)
    part = dm.empty(S, R * K)
    rs = dm.empty(S, R) if rowsum else part
    lz, lzb, lzr, lzt, l_mean, l_var, l_w, _, l_sums, l_eps = l_bn
    rb = (r_bn.mean, r_bn.var, r_bn.w, r_bn.b, r_bn.eps) if r_bn is not None else (part, part, part, part, 0.0)
    _wgrad_kernel[(triton.cdiv(R, block_r), triton.cdiv(K, block_k), S)](
        left, *_st(left), lz, lzb, lzr, lzt, l_mean, l_var, l_w, l_sums, l_eps, right, *_st(right), *rb, dm.count,
        part, rs, R, K, dm.N, n_tblk, n_tiles, per_split, PRO_L=pro_l, PRO_R=pro_r, ROWSUM=rowsum, BLOCK_R=block_r,
        BLOCK_K=block_k, BLOCK_T=block_t, num_warps=_GEMM_WARPS, **dm.meta)
    return _sum(part).view(R, K), (_sum(rs) if rowsum else None)


def _t(w: torch.Tensor) -> tuple:
    """(w, row stride, column stride) of w^T: a transposed weight is read through swapped strides."""
    return w, w.stride(1), w.stride(0)


def fwd(x, w1, b1, w2, b2):
    dm = _Dims(x, w1.shape[0])
    x = _dense(x, dm.fmt)
    y = dm.like(x, dm.D)
    grid, sizes, meta = _fused_grid(dm)
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
    y = dm.like(x, dm.D)
    block_c, block_t, n_tblk = dm.ew_blocks(dm.D)
    _bn_residual_kernel[(dm.B * n_tblk, triton.cdiv(dm.D, block_c))](
        z2, *_st(z2), x, *_st(x), y, *_st(y), bn2.mean, bn2.var, bn2.w, bn2.b, eps2, dm.D, dm.N, n_tblk,
        ACC=dm.meta["ACC"], BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    return y, bn1.mean, bn1.var, bn2.mean, bn2.var, z1, z2


def train_bwd(gy, x, w1, bn1_w, bn1_b, eps1, w2, bn2_w, bn2_b, eps2, mean1, var1, mean2, var2, z1, z2):
    dm = _Dims(x, w1.shape[0])
    x, gy, z1, z2 = _dense(x, dm.fmt), _dense(gy, dm.fmt), _dense(z1, None), _dense(z2, None)
    bn1 = _BN(mean1, var1, bn1_w, bn1_b, eps1, dm.acc)
    bn2 = _BN(mean2, var2, bn2_w, bn2_b, eps2, dm.acc)
    # bn2's backward needs the totals [sum g | sum g * zhat2] of g = grad_y
    block_c, block_t, n_tblk = dm.ew_blocks(dm.D)
    part = dm.empty(dm.B * n_tblk, 2 * dm.D)
    _bn_sums_kernel[(dm.B * n_tblk, triton.cdiv(dm.D, block_c))](
        gy, *_st(gy), z2, *_st(z2), bn2.mean, bn2.var, eps2, part, dm.D, dm.N, n_tblk, ACC=dm.meta["ACC"],
        BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    sums2 = _sum(part)
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
