"""Token-major GEMMs of 1x1 convs with their BatchNorm / ReLU / gate work fused into operand prologues and output
epilogues, shared by the FFN and the pointwise Conv2d_BN (ffn.py, pw_conv_bn.py): the launchers' tiles, the GEMM
kernel, BN apply and gradient-sum kernels, and the split-K weight-gradient kernel.

Activations are indexed through their (sample, channel, token) strides, NCHW or channels_last, with no layout copy.
Token tiles run over the flattened B*N tokens where N % 16 == 0, so a tile may span samples (_Shape.flat), but for
the launches with pw_conv_bn's per-sample gate, which tile each sample.
Deterministic: cross-program reductions write per-tile partials that _sum / _welford reduce in a fixed order.
Accumulation is fp32 (fp64 for fp64 inputs); dots take activation-dtype operands, IEEE for fp32 / fp64 (no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.ffn import memory_format
from ._common import (_BLOCK_K, _BLOCK_R, _BN, _EW_TILE, _GEMM_WARPS, _GPU_PROGRAMS, _at, _bn_coef, _bn_grad, _mm,
                      _p2, _relu, _rstd, _Shape, _split_k, _store_wgrad, _sum, _tile_tokens, _welford_partial)

INTERP_WGRAD_PROGRAMS = 1  # weight-grad programs wanted under the interpreter (tests raise it: multi-split path)
# Kernels with x resident (_x_tile: the eval FFN forward, the eval pw_conv_bn)
RESIDENT_X = 32768  # most x elements kept on chip for the whole program (64 KB fp16); 0: never
RESIDENT_TOKENS = 128  # most tokens per program
RESIDENT_W = 16384  # most elements of a weight tile per step (32 KB fp16, per pipeline stage)
_RESIDENT_ACC = 16384  # _resident_kernel's accumulator elements (64 fp32 registers a thread at its 8 warps)


# ---- device helpers ----------------------------------------------------------------------------------------

@triton.jit
def _ptrs(ptr, b, sb, r, sr, t, st):
    # [len(r), len(t)] pointers: rows r, tokens t of sample b of a (B, R, N) activation with strides (sb, sr, st).
    # int64 throughout: B*R*N, and within a sample R*N (NCHW) or N*R (channels_last), may pass 2**31
    return ptr + tl.cast(b, tl.int64) * sb + (r.to(tl.int64) * sr)[:, None] + (t.to(tl.int64) * st)[None, :]


@triton.jit
def _operand(p, sb, sr, st, z, szb, szr, szt, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, sums_ptr, eps, count,
             b, r, rm, t, tm, R, PRO: tl.constexpr, ACC: tl.constexpr):
    # Rows r x tokens t of a (B, R, N) operand in ACC, 0 outside. PRO 0: as stored; 1: relu(bn(a)), the training
    # BN (batch mean / var) applied in the load; 2: bn's backward of the grad a of its output (z: bn's input,
    # sums [sum g | sum g * zhat], count values per row); 3: a * gate[b, r], the (B, R) gate read through z and its
    # sample / row strides; 4: a where z > 0 (z: a ReLU's output: the ReLU's backward); 5: as 2, a first masked by
    # bn(z) > 0 (a ReLU after the BN)
    mask = rm[:, None] & tm[None, :]
    a = tl.load(_ptrs(p, b, sb, r, sr, t, st), mask=mask, other=0.0).to(ACC)
    if PRO == 1:
        scale, shift = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, r, rm, True, ACC)
        a = tl.where(mask, _relu(a * scale[:, None] + shift[:, None]), 0.0)
    elif PRO == 2 or PRO == 5:
        zt = tl.load(_ptrs(z, b, szb, r, szr, t, szt), mask=mask, other=0.0).to(ACC)
        if PRO == 5:
            scale, shift = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, r, rm, True, ACC)
            a = tl.where(zt * scale[:, None] + shift[:, None] > 0, a, 0.0)
        a = _bn_grad(a, zt, mean_ptr, var_ptr, bnw_ptr, sums_ptr, eps, count, r, rm, mask, R, ACC)
    elif PRO == 3:  # b is one sample here (per-sample token tiles): _x_tile gates tiles that span samples
        gate = tl.load(z + tl.cast(b, tl.int64) * szb + r * szr, mask=rm, other=0.0).to(ACC)
        a = a * gate[:, None]
    elif PRO == 4:
        zt = tl.load(_ptrs(z, b, szb, r, szr, t, szt), mask=mask, other=0.0)
        a = tl.where(zt > 0, a, 0.0)
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
def _x_tile(x_ptr, sxb, sxc, sxt, g_ptr, sgb, sgc, b, t, tm, K, GATE: tl.constexpr, ACC: tl.constexpr,
            DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    # x's whole [BLOCK_K >= K, tokens] tile in DOT (rows past K zero), once per program: the resident operand of
    # _row_block. GATE: times gate[b, k] of each token's sample, in ACC and then rounded, as PRO 3 does
    k = tl.arange(0, BLOCK_K)
    mask = (k < K)[:, None] & tm[None, :]
    a = tl.load(_ptrs(x_ptr, b, sxb, k, sxc, t, sxt), mask=mask, other=0.0)
    if GATE:
        gate = tl.load(g_ptr + (tl.cast(b, tl.int64) * sgb)[None, :] + (k * sgc)[:, None], mask=mask, other=0.0)
        a = a.to(ACC) * gate.to(ACC)
    return a.to(DOT)


@triton.jit
def _row_block(w_ptr, swr, swk, r, rm, xs, K, ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # W[r, :K] @ xs ([BLOCK_R, BLOCK_T] in ACC): one dot over all K, xs from _x_tile
    k = tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + r[:, None] * swr + k[None, :] * swk, mask=rm[:, None] & (k < K)[None, :], other=0.0)
    return _mm(w.to(DOT), xs, tl.zeros([BLOCK_R, BLOCK_T], ACC), ACC)


# ---- kernels ----------------------------------------------------------------------------------------------

@triton.jit
def _gemm_kernel(w_ptr, swr, swk, a_ptr, sab, sak, sat, az_ptr, szb, szk, szt, a_mean, a_var, a_w, a_b, a_sums,
                 a_eps: tl.float64, count, o_ptr, sob, sor, sot, e_ptr, seb, ser, set_, e_mean, e_var, e_w, e_b,
                 e_eps: tl.float64, part_ptr,
                 R, K, N, BN, n_tblk, S,
                 PRO: tl.constexpr, EPI: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # out = W @ A for BLOCK_R rows x BLOCK_T tokens, A through its prologue PRO (see _operand; its BN: a_*).
    # EPI 0: out and Welford partials of out (the training forward's pre-BN z1 / z2).
    # EPI 1: out = acc * relu'(bn1(e)) (e = z1, bn1 = e_*: the grad of bn1's output) and per-tile sums of out and
    #        out * zhat1, from out as stored (bn1's backward reads the stored values).
    # EPI 2: out = acc + e (e = grad_y: grad_x).
    # EPI 3: out = acc.  EPI 4: out = acc + bias (e_b).  EPI 5: out = relu(acc + bias).
    # EPI 6: out = acc * gate[b, r] (gate: e_w, (B, R) contiguous) and per-tile partials of sum_t acc * e at [bt, r]
    #        of (S, R) (e = the gated GEMM's input x: the gate's gradient).
    # Token tiles: see _tile_tokens; PRO 3 and EPI 6 need one sample per tile (not FLAT).
    tl.static_assert(not (FLAT and (PRO == 3 or EPI == 6)), "the gate's prologue / epilogue tile one sample")
    bt = tl.program_id(0)
    b, t, tm = _tile_tokens(bt, N, BN, n_tblk, FLAT, BLOCK_T)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    acc = _gemm(w_ptr, swr, swk, r, rm, a_ptr, sab, sak, sat, az_ptr, szb, szk, szt, a_mean, a_var, a_w, a_b, a_sums,
                a_eps, count, b, t, tm, K, PRO, ACC, DOT, BLOCK_R, BLOCK_K, BLOCK_T)
    mask = rm[:, None] & tm[None, :]
    if EPI == 0:  # padded tokens hold 0: the operand is 0 there
        _welford_partial(part_ptr, bt, S, R, r, rm, acc, mask, tl.sum(tm.to(ACC), axis=0))
    elif EPI == 1:
        z = tl.load(_ptrs(e_ptr, b, seb, r, ser, t, set_), mask=mask, other=0.0).to(ACC)
        scale, shift = _bn_coef(e_mean, e_var, e_w, e_b, e_eps, r, rm, True, ACC)
        acc = tl.where(mask & (z * scale[:, None] + shift[:, None] > 0), acc, 0.0)
        acc = acc.to(o_ptr.dtype.element_ty).to(ACC)
        zhat = (z - tl.load(e_mean + r, mask=rm, other=0.0)[:, None]) * _rstd(e_var, r, rm, e_eps)[:, None]
        tl.store(part_ptr + _at(bt, 2 * R, r), tl.sum(acc, axis=1), mask=rm)
        tl.store(part_ptr + _at(bt, 2 * R, R + r), tl.sum(acc * zhat, axis=1), mask=rm)
    elif EPI == 2:
        acc += tl.load(_ptrs(e_ptr, b, seb, r, ser, t, set_), mask=mask, other=0.0).to(ACC)
    elif EPI == 4 or EPI == 5:
        acc += tl.load(e_b + r, mask=rm, other=0.0).to(ACC)[:, None]
        if EPI == 5:
            acc = _relu(acc)
    elif EPI == 6:
        x = tl.load(_ptrs(e_ptr, b, seb, r, ser, t, set_), mask=mask, other=0.0).to(ACC)
        tl.store(part_ptr + _at(bt, R, r), tl.sum(acc * x, axis=1), mask=rm)
        acc *= tl.load(e_w + _at(b, R, r), mask=rm, other=0.0).to(ACC)[:, None]
    tl.store(_ptrs(o_ptr, b, sob, r, sor, t, sot), acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _resident_kernel(w_ptr, swr, swk, bias_ptr, x_ptr, sxb, sxc, sxt, g_ptr, sgb, sgc, y_ptr, syb, syc, syt,
                     R, K, N, BN,
                     GATE: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # y[r, t] = [relu](W[r] (gate * x)[:, t] + bias[r]) for all R rows of one tile of flattened tokens: x's tile is
    # read once and W streamed once per tile (the eval pw_conv_bn; _gemm_kernel re-reads x for every row block)
    b, t, tm = _tile_tokens(tl.program_id(0), N, BN, 1, True, BLOCK_T)
    xs = _x_tile(x_ptr, sxb, sxc, sxt, g_ptr, sgb, sgc, b, t, tm, K, GATE, ACC, DOT, BLOCK_K)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < R
        y = _row_block(w_ptr, swr, swk, r, rm, xs, K, ACC, DOT, BLOCK_R, BLOCK_K, BLOCK_T)
        y += tl.load(bias_ptr + r, mask=rm, other=0.0).to(ACC)[:, None]
        if RELU:
            y = _relu(y)
        tl.store(_ptrs(y_ptr, b, syb, r, syc, t, syt), y.to(y_ptr.dtype.element_ty), mask=rm[:, None] & tm[None, :])


@triton.jit
def _bn_apply_kernel(z_ptr, szb, szc, szt, x_ptr, sxb, sxc, sxt, y_ptr, syb, syc, syt, mean_ptr, var_ptr, bnw_ptr,
                     bnb_ptr, eps: tl.float64, C, N, n_tblk,
                     RES: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    # y = bn(z) [+ x if RES] [then ReLU if RELU] over a [BLOCK_C, BLOCK_T] tile
    bt = tl.program_id(0)
    b = bt // n_tblk
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t = (bt % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = cm[:, None] & (t < N)[None, :]
    scale, shift = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, c, cm, True, ACC)
    z = tl.load(_ptrs(z_ptr, b, szb, c, szc, t, szt), mask=mask, other=0.0).to(ACC)
    y = z * scale[:, None] + shift[:, None]
    if RES:
        y += tl.load(_ptrs(x_ptr, b, sxb, c, sxc, t, sxt), mask=mask, other=0.0).to(ACC)
    if RELU:
        y = _relu(y)
    tl.store(_ptrs(y_ptr, b, syb, c, syc, t, syt), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_sums_kernel(g_ptr, sgb, sgc, sgt, z_ptr, szb, szc, szt, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps: tl.float64,
                    part_ptr, C, N, n_tblk,
                    RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # per-tile sums of g and g * zhat (zhat = bn-normalised z) at [tile, c] and [tile, C + c] of (S, 2C); RELU: g is
    # the grad of relu(bn(z)), masked by bn(z) > 0 first
    bt = tl.program_id(0)
    b = bt // n_tblk
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t = (bt % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = cm[:, None] & (t < N)[None, :]
    g = tl.load(_ptrs(g_ptr, b, sgb, c, sgc, t, sgt), mask=mask, other=0.0).to(ACC)
    z = tl.load(_ptrs(z_ptr, b, szb, c, szc, t, szt), mask=mask, other=0.0).to(ACC)
    if RELU:
        scale, shift = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, c, cm, True, ACC)
        g = tl.where(z * scale[:, None] + shift[:, None] > 0, g, 0.0)
    zhat = (z - tl.load(mean_ptr + c, mask=cm, other=0.0)[:, None]) * _rstd(var_ptr, c, cm, eps)[:, None]
    tl.store(part_ptr + _at(bt, 2 * C, c), tl.sum(g, axis=1), mask=cm)
    tl.store(part_ptr + _at(bt, 2 * C, C + c), tl.sum(tl.where(mask, g * zhat, 0.0), axis=1), mask=cm)


@triton.jit
def _wgrad_kernel(l_ptr, slb, slr, slt, lz_ptr, slzb, slzr, slzt, l_mean, l_var, l_w, l_b, l_sums, l_eps: tl.float64,
                  r_ptr, srb, srk, srt, rz_ptr, srzb, srzk, srzt, r_mean, r_var, r_w, r_b, r_eps: tl.float64, count,
                  part_ptr, rowsum_ptr,
                  R, K, N, BN, n_tblk, n_tiles, per_split,
                  PRO_L: tl.constexpr, PRO_R: tl.constexpr, ROWSUM: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr,
                  DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # Split-K weight grad: the partial over this split's token tiles of sum_{b,n} L[b, r, n] * Rt[b, k, n], both
    # operands through their prologues (see _operand; L: a grad, Rt: the layer's input). ROWSUM: also the partial
    # sums of L (an eval bias grad)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < K
    sp = tl.program_id(2)
    tl.static_assert(not (FLAT and PRO_R == 3), "the gate's prologue tiles one sample")
    acc = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    rs = tl.zeros([BLOCK_R], ACC)
    for tile in range(sp * per_split, tl.minimum(sp * per_split + per_split, n_tiles)):
        b, t, tm = _tile_tokens(tile, N, BN, n_tblk, FLAT, BLOCK_T)
        g = _operand(l_ptr, slb, slr, slt, lz_ptr, slzb, slzr, slzt, l_mean, l_var, l_w, l_b, l_sums, l_eps, count,
                     b, r, rm, t, tm, R, PRO_L, ACC)
        a = _operand(r_ptr, srb, srk, srt, rz_ptr, srzb, srzk, srzt, r_mean, r_var, r_w, r_b, r_mean, r_eps, count,
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



def _resident_tokens(dm: _Dims, K: int) -> tuple[int, int] | None:
    """(BLOCK_K, BLOCK_T) of a kernel that keeps x's whole [K, BLOCK_T] tile on chip (_x_tile) and streams its
    weights once per tile of flattened tokens, or None: GPU fp32 / fp64 (FMA dots hold operands in registers), K
    too wide for a 16-token tile, or, on a GPU, N % 16 != 0 (the flattened tokens' per-element indices made the FFN
    forward spill 736 B a thread at 14x14 and 784 B at 7x7, sm_90 ptxas; independent of FLAT_TOKENS). Each program
    streams all the weights, so the tile is as long as RESIDENT_X and RESIDENT_TOKENS allow while the grid still
    gives every SM a program (on a GPU; the interpreter wants few)."""
    k = _p2(K)
    tokens = dm.B * dm.N
    fill = 1 << max(0, (tokens // (_GPU_PROGRAMS // 2 if dm.gpu else 1)).bit_length() - 1)  # power of two, floor
    block_t = min(RESIDENT_TOKENS, RESIDENT_X // k, _p2(tokens), max(32, fill))
    return None if dm.fma or block_t < 16 or dm.gpu and dm.N % 16 else (k, block_t)


def _resident_gemm(dm: _Dims, K: int, R: int) -> tuple[int, int, int] | None:
    """(BLOCK_K, BLOCK_T, BLOCK_R) of _resident_kernel for an R x K weight, or None: row blocks within RESIDENT_W
    and _RESIDENT_ACC, at least 16 (the smallest dot). On a GPU only where it beats _gemm_kernel's 64 x 64 tiles:
    tiles of at least 64 tokens (shorter ones stream W more often, and a batch that small wants _gemm_kernel's
    many programs) and row blocks of at least min(32, p2(R)) (K up to 512 at the defaults)."""
    tiles = _resident_tokens(dm, K)
    if tiles is None:
        return None
    k, block_t = tiles
    block_r = min(_p2(R), RESIDENT_W // k, _RESIDENT_ACC // block_t)
    if block_r < 16 or dm.gpu and (block_t < 64 or block_r < min(32, _p2(R))):
        return None
    return k, block_t, block_r


def _resident_launch(dm: _Dims, w: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None,
                     relu: bool, y: torch.Tensor, tiles: tuple[int, int, int]) -> None:
    """y = [relu](W (gate * x) + bias) through _resident_kernel; tiles from _resident_gemm."""
    k, block_t, block_r = tiles
    g = (gate, gate.stride(0), gate.stride(1)) if gate is not None else (x, 0, 0)
    _resident_kernel[(triton.cdiv(dm.B * dm.N, block_t),)](
        w, *w.stride(), bias, x, *_st(x), *g, y, *_st(y), dm.HD, dm.C, dm.N, dm.B * dm.N, GATE=gate is not None,
        RELU=relu, BLOCK_R=block_r, BLOCK_K=k, BLOCK_T=block_t, num_warps=8,  # 8: a gated x tile passes registers
        **dm.meta)


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return t.contiguous(memory_format=memory_format(t) if fmt is None else fmt)



def _no_bn(ph: torch.Tensor, z: torch.Tensor | None = None, strides: tuple = (0, 0, 0)) -> tuple:
    """An operand's prologue arguments without a BN: (z, its 3 strides, mean, var, w, b, sums, eps), z a gate
    (PRO 3: strides (K, 1, 0)) or a ReLU's output (PRO 4) where given; placeholders otherwise."""
    z = ph if z is None else z
    return z, *strides, ph, ph, ph, ph, ph, 0.0


