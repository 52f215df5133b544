"""Triton kernels: PVT's spatial-reduction attention (the backend interface of `shvit_kernels.ops.sra`).

The four functions of the spec (shvit_kernels/reference/sra.py): reduce_fwd, reduce_bwd, attn_fwd, attn_bwd.
Sizes: x (B, N, C) tokens-major (N = H*W), red (B, M, C), heads h of width D = C / heads (DP = p2₁₆(D));
reduction ratio R (patchify conv, M = (H//R)(W//R)) or, `linear`, the 7x7 adaptive pool (M = 49, R = 1).
Every GEMM row index runs over flattened tokens (b * tokens + t); offsets are int64 from the row on.

sra_reduce forward (1 launch). Per launch: grid, then bytes (one element = one activation):
  reduce    (B*M / BLOCK_T,)      z = patches @ W_sr^T + b for BLOCK_T output tokens x all C channels: the R x R x C
            patch (or the pooled bin average) is gathered from x in the operand load, never materialised; LayerNorm
            over C (+ GELU) in the epilogue. Reads x once (R*R*C*M = N*C per sample; linear: each pixel once per
            bin that holds it) and W_sr once per program; writes red (B*M*C)
sra_reduce backward (3 kernels + 3 _sum launches; linear: 4 + 3):
  reduce    (BWD)                 recompute z and its LayerNorm; g through GELU'; gz = LN backward (row-local: one
            program holds all C); writes gz (B*M*C, fp32) and per-tile sums of g*zhat, g (g_ln_w, g_ln_b)
  wgrad     (C/64, R*R*C/64, splits)  split-K g_sr_w = gz^T patches (patches gathered as in the forward), stored in
            the conv weight's layout, + column sums of gz (g_sr_b); _sum reduces the splits in a fixed order
  linear    (B*M/64, R*R*C/64)   grad of the patches = gz @ W_sr, scattered straight into grad_x (pixels that no
            patch covers, when R does not divide H or W, are zeroed first). linear: gz @ W_sr into the pooled grad,
            then pool_bwd (B*N/64, C/64) gathers each pixel's bins (no atomics)
sra_attention forward (2 launches):
  linear    (B*M/64, 2C/64)       kv = red @ W_kv^T + b (B*M*2C): M << N, so computed once, not per query tile
  attn_fwd  (B*N/BLOCK_M, heads)  q = x @ W_q^T + b for this head and query tile (the q projection fused: q never
            touches memory), then softmax(q k^T * scale) v over key blocks with online softmax; all M keys in one
            block while p2₁₆(M) <= min(256, 16384 / DP). Reads x once per head, kv once per query tile; writes o
            (B*N*C) and the logsumexp (B*heads*N, fp32)
sra_attention backward (FlashAttention-2 style, from the saved logsumexp; 7 kernels + 4 _sum launches, 5 when the
key kernel splits the queries):
  linear    kv recomputed
  attn_bwd_q  (B*N/BLOCK, heads)  q recomputed (fused, as in the forward) and written (B*N*C) for the next kernel,
            D = rowsum(dO * O), P and dS per [queries, keys] tile, dq over all key blocks
  attn_bwd_kv (B*M/BLOCK, heads, splits)  dk, dv for one key block over a split of the query blocks (reads q and dO
            once per key block and split): split-K partials (splits*B*M*2C, fp32), _sum'ed in a fixed order when
            there is more than one split (on a GPU: splits fill ~264 programs)
  linear x2 gx = dq @ W_q, g_red = dkv @ W_kv;  wgrad x2  g_q_w (+ g_q_b), g_kv_w (+ g_kv_b), split-K + _sum
Never an N x M buffer in memory: scores live only as [queries, keys] register tiles.
Deterministic: no atomics; every cross-program sum goes through per-split partials reduced by _sum in a fixed
order. Accumulation is fp32 (fp64 for fp64 inputs); dots take activation-dtype operands, fp32/fp64 dots are IEEE.
Scalars (scale, eps, GELU's constants) are `tl.float64` kernel arguments, taken in the accumulation dtype by
_common._scalar: a plain float argument would reach an fp64 kernel rounded to fp32.
Shared with the other kernels: _common's _TL, _at, _inv_std, _mm, _p2, _scalar, _sum and shsa's _p_ds.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import _TL, _at, _inv_std, _mm, _p2, _scalar, _sum
from .shsa import _p_ds

# Attention blocking; module-level so that tests can shrink it to reach the multi-block paths with small shapes.
BLOCK_QUERIES = 64  # queries per forward program
BLOCK_KEYS = 64  # keys per online-softmax step past SINGLE_PASS_MAX; also the blocks of the backward
SINGLE_PASS_MAX = 256  # all M keys (padded to a power of two) in one block up to this
_ATTN_TILE = 16384  # [keys, DP] register-tile cap (queries: half, backward blocks: a quarter)
_FMA_BLOCK = 32  # attention block cap for fp32/fp64 on a GPU: IEEE dots run on FMA units, operands in registers

_BLOCK_R, _BLOCK_N, _BLOCK_K = 64, 64, 32  # GEMM tiles: rows (tokens), output columns, reduction
_LN_TILE = 8192  # reduce: [tokens, p2(C)] accumulator elements per program (a quarter less for fp32 FMA dots)
_GEMM_WARPS = 8
_PROGRAMS = 264  # split-K target on a GPU (2 per H100 SM)
_INTERP_PROGRAMS = 1  # ... and in the interpreter (one split: programs cost time, not parallelism); tests raise it


# ---- device helpers ----------------------------------------------------------------------------------------

@triton.jit
def _tok(ptr, b, t, T, S, col):
    # [len(t), len(col)] pointers: tokens t of sample b of a row-major (B, T, S) tensor, columns col
    return ptr + (_at(b, T, t) * S)[:, None] + col[None, :]


@triton.jit
def _tok_t(ptr, b, t, T, S, col):
    # the same, transposed: [len(col), len(t)]
    return ptr + (_at(b, T, t) * S)[None, :] + col[:, None]


@triton.jit
def _perm(n, CC, RR):
    # Column n = tap * CC + c of a patch matrix -> c * RR + tap, its place in a conv weight's (c, kh, kw) dims.
    # Plain columns: CC = number of columns, RR = 1 gives n.
    return (n % CC) * RR + n // CC


@triton.jit
def _patch_off(r, k, M, N, W, Wo, R, C):
    # [len(r), len(k)] int64 offsets into x (B, N, C) of the patch matrix: row r = b * M + output token (oi, oj),
    # column k = (di * R + dj) * C + c  ->  x[b, (oi * R + di) * W + oj * R + dj, c]
    t = r % M
    tap = k // C
    pix = ((t // Wo) * R * W + (t % Wo) * R)[:, None] + ((tap // R) * W + tap % R)[None, :]
    return ((_at(r // M, N, 0))[:, None] + pix) * C + (k % C)[None, :]


@triton.jit
def _load_a(a_ptr, r, rm, k, km, K, C, M, N, H, W, Wo, R, KH, KW, GATHER: tl.constexpr, ACC: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # Rows r x columns k of a GEMM's left operand in ACC, 0 outside: GATHER 0: a row-major (rows, K) matrix;
    # 1: the patchify conv's patch matrix (K = R*R*C) read from x; 2: the 7x7 adaptive average pool of x (K = C),
    # bins [floor(i H / 7), ceil((i + 1) H / 7)) as ATen's, summed over the (at most KH x KW) pixels of each bin.
    mask = rm[:, None] & km[None, :]
    if GATHER == 0:
        a = tl.load(a_ptr + _at(r, K, 0)[:, None] + k[None, :], mask=mask, other=0.0).to(ACC)
    elif GATHER == 1:
        a = tl.load(a_ptr + _patch_off(r, k, M, N, W, Wo, R, C), mask=mask, other=0.0).to(ACC)
    else:
        t = r % M
        oi = t // 7
        oj = t % 7
        h0 = oi * H // 7
        h1 = ((oi + 1) * H + 6) // 7
        w0 = oj * W // 7
        w1 = ((oj + 1) * W + 6) // 7
        base = _at(r // M, N, 0)
        a = tl.zeros([BLOCK_R, BLOCK_K], ACC)
        for dh in range(KH):
            for dw in range(KW):
                ok = rm & (h0 + dh < h1) & (w0 + dw < w1)
                pix = base + (h0 + dh) * W + w0 + dw
                a += tl.load(a_ptr + (pix * C)[:, None] + k[None, :], mask=ok[:, None] & km[None, :],
                             other=0.0).to(ACC)
        a = a / ((h1 - h0) * (w1 - w0)).to(ACC)[:, None]
    return a


# ---- GEMMs -------------------------------------------------------------------------------------------------

@triton.jit
def _linear_kernel(a_ptr, w_ptr, swk, swn, CC, RR, bias_ptr, out_ptr, Rows, K, NOUT, M, N, W, Wo, R, C,
                   BIAS: tl.constexpr, SCATTER: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out = A @ Wm [+ bias] for BLOCK_R rows x BLOCK_N columns. A: row-major (Rows, K); Wm[k, n] at
    # w + k * swk + _perm(n, CC, RR) * swn. out: row-major (Rows, NOUT), or (SCATTER) the patch matrix's
    # entries scattered into an image-layout (B, N, C) tensor: the patchify conv's input grad.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < Rows
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < NOUT
    wn = _perm(n, CC, RR) * swn
    acc = tl.zeros([BLOCK_R, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        a = tl.load(a_ptr + _at(r, K, 0)[:, None] + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + k[:, None] * swk + wn[None, :], mask=km[:, None] & nm[None, :], other=0.0)
        acc = _mm(a.to(DOT), w.to(DOT), acc, ACC)
    if BIAS:
        acc += tl.load(bias_ptr + n, mask=nm, other=0.0).to(ACC)[None, :]
    if SCATTER:
        off = _patch_off(r, n, M, N, W, Wo, R, C)
    else:
        off = _at(r, NOUT, 0)[:, None] + n[None, :]
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] & nm[None, :])


@triton.jit
def _wgrad_kernel(g_ptr, a_ptr, part_ptr, rs_ptr, Rows, O, K, C, M, N, H, W, Wo, R, KH, KW, n_tiles, per_split,
                  GATHER: tl.constexpr, ROWSUM: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                  BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # Split-K weight grad: this split's partial of sum_r G[r, o] A[r, k] (G row-major (Rows, O), A from _load_a),
    # stored at part[split, o * K + _perm(k, C, R*R)] (a conv weight's layout; plain for C = K, R = 1).
    # ROWSUM: also the partial column sums of G (the bias grad), from the programs of column block 0.
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    om = o < O
    kb = tl.program_id(1)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < K
    sp = tl.program_id(2)
    acc = tl.zeros([BLOCK_O, BLOCK_K], ACC)
    rs = tl.zeros([BLOCK_O], ACC)
    for tile in range(sp * per_split, tl.minimum(sp * per_split + per_split, n_tiles)):
        r = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        rm = r < Rows
        g_t = tl.load(g_ptr + _at(r, O, 0)[None, :] + o[:, None], mask=om[:, None] & rm[None, :], other=0.0).to(ACC)
        a = _load_a(a_ptr, r, rm, k, km, K, C, M, N, H, W, Wo, R, KH, KW, GATHER, ACC, BLOCK_T, BLOCK_K)
        acc = _mm(g_t.to(DOT), a.to(DOT), acc, ACC)
        if ROWSUM:
            rs += tl.sum(g_t, axis=1)
    off = _at(sp, O * K, 0) + (o * K)[:, None] + _perm(k, C, R * R)[None, :]
    tl.store(part_ptr + off, acc, mask=om[:, None] & km[None, :])
    if ROWSUM:  # noqa: SIM102 (a compile-time test, then a runtime one)
        if kb == 0:
            tl.store(rs_ptr + _at(sp, O, o), rs, mask=om)


# ---- spatial reduction -------------------------------------------------------------------------------------

@triton.jit
def _reduce_kernel(x_ptr, w_ptr, srb_ptr, lnw_ptr, lnb_ptr, eps: tl.float64, rsqrt_2: tl.float64,
                   rsqrt_2pi: tl.float64, g_ptr, out_ptr, part_ptr,
                   Rows, C, M, N, H, W, Wo, R, KH, KW,
                   GATHER: tl.constexpr, BWD: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                   CP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # BLOCK_T output tokens x all C channels: z = patches @ W_sr^T + b (patch gathered from x, or the pooled bin
    # average when GATHER == 2), t = LayerNorm(z). Forward: red = t (GATHER 2: GELU(t)). BWD: from g = grad of red,
    # through GELU' (GATHER 2), per-tile sums of g * zhat and g (LayerNorm weight / bias grads) at part[tile], and
    # gz = rstd * (gzhat - mean(gzhat) - zhat * mean(gzhat * zhat)), gzhat = g * ln_w, into out.
    pid = tl.program_id(0)
    r = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = r < Rows
    c = tl.arange(0, CP)
    cm = c < C
    RR = R * R
    K = RR * C
    acc = tl.zeros([BLOCK_T, CP], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        a = _load_a(x_ptr, r, rm, k, km, K, C, M, N, H, W, Wo, R, KH, KW, GATHER, ACC, BLOCK_T, BLOCK_K)
        w = tl.load(w_ptr + (c * K)[None, :] + _perm(k, C, RR)[:, None], mask=km[:, None] & cm[None, :], other=0.0)
        acc = _mm(a.to(DOT), w.to(DOT), acc, ACC)
    mask = rm[:, None] & cm[None, :]
    z = acc + tl.load(srb_ptr + c, mask=cm, other=0.0).to(ACC)[None, :]
    mean = tl.sum(tl.where(mask, z, 0.0), axis=1) / C
    d = tl.where(mask, z - mean[:, None], 0.0)
    rstd = _inv_std(tl.sum(d * d, axis=1) / C, eps)
    zhat = d * rstd[:, None]
    lw = tl.load(lnw_ptr + c, mask=cm, other=0.0).to(ACC)
    t = zhat * lw[None, :] + tl.load(lnb_ptr + c, mask=cm, other=0.0).to(ACC)[None, :]
    out = _at(r, C, 0)[:, None] + c[None, :]
    if GATHER == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(t * _scalar(rsqrt_2, ACC)))  # Phi(t)
    if BWD:
        g = tl.load(g_ptr + out, mask=mask, other=0.0).to(ACC)
        if GATHER == 2:  # d gelu(t) = Phi(t) + t phi(t)
            g = g * (cdf + t * tl.exp(-0.5 * t * t) * _scalar(rsqrt_2pi, ACC))
        tl.store(part_ptr + _at(pid, 2 * C, c), tl.sum(g * zhat, axis=0), mask=cm)
        tl.store(part_ptr + _at(pid, 2 * C, C + c), tl.sum(g, axis=0), mask=cm)
        gzhat = g * lw[None, :]
        m1 = tl.sum(gzhat, axis=1) / C
        m2 = tl.sum(gzhat * zhat, axis=1) / C
        t = rstd[:, None] * (gzhat - m1[:, None] - zhat * m2[:, None])
    elif GATHER == 2:
        t = t * cdf
    tl.store(out_ptr + out, t.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_bwd_kernel(g_ptr, gx_ptr, Rows, C, N, H, W, NBH, NBW, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    # grad of the 7x7 adaptive average pool: gx[b, p, c] = sum over the bins (i, j) holding pixel p of
    # g[b, 7 i + j, c] / |bin|; rows r = b * N + p. The first bin holding row h is floor(7 h / H); at most NBH
    # (NBW) bins hold one row (column).
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = r < Rows
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    p = r % N
    hh = p // W
    ww = p % W
    base = _at(r // N, 49, 0)
    acc = tl.zeros([BLOCK_T, BLOCK_C], ACC)
    for di in range(NBH):
        i = hh * 7 // H + di
        h0 = i * H // 7
        okh = rm & (i < 7) & (h0 <= hh)
        for dj in range(NBW):
            j = ww * 7 // W + dj
            w0 = j * W // 7
            ok = okh & (j < 7) & (w0 <= ww)
            area = ((((i + 1) * H + 6) // 7 - h0) * (((j + 1) * W + 6) // 7 - w0)).to(ACC)
            g = tl.load(g_ptr + ((base + i * 7 + j) * C)[:, None] + c[None, :], mask=ok[:, None] & cm[None, :],
                        other=0.0).to(ACC)
            acc += g / area[:, None]
    tl.store(gx_ptr + _at(r, C, 0)[:, None] + c[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=rm[:, None] & cm[None, :])


# ---- attention ---------------------------------------------------------------------------------------------

@triton.jit
def _q_tile(x_ptr, qw_ptr, qb_ptr, b, i, im, col, cm, C, N, BIAS: tl.constexpr, ACC: tl.constexpr,
            DOT: tl.constexpr, BLOCK_M: tl.constexpr, DP: tl.constexpr, BLOCK_K: tl.constexpr):
    # q = x W_q^T [+ b_q] for queries i of sample b, channels col (one head), in the dot dtype: [BLOCK_M, DP]
    acc = tl.zeros([BLOCK_M, DP], ACC)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < C
        xa = tl.load(_tok(x_ptr, b, i, N, C, k), mask=im[:, None] & km[None, :], other=0.0)
        w_t = tl.load(qw_ptr + (col * C)[None, :] + k[:, None], mask=km[:, None] & cm[None, :], other=0.0)
        acc = _mm(xa.to(DOT), w_t.to(DOT), acc, ACC)
    if BIAS:
        acc += tl.load(qb_ptr + col, mask=cm, other=0.0).to(ACC)[None, :]
    return acc.to(DOT)


@triton.jit
def _attn_fwd_kernel(x_ptr, qw_ptr, qb_ptr, kv_ptr, qk_scale: tl.float64, o_ptr, lse_ptr, C, D, N, M, heads, n_qblk,
                     BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, DP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # BLOCK_M queries of one sample, one head, against all M keys: o = softmax(q k^T * scale) v and the logsumexp.
    # Online softmax over key blocks (one block when all keys fit).
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = pid // n_qblk
    i = (pid % n_qblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    im = i < N
    d = tl.arange(0, DP)
    dm = d < D
    col = h * D + d
    scale = _scalar(qk_scale, ACC)
    q = _q_tile(x_ptr, qw_ptr, qb_ptr, b, i, im, col, dm, C, N, BIAS, ACC, DOT, BLOCK_M, DP, BLOCK_K)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    den = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, DP], ACC)
    for j0 in range(0, M, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jm = j < M
        k_t = tl.load(_tok_t(kv_ptr, b, j, M, 2 * C, col), mask=dm[:, None] & jm[None, :], other=0.0).to(DOT)
        s = tl.where(jm[None, :], _mm(q, k_t, None, ACC) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block has a valid key
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        den = den * alpha + tl.sum(p, axis=1)
        v = tl.load(_tok(kv_ptr, b, j, M, 2 * C, C + col), mask=jm[:, None] & dm[None, :], other=0.0).to(DOT)
        acc = _mm(p.to(DOT), v, acc * alpha[:, None], ACC)
        m = m_new
    tl.store(_tok(o_ptr, b, i, N, C, col), (acc / den[:, None]).to(o_ptr.dtype.element_ty),
             mask=im[:, None] & dm[None, :])
    tl.store(lse_ptr + _at(b * heads + h, N, i), m + tl.log(den), mask=im)


@triton.jit
def _attn_bwd_q_kernel(x_ptr, qw_ptr, qb_ptr, kv_ptr, qk_scale: tl.float64, go_ptr, o_ptr, lse_ptr, q_ptr, dd_ptr,
                       dq_ptr, C, D, N, M, heads, n_qblk,
                       BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, DP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Queries i of one sample and head: q recomputed and stored (for the key kernel), D = rowsum(dO * O) stored,
    # dq = scale * sum over key blocks of dS k, with P = exp(s - lse) and dS = P * (dP - D).
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = pid // n_qblk
    i = (pid % n_qblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    im = i < N
    d = tl.arange(0, DP)
    dm = d < D
    col = h * D + d
    mask = im[:, None] & dm[None, :]
    scale = _scalar(qk_scale, ACC)
    q = _q_tile(x_ptr, qw_ptr, qb_ptr, b, i, im, col, dm, C, N, BIAS, ACC, DOT, BLOCK_M, DP, BLOCK_K)
    tl.store(_tok(q_ptr, b, i, N, C, col), q.to(q_ptr.dtype.element_ty), mask=mask)
    go = tl.load(_tok(go_ptr, b, i, N, C, col), mask=mask, other=0.0)
    dd = tl.sum(go.to(ACC) * tl.load(_tok(o_ptr, b, i, N, C, col), mask=mask, other=0.0).to(ACC), axis=1)
    row = _at(b * heads + h, N, i)
    tl.store(dd_ptr + row, dd, mask=im)
    lse = tl.load(lse_ptr + row, mask=im, other=0.0)
    go = go.to(DOT)
    dq = tl.zeros([BLOCK_M, DP], ACC)
    for j0 in range(0, M, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jm = j < M
        k_t = tl.load(_tok_t(kv_ptr, b, j, M, 2 * C, col), mask=dm[:, None] & jm[None, :], other=0.0).to(DOT)
        v_t = tl.load(_tok_t(kv_ptr, b, j, M, 2 * C, C + col), mask=dm[:, None] & jm[None, :], other=0.0).to(DOT)
        _, ds = _p_ds(q, k_t, go, v_t, lse, dd, im, jm, scale, ACC)
        dq = _mm(ds.to(DOT), tl.trans(k_t), dq, ACC)
    tl.store(_tok(dq_ptr, b, i, N, C, col), (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_kv_kernel(q_ptr, kv_ptr, qk_scale: tl.float64, go_ptr, lse_ptr, dd_ptr, part_ptr, C, D, N, M, B, heads,
                        n_kblk, n_qblk, per_split,
                        ACC: tl.constexpr, DOT: tl.constexpr, DP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys j of one sample and head over this split's query blocks: dv = P^T dO, dk = scale * dS^T q, into the
    # (splits, B, M, 2C) partials at [split, b, j, (k | v) columns of the head]
    pid = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    b = pid // n_kblk
    j = (pid % n_kblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    jm = j < M
    d = tl.arange(0, DP)
    dm = d < D
    col = h * D + d
    scale = _scalar(qk_scale, ACC)
    k_t = tl.load(_tok_t(kv_ptr, b, j, M, 2 * C, col), mask=dm[:, None] & jm[None, :], other=0.0).to(DOT)
    v_t = tl.load(_tok_t(kv_ptr, b, j, M, 2 * C, C + col), mask=dm[:, None] & jm[None, :], other=0.0).to(DOT)
    dk = tl.zeros([BLOCK_N, DP], ACC)
    dv = tl.zeros([BLOCK_N, DP], ACC)
    for qb in range(sp * per_split, tl.minimum(sp * per_split + per_split, n_qblk)):
        i = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        im = i < N
        mask = im[:, None] & dm[None, :]
        q = tl.load(_tok(q_ptr, b, i, N, C, col), mask=mask, other=0.0).to(DOT)
        go = tl.load(_tok(go_ptr, b, i, N, C, col), mask=mask, other=0.0).to(DOT)
        row = _at(b * heads + h, N, i)
        p, ds = _p_ds(q, k_t, go, v_t, tl.load(lse_ptr + row, mask=im, other=0.0),
                      tl.load(dd_ptr + row, mask=im, other=0.0), im, jm, scale, ACC)
        dv = _mm(tl.trans(p.to(DOT)), go, dv, ACC)
        dk = _mm(tl.trans(ds.to(DOT)), q, dk, ACC)
    mask = jm[:, None] & dm[None, :]
    tl.store(_tok(part_ptr, sp * B + b, j, M, 2 * C, col), dk * scale, mask=mask)
    tl.store(_tok(part_ptr, sp * B + b, j, M, 2 * C, C + col), dv, mask=mask)


# ---- host side -------------------------------------------------------------------------------------------

class _Ctx:
    """Dtypes, device and the per-device choices shared by every launch of one call."""

    def __init__(self, x: torch.Tensor):
        self.acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.meta = {"ACC": _TL[self.acc], "DOT": _TL[x.dtype]}
        self.dev = x.device
        self.gpu = x.device.type != "cpu"  # CPU: the interpreter; meta tensors (overflow tests) get the GPU's choices
        # IEEE fp32/fp64 dots compile to FMA loops that keep operand rows in registers: smaller tiles on a GPU
        self.fma = self.gpu and x.dtype in (torch.float32, torch.float64)

    def empty(self, *shape) -> torch.Tensor:
        return torch.empty(shape, dtype=self.acc, device=self.dev)

    def splits(self, n_items: int, other_programs: int) -> tuple[int, int]:
        """(splits, items per split) of a split-K loop over n_items next to other_programs programs."""
        want = _PROGRAMS if self.gpu else _INTERP_PROGRAMS
        per_split = triton.cdiv(n_items, max(1, min(n_items, want // other_programs)))
        return triton.cdiv(n_items, per_split), per_split


class _Geo:
    """Where the rows of a GEMM's left operand come from (_load_a): plain rows (gather 0), the patches of a
    k = stride = R conv (1) or the 7x7 adaptive-pool bins (2) of x (B, N = H*W, C), M output tokens per sample."""

    def __init__(self, gather=0, C=1, M=1, N=1, H=1, W=1, R=1):
        self.gather, self.C, self.M, self.N, self.H, self.W, self.R = gather, C, M, N, H, W, R
        self.Wo = 7 if gather == 2 else W // R
        self.KH = _max_bin(H) if gather == 2 else 1
        self.KW = _max_bin(W) if gather == 2 else 1

    def args(self) -> tuple:
        return self.C, self.M, self.N, self.H, self.W, self.Wo, self.R, self.KH, self.KW


def _bins(n: int) -> list[tuple[int, int]]:
    return [(i * n // 7, ((i + 1) * n + 6) // 7) for i in range(7)]


def _max_bin(n: int) -> int:
    """Most pixels in one of the 7 adaptive-pool bins over n."""
    return max(e - s for s, e in _bins(n))


def _max_cover(n: int) -> int:
    """Most of the 7 adaptive-pool bins over n that hold one pixel (the most overlap is at some bin's start)."""
    bins = _bins(n)
    return max(sum(s <= p < e for s, e in bins) for p, _ in bins)


def _linear(ctx, a, rows, K, w, swk, swn, n_out, out, bias=None, perm=None, scatter=None):
    """out = A @ Wm [+ bias] through _linear_kernel: A (rows, K) row-major, Wm[k, n] = w[k * swk + n' * swn],
    n' = _perm(n, *perm) (default: n); scatter: a _Geo whose patch matrix out receives, instead of rows."""
    cc, rr = perm if perm is not None else (n_out, 1)
    geo = scatter or _Geo()
    block_r = min(32 if ctx.fma else _BLOCK_R, _p2(rows))
    block_n = min(_BLOCK_N, _p2(n_out))
    _linear_kernel[(triton.cdiv(rows, block_r), triton.cdiv(n_out, block_n))](
        a, w, swk, swn, cc, rr, bias if bias is not None else out, out, rows, K, n_out, geo.M, geo.N, geo.W, geo.Wo,
        geo.R, geo.C, BIAS=bias is not None, SCATTER=scatter is not None, BLOCK_R=block_r, BLOCK_N=block_n,
        BLOCK_K=min(_BLOCK_K, _p2(K)), num_warps=_GEMM_WARPS, **ctx.meta)
    return out


def _wgrad(ctx, g, a, rows, O, K, geo=None):
    """(sum over rows of G^T A as an (O, K) matrix, in the conv weight layout for a patch geo; column sums of G)."""
    geo = geo or _Geo(C=K)
    block_o, block_k = min(_BLOCK_R, _p2(O)), min(_BLOCK_R, _p2(K))
    block_t = min(32 if ctx.fma else _BLOCK_R, _p2(rows))  # rows are the dot's K: FMA dots spill at 64
    n_tiles = triton.cdiv(rows, block_t)
    grid_ok = (triton.cdiv(O, block_o), triton.cdiv(K, block_k))
    S, per_split = ctx.splits(n_tiles, grid_ok[0] * grid_ok[1])
    part, rs = ctx.empty(S, O * K), ctx.empty(S, O)
    _wgrad_kernel[(*grid_ok, S)](
        g, a, part, rs, rows, O, K, *geo.args(), n_tiles, per_split, GATHER=geo.gather, ROWSUM=True,
        BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_T=block_t, num_warps=_GEMM_WARPS, **ctx.meta)
    return _sum(part), _sum(rs)


def _cast(t: torch.Tensor, like: torch.Tensor | None, shape=None) -> torch.Tensor:
    # a copy: slices of one sums buffer must not alias between outputs
    t = t.to(like.dtype if like is not None else t.dtype, copy=True)
    return t.view(shape) if shape is not None else t


# ---- spatial reduction -----------------------------------------------------------------------------------

def _reduce(x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear, g_red=None):
    """The reduce kernel in forward (g_red None: returns red) or backward mode (returns gz, LayerNorm sums)."""
    ctx = _Ctx(x)
    B, N, C = x.shape
    r = 1 if linear else sr_ratio
    geo = _Geo(2 if linear else 1, C, 49 if linear else (h // r) * (w // r), N, h, w, r)
    rows, cp = B * geo.M, _p2(C)
    block_t = max(16, min(_BLOCK_R, (_LN_TILE // 2 if ctx.fma else _LN_TILE) // cp, _p2(rows)))
    block_k = max(16, min(_BLOCK_K, _LN_TILE // cp))
    n_tiles = triton.cdiv(rows, block_t)
    bwd = g_red is not None
    out = ctx.empty(rows, C) if bwd else torch.empty(B, geo.M, C, dtype=x.dtype, device=x.device)
    part = ctx.empty(n_tiles, 2 * C) if bwd else out
    _reduce_kernel[(n_tiles,)](
        x, sr_w, sr_b, ln_w, ln_b, eps, 0.5 ** 0.5, (2 * math.pi) ** -0.5, g_red if bwd else out, out, part, rows,
        *geo.args(),
        GATHER=geo.gather, BWD=bwd, CP=cp, BLOCK_T=block_t, BLOCK_K=block_k, num_warps=_GEMM_WARPS, **ctx.meta)
    return (out, part, geo, ctx) if bwd else out


def reduce_fwd(x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear):
    return _reduce(x.contiguous(), h, w, sr_w.contiguous(), sr_b.contiguous(), ln_w.contiguous(), ln_b.contiguous(),
                   eps, sr_ratio, linear)


def reduce_bwd(g_red, x, h, w, sr_w, sr_b, ln_w, ln_b, eps, sr_ratio, linear):
    x, sr_w = x.contiguous(), sr_w.contiguous()
    gz, part, geo, ctx = _reduce(x, h, w, sr_w, sr_b.contiguous(), ln_w.contiguous(), ln_b.contiguous(), eps,
                                 sr_ratio, linear, g_red=g_red.contiguous())
    B, N, C = x.shape
    rows, r = B * geo.M, geo.R
    ln_sums = _sum(part)  # [sum g * zhat | sum g]
    g_sr_w, g_sr_b = _wgrad(ctx, gz, x, rows, C, r * r * C, geo)
    if linear:  # grad of the pooled map, then the pool's backward
        gp = _linear(ctx, gz, rows, C, sr_w, C, 1, C, ctx.empty(rows, C))
        gx = torch.empty_like(x)
        block_t, block_c = min(_BLOCK_R, _p2(B * N)), min(_BLOCK_N, _p2(C))
        _pool_bwd_kernel[(triton.cdiv(B * N, block_t), triton.cdiv(C, block_c))](
            gp, gx, B * N, C, N, h, w, _max_cover(h), _max_cover(w), ACC=ctx.meta["ACC"], BLOCK_T=block_t,
            BLOCK_C=block_c, num_warps=4)
    else:  # patch grads scattered into x's layout; pixels past the last whole patch get none
        gx = torch.empty_like(x) if h % r == 0 and w % r == 0 else torch.zeros_like(x)
        _linear(ctx, gz, rows, C, sr_w, r * r * C, 1, r * r * C, gx, perm=(C, r * r), scatter=geo)
    return (gx, _cast(g_sr_w, sr_w, sr_w.shape), _cast(g_sr_b, sr_b), _cast(ln_sums[:C], ln_w),
            _cast(ln_sums[C:], ln_b))


# ---- attention ---------------------------------------------------------------------------------------------

class _Attn:
    """Shapes, blocks and kv = red W_kv^T + b_kv (computed once per call) shared by the attention entry points."""

    def __init__(self, x, red, q_w, q_b, kv_w, kv_b, num_heads, scale):
        self.ctx = ctx = _Ctx(x)
        self.x, self.red = x.contiguous(), red.contiguous()
        self.q_w, self.kv_w = q_w.contiguous(), kv_w.contiguous()
        self.q_b = q_b.contiguous() if q_b is not None else None
        self.B, self.N, self.C = x.shape
        self.M, self.heads, self.D = red.shape[1], num_heads, self.C // num_heads
        self.DP = _p2(self.D)
        self.scale = scale
        B, M, C = self.B, self.M, self.C
        self.kv = _linear(ctx, self.red, B * M, C, self.kv_w, 1, C, 2 * C,
                          torch.empty(B, M, 2 * C, dtype=x.dtype, device=x.device),
                          bias=kv_b.contiguous() if kv_b is not None else None)
        # forward: all keys in one block up to SINGLE_PASS_MAX (and the register cap), else online softmax
        cap = max(16, _ATTN_TILE // self.DP)
        cap_q, cap_bwd = max(16, cap // 2), max(16, cap // 4)
        if ctx.fma:
            cap, cap_q, cap_bwd = (min(c, _FMA_BLOCK) for c in (cap, cap_q, cap_bwd))
        mp = _p2(M)
        self.block_n = mp if mp <= min(SINGLE_PASS_MAX, cap) else min(BLOCK_KEYS, cap)
        self.block_m = min(BLOCK_QUERIES, cap_q, _p2(self.N))
        self.bwd_m = min(BLOCK_KEYS, cap_bwd, _p2(self.N))
        self.bwd_n = min(BLOCK_KEYS, cap_bwd, mp)
        self.k = {"BIAS": q_b is not None, "DP": self.DP, "BLOCK_K": min(_BLOCK_K, _p2(C)), **ctx.meta}

    def warps(self, block_m, block_n) -> int:
        return 8 if self.ctx.fma or block_m * max(block_n, self.DP) >= 4096 else 4

    def forward(self):
        B, N, C, ctx = self.B, self.N, self.C, self.ctx
        o = torch.empty_like(self.x)
        lse = ctx.empty(B, self.heads, N)
        n_qblk = triton.cdiv(N, self.block_m)
        _attn_fwd_kernel[(B * n_qblk, self.heads)](
            self.x, self.q_w, self.q_b if self.q_b is not None else o, self.kv, self.scale, o, lse, C, self.D, N,
            self.M, self.heads, n_qblk, BLOCK_M=self.block_m, BLOCK_N=self.block_n,
            num_warps=self.warps(self.block_m, self.block_n), **self.k)
        return o, lse

    def backward(self, g_o, o, lse):
        B, N, M, C, ctx = self.B, self.N, self.M, self.C, self.ctx
        x, red = self.x, self.red
        bm, bn = self.bwd_m, self.bwd_n
        q, dq = torch.empty_like(x), torch.empty_like(x)
        dd = ctx.empty(B, self.heads, N)
        n_qblk = triton.cdiv(N, bm)
        _attn_bwd_q_kernel[(B * n_qblk, self.heads)](
            x, self.q_w, self.q_b if self.q_b is not None else x, self.kv, self.scale, g_o.contiguous(),
            o.contiguous(), lse.contiguous(), q, dd, dq, C, self.D, N, M, self.heads, n_qblk, BLOCK_M=bm,
            BLOCK_N=bn, num_warps=8, **self.k)
        n_kblk = triton.cdiv(M, bn)
        S, per_split = ctx.splits(n_qblk, B * n_kblk * self.heads)
        part = ctx.empty(S, B * M * 2 * C)
        _attn_bwd_kv_kernel[(B * n_kblk, self.heads, S)](
            q, self.kv, self.scale, g_o.contiguous(), lse.contiguous(), dd, part, C, self.D, N, M, B, self.heads,
            n_kblk, n_qblk, per_split, DP=self.DP, BLOCK_M=bm, BLOCK_N=bn, num_warps=8, **ctx.meta)
        dkv = part if S == 1 else _sum(part)
        gx = _linear(ctx, dq, B * N, C, self.q_w, C, 1, C, torch.empty_like(x))
        g_red = _linear(ctx, dkv, B * M, 2 * C, self.kv_w, C, 1, C, torch.empty_like(red))
        g_q_w, g_q_b = _wgrad(ctx, dq, x, B * N, C, C)
        g_kv_w, g_kv_b = _wgrad(ctx, dkv, red, B * M, 2 * C, C)
        return (gx, g_red, _cast(g_q_w, self.q_w, (C, C)), _cast(g_q_b, self.q_w),
                _cast(g_kv_w, self.kv_w, (2 * C, C)), _cast(g_kv_b, self.kv_w))


def attn_fwd(x, red, q_w, q_b, kv_w, kv_b, num_heads, scale):
    return _Attn(x, red, q_w, q_b, kv_w, kv_b, num_heads, scale).forward()


def attn_bwd(g_o, x, red, q_w, q_b, kv_w, kv_b, o, lse, num_heads, scale):
    return _Attn(x, red, q_w, q_b, kv_w, kv_b, num_heads, scale).backward(g_o, o, lse)
