"""Shared pieces of the Triton kernels (shsa, ffn, dwconv_bn): GEMM tile constants, device helpers (64-bit partial
offsets, IEEE dots, BatchNorm coefficients and backward, Welford partials), the fixed-order reductions of per-tile partials
(`_welford_kernel`, `_sum_kernel`) and their host launchers, and the host-side sizing every launcher starts from.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_T, _BLOCK_R, _BLOCK_K = 64, 64, 32  # GEMM tiles: tokens, output rows, reduction
_GEMM_WARPS = 8  # 4 warps spill on sm_90 with these tiles (ptxas), fp32 FMA dots most
_EW_TILE = 1024  # elements per tile of the statistics / elementwise kernels (8 per thread)
_RED_TILE, _RED_R = 2048, 128  # reduction kernels: tile elements, most rows per tile
_GPU_PROGRAMS = 264  # programs that fill an H100 (2 per SM): split-K weight grads and the one-kernel SHSA eval aim at it
FLAT_TOKENS = 16  # token GEMMs tile the flattened B*N tokens where N % FLAT_TOKENS == 0 (_Shape.flat); 1: always
# (the eval forwards' resident-x rule, N % 16 == 0 on a GPU, does not read it: _token_gemm._resident_tokens)


# ---- device helpers ----------------------------------------------------------------------------------------

@triton.jit
def _at(s, R, r):
    # Offset of entry r of row s of a row-major (S, R) buffer, in int64: the partial buffers hold
    # ~B*C*N / BLOCK_T entries, past 2**31 for inputs of ~2**36 elements (tl.cast: s may be a constexpr)
    return tl.cast(s, tl.int64) * R + r


@triton.jit
def _mm(a, b, acc, ACC: tl.constexpr):
    # IEEE fp32 (and fp64): TF32 would break the match with the float64 reference. out_dtype: triton < 3.9
    # checks an fp64 accumulator against the fp32 default
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)


@triton.jit
def _relu(v):
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as torch


@triton.jit
def _scalar(v, dtype: tl.constexpr):
    # A float kernel argument in `dtype`. Kernels annotate such arguments `tl.float64` (a plain float argument would
    # reach an fp64 kernel rounded to fp32). tl.full, not tl.cast: the interpreter passes a Python float, which
    # tl.cast would round to fp32 first
    return tl.full([], v, dtype)


@triton.jit
def _inv_std(var, eps):
    # 1 / sqrt(var + eps) in var's dtype (not rsqrt: also valid for fp64); eps: a tl.float64 argument (_scalar)
    return 1.0 / tl.sqrt(var + _scalar(eps, var.dtype))


@triton.jit
def _rstd(var_ptr, r, rm, eps):
    return _inv_std(tl.load(var_ptr + r, mask=rm, other=1.0), eps)


@triton.jit
def _bn_coef(mean_ptr, var_ptr, w_ptr, bias_ptr, eps, r, rm, NORM: tl.constexpr, ACC: tl.constexpr):
    # (scale, shift) of the training BN (batch mean/var) of rows r; unused placeholders without it
    if NORM:
        scale = _rstd(var_ptr, r, rm, eps) * tl.load(w_ptr + r, mask=rm, other=0.0).to(ACC)
        shift = tl.load(bias_ptr + r, mask=rm, other=0.0).to(ACC) - tl.load(mean_ptr + r, mask=rm, other=0.0) * scale
    else:
        scale = 1.0
        shift = 0.0
    return scale, shift


@triton.jit
def _bn_grad_coef(mean_ptr, var_ptr, w_ptr, sums_ptr, eps, count, r, rm, R, ACC: tl.constexpr):
    # Per-row coefficients of _bn_grad_apply: (mean, rstd, w * rstd, mean(g), mean(g * zhat)); sums_ptr holds
    # [sum g | sum g * zhat] over (B, N) (count values per row)
    rstd = _rstd(var_ptr, r, rm, eps)
    mg = tl.load(sums_ptr + r, mask=rm, other=0.0) / count
    mgz = tl.load(sums_ptr + R + r, mask=rm, other=0.0) / count
    mean = tl.load(mean_ptr + r, mask=rm, other=0.0)
    return mean, rstd, rstd * tl.load(w_ptr + r, mask=rm, other=0.0).to(ACC), mg, mgz


@triton.jit
def _bn_grad_apply(g, z, mean, rstd, a, mg, mgz, mask):
    # Grad w.r.t. the input z (rows x tokens, ACC) of a training BN from the grad g of its output:
    # gz = w * rstd * (g - mean(g) - zhat * mean(g * zhat)), 0 outside mask
    zhat = (z - mean[:, None]) * rstd[:, None]
    return tl.where(mask, a[:, None] * (g - mg[:, None] - zhat * mgz[:, None]), 0.0)


@triton.jit
def _bn_grad(g, z, mean_ptr, var_ptr, w_ptr, sums_ptr, eps, count, r, rm, mask, R, ACC: tl.constexpr):
    # _bn_grad_apply with rows r's coefficients loaded here (a kernel that applies them to many tiles loads them once)
    mean, rstd, a, mg, mgz = _bn_grad_coef(mean_ptr, var_ptr, w_ptr, sums_ptr, eps, count, r, rm, R, ACC)
    return _bn_grad_apply(g, z, mean, rstd, a, mg, mgz, mask)


@triton.jit
def _tile_tokens(s, N, BN, n_tblk, FLAT: tl.constexpr, BLOCK_T: tl.constexpr):
    # (sample, token, mask) of token tile s. FLAT: BLOCK_T tokens of the flattened B*N index, so a tile may span
    # samples (sample and token then vary along the tile); else tile s % n_tblk of sample s // n_tblk (a scalar).
    # Neither loses vector loads to the other: Triton proves token runs contiguous and aligned only where N % 16 == 0
    # (its divisibility specialisation), and then a flat tile's runs are 16 tokens long
    if FLAT:
        ft = tl.cast(s, tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        b, t, tm = ft // N, ft % N, ft < BN
    else:
        b = s // n_tblk
        t = (s % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = t < N
    return b, t, tm


@triton.jit
def _store_wgrad(part_ptr, rowsum_ptr, acc, rs, sp, r, rm, k, km, R, K, ROWSUM: tl.constexpr):
    # Split sp's partial of a split-K weight grad: acc [rows r, cols k] at [sp, r, k] of (S, R, K) and, when ROWSUM,
    # from the programs of column block 0, the row sums rs at [sp, r] of (S, R)
    off = (sp * R + r).to(tl.int64) * K
    tl.store(part_ptr + off[:, None] + k[None, :], acc, mask=rm[:, None] & km[None, :])
    if ROWSUM:  # noqa: SIM102 (a compile-time test, then a runtime one)
        if tl.program_id(1) == 0:
            tl.store(rowsum_ptr + _at(sp, R, r), rs, mask=rm)


@triton.jit
def _welford_store(part_ptr, s, S, R, r, rm, mean, m2, n):
    # Rows r's (mean, M2, count) at [., s, r] of a (3, S, R) Welford partial buffer
    off = _at(s, R, r)
    plane = _at(S, R, 0)
    tl.store(part_ptr + off, mean, mask=rm)
    tl.store(part_ptr + plane + off, m2, mask=rm)
    tl.store(part_ptr + 2 * plane + off, tl.zeros_like(mean) + n, mask=rm)


@triton.jit
def _welford_partial(part_ptr, s, S, R, r, rm, v, mask, n):
    # (mean, M2, count) of the valid entries of each row of v (invalid entries hold 0) at [., s, r] of (3, S, R)
    mean = tl.sum(v, axis=1) / n
    d = tl.where(mask, v - mean[:, None], 0.0)
    _welford_store(part_ptr, s, S, R, r, rm, mean, tl.sum(d * d, axis=1), n)


# ---- reductions ------------------------------------------------------------------------------------------

@triton.jit
def _chan_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    # Chan's pairwise update: (mean, M2, count) of the union of two disjoint sets from those of each set
    n_ab = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n_ab), m2_a + m2_b + delta * delta * (n_a * n_b / n_ab), n_ab


@triton.jit
def _welford_kernel(part_ptr, mean_ptr, var_ptr, S, R, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    # Fixed-order merge of (3, S, R) Welford partials into per-row mean and biased variance: each chunk of
    # BLOCK_S partials is combined exactly (multi-way Chan), then folded in with Chan's pairwise update.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    r_in = tl.minimum(r, R - 1)  # padding rows merge a copy of the last row (no 0/0), never stored
    n_a = tl.zeros([BLOCK_R], ACC)
    mean_a = tl.zeros([BLOCK_R], ACC)
    m2_a = tl.zeros([BLOCK_R], ACC)
    plane = _at(S, R, 0)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None]
        off = _at(s[:, None], R, r_in[None, :])
        mu = tl.load(part_ptr + off, mask=mask, other=0.0)
        m2 = tl.load(part_ptr + plane + off, mask=mask, other=0.0)
        n = tl.load(part_ptr + 2 * plane + off, mask=mask, other=0.0)
        n_b = tl.sum(n, axis=0)
        mean_b = tl.sum(n * mu, axis=0) / n_b
        d = mu - mean_b[None, :]
        m2_b = tl.sum(m2 + n * d * d, axis=0)
        mean_a, m2_a, n_a = _chan_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b)
    tl.store(mean_ptr + r, mean_a, mask=rm)
    tl.store(var_ptr + r, m2_a / n_a, mask=rm)


@triton.jit
def _sum_kernel(part_ptr, out_ptr, S, R, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    # out[r] = sum over s of part[s, r], in a fixed order
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    acc = tl.zeros([BLOCK_S, BLOCK_R], ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        acc += tl.load(part_ptr + _at(s[:, None], R, r[None, :]), mask=(s < S)[:, None] & rm[None, :], other=0.0)
    tl.store(out_ptr + r, tl.sum(acc, axis=0), mask=rm)


# ---- host side -------------------------------------------------------------------------------------------

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def _p2(n: int) -> int:
    """Power of two >= n and >= 16 (the smallest tl.dot dimension)."""
    return max(16, triton.next_power_of_2(n))


class _Shape:
    """What every launcher derives from the activation x (B, C, H, W): sizes, the accumulation dtype, the dtypes
    the kernels are specialised on, the GEMM token tile, and whether this is a GPU (else the interpreter: a cost
    per program, no register file)."""

    def __init__(self, x):
        self.B, self.C, h, w = x.shape
        self.N = h * w
        self.acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.meta = {"ACC": _TL[self.acc], "DOT": _TL[x.dtype]}
        self.block_t, self.n_tblk, _ = self.tiles(False)  # per-sample GEMM tiles
        self.dev = x.device
        self.gpu = x.device.type == "cuda"
        # IEEE fp32/fp64 dots compile to FMA loops that keep operand rows in registers: smaller tiles on a GPU
        self.fma = self.gpu and x.dtype in (torch.float32, torch.float64)

    def tiles(self, flat: bool, cap: int | None = None) -> tuple[int, int, int]:
        """(BLOCK_T, tiles per sample, tiles) of token tiles of at most min(cap, _BLOCK_T) tokens. Flat: over the
        flattened B*N tokens (tiles per sample unused: 1), so that no tile is padded per sample (N = 196 and 49 fill
        77% of their 256 and 64 slots) nor cut to N tokens (16 at SHViT's last stage, where a GEMM program would
        stream its weight rows every 16 tokens). Else within each sample."""
        cap = min(cap or _BLOCK_T, _BLOCK_T)
        if flat:
            block_t = min(cap, _p2(self.B * self.N))
            return block_t, 1, triton.cdiv(self.B * self.N, block_t)
        block_t = min(cap, _p2(self.N))
        n_tblk = triton.cdiv(self.N, block_t)
        return block_t, n_tblk, self.B * n_tblk

    @property
    def flat(self) -> bool:
        """Whether the token GEMMs tile the flattened B*N tokens: where N % FLAT_TOKENS == 0. Triton then proves runs
        of 16 contiguous, aligned tokens (it specialises N on divisibility by 16), as in per-sample tiles: the same
        vector loads and cp.async pipelines. For other N, a flat tile's per-token sample and offset cost registers
        (sm_90 ptxas, the FFN's first GEMM at 7x7: 142 against 64), so those tile each sample."""
        return FLAT_TOKENS > 0 and self.N % FLAT_TOKENS == 0

    def empty(self, *shape) -> torch.Tensor:
        return torch.empty(shape, dtype=self.acc, device=self.dev)

    def ew_blocks(self, rows: int) -> tuple[int, int, int]:
        """(rows, tokens, token tiles) of an elementwise / statistics tile."""
        block_t = min(_p2(self.N), 256)
        return min(triton.next_power_of_2(rows), _EW_TILE // block_t), block_t, triton.cdiv(self.N, block_t)


def _split_k(n_tiles: int, grid_rk: int, want: int) -> tuple[int, int]:
    """(token tiles per split, splits) of a split-K weight grad over n_tiles token tiles with grid_rk output
    blocks: enough splits to give about `want` programs (fixed by the shape and device: deterministic)."""
    per_split = triton.cdiv(n_tiles, max(1, min(n_tiles, want // grid_rk)))
    return per_split, triton.cdiv(n_tiles, per_split)


class _BN:
    """A training BatchNorm as the kernels take it: batch mean / biased var (acc dtype), weight, bias, eps."""

    def __init__(self, mean, var, w, b, eps, acc):
        self.mean, self.var = mean.to(acc).contiguous(), var.to(acc).contiguous()
        self.w, self.b, self.eps = w.contiguous(), b.contiguous(), eps

    @staticmethod
    def fwd_args(bn, ph) -> tuple:
        """(mean, var, w, b, eps) for _load_act; placeholders, never read, without a BN."""
        return (bn.mean, bn.var, bn.w, bn.b, bn.eps) if bn is not None else (ph, ph, ph, ph, 0.0)

    @staticmethod
    def bwd_args(bn, sums, ph) -> tuple:
        """(mean, var, w, sums, eps) for _load_grad; placeholders without a BN."""
        return (bn.mean, bn.var, bn.w, sums, bn.eps) if bn is not None else (ph, ph, ph, ph, 0.0)


def _red_blocks(S: int, R: int) -> tuple[int, int]:
    block_r = min(triton.next_power_of_2(R), _RED_R)
    return min(triton.next_power_of_2(S), _RED_TILE // block_r), block_r


def _welford(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per row from (3, S, R) Welford partials."""
    _, S, R = part.shape
    mean = torch.empty(R, dtype=part.dtype, device=part.device)
    var = torch.empty_like(mean)
    block_s, block_r = _red_blocks(S, R)
    _welford_kernel[(triton.cdiv(R, block_r),)](part, mean, var, S, R, ACC=_TL[part.dtype], BLOCK_S=block_s,
                                                BLOCK_R=block_r, num_warps=4)
    return mean, var


def _sum(part: torch.Tensor) -> torch.Tensor:
    """Fixed-order sum over the first dim of (S, R) partials."""
    S, R = part.shape
    out = torch.empty(R, dtype=part.dtype, device=part.device)
    block_s, block_r = _red_blocks(S, R)
    _sum_kernel[(triton.cdiv(R, block_r),)](part, out, S, R, ACC=_TL[part.dtype], BLOCK_S=block_s,
                                            BLOCK_R=block_r, num_warps=4)
    return out


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype, copy=True)  # a copy: slices of one sums buffer must not alias between outputs