def _gate_operand(ph: torch.Tensor, gate: torch.Tensor | None) -> tuple[int, tuple]:
    """(PRO, prologue arguments) of a GEMM input scaled by a (B, K) gate (PRO 3), or read as stored."""
    return (0, _no_bn(ph)) if gate is None else (3, _no_bn(ph, gate, (gate.stride(0), gate.stride(1), 0)))


def _bn_operand(bn: _BN, z: torch.Tensor, sums: torch.Tensor | None) -> tuple:
    """A BN prologue's arguments: (z, its 3 strides, mean, var, w, b, sums, eps)."""
    return z, *_st(z), bn.mean, bn.var, bn.w, bn.b, sums if sums is not None else bn.mean, bn.eps


def _gemm_launch(dm: _Dims, w_rk: tuple, R: int, K: int, a: torch.Tensor, pro: int, a_bn: tuple, out: torch.Tensor,
                 epi: int, e: torch.Tensor | None = None, e_bn: _BN | None = None, bias: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None) -> torch.Tensor | None:
    """out = W A through _gemm_kernel; w_rk = (W, stride over out rows, stride over K). Returns the partials of
    EPI 0 (Welford, (3, S, R)), EPI 1 (sums, (S, 2R)) or EPI 6 (the gate's, (S, R)). bias: EPI 4 / 5's;
    gate: EPI 6's."""
    w, swr, swk = w_rk
    block_r = min(_BLOCK_R, _p2(R))
    block_k = min(_BLOCK_K, _p2(K))
    flat = dm.flat and pro != 3 and epi != 6  # the gate's prologue and epilogue index one sample per tile
    block_t, n_tblk, S = dm.tiles(flat)
    part = {0: lambda: dm.empty(3, S, R), 1: lambda: dm.empty(S, 2 * R), 6: lambda: dm.empty(S, R)}.get(epi, lambda: out)()
    e = e if e is not None else out
    if e_bn is not None:
        eb = (e_bn.mean, e_bn.var, e_bn.w, e_bn.b, e_bn.eps)
    else:
        eb = (out, out, gate if gate is not None else out, bias if bias is not None else out, 0.0)
    _gemm_kernel[(S, triton.cdiv(R, block_r))](
        w, swr, swk, a, *_st(a), *a_bn, dm.count, out, *_st(out), e, *_st(e), *eb, part, R, K, dm.N, dm.count, n_tblk,
        S, PRO=pro, EPI=epi, FLAT=flat, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_T=block_t, num_warps=_GEMM_WARPS,
        **dm.meta)
    return part if epi in (0, 1, 6) else None


