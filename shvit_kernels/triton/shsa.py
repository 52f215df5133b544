"""Triton kernels: fused SHViT single-head self-attention (the backend interface of `shvit_kernels.ops.shsa`).

Sizes: dim C, pdim P, qk_dim Q, O = 2Q + P rows of qkv, N = H*W tokens. x, y, grad_y and grad_x are contiguous
NCHW seen as (B, C, N); every intermediate is a contiguous (B, rows, N) tensor in the activation dtype (z: qkv
before its bias/BN, o: attention output, go: its grad, ga = [dq; dk; dv]) or a small fp32/fp64 vector.

Eval forward at up to 64 tokens (S4's attention stages; ONE_KERNEL_TILE): 1 launch, _eval_kernel, grid (B, channel
  groups). Per sample: GroupNorm statistics (two passes over x1), q, k and the softmax numerator in registers; v and
  o in blocks of _EVAL_BLOCK_V rows, o through the program's own scratch rows (B*groups, P, N), read back after a
  barrier by the projection + bias [+ x]. Read x (x1 six times, from L1/L2 after the first), write y. Channel groups
  only when B alone gives fewer than _GPU_PROGRAMS programs; each recomputes the attention.
Forward otherwise (eval: 5 launches; training: 8). Per launch: grid, then bytes (one element = one activation):
  gn_stats  (B*token tiles, channel blocks)  read x1 (B*P*N) -> Welford partials; _welford -> per-sample mean/var
  qkv       (B*token tiles, row blocks)      read x1 once per block of 64 rows, GroupNorm applied in the load;
            write z (B*O*N). Training: per-(row, tile) Welford partials -> _welford -> BN batch mean/var, applied
            whenever q, k, v are loaded (z is never rewritten)
  attn_fwd  (B*query blocks)                 read q once, k and v once per query block: N/BLOCK_QUERIES *
            (Q+P)*N per sample; write o (B*P*N) and the row logsumexp (B*N fp32). All keys in one block
            (N <= SINGLE_PASS_MAX): plain softmax; otherwise online softmax over key blocks. The N x N scores live
            only as one [queries, keys] register tile.
  proj      (token tiles, row blocks)        y = W_proj @ relu(cat[o, x2]) [+ bias] [+ x]: the concat and ReLU
            happen in the operand load (o rows from o, the rest from x). Training: pre-BN values into y and
            Welford partials; _welford; bn_apply normalises y in place [+ x].
Backward (the op gets only the inputs): recompute gn stats, z, o and the logsumexp, then
  [training: proj in mode 2 -> z_y (B*C*N) and per-tile sums of g, g*zhat for the proj BN]
  wgrad     (row blocks, col blocks, token splits)  grad of W_proj (+ grad of its bias) as split-K partials
  proj_bwd  (token tiles, 1 + x2 blocks)    gu = W_proj^T @ gz with the ReLU mask; block 0 holds all P attention
            channels: go and D = rowsum(go*o); the others write grad_x2 [+ grad_y] into grad_x directly
  attn_bwd  (B*blocks, 2 roles)             FlashAttention-2: P recomputed per [queries, keys] tile from q, k and
            the logsumexp, dS = P * (dP - D). Role 0 owns a key block (dk, dv over all query blocks), role 1 a
            query block (dq over all key blocks): no atomics and no N x N buffer. Writes ga (B*O*N) and per-tile
            sums for the qkv bias / BN grads.
  wgrad     grad of W_qkv (GroupNorm output recomputed in the load)
  gn_bwd_dn (B*token tiles, P blocks)       gn = W_qkv^T @ gz into grad_x[:, :P]; sums for g_gn_w, g_gn_b and the
            per-sample GroupNorm sums;  gn_bwd_dx: grad_x1 in place [+ grad_y]
Where N % 16 == 0 (_Shape.flat), the projection's launches (proj, proj_bwd, the proj weight grad) tile the flattened
B*N tokens (_tile_tokens): a tile may span samples, so none is cut to N tokens (16 at S4's last stage). The others
tile each sample: the GroupNorm and the attention are per sample ("B*token tiles").
Deterministic: every cross-program reduction writes per-tile partials that _sum/_welford reduce in a fixed order.
Accumulation is fp32 (fp64 for fp64 inputs); dots take activation-dtype operands, and fp32/fp64 dots are IEEE
(no TF32) so that results match the float64 reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (_BLOCK_K, _BLOCK_R, _BN, _GEMM_WARPS, _GPU_PROGRAMS, _at, _bn_coef, _bn_grad, _cast, _mm, _p2,
                     _inv_std, _relu, _rstd, _Shape, _split_k, _store_wgrad, _sum, _tile_tokens, _welford,
                     _welford_partial)

# Attention blocking; module-level so that tests can shrink it to reach the multi-block paths with a small N.
BLOCK_QUERIES = 64  # queries per forward program
BLOCK_KEYS = 64  # keys per online-softmax step; also the block of both backward roles
SINGLE_PASS_MAX = 128  # all N keys (padded to a power of two) in one block up to this: plain softmax
_ATTN_TILE = 8192  # [tokens, P] register-tile cap (half in the backward, a quarter for fp32/fp64 there)
_FMA_BLOCK = 32  # attention block cap for fp32/fp64: IEEE dots run on FMA units, operands held in registers
ONE_KERNEL_TILE = 4096  # eval forward in one kernel (_eval_kernel) when its [tokens, tokens] scores fit (tests: 0)
_EVAL_BLOCK_V, _EVAL_BLOCK_C = 32, 64  # _eval_kernel's steps: rows of v / o, output channels of the projection
INTERP_EVAL_PROGRAMS = 1  # _eval_kernel programs wanted under the interpreter (tests raise it: channel groups)


# ---- device helpers ----------------------------------------------------------------------------------------

@triton.jit
def _rows(ptr, b, r, t, R, N):
    # [len(r), len(t)] pointers: rows r, tokens t of sample b of a contiguous (B, R, N) tensor; b is one sample or,
    # in a tile of flattened tokens (_tile_tokens), each token's. int64 from the sample index on: B*R*N may exceed
    # 2**31
    return ptr + tl.cast(b, tl.int64) * R * N + (r.to(tl.int64) * N)[:, None] + t[None, :]


@triton.jit
def _rows_t(ptr, b, r, t, R, N):
    # the same, transposed: [len(t), len(r)]
    return ptr + (_at(b, R, r) * N)[None, :] + t[:, None]


@triton.jit
def _load_act(z_ptr, b, r, rm, t, tm, R, N, scale, shift, NORM: tl.constexpr, TRANS: tl.constexpr,
              ACC: tl.constexpr):
    # Rows r x tokens t ([tokens, rows] when TRANS) of a (B, R, N) activation in ACC, 0 outside, with the
    # BN scale/shift of _bn_coef applied when NORM
    if TRANS:
        mask = tm[:, None] & rm[None, :]
        a = tl.load(_rows_t(z_ptr, b, r, t, R, N), mask=mask, other=0.0).to(ACC)
        if NORM:
            a = tl.where(mask, a * scale[None, :] + shift[None, :], 0.0)
    else:
        mask = rm[:, None] & tm[None, :]
        a = tl.load(_rows(z_ptr, b, r, t, R, N), mask=mask, other=0.0).to(ACC)
        if NORM:
            a = tl.where(mask, a * scale[:, None] + shift[:, None], 0.0)
    return a


@triton.jit
def _gn_tile(x_ptr, b, p, pm, t, tm, C, N, mean, rstd, gnw_ptr, gnb_ptr, ACC: tl.constexpr):
    # GroupNorm(1) output from sample b's (mean, rstd), rows p x tokens t, 0 outside (padding must not add gn_b to
    # the dots)
    mask = pm[:, None] & tm[None, :]
    x = tl.load(_rows(x_ptr, b, p, t, C, N), mask=mask, other=0.0).to(ACC)
    w = tl.load(gnw_ptr + p, mask=pm, other=0.0).to(ACC) * rstd
    shift = tl.load(gnb_ptr + p, mask=pm, other=0.0).to(ACC) - mean * w
    return tl.where(mask, x * w[:, None] + shift[:, None], 0.0)


@triton.jit
def _load_gn(x_ptr, b, p, pm, t, tm, C, N, gn_mean_ptr, gn_var_ptr, gnw_ptr, gnb_ptr, gn_eps, ACC: tl.constexpr):
    # _gn_tile with the statistics read from the per-sample mean / var vectors
    return _gn_tile(x_ptr, b, p, pm, t, tm, C, N, tl.load(gn_mean_ptr + b), _inv_std(tl.load(gn_var_ptr + b), gn_eps),
                    gnw_ptr, gnb_ptr, ACC)


@triton.jit
def _xhat(x_ptr, b, p, t, mask, C, N, gn_mean_ptr, gn_var_ptr, gn_eps, ACC: tl.constexpr):
    x = tl.load(_rows(x_ptr, b, p, t, C, N), mask=mask, other=0.0).to(ACC)
    rstd = _inv_std(tl.load(gn_var_ptr + b), gn_eps)
    return tl.where(mask, (x - tl.load(gn_mean_ptr + b)) * rstd, 0.0)


@triton.jit
def _load_u(o_ptr, x_ptr, b, j, t, tm, C, P, N):
    # relu(cat[o, x2]) rows j: attention rows from o, the others from x; the concat is never materialised
    from_o = (j < P)[:, None] & tm[None, :]
    from_x = ((j >= P) & (j < C))[:, None] & tm[None, :]
    return _relu(tl.load(_rows(o_ptr, b, j, t, P, N), mask=from_o, other=0.0)
                 + tl.load(_rows(x_ptr, b, j, t, C, N), mask=from_x, other=0.0))


@triton.jit
def _wtile(w_ptr, r, rm, k, km, sr, sk):
    # [len(r), len(k)] tile of a weight matrix with strides (sr, sk), 0 outside
    return tl.load(w_ptr + r[:, None] * sr + k[None, :] * sk, mask=rm[:, None] & km[None, :], other=0.0)


@triton.jit
def _proj_tile(o_ptr, x_ptr, w_ptr, swc, swj, b, c, cm, t, tm, C, P, N, ACC: tl.constexpr, DOT: tl.constexpr,
               BLOCK_K: tl.constexpr):
    # W_proj[c] relu(cat[o, x2])[:, t], [len(c), len(t)] in ACC
    acc = tl.zeros([c.shape[0], t.shape[0]], ACC)
    for k0 in range(0, C, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        acc = _mm(_wtile(w_ptr, c, cm, j, j < C, swc, swj).to(DOT), _load_u(o_ptr, x_ptr, b, j, t, tm, C, P, N).to(DOT),
                  acc, ACC)
    return acc


@triton.jit
def _store_eval(y_ptr, x_ptr, bias_ptr, acc, b, c, cm, t, tm, C, N, RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    # y = acc + bias [+ x], the eval projection's epilogue
    mask = cm[:, None] & tm[None, :]
    acc += tl.load(bias_ptr + c, mask=cm, other=0.0).to(ACC)[:, None]
    if RESIDUAL:
        acc += tl.load(_rows(x_ptr, b, c, t, C, N), mask=mask, other=0.0).to(ACC)
    tl.store(_rows(y_ptr, b, c, t, C, N), acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_grad(g_ptr, z_ptr, b, r, rm, t, tm, R, N, mean_ptr, var_ptr, w_ptr, sums_ptr, eps, count,
               NORM: tl.constexpr, ACC: tl.constexpr):
    # Grad w.r.t. the input z of a bias (eval: g itself) or of a training BN, from the grad g of its output:
    # gz = w * rstd * (g - mean(g) - zhat * mean(g * zhat)); sums_ptr holds [sum g | sum g * zhat] over (B, N).
    mask = rm[:, None] & tm[None, :]
    g = tl.load(_rows(g_ptr, b, r, t, R, N), mask=mask, other=0.0).to(ACC)
    if NORM:
        z = tl.load(_rows(z_ptr, b, r, t, R, N), mask=mask, other=0.0).to(ACC)
        g = _bn_grad(g, z, mean_ptr, var_ptr, w_ptr, sums_ptr, eps, count, r, rm, mask, R, ACC)
    return g


# ---- forward ---------------------------------------------------------------------------------------------

@triton.jit
def _gn_stats_kernel(x_ptr, part_ptr, C, P, N, n_tblk, B, S, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    # (mean, M2, count) of one [channels, tokens] tile of x1 at [., s, b] of the (3, S, B) partials
    bt = tl.program_id(0)
    cb = tl.program_id(1)
    b = bt // n_tblk
    tb = bt % n_tblk
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (c < P)[:, None] & (t < N)[None, :]
    v = tl.load(_rows(x_ptr, b, c, t, C, N), mask=mask, other=0.0).to(ACC)
    n = (tl.minimum(P - cb * BLOCK_C, BLOCK_C) * tl.minimum(N - tb * BLOCK_T, BLOCK_T)).to(ACC)
    mean = tl.sum(tl.sum(v, axis=1), axis=0) / n
    d = tl.where(mask, v - mean, 0.0)
    off = _at(cb * n_tblk + tb, B, b)
    plane = _at(S, B, 0)
    tl.store(part_ptr + off, mean)
    tl.store(part_ptr + plane + off, tl.sum(tl.sum(d * d, axis=1), axis=0))
    tl.store(part_ptr + 2 * plane + off, n)


@triton.jit
def _qkv_kernel(x_ptr, gn_mean_ptr, gn_var_ptr, gnw_ptr, gnb_ptr, gn_eps: tl.float64, w_ptr, swo, swp, bias_ptr, z_ptr,
                part_ptr, C, P, O, N, n_tblk, S,
                BIAS: tl.constexpr, STATS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # z = W_qkv @ gn(x1) [+ bias (eval)] for BLOCK_O rows x BLOCK_T tokens [+ Welford partials of z (training)]
    bt = tl.program_id(0)
    b = bt // n_tblk
    tb = bt % n_tblk
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    om = o < O
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N
    acc = tl.zeros([BLOCK_O, BLOCK_T], ACC)
    for k0 in range(0, P, BLOCK_K):
        p = k0 + tl.arange(0, BLOCK_K)
        pm = p < P
        n = _load_gn(x_ptr, b, p, pm, t, tm, C, N, gn_mean_ptr, gn_var_ptr, gnw_ptr, gnb_ptr, gn_eps, ACC)
        w = tl.load(w_ptr + o[:, None] * swo + p[None, :] * swp, mask=om[:, None] & pm[None, :], other=0.0)
        acc = _mm(w.to(DOT), n.to(DOT), acc, ACC)
    mask = om[:, None] & tm[None, :]
    if STATS:  # padded tokens hold 0 (the GroupNorm output is 0 there)
        _welford_partial(part_ptr, bt, S, O, o, om, acc, mask, tl.minimum(N - tb * BLOCK_T, BLOCK_T).to(ACC))
    if BIAS:
        acc += tl.load(bias_ptr + o, mask=om, other=0.0).to(ACC)[:, None]
    tl.store(_rows(z_ptr, b, o, t, O, N), acc.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_fwd_kernel(z_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps: tl.float64, o_ptr, lse_ptr, Q, P, O, N, n_mblk,
                     NORM: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                     QP: tl.constexpr, PP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # BLOCK_M queries of one sample against all N keys: o = softmax(q^T k / sqrt(Q)) v^T and the row logsumexp
    pid = tl.program_id(0)
    b = pid // n_mblk
    i = (pid % n_mblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    im = i < N
    cq = tl.arange(0, QP)
    cqm = cq < Q
    cv = tl.arange(0, PP)
    cvm = cv < P
    scale = 1.0 / tl.sqrt(tl.cast(Q, ACC))  # in ACC: a float argument would be rounded to fp32
    q_s, q_h = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, cq, cqm, NORM, ACC)
    k_s, k_h = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, Q + cq, cqm, NORM, ACC)
    v_s, v_h = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, 2 * Q + cv, cvm, NORM, ACC)
    q_t = _load_act(z_ptr, b, cq, cqm, i, im, O, N, q_s, q_h, NORM, True, ACC).to(DOT)
    if SINGLE:  # every key in one block: plain softmax
        j = tl.arange(0, BLOCK_N)
        jm = j < N
        k = _load_act(z_ptr, b, Q + cq, cqm, j, jm, O, N, k_s, k_h, NORM, False, ACC)
        s = tl.where(jm[None, :], _mm(q_t, k.to(DOT), None, ACC) * scale, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        den = tl.sum(p, axis=1)
        v_t = _load_act(z_ptr, b, 2 * Q + cv, cvm, j, jm, O, N, v_s, v_h, NORM, True, ACC)
        acc = _mm(p.to(DOT), v_t.to(DOT), None, ACC)
    else:  # online softmax over key blocks
        m = tl.full([BLOCK_M], float("-inf"), ACC)
        den = tl.zeros([BLOCK_M], ACC)
        acc = tl.zeros([BLOCK_M, PP], ACC)
        for j0 in range(0, N, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            jm = j < N
            k = _load_act(z_ptr, b, Q + cq, cqm, j, jm, O, N, k_s, k_h, NORM, False, ACC)
            s = tl.where(jm[None, :], _mm(q_t, k.to(DOT), None, ACC) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block has a valid key
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            den = den * alpha + tl.sum(p, axis=1)
            v_t = _load_act(z_ptr, b, 2 * Q + cv, cvm, j, jm, O, N, v_s, v_h, NORM, True, ACC)
            acc = _mm(p.to(DOT), v_t.to(DOT), acc * alpha[:, None], ACC)
            m = m_new
    o = acc / den[:, None]
    tl.store(_rows_t(o_ptr, b, cv, i, P, N), o.to(o_ptr.dtype.element_ty), mask=im[:, None] & cvm[None, :])
    tl.store(lse_ptr + b.to(tl.int64) * N + i, m + tl.log(den), mask=im)


@triton.jit
def _proj_kernel(o_ptr, x_ptr, w_ptr, swc, swj, bias_ptr, y_ptr, part_ptr, g_ptr, mean_ptr, var_ptr, eps: tl.float64,
                 C, P, N, BN, n_tblk, S,
                 MODE: tl.constexpr, RESIDUAL: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # z = W_proj @ relu(cat[o, x2]) for BLOCK_C rows x BLOCK_T tokens (FLAT: of the flattened B*N, a tile may span
    # samples). MODE 0 (eval): y = z + bias [+ x]; 1 (training forward): y = z and Welford partials; 2 (training
    # backward): y = z and per-tile sums of g and g * zhat (g = grad_y) for the BN backward.
    bt = tl.program_id(0)
    b, t, tm = _tile_tokens(bt, N, BN, n_tblk, FLAT, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    acc = _proj_tile(o_ptr, x_ptr, w_ptr, swc, swj, b, c, cm, t, tm, C, P, N, ACC, DOT, BLOCK_K)
    mask = cm[:, None] & tm[None, :]
    if MODE == 0:
        _store_eval(y_ptr, x_ptr, bias_ptr, acc, b, c, cm, t, tm, C, N, RESIDUAL, ACC)
    elif MODE == 1:
        _welford_partial(part_ptr, bt, S, C, c, cm, acc, mask, tl.sum(tm.to(ACC), axis=0))
    else:
        g = tl.load(_rows(g_ptr, b, c, t, C, N), mask=mask, other=0.0).to(ACC)
        zhat = tl.where(mask, (acc - tl.load(mean_ptr + c, mask=cm, other=0.0)[:, None])
                        * _rstd(var_ptr, c, cm, eps)[:, None], 0.0)
        tl.store(part_ptr + _at(bt, 2 * C, c), tl.sum(g, axis=1), mask=cm)
        tl.store(part_ptr + _at(bt, 2 * C, C + c), tl.sum(g * zhat, axis=1), mask=cm)
    if MODE != 0:
        tl.store(_rows(y_ptr, b, c, t, C, N), acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_apply_kernel(y_ptr, x_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps: tl.float64, C, N, n_tblk,
                     RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # y = BN(z) [+ x] in place over the pre-BN values the proj kernel left in y
    bt = tl.program_id(0)
    b = bt // n_tblk
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t = (bt % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N
    scale, shift = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, c, cm, True, ACC)
    y = _load_act(y_ptr, b, c, cm, t, tm, C, N, scale, shift, True, False, ACC)
    mask = cm[:, None] & tm[None, :]
    if RESIDUAL:
        y += tl.load(_rows(x_ptr, b, c, t, C, N), mask=mask, other=0.0).to(ACC)
    tl.store(_rows(y_ptr, b, c, t, C, N), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _eval_kernel(x_ptr, gnw_ptr, gnb_ptr, gn_eps: tl.float64, qkv_w_ptr, swo, swp, qkv_b_ptr, proj_w_ptr, swc, swj,
                 proj_b_ptr, o_ptr, y_ptr, C, P, Q, N, c_per_prog,
                 RESIDUAL: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, QP: tl.constexpr, NP: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # The whole eval forward of sample b for output channels [c_lo, c_lo + c_per_prog): GroupNorm statistics, q, k
    # and the softmax stay in registers; o goes through this program's own scratch rows (L1/L2), read back by the
    # projection after a barrier. HBM traffic: x read, y written (+ o's scratch if evicted).
    b = tl.program_id(0)
    g = tl.program_id(1)
    t = tl.arange(0, NP)
    tm = t < N
    # GroupNorm(1) statistics of x1 in two passes (exact; the second pass reads the sample from L1)
    count = tl.cast(P, ACC) * N
    sx = tl.zeros([BLOCK_K, NP], ACC)
    for k0 in range(0, P, BLOCK_K):
        p = k0 + tl.arange(0, BLOCK_K)
        sx += tl.load(_rows(x_ptr, b, p, t, C, N), mask=(p < P)[:, None] & tm[None, :], other=0.0).to(ACC)
    mean = tl.sum(tl.sum(sx, axis=1), axis=0) / count
    sd = tl.zeros([BLOCK_K, NP], ACC)
    for k0 in range(0, P, BLOCK_K):
        p = k0 + tl.arange(0, BLOCK_K)
        mask = (p < P)[:, None] & tm[None, :]
        d = tl.where(mask, tl.load(_rows(x_ptr, b, p, t, C, N), mask=mask, other=0.0).to(ACC) - mean, 0.0)
        sd += d * d
    rstd = _inv_std(tl.sum(tl.sum(sd, axis=1), axis=0) / count, gn_eps)
    # q, k = W_qkv[:2Q] gn(x1) + b, rounded to the activation dtype as the stock module stores them (rows past Q are
    # 0: masked weights and bias add nothing to the dot); then the softmax numerator e over every key at once
    cq = tl.arange(0, QP)
    cqm = cq < Q
    q = tl.zeros([QP, NP], ACC)
    k = tl.zeros([QP, NP], ACC)
    for k0 in range(0, P, BLOCK_K):
        p = k0 + tl.arange(0, BLOCK_K)
        pm = p < P
        n = _gn_tile(x_ptr, b, p, pm, t, tm, C, N, mean, rstd, gnw_ptr, gnb_ptr, ACC).to(DOT)
        q = _mm(_wtile(qkv_w_ptr, cq, cqm, p, pm, swo, swp).to(DOT), n, q, ACC)
        k = _mm(_wtile(qkv_w_ptr, Q + cq, cqm, p, pm, swo, swp).to(DOT), n, k, ACC)
    q = (q + tl.load(qkv_b_ptr + cq, mask=cqm, other=0.0).to(ACC)[:, None]).to(DOT)
    k = (k + tl.load(qkv_b_ptr + Q + cq, mask=cqm, other=0.0).to(ACC)[:, None]).to(DOT)
    s = tl.where(tm[None, :], _mm(tl.trans(q), k, None, ACC) * (1.0 / tl.sqrt(tl.cast(Q, ACC))), float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])  # [queries, keys]
    den = tl.sum(e, axis=1)
    e = tl.trans(e.to(DOT))
    # o = v softmax^T in blocks of BLOCK_V rows of v = W_qkv[2Q:] gn(x1) + b, into the scratch rows of (b, g) (a
    # (B * groups, P, N) buffer: no two programs write the same rows; o_ptr is offset so that _rows' sample b lands
    # on row block b * groups + g)
    o_ptr += _at(b.to(tl.int64) * (tl.num_programs(1) - 1) + g, P * N, 0)
    for v0 in range(0, P, BLOCK_V):
        r = v0 + tl.arange(0, BLOCK_V)
        rm = r < P
        v = tl.zeros([BLOCK_V, NP], ACC)
        for k0 in range(0, P, BLOCK_K):
            p = k0 + tl.arange(0, BLOCK_K)
            pm = p < P
            n = _gn_tile(x_ptr, b, p, pm, t, tm, C, N, mean, rstd, gnw_ptr, gnb_ptr, ACC).to(DOT)
            v = _mm(_wtile(qkv_w_ptr, 2 * Q + r, rm, p, pm, swo, swp).to(DOT), n, v, ACC)
        v = (v + tl.load(qkv_b_ptr + 2 * Q + r, mask=rm, other=0.0).to(ACC)[:, None]).to(DOT)
        o = _mm(v, e, None, ACC) / den[None, :]
        tl.store(_rows(o_ptr, b, r, t, P, N), o.to(o_ptr.dtype.element_ty), mask=rm[:, None] & tm[None, :])
    tl.debug_barrier()  # o's rows, stored by other threads of this program, are read below
    # y = W_proj relu(cat[o, x2]) + b [+ x] for this program's output channels
    c_lo = g * c_per_prog
    for c0 in range(c_lo, tl.minimum(c_lo + c_per_prog, C), BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = _proj_tile(o_ptr, x_ptr, proj_w_ptr, swc, swj, b, c, cm, t, tm, C, P, N, ACC, DOT, BLOCK_K)
        _store_eval(y_ptr, x_ptr, proj_b_ptr, acc, b, c, cm, t, tm, C, N, RESIDUAL, ACC)


# ---- backward --------------------------------------------------------------------------------------------

@triton.jit
def _wgrad_kernel(g_ptr, z_ptr, mean_ptr, var_ptr, bnw_ptr, sums_ptr, eps: tl.float64, count,
                  a_ptr, x_ptr, gn_mean_ptr, gn_var_ptr, gnw_ptr, gnb_ptr, gn_eps: tl.float64,
                  part_ptr, rowsum_ptr, R, K, C, P, N, BN, n_tblk, n_tiles, per_split,
                  NORM: tl.constexpr, RIGHT_U: tl.constexpr, ROWSUM: tl.constexpr, FLAT: tl.constexpr,
                  ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # Split-K weight grad: the partial over this split's token tiles of sum_{b,n} gz[b, r, n] * in[b, k, n],
    # with gz from _load_grad and in = relu(cat[o, x2]) (RIGHT_U, proj) or the GroupNorm output (qkv).
    # ROWSUM: also the partial sums of gz (the eval bias grad), from the programs of column block 0.
    # FLAT (proj only: qkv's tiles hold one sample, for its GroupNorm statistics): tiles of the flattened B*N
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    kb = tl.program_id(1)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < K
    sp = tl.program_id(2)
    tl.static_assert(RIGHT_U or not FLAT, "the GroupNorm operand tiles one sample")
    acc = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    rs = tl.zeros([BLOCK_R], ACC)
    for tile in range(sp * per_split, tl.minimum(sp * per_split + per_split, n_tiles)):
        b, t, tm = _tile_tokens(tile, N, BN, n_tblk, FLAT, BLOCK_T)
        g = _load_grad(g_ptr, z_ptr, b, r, rm, t, tm, R, N, mean_ptr, var_ptr, bnw_ptr, sums_ptr, eps, count, NORM,
                       ACC)
        if RIGHT_U:
            a = _load_u(a_ptr, x_ptr, b, k, t, tm, C, P, N)
        else:
            a = _load_gn(x_ptr, b, k, km, t, tm, C, N, gn_mean_ptr, gn_var_ptr, gnw_ptr, gnb_ptr, gn_eps, ACC)
        acc = _mm(g.to(DOT), tl.trans(a.to(DOT)), acc, ACC)
        if ROWSUM:
            rs += tl.sum(g, axis=1)
    _store_wgrad(part_ptr, rowsum_ptr, acc, rs, sp, r, rm, k, km, R, K, ROWSUM)


@triton.jit
def _proj_bwd_kernel(gy_ptr, zy_ptr, mean_ptr, var_ptr, bnw_ptr, sums_ptr, eps: tl.float64, count,
                     w_ptr, swc, swj, o_ptr, x_ptr, go_ptr, d_ptr, gx_ptr, C, P, N, BN, n_tblk,
                     NORM: tl.constexpr, RESIDUAL: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr,
                     DOT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # gu = W_proj^T @ gz, masked by relu'(u). Row block 0 holds all P attention channels so that it can finish
    # D = rowsum(go * o) for its tokens; blocks 1.. cover the pass-through channels of grad_x. FLAT: tiles of the
    # flattened B*N tokens.
    jb = tl.program_id(1)
    b, t, tm = _tile_tokens(tl.program_id(0), N, BN, n_tblk, FLAT, BLOCK_T)
    j = tl.where(jb == 0, 0, P + (jb - 1) * BLOCK_J) + tl.arange(0, BLOCK_J)
    jm = j < tl.where(jb == 0, P, C)
    acc = tl.zeros([BLOCK_J, BLOCK_T], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        w_t = tl.load(w_ptr + c[None, :] * swc + j[:, None] * swj, mask=jm[:, None] & cm[None, :], other=0.0)
        g = _load_grad(gy_ptr, zy_ptr, b, c, cm, t, tm, C, N, mean_ptr, var_ptr, bnw_ptr, sums_ptr, eps, count,
                       NORM, ACC)
        acc = _mm(w_t.to(DOT), g.to(DOT), acc, ACC)
    mask = jm[:, None] & tm[None, :]
    if jb == 0:
        o = tl.load(_rows(o_ptr, b, j, t, P, N), mask=mask, other=0.0).to(ACC)
        # D from go as stored: the attention backward's dP uses that go, and rowsum(dS) = 0 needs the same one
        go = tl.where(o > 0, acc, 0.0).to(go_ptr.dtype.element_ty)
        tl.store(_rows(go_ptr, b, j, t, P, N), go, mask=mask)
        tl.store(d_ptr + b.to(tl.int64) * N + t, tl.sum(go.to(ACC) * o, axis=0), mask=tm)
    else:
        xv = tl.load(_rows(x_ptr, b, j, t, C, N), mask=mask, other=0.0)
        gx = tl.where(xv > 0, acc, 0.0)
        if RESIDUAL:
            gx += tl.load(_rows(gy_ptr, b, j, t, C, N), mask=mask, other=0.0).to(ACC)
        tl.store(_rows(gx_ptr, b, j, t, C, N), gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _p_ds(q_t, k, go_t, v, lse, dd, im, jm, scale, ACC: tl.constexpr):
    # One [queries, keys] tile: P = exp(s - lse) (0 outside the valid block) and dS = P * (dP - D)
    s = tl.where(im[:, None] & jm[None, :], _mm(q_t, k, None, ACC) * scale, float("-inf"))
    p = tl.exp(s - lse[:, None])
    return p, p * (_mm(go_t, v, None, ACC) - dd[:, None])


@triton.jit
def _store_ga(ga_ptr, part_ptr, g, z_ptr, b, r, rm, t, tm, O, N, s, W2, mean_ptr, var_ptr, eps,
              NORM: tl.constexpr, ACC: tl.constexpr):
    # rows r of ga and this tile's sums: g (qkv bias / BN-bias grad) and, training, g * zhat (BN-weight grad)
    mask = rm[:, None] & tm[None, :]
    tl.store(_rows(ga_ptr, b, r, t, O, N), g.to(ga_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + _at(s, W2, r), tl.sum(g, axis=1), mask=rm)
    if NORM:
        zhat = (tl.load(_rows(z_ptr, b, r, t, O, N), mask=mask, other=0.0).to(ACC)
                - tl.load(mean_ptr + r, mask=rm, other=0.0)[:, None]) * _rstd(var_ptr, r, rm, eps)[:, None]
        tl.store(part_ptr + _at(s, W2, O + r), tl.sum(tl.where(mask, g * zhat, 0.0), axis=1), mask=rm)


@triton.jit
def _attn_bwd_kernel(z_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps: tl.float64, go_ptr, d_ptr, lse_ptr, ga_ptr,
                     part_ptr, Q, P, O, N, n_blk, W2,
                     NORM: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                     QP: tl.constexpr, PP: tl.constexpr, BLOCK: tl.constexpr):
    # One block of BLOCK tokens of one sample, as keys (program_id(1) == 0) or as queries (== 1)
    pid = tl.program_id(0)
    b = pid // n_blk
    r = (pid % n_blk) * BLOCK + tl.arange(0, BLOCK)
    rm = r < N
    cq = tl.arange(0, QP)
    cqm = cq < Q
    cv = tl.arange(0, PP)
    cvm = cv < P
    scale = 1.0 / tl.sqrt(tl.cast(Q, ACC))
    row = b.to(tl.int64) * N
    q_s, q_h = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, cq, cqm, NORM, ACC)
    k_s, k_h = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, Q + cq, cqm, NORM, ACC)
    v_s, v_h = _bn_coef(mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, 2 * Q + cv, cvm, NORM, ACC)
    if tl.program_id(1) == 0:  # role 0: keys r; dk and dv summed over every query block
        k = _load_act(z_ptr, b, Q + cq, cqm, r, rm, O, N, k_s, k_h, NORM, False, ACC).to(DOT)
        v = _load_act(z_ptr, b, 2 * Q + cv, cvm, r, rm, O, N, v_s, v_h, NORM, False, ACC).to(DOT)
        dk = tl.zeros([QP, BLOCK], ACC)
        dv = tl.zeros([PP, BLOCK], ACC)
        for i0 in range(0, N, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            im = i < N
            q_t = _load_act(z_ptr, b, cq, cqm, i, im, O, N, q_s, q_h, NORM, True, ACC).to(DOT)
            go_t = tl.load(_rows_t(go_ptr, b, cv, i, P, N), mask=im[:, None] & cvm[None, :], other=0.0).to(DOT)
            p, ds = _p_ds(q_t, k, go_t, v, tl.load(lse_ptr + row + i, mask=im, other=0.0),
                          tl.load(d_ptr + row + i, mask=im, other=0.0), im, rm, scale, ACC)
            dv = _mm(tl.trans(go_t), p.to(DOT), dv, ACC)
            dk = _mm(tl.trans(q_t), ds.to(DOT), dk, ACC)
        _store_ga(ga_ptr, part_ptr, dk * scale, z_ptr, b, Q + cq, cqm, r, rm, O, N, pid, W2, mean_ptr, var_ptr,
                  eps, NORM, ACC)
        _store_ga(ga_ptr, part_ptr, dv, z_ptr, b, 2 * Q + cv, cvm, r, rm, O, N, pid, W2, mean_ptr, var_ptr, eps,
                  NORM, ACC)
    else:  # role 1: queries r; dq summed over every key block
        q_t = _load_act(z_ptr, b, cq, cqm, r, rm, O, N, q_s, q_h, NORM, True, ACC).to(DOT)
        go_t = tl.load(_rows_t(go_ptr, b, cv, r, P, N), mask=rm[:, None] & cvm[None, :], other=0.0).to(DOT)
        lse = tl.load(lse_ptr + row + r, mask=rm, other=0.0)
        dd = tl.load(d_ptr + row + r, mask=rm, other=0.0)
        dq_t = tl.zeros([BLOCK, QP], ACC)
        for j0 in range(0, N, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            jm = j < N
            k = _load_act(z_ptr, b, Q + cq, cqm, j, jm, O, N, k_s, k_h, NORM, False, ACC).to(DOT)
            v = _load_act(z_ptr, b, 2 * Q + cv, cvm, j, jm, O, N, v_s, v_h, NORM, False, ACC).to(DOT)
            p, ds = _p_ds(q_t, k, go_t, v, lse, dd, rm, jm, scale, ACC)
            dq_t = _mm(ds.to(DOT), tl.trans(k), dq_t, ACC)
        _store_ga(ga_ptr, part_ptr, tl.trans(dq_t) * scale, z_ptr, b, cq, cqm, r, rm, O, N, pid, W2, mean_ptr,
                  var_ptr, eps, NORM, ACC)


@triton.jit
def _gn_bwd_dn_kernel(ga_ptr, z_ptr, mean_ptr, var_ptr, bnw_ptr, sums_ptr, eps: tl.float64, count, w_ptr, swo, swp,
                      x_ptr, gn_mean_ptr, gn_var_ptr, gnw_ptr, gn_eps: tl.float64, gx_ptr, part_ptr, spart_ptr,
                      C, P, O, N, n_tblk, n_pblk, B,
                      NORM: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr):
    # gn = W_qkv^T @ gz (grad of the GroupNorm output), parked in grad_x[:, :P]; per-tile sums of gn and
    # gn * xhat (g_gn_b, g_gn_w) and, per sample, of gxhat = gn * gn_w and gxhat * xhat (GroupNorm backward)
    bt = tl.program_id(0)
    pb = tl.program_id(1)
    b = bt // n_tblk
    tb = bt % n_tblk
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N
    acc = tl.zeros([BLOCK_P, BLOCK_T], ACC)
    for o0 in range(0, O, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        om = o < O
        w_t = tl.load(w_ptr + o[None, :] * swo + p[:, None] * swp, mask=pm[:, None] & om[None, :], other=0.0)
        g = _load_grad(ga_ptr, z_ptr, b, o, om, t, tm, O, N, mean_ptr, var_ptr, bnw_ptr, sums_ptr, eps, count, NORM,
                       ACC)
        acc = _mm(w_t.to(DOT), g.to(DOT), acc, ACC)
    mask = pm[:, None] & tm[None, :]
    tl.store(_rows(gx_ptr, b, p, t, C, N), acc.to(gx_ptr.dtype.element_ty), mask=mask)
    xhat = _xhat(x_ptr, b, p, t, mask, C, N, gn_mean_ptr, gn_var_ptr, gn_eps, ACC)
    gx = acc * xhat
    tl.store(part_ptr + _at(bt, 2 * P, p), tl.sum(acc, axis=1), mask=pm)
    tl.store(part_ptr + _at(bt, 2 * P, P + p), tl.sum(gx, axis=1), mask=pm)
    gw = tl.load(gnw_ptr + p, mask=pm, other=0.0).to(ACC)
    s2 = tb * n_pblk + pb
    tl.store(spart_ptr + _at(s2, 2 * B, b), tl.sum(tl.sum(acc, axis=1) * gw, axis=0))
    tl.store(spart_ptr + _at(s2, 2 * B, B + b), tl.sum(tl.sum(gx, axis=1) * gw, axis=0))


@triton.jit
def _gn_bwd_dx_kernel(gx_ptr, x_ptr, gy_ptr, gn_mean_ptr, gn_var_ptr, gnw_ptr, gn_eps: tl.float64, ssum_ptr, C, P, N,
                      n_tblk, B,
                      RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    # grad_x1 = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat)) [+ grad_y], over gn left in grad_x
    bt = tl.program_id(0)
    b = bt // n_tblk
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    t = (bt % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = pm[:, None] & (t < N)[None, :]
    gxhat = tl.load(_rows(gx_ptr, b, p, t, C, N), mask=mask, other=0.0).to(ACC) \
        * tl.load(gnw_ptr + p, mask=pm, other=0.0).to(ACC)[:, None]
    xhat = _xhat(x_ptr, b, p, t, mask, C, N, gn_mean_ptr, gn_var_ptr, gn_eps, ACC)
    count = tl.cast(P, ACC) * N  # P * N values per sample, counted in ACC (no int32 product)
    m1 = tl.load(ssum_ptr + b) / count
    m2 = tl.load(ssum_ptr + B + b) / count
    gx = (gxhat - m1 - xhat * m2) * _inv_std(tl.load(gn_var_ptr + b), gn_eps)
    if RESIDUAL:
        gx += tl.load(_rows(gy_ptr, b, p, t, C, N), mask=mask, other=0.0).to(ACC)
    tl.store(_rows(gx_ptr, b, p, t, C, N), gx.to(gx_ptr.dtype.element_ty), mask=mask)


# ---- host side -------------------------------------------------------------------------------------------

class _Sizes(_Shape):
    def __init__(self, x: torch.Tensor, gn_w: torch.Tensor, qk_dim: int):
        super().__init__(x)
        self.P, self.Q = gn_w.shape[0], qk_dim
        self.O = 2 * qk_dim + self.P
        self.QP, self.PP = _p2(self.Q), _p2(self.P)


def _attn_blocks(sz: _Sizes) -> tuple[int, int, int]:
    """(query block, key block, block of the backward), sized so that the kernels' register tiles fit (per
    sm_90 ptxas: fewer spills) and never wider than the padded N."""
    cap, cap_bwd = max(16, _ATTN_TILE // sz.PP), max(16, _ATTN_TILE // (2 * sz.PP))
    if sz.fma:
        cap, cap_bwd = min(cap, _FMA_BLOCK), max(16, min(cap_bwd // 2, _FMA_BLOCK))
    n = _p2(sz.N)
    keys = n if n <= min(SINGLE_PASS_MAX, cap) else min(BLOCK_KEYS, cap)
    return min(BLOCK_QUERIES, cap, n), keys, min(BLOCK_KEYS, cap_bwd, n)


class _Front:
    """The forward up to the attention, shared by all four entry points (the backward gets only the inputs):
    GroupNorm stats, z = W_qkv gn(x1) [+ bias], the qkv BN (given stats, or batch stats when qkv_bn_stats is
    None in training), o and the row logsumexp. For the backward, o stays in the accumulation dtype: its
    rounding would show in D = rowsum(go * o), whose consistency with dP makes the rows of dS sum to 0."""

    def __init__(self, x, gn_w, gn_b, gn_eps, qkv_w, qk_dim, qkv_b=None, qkv_bn=None, qkv_bn_stats=None,
                 backward=False):
        self.x = x = x.contiguous()
        self.sz = sz = _Sizes(x, gn_w, qk_dim)
        self.gn_w, self.gn_b, self.gn_eps = gn_w.contiguous(), gn_b.contiguous(), gn_eps
        self.qkv_w = qkv_w
        block_s, block_t, n_tblk = sz.ew_blocks(sz.P)
        S = n_tblk * triton.cdiv(sz.P, block_s)
        part = sz.empty(3, S, sz.B)
        _gn_stats_kernel[(sz.B * n_tblk, triton.cdiv(sz.P, block_s))](
            x, part, sz.C, sz.P, sz.N, n_tblk, sz.B, S, ACC=sz.meta["ACC"], BLOCK_C=block_s, BLOCK_T=block_t,
            num_warps=4)
        self.gn = _welford(part)

        batch_stats = qkv_bn is not None and qkv_bn_stats is None
        self.z = z = torch.empty(sz.B, sz.O, sz.N, dtype=x.dtype, device=x.device)
        block_o = min(_BLOCK_R, _p2(sz.O))
        part = sz.empty(3, sz.B * sz.n_tblk, sz.O) if batch_stats else z
        bias = qkv_b.contiguous() if qkv_b is not None else z
        _qkv_kernel[(sz.B * sz.n_tblk, triton.cdiv(sz.O, block_o))](
            x, *self.gn, self.gn_w, self.gn_b, gn_eps, qkv_w, *qkv_w.stride(), bias, z, part, sz.C, sz.P, sz.O, sz.N,
            sz.n_tblk, sz.B * sz.n_tblk, BIAS=qkv_b is not None, STATS=batch_stats, BLOCK_O=block_o, BLOCK_K=_BLOCK_K,
            BLOCK_T=sz.block_t, num_warps=_GEMM_WARPS, **sz.meta)
        self.bn = None
        if qkv_bn is not None:
            mean, var = _welford(part) if batch_stats else qkv_bn_stats
            self.bn = _BN(mean, var, *qkv_bn, sz.acc)

        block_m, block_n, _ = _attn_blocks(sz)
        self.o = torch.empty(sz.B, sz.P, sz.N, dtype=sz.acc if backward else x.dtype, device=x.device)
        self.lse = sz.empty(sz.B, sz.N)
        n_mblk = triton.cdiv(sz.N, block_m)
        _attn_fwd_kernel[(sz.B * n_mblk,)](
            z, *_BN.fwd_args(self.bn, z), self.o, self.lse, sz.Q, sz.P, sz.O, sz.N, n_mblk, NORM=self.bn is not None,
            SINGLE=block_n >= sz.N, QP=sz.QP, PP=sz.PP, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=8 if sz.fma or block_m * max(block_n, sz.PP) >= 4096 else 4, **sz.meta)

    def proj(self, proj_w, out, mode, residual=False, bias=None, g=None, bn=None):
        """Launch _proj_kernel (see there for the modes) writing into out; returns its partials (modes 1, 2)."""
        sz = self.sz
        block_c = min(_BLOCK_R, _p2(sz.C))
        block_t, n_tblk, S = sz.tiles(sz.flat)
        part = out if mode == 0 else sz.empty(3, S, sz.C) if mode == 1 else sz.empty(S, 2 * sz.C)
        mean, var, eps = (bn.mean, bn.var, bn.eps) if bn is not None else (out, out, 0.0)
        _proj_kernel[(S, triton.cdiv(sz.C, block_c))](
            self.o, self.x, proj_w, *proj_w.stride(), bias.contiguous() if bias is not None else out, out, part,
            g if g is not None else out, mean, var, eps, sz.C, sz.P, sz.N, sz.B * sz.N, n_tblk, S, MODE=mode,
            RESIDUAL=residual, FLAT=sz.flat, BLOCK_C=block_c, BLOCK_K=_BLOCK_K, BLOCK_T=block_t, num_warps=_GEMM_WARPS,
            **sz.meta)
        return part

    def wgrad(self, g, z, bn, sums, right_u):
        """sum over (b, n) of gz[b, :, n] in[b, :, n]^T in acc dtype, and the sums of gz when there is no BN.

        gz: g (bn None) or the BN backward of g (z its input, sums = [sum g | sum g*zhat]); in: relu(cat[o, x2])
        (right_u, the proj weight) or the GroupNorm output (the qkv weight).
        """
        sz = self.sz
        rows, cols = (sz.C, sz.C) if right_u else (sz.O, sz.P)
        rowsum = bn is None and right_u
        block_r, block_k = min(_BLOCK_R, _p2(rows)), min(_BLOCK_R, _p2(cols))
        grid_rk = triton.cdiv(rows, block_r) * triton.cdiv(cols, block_k)
        flat = right_u and sz.flat  # qkv's tiles hold one sample (its GroupNorm statistics)
        block_t, n_tblk, n_tiles = sz.tiles(flat, 32 if sz.fma else None)  # tokens: the dot's K; FMA spills at 64
        # split-K over token tiles: enough programs to fill a GPU; one split in the interpreter
        per_split, S = _split_k(n_tiles, grid_rk, _GPU_PROGRAMS if sz.gpu else 1)
        part = sz.empty(S, rows * cols)
        rs = sz.empty(S, rows) if rowsum else part
        _wgrad_kernel[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_k), S)](
            g, z, *_BN.bwd_args(bn, sums, g), sz.B * sz.N, self.o, self.x, *self.gn, self.gn_w, self.gn_b,
            self.gn_eps, part, rs, rows, cols, sz.C, sz.P, sz.N, sz.B * sz.N, n_tblk, n_tiles, per_split,
            NORM=bn is not None, RIGHT_U=right_u, ROWSUM=rowsum, FLAT=flat, BLOCK_R=block_r, BLOCK_K=block_k,
            BLOCK_T=block_t, num_warps=_GEMM_WARPS, **sz.meta)
        return _sum(part).view(rows, cols), (_sum(rs) if rowsum else None)

    def backward(self, gy, proj_w, proj_bn, residual):
        """Returns (gx, g_gn_w, g_gn_b, g_qkv_w, qkv sums, g_proj_w, proj sums), the sums over (B, N) of the grad g
        of each BN output being [sum g | sum g * zhat] (training), or sum g, the bias grad (eval)."""
        sz, x = self.sz, self.x
        gy = gy.contiguous()
        B, C, P, Q, O, N = sz.B, sz.C, sz.P, sz.Q, sz.O, sz.N
        if proj_bn is None:
            zy = psums = gy  # placeholders, never read without the BN
            g_proj_w, g_sums = self.wgrad(gy, zy, None, None, right_u=True)
        else:
            zy = torch.empty_like(x)
            psums = g_sums = _sum(self.proj(proj_w, zy, 2, g=gy, bn=proj_bn))
            g_proj_w, _ = self.wgrad(gy, zy, proj_bn, psums, right_u=True)

        # gu = W_proj^T gz: go and D for the attention backward; grad_x2 straight into grad_x
        gx = torch.empty_like(x)
        go = torch.empty(B, P, N, dtype=x.dtype, device=x.device)
        dd = sz.empty(B, N)
        block_j = sz.PP
        block_t, n_tblk, n_tiles = sz.tiles(sz.flat, max(16, _ATTN_TILE // (2 * block_j if sz.fma else block_j)))
        _proj_bwd_kernel[(n_tiles, 1 + triton.cdiv(C - P, block_j))](
            gy, zy, *_BN.bwd_args(proj_bn, psums, gy), B * N, proj_w, *proj_w.stride(), self.o, x, go, dd, gx,
            C, P, N, B * N, n_tblk, FLAT=sz.flat, NORM=proj_bn is not None, RESIDUAL=residual, BLOCK_J=block_j,
            BLOCK_C=_BLOCK_K, BLOCK_T=block_t, num_warps=_GEMM_WARPS, **sz.meta)

        # attention backward: ga = [dq; dk; dv] and its per-tile sums
        _, _, block = _attn_blocks(sz)
        n_blk = triton.cdiv(N, block)
        w2 = O if self.bn is None else 2 * O
        part = sz.empty(B * n_blk, w2)
        ga = torch.empty_like(self.z)
        _attn_bwd_kernel[(B * n_blk, 2)](
            self.z, *_BN.fwd_args(self.bn, ga), go, dd, self.lse, ga, part, Q, P, O, N, n_blk, w2,
            NORM=self.bn is not None, QP=sz.QP, PP=sz.PP, BLOCK=block, num_warps=8,
            **sz.meta)
        qsums = _sum(part)
        g_qkv_w, _ = self.wgrad(ga, self.z, self.bn, qsums, right_u=False)

        # GroupNorm backward: gn into grad_x[:, :P] with its sums, then grad_x1 in place
        block_p = min(_BLOCK_R, _p2(P))
        n_pblk = triton.cdiv(P, block_p)
        gpart = sz.empty(B * sz.n_tblk, 2 * P)
        spart = sz.empty(sz.n_tblk * n_pblk, 2 * B)
        _gn_bwd_dn_kernel[(B * sz.n_tblk, n_pblk)](
            ga, self.z, *_BN.bwd_args(self.bn, qsums, ga), B * N, self.qkv_w, *self.qkv_w.stride(), x, *self.gn,
            self.gn_w, self.gn_eps, gx, gpart, spart, C, P, O, N, sz.n_tblk, n_pblk, B, NORM=self.bn is not None,
            BLOCK_P=block_p, BLOCK_O=_BLOCK_K, BLOCK_T=sz.block_t, num_warps=_GEMM_WARPS, **sz.meta)
        gsums = _sum(gpart)
        block_e, block_t, n_tblk = sz.ew_blocks(P)
        _gn_bwd_dx_kernel[(B * n_tblk, triton.cdiv(P, block_e))](
            gx, x, gy, *self.gn, self.gn_w, self.gn_eps, _sum(spart), C, P, N, n_tblk, B, RESIDUAL=residual,
            ACC=sz.meta["ACC"], BLOCK_P=block_e, BLOCK_T=block_t, num_warps=4)
        return gx, gsums[P:], gsums[:P], g_qkv_w, qsums, g_proj_w, g_sums


def _fits_one_launch(n_tokens: int) -> bool:
    """Whether the eval forward fits _eval_kernel: every key in one block, and the [queries, keys] scores within
    ONE_KERNEL_TILE."""
    n = _p2(n_tokens)
    return n <= SINGLE_PASS_MAX and n * n <= ONE_KERNEL_TILE


def _eval_in_one_launch(x, sz, gn_w, gn_b, gn_eps, qkv_w, qkv_b, proj_w, proj_b, residual):
    # Channel groups per sample: enough programs to fill a GPU when the batch alone does not (each group recomputes
    # the attention: at S4's stage-2 shape about a third of one 64-channel block's projection FLOPs)
    n_cblk = triton.cdiv(sz.C, _EVAL_BLOCK_C)
    groups = min(n_cblk, max(1, (_GPU_PROGRAMS if sz.gpu else INTERP_EVAL_PROGRAMS) // sz.B))
    per = triton.cdiv(n_cblk, groups) * _EVAL_BLOCK_C
    groups = triton.cdiv(sz.C, per)
    o = torch.empty(sz.B * groups, sz.P, sz.N, dtype=x.dtype, device=x.device)
    y = torch.empty_like(x)
    np2 = _p2(sz.N)
    _eval_kernel[(sz.B, groups)](
        x, gn_w, gn_b, gn_eps, qkv_w, *qkv_w.stride(), qkv_b, proj_w, *proj_w.stride(), proj_b, o, y, sz.C, sz.P,
        sz.Q, sz.N, per, RESIDUAL=residual, QP=sz.QP, NP=np2, BLOCK_V=_EVAL_BLOCK_V, BLOCK_C=_EVAL_BLOCK_C,
        BLOCK_K=_BLOCK_K, num_warps=_GEMM_WARPS if np2 >= 64 else 4, **sz.meta)
    return y


def fwd(x, gn_w, gn_b, gn_eps, qkv_w, qkv_b, proj_w, proj_b, qk_dim, residual):
    x = x.contiguous()
    sz = _Sizes(x, gn_w, qk_dim)
    if _fits_one_launch(sz.N):
        return _eval_in_one_launch(x, sz, gn_w.contiguous(), gn_b.contiguous(), gn_eps, qkv_w, qkv_b.contiguous(),
                                   proj_w, proj_b.contiguous(), residual)
    f = _Front(x, gn_w, gn_b, gn_eps, qkv_w, qk_dim, qkv_b=qkv_b)
    y = torch.empty_like(f.x)
    f.proj(proj_w, y, 0, residual=residual, bias=proj_b)
    return y


def bwd(gy, x, gn_w, gn_b, gn_eps, qkv_w, qkv_b, proj_w, proj_b, qk_dim, residual):
    f = _Front(x, gn_w, gn_b, gn_eps, qkv_w, qk_dim, qkv_b=qkv_b, backward=True)
    gx, ggw, ggb, gqw, gqb, gpw, gpb = f.backward(gy, proj_w, None, residual)
    return (gx, _cast(ggw, gn_w), _cast(ggb, gn_b), _cast(gqw, qkv_w), _cast(gqb, qkv_b), _cast(gpw, proj_w),
            _cast(gpb, proj_b))


def train_fwd(x, gn_w, gn_b, gn_eps, qkv_w, qkv_bn_w, qkv_bn_b, qkv_eps, proj_w, proj_bn_w, proj_bn_b, proj_eps,
              qk_dim, residual):
    f = _Front(x, gn_w, gn_b, gn_eps, qkv_w, qk_dim, qkv_bn=(qkv_bn_w, qkv_bn_b, qkv_eps))
    sz = f.sz
    y = torch.empty_like(f.x)
    bn = _BN(*_welford(f.proj(proj_w, y, 1)), proj_bn_w, proj_bn_b, proj_eps, sz.acc)
    block_c, block_t, n_tblk = sz.ew_blocks(sz.C)
    _bn_apply_kernel[(sz.B * n_tblk, triton.cdiv(sz.C, block_c))](
        y, f.x, bn.mean, bn.var, bn.w, bn.b, proj_eps, sz.C, sz.N, n_tblk, RESIDUAL=residual, ACC=sz.meta["ACC"],
        BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    return y, f.bn.mean, f.bn.var, bn.mean, bn.var


def train_bwd(gy, x, gn_w, gn_b, gn_eps, qkv_w, qkv_bn_w, qkv_bn_b, qkv_eps, proj_w, proj_bn_w, proj_bn_b, proj_eps,
              qkv_mean, qkv_var, proj_mean, proj_var, qk_dim, residual):
    f = _Front(x, gn_w, gn_b, gn_eps, qkv_w, qk_dim, qkv_bn=(qkv_bn_w, qkv_bn_b, qkv_eps),
               qkv_bn_stats=(qkv_mean, qkv_var), backward=True)
    proj_bn = _BN(proj_mean, proj_var, proj_bn_w, proj_bn_b, proj_eps, f.sz.acc)
    gx, ggw, ggb, gqw, qsums, gpw, psums = f.backward(gy, proj_w, proj_bn, residual)
    O, C = f.sz.O, f.sz.C
    return (gx, _cast(ggw, gn_w), _cast(ggb, gn_b), _cast(gqw, qkv_w), _cast(qsums[O:], qkv_bn_w),
            _cast(qsums[:O], qkv_bn_b), _cast(gpw, proj_w), _cast(psums[C:], proj_bn_w), _cast(psums[:C], proj_bn_b))