def _wgrad(dm: _Dims, left: torch.Tensor, pro_l: int, l_bn: tuple, right: torch.Tensor, pro_r: int,
           r_bn: _BN | None, rowsum: bool, r_gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum over (b, n) of L[b, :, n] Rt[b, :, n]^T (acc dtype) through the operands' prologues (R's: PRO 3 with
    r_gate), and the sums of L when rowsum."""
    R, K = left.shape[1], right.shape[1]
    block_r, block_k = min(_BLOCK_R, _p2(R)), min(_BLOCK_R, _p2(K))
    grid_rk = triton.cdiv(R, block_r) * triton.cdiv(K, block_k)
    flat = dm.flat and r_gate is None
    block_t, n_tblk, n_tiles = dm.tiles(flat, 32 if dm.fma else None)  # tokens: the dot's K; FMA spills at 64
    per_split, S = _split_k(n_tiles, grid_rk, _GPU_PROGRAMS if dm.gpu else INTERP_WGRAD_PROGRAMS)
    part = dm.empty(S, R * K)
    rs = dm.empty(S, R) if rowsum else part
    rb = (r_bn.mean, r_bn.var, r_bn.w, r_bn.b, r_bn.eps) if r_bn is not None else (part, part, part, part, 0.0)
    rz = (r_gate, r_gate.stride(0), r_gate.stride(1), 0) if r_gate is not None else (right, 0, 0, 0)
    _wgrad_kernel[(triton.cdiv(R, block_r), triton.cdiv(K, block_k), S)](
        left, *_st(left), *l_bn, right, *_st(right), *rz, *rb, dm.count,
        part, rs, R, K, dm.N, dm.count, n_tblk, n_tiles, per_split, PRO_L=pro_l, PRO_R=pro_r, ROWSUM=rowsum,
        FLAT=flat, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_T=block_t, num_warps=_GEMM_WARPS, **dm.meta)
    return _sum(part).view(R, K), (_sum(rs) if rowsum else None)


def _bn_apply(dm: _Dims, z: torch.Tensor, bn: _BN, y: torch.Tensor, res: torch.Tensor | None = None,
              relu: bool = False) -> torch.Tensor:
    """y = bn(z) [+ res] [then ReLU] through _bn_apply_kernel; returns y."""
    rows = z.shape[1]
    block_c, block_t, n_tblk = dm.ew_blocks(rows)
    r = res if res is not None else z
    _bn_apply_kernel[(dm.B * n_tblk, triton.cdiv(rows, block_c))](
        z, *_st(z), r, *_st(r), y, *_st(y), bn.mean, bn.var, bn.w, bn.b, bn.eps, rows, dm.N, n_tblk,
        RES=res is not None, RELU=relu, ACC=dm.meta["ACC"], BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    return y


def _bn_sums(dm: _Dims, g: torch.Tensor, z: torch.Tensor, bn: _BN, relu: bool = False) -> torch.Tensor:
    """[sum g | sum g * zhat] over (B, N) per row: what bn's backward needs of g, the grad of bn(z) (of relu(bn(z))
    when relu: masked by bn(z) > 0)."""
    rows = z.shape[1]
    block_c, block_t, n_tblk = dm.ew_blocks(rows)
    part = dm.empty(dm.B * n_tblk, 2 * rows)
    _bn_sums_kernel[(dm.B * n_tblk, triton.cdiv(rows, block_c))](
        g, *_st(g), z, *_st(z), bn.mean, bn.var, bn.w, bn.b, bn.eps, part, rows, dm.N, n_tblk, RELU=relu,
        ACC=dm.meta["ACC"], BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    return _sum(part)


def _t(w: torch.Tensor) -> tuple:
    """(w, row stride, column stride) of w^T: a transposed weight is read through swapped strides."""
    return w, w.stride(1), w.stride(0)

