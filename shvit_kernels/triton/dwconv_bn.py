"""Triton kernels: fused depthwise k x k conv (odd k <= 7, stride 1/2, padding k//2) + BatchNorm (+ residual) (+ ReLU).

Entry points (also exported as `fwd`, `train_fwd`, `train_bwd`, the backend interface of `ops.dwconv_bn`):
  dwconv_bn_fwd        eval form, BN folded:        1 pass   (read x, write y)
  dwconv_bn_train_fwd  batch statistics:            2 passes (stats: read x; apply: read x, write y)
                                                    + a tiny Welford reduction; z is never stored
  dwconv_bn_train_bwd  batch-statistics backward:   3 passes (A: read x, gy[, y] -> sums of g, g*zhat;
                                                    B: read x, gy[, y], write dz, grad_weight partials;
                                                    C: read dz[, gy, y], write grad_x) + 2 tiny reductions

Every tensor is indexed through its strides, so NCHW and channels_last run without layout copies; a tile is
[BLOCK_C, BLOCK_HW] (channels x flattened pixels) and the wrapper shapes it along the contiguous dimension.
Cross-tile reductions go through per-(row, tile) partial buffers summed in a fixed order: no atomics, so
results are bitwise reproducible. Accumulation is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _chan_merge, _rstd

_TILE, _WARPS = 1024, 8  # elements per [BLOCK_C, BLOCK_HW] tile: 4 per thread (~60-130 registers)
_RED_TILE, _RED_P = 2048, 512  # reduction tile: elements, and most partials per row chunk


# ---- device helpers ----------------------------------------------------------------------------------------

@triton.jit
def _tile(n_tiles, n_cblk, C, HW, Wd, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # 1-D grid (no 65535 limit on axis 1); spatial tiles of one (b, channel block) are adjacent so their
    # shared halo rows are still in L2.
    pid = tl.program_id(0)
    t = pid % n_tiles
    bc = pid // n_tiles
    b = bc // n_cblk
    c = (bc % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = t * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return b, t, c, c < C, hw // Wd, hw % Wd, hw < HW


@triton.jit
def _ptrs(ptr, b, c, h, w, sb, sc, sh, sw):
    # int64 before multiplying: B*C*H*W may exceed 2**31.
    hw_off = h.to(tl.int64) * sh + w.to(tl.int64) * sw
    return ptr + b.to(tl.int64) * sb + (c.to(tl.int64) * sc)[:, None] + hw_off[None, :]


@triton.jit
def _tap_off(dh, dw, sh, sw):
    # Offset of the pixel (dh, dw) away, in int64: a row stride times k // 2 may pass 2**31.
    return dh * tl.cast(sh, tl.int64) + dw * tl.cast(sw, tl.int64)


@triton.jit
def _count(P, n_tiles, HWo, ACC: tl.constexpr):
    # Values per channel, B * Ho * Wo (P = B * n_tiles partials), in ACC: the int32 product would overflow once
    # B * Ho * Wo passes 2**31 (tl.cast also takes the ints Triton specialises to constexprs).
    return tl.cast(P // n_tiles, ACC) * HWo


@triton.jit
def _load_tap(xc, ih0, iw0, c_mask, hw_mask, H, W, sxh, sxw, dh, dw, ACC: tl.constexpr):
    # xc points at input pixel (ih0, iw0) = (oh, ow) * stride; a tap is a scalar offset from it.
    ih = ih0 + dh
    iw = iw0 + dw
    ok = hw_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(xc + _tap_off(dh, dw, sxh, sxw), mask=c_mask[:, None] & ok[None, :], other=0.0).to(ACC)


@triton.jit
def _dwconv(x_ptr, w_ptr, b, c, c_mask, oh, ow, hw_mask, H, W, sxb, sxc, sxh, sxw,
            K: tl.constexpr, STRIDE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    ih0 = oh * STRIDE
    iw0 = ow * STRIDE
    xc = _ptrs(x_ptr, b, c, ih0, iw0, sxb, sxc, sxh, sxw)
    z = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    # Runtime loop over kernel rows: with all k*k taps unrolled the compiler hoists every load and spills.
    for kh in range(K):
        for kw in tl.static_range(K):
            wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw), mask=c_mask, other=0.0).to(ACC)
            z += wv[:, None] * _load_tap(xc, ih0, iw0, c_mask, hw_mask, H, W, sxh, sxw, kh - K // 2, kw - K // 2, ACC)
    return z


@triton.jit
def _upstream_grad(gy_ptr, y_ptr, b, c, oh, ow, mask, sgb, sgc, sgh, sgw, syb, syc, syh, syw,
                   RELU: tl.constexpr, ACC: tl.constexpr):
    # g = grad of the pre-ReLU sum; y > 0 is the ReLU mask.
    g = tl.load(_ptrs(gy_ptr, b, c, oh, ow, sgb, sgc, sgh, sgw), mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.load(_ptrs(y_ptr, b, c, oh, ow, syb, syc, syh, syw), mask=mask, other=0.0)
        g = tl.where(y > 0, g, 0.0)
    return g


# ---- forward ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_eval_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, C, H, W, Ho, Wo, n_tiles, n_cblk,
                     sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                     K: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b, _, c, cm, oh, ow, pm = _tile(n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    z = _dwconv(x_ptr, w_ptr, b, c, cm, oh, ow, pm, H, W, sxb, sxc, sxh, sxw, K, STRIDE, ACC, BLOCK_C, BLOCK_HW)
    z += tl.load(bias_ptr + c, mask=cm, other=0.0).to(ACC)[:, None]
    if RELU:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as torch
    tl.store(_ptrs(y_ptr, b, c, oh, ow, syb, syc, syh, syw), z.to(y_ptr.dtype.element_ty),
             mask=cm[:, None] & pm[None, :])


@triton.jit
def _fwd_stats_kernel(x_ptr, w_ptr, pmean_ptr, pm2_ptr, C, H, W, Ho, Wo, n_tiles, n_cblk, P,
                      sxb, sxc, sxh, sxw,
                      K: tl.constexpr, STRIDE: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # Per-(channel, tile) Welford partials (mean, M2); the tile's count is implied by its index.
    b, t, c, cm, oh, ow, pm = _tile(n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    z = _dwconv(x_ptr, w_ptr, b, c, cm, oh, ow, pm, H, W, sxb, sxc, sxh, sxw, K, STRIDE, ACC, BLOCK_C, BLOCK_HW)
    n = tl.minimum(Ho * Wo - t * BLOCK_HW, BLOCK_HW).to(ACC)
    mean = tl.sum(z, axis=1) / n  # masked pixels hold z = 0
    d = tl.where(pm[None, :], z - mean[:, None], 0.0)
    off = c.to(tl.int64) * P + (b * n_tiles + t)
    tl.store(pmean_ptr + off, mean, mask=cm)
    tl.store(pm2_ptr + off, tl.sum(d * d, axis=1), mask=cm)


@triton.jit
def _welford_kernel(pmean_ptr, pm2_ptr, mean_ptr, var_ptr, C, P, n_tiles, HWo,
                    ACC: tl.constexpr, TILE_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # Fixed-order merge of the partials: each chunk of BLOCK_P tiles is combined exactly (multi-way Chan),
    # then folded into the running (n, mean, M2) with Chan's pairwise update.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    row = (c.to(tl.int64) * P)[:, None]
    n_a = tl.zeros([BLOCK_C], ACC)
    mean_a = tl.zeros([BLOCK_C], ACC)
    m2_a = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n = tl.where(p < P, tl.minimum(HWo - (p % n_tiles) * TILE_HW, TILE_HW), 0).to(ACC)
        mask = cm[:, None] & (p < P)[None, :]
        mu = tl.load(pmean_ptr + row + p[None, :], mask=mask, other=0.0)
        m2 = tl.load(pm2_ptr + row + p[None, :], mask=mask, other=0.0)
        n_b = tl.sum(n, axis=0)
        mean_b = tl.sum(n[None, :] * mu, axis=1) / n_b
        d = mu - mean_b[:, None]
        m2_b = tl.sum(m2 + n[None, :] * d * d, axis=1)
        mean_a, m2_a, n_a = _chan_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b)
    tl.store(mean_ptr + c, mean_a, mask=cm)
    tl.store(var_ptr + c, m2_a / n_a, mask=cm)


@triton.jit
def _fwd_apply_kernel(x_ptr, w_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, y_ptr, eps: tl.float64,
                      C, H, W, Ho, Wo, n_tiles, n_cblk,
                      sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                      K: tl.constexpr, STRIDE: tl.constexpr, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b, _, c, cm, oh, ow, pm = _tile(n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    z = _dwconv(x_ptr, w_ptr, b, c, cm, oh, ow, pm, H, W, sxb, sxc, sxh, sxw, K, STRIDE, ACC, BLOCK_C, BLOCK_HW)
    scale = _rstd(var_ptr, c, cm, eps) * tl.load(bnw_ptr + c, mask=cm, other=0.0).to(ACC)
    shift = tl.load(bnb_ptr + c, mask=cm, other=0.0).to(ACC) - tl.load(mean_ptr + c, mask=cm, other=0.0) * scale
    y = z * scale[:, None] + shift[:, None]
    mask = cm[:, None] & pm[None, :]
    if RESIDUAL:  # stride 1: output pixel == input pixel
        y += tl.load(_ptrs(x_ptr, b, c, oh, ow, sxb, sxc, sxh, sxw), mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(_ptrs(y_ptr, b, c, oh, ow, syb, syc, syh, syw), y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- backward --------------------------------------------------------------------------------------------

@triton.jit
def _bwd_stats_kernel(gy_ptr, y_ptr, x_ptr, w_ptr, mean_ptr, var_ptr, psg_ptr, psgz_ptr, eps: tl.float64,
                      C, H, W, Ho, Wo, n_tiles, n_cblk, P,
                      sgb, sgc, sgh, sgw, syb, syc, syh, syw, sxb, sxc, sxh, sxw,
                      K: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # Pass A: per-(channel, tile) sums of g and g * zhat.
    b, t, c, cm, oh, ow, pm = _tile(n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    mask = cm[:, None] & pm[None, :]
    g = _upstream_grad(gy_ptr, y_ptr, b, c, oh, ow, mask, sgb, sgc, sgh, sgw, syb, syc, syh, syw, RELU, ACC)
    z = _dwconv(x_ptr, w_ptr, b, c, cm, oh, ow, pm, H, W, sxb, sxc, sxh, sxw, K, STRIDE, ACC, BLOCK_C, BLOCK_HW)
    zhat = (z - tl.load(mean_ptr + c, mask=cm, other=0.0)[:, None]) * _rstd(var_ptr, c, cm, eps)[:, None]
    off = c.to(tl.int64) * P + (b * n_tiles + t)
    tl.store(psg_ptr + off, tl.sum(g, axis=1), mask=cm)  # g is 0 off the tile: no extra masking
    tl.store(psgz_ptr + off, tl.sum(g * zhat, axis=1), mask=cm)


@triton.jit
def _bwd_dz_kernel(gy_ptr, y_ptr, x_ptr, w_ptr, mean_ptr, var_ptr, bnw_ptr, sg_ptr, sgz_ptr, dz_ptr, pgw_ptr,
                   eps: tl.float64, C, H, W, Ho, Wo, n_tiles, n_cblk, P,
                   sgb, sgc, sgh, sgw, syb, syc, syh, syw, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                   K: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # Pass B: dz = bn_w * rstd * (g - mean(g) - zhat * mean(g * zhat)); store dz and the per-(channel, tap,
    # tile) partials of grad_weight = sum dz * x_tap (the taps are re-read from cache, not kept in registers).
    b, t, c, cm, oh, ow, pm = _tile(n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    mask = cm[:, None] & pm[None, :]
    g = _upstream_grad(gy_ptr, y_ptr, b, c, oh, ow, mask, sgb, sgc, sgh, sgw, syb, syc, syh, syw, RELU, ACC)
    z = _dwconv(x_ptr, w_ptr, b, c, cm, oh, ow, pm, H, W, sxb, sxc, sxh, sxw, K, STRIDE, ACC, BLOCK_C, BLOCK_HW)
    rstd = _rstd(var_ptr, c, cm, eps)
    zhat = (z - tl.load(mean_ptr + c, mask=cm, other=0.0)[:, None]) * rstd[:, None]
    count = _count(P, n_tiles, Ho * Wo, ACC)
    mg = tl.load(sg_ptr + c, mask=cm, other=0.0) / count
    mgz = tl.load(sgz_ptr + c, mask=cm, other=0.0) / count
    a = rstd * tl.load(bnw_ptr + c, mask=cm, other=0.0).to(ACC)
    dz = tl.where(mask, a[:, None] * (g - mg[:, None] - zhat * mgz[:, None]), 0.0)
    tl.store(_ptrs(dz_ptr, b, c, oh, ow, sdb, sdc, sdh, sdw), dz.to(dz_ptr.dtype.element_ty), mask=mask)
    P64 = tl.cast(P, tl.int64)  # the tap's partials start at (c * K * K + tap) * P: past 2**31 for large inputs
    row = (c.to(tl.int64) * (K * K)) * P64 + (b * n_tiles + t)
    ih0 = oh * STRIDE
    iw0 = ow * STRIDE
    xc = _ptrs(x_ptr, b, c, ih0, iw0, sxb, sxc, sxh, sxw)
    for kh in range(K):  # runtime loop: see _dwconv
        for kw in tl.static_range(K):
            xv = _load_tap(xc, ih0, iw0, cm, pm, H, W, sxh, sxw, kh - K // 2, kw - K // 2, ACC)
            tl.store(pgw_ptr + row + (kh * K + kw) * P64, tl.sum(dz * xv, axis=1), mask=cm)


@triton.jit
def _bwd_dx_kernel(dz_ptr, w_ptr, gy_ptr, y_ptr, gx_ptr, C, H, W, Ho, Wo, n_tiles, n_cblk,
                   sdb, sdc, sdh, sdw, sgb, sgc, sgh, sgw, syb, syc, syh, syw, sob, soc, soh, sow,
                   K: tl.constexpr, STRIDE: tl.constexpr, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # Pass C, tiled over input pixels: grad_x = transposed depthwise conv of dz (+ g for the residual).
    b, _, c, cm, ih, iw, pm = _tile(n_tiles, n_cblk, C, H * W, W, BLOCK_C, BLOCK_HW)
    mask = cm[:, None] & pm[None, :]
    d_base = dz_ptr + b.to(tl.int64) * sdb + (c.to(tl.int64) * sdc)[:, None]
    d_ctr = d_base + (ih.to(tl.int64) * sdh + iw.to(tl.int64) * sdw)[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for kh in range(K):  # runtime loop: see _dwconv
        th = ih + (K // 2 - kh)  # = oh * STRIDE for the output row that reads this input row through tap kh
        oh = th // STRIDE
        row_ok = pm & (th >= 0) & (oh < Ho)
        if STRIDE > 1:
            row_ok = row_ok & (th % STRIDE == 0)
            d_row = d_base + (oh.to(tl.int64) * sdh)[None, :]
        for kw in tl.static_range(K):
            tw = iw + (K // 2 - kw)
            ow = tw // STRIDE
            ok = row_ok & (tw >= 0) & (ow < Wo)
            if STRIDE > 1:
                ok = ok & (tw % STRIDE == 0)
                d_ptr = d_row + (ow.to(tl.int64) * sdw)[None, :]
            else:  # a scalar offset from the centre pointer: fewer 64-bit adds and registers
                d_ptr = d_ctr + _tap_off(K // 2 - kh, K // 2 - kw, sdh, sdw)
            wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw), mask=cm, other=0.0).to(ACC)
            d = tl.load(d_ptr, mask=cm[:, None] & ok[None, :], other=0.0)
            acc += wv[:, None] * d.to(ACC)
    if RESIDUAL:
        acc += _upstream_grad(gy_ptr, y_ptr, b, c, ih, iw, mask, sgb, sgc, sgh, sgw, syb, syc, syh, syw, RELU, ACC)
    tl.store(_ptrs(gx_ptr, b, c, ih, iw, sob, soc, soh, sow), acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_sum_kernel(part_ptr, out_ptr, R, P, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    row = (r.to(tl.int64) * P)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_P], ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + row + p[None, :], mask=rm[:, None] & (p < P)[None, :], other=0.0)
    tl.store(out_ptr + r, tl.sum(acc, axis=1), mask=rm)


# ---- host side -------------------------------------------------------------------------------------------

_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format]:
    """x in NCHW or channels_last (copied to NCHW if neither) and the memory format outputs take."""
    if x.is_contiguous():
        return x, torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, torch.channels_last
    return x.contiguous(), torch.contiguous_format


def _kernel_size(x: torch.Tensor, weight: torch.Tensor, stride: int) -> int:
    k = weight.shape[-1]
    assert x.dim() == 4 and weight.shape == (x.shape[1], 1, k, k) and k % 2 == 1 and k <= 7, (x.shape, weight.shape)
    assert stride in (1, 2) and x.device == weight.device, (stride, x.device, weight.device)
    return k


class _Grid:
    """Tiling of a (B, C, h, w) pixel space into [BLOCK_C, BLOCK_HW] tiles along the contiguous dimension."""

    def __init__(self, B: int, C: int, h: int, w: int, fmt: torch.memory_format):
        hw = h * w
        if fmt == torch.channels_last:  # C is contiguous: wide along C
            self.block_c = min(triton.next_power_of_2(C), 64)
            self.block_hw = min(triton.next_power_of_2(hw), max(_TILE // self.block_c, 1))
        else:  # W is contiguous: wide along the flattened pixels
            self.block_hw = min(triton.next_power_of_2(hw), _TILE)
            self.block_c = min(triton.next_power_of_2(C), max(_TILE // self.block_hw, 1))
        self.n_tiles = triton.cdiv(hw, self.block_hw)
        self.n_cblk = triton.cdiv(C, self.block_c)
        self.P = B * self.n_tiles  # partials per channel
        self.grid = (B * self.n_cblk * self.n_tiles,)
        self.meta = {"BLOCK_C": self.block_c, "BLOCK_HW": self.block_hw, "num_warps": _WARPS}
        # Program ids, pixel indices within a plane and tile indices are int32 in the kernels (every element
        # offset is int64): what they count must fit. Past this the input would be > 2**31 pixels per plane, or
        # > 2**40 elements.
        if hw + self.block_hw >= 2**31 or self.grid[0] >= 2**31:
            raise ValueError(f"dwconv_bn (triton): input too large to tile: B={B}, C={C}, H*W={h}*{w}")


def _out_hw(x: torch.Tensor, stride: int) -> tuple[int, int]:
    return (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1  # odd k, padding k // 2


def _red_blocks(R: int, P: int) -> tuple[int, int]:
    """(rows, partials) per reduction tile: long rows get the width, short ones pack many rows."""
    block_p = min(_RED_P, triton.next_power_of_2(P))
    return min(triton.next_power_of_2(R), _RED_TILE // block_p), block_p


def _row_sum(part: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of a (R, P) partial buffer, in a fixed order."""
    R, P = part.shape
    out = torch.empty(R, dtype=part.dtype, device=part.device)
    block_r, block_p = _red_blocks(R, P)
    _row_sum_kernel[(triton.cdiv(R, block_r),)](part, out, R, P, ACC=_TL[part.dtype], BLOCK_R=block_r,
                                               BLOCK_P=block_p, num_warps=4)
    return out


def dwconv_bn_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, relu: bool) -> torch.Tensor:
    """Eval form: y = [relu](dwconv(x, weight) + bias), BN (and any residual identity) folded by the caller."""
    k = _kernel_size(x, weight, stride)
    x, fmt = _layout(x)
    B, C, H, W = x.shape
    Ho, Wo = _out_hw(x, stride)
    y = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    g = _Grid(B, C, Ho, Wo, fmt)
    _fwd_eval_kernel[g.grid](x, weight.contiguous(), bias.contiguous(), y, C, H, W, Ho, Wo, g.n_tiles, g.n_cblk,
                             *x.stride(), *y.stride(), K=k, STRIDE=stride, RELU=relu, ACC=_TL[_acc_dtype(x)],
                             **g.meta)
    return y


def dwconv_bn_train_fwd(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                        eps: float, stride: int, residual: bool, relu: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training form: (y, mean, biased var) of z = dwconv(x, weight) over (B, H', W')."""
    k = _kernel_size(x, weight, stride)
    assert not residual or stride == 1
    x, fmt = _layout(x)
    weight = weight.contiguous()
    B, C, H, W = x.shape
    Ho, Wo = _out_hw(x, stride)
    acc = _acc_dtype(x)
    g = _Grid(B, C, Ho, Wo, fmt)
    part = torch.empty((2, C, g.P), dtype=acc, device=x.device)
    _fwd_stats_kernel[g.grid](x, weight, part[0], part[1], C, H, W, Ho, Wo, g.n_tiles, g.n_cblk, g.P, *x.stride(),
                              K=k, STRIDE=stride, ACC=_TL[acc], **g.meta)
    mean = torch.empty(C, dtype=acc, device=x.device)
    var = torch.empty(C, dtype=acc, device=x.device)
    block_c, block_p = _red_blocks(C, g.P)
    _welford_kernel[(triton.cdiv(C, block_c),)](part[0], part[1], mean, var, C, g.P, g.n_tiles, Ho * Wo,
                                                ACC=_TL[acc], TILE_HW=g.block_hw, BLOCK_C=block_c,
                                                BLOCK_P=block_p, num_warps=4)
    y = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    _fwd_apply_kernel[g.grid](x, weight, mean, var, bn_weight.contiguous(), bn_bias.contiguous(), y, eps,
                              C, H, W, Ho, Wo, g.n_tiles, g.n_cblk, *x.stride(), *y.stride(),
                              K=k, STRIDE=stride, RESIDUAL=residual, RELU=relu, ACC=_TL[acc], **g.meta)
    return y, mean, var


def dwconv_bn_train_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor,
                        mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor | None, eps: float, stride: int,
                        residual: bool, relu: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `dwconv_bn_train_fwd`: (grad_x, grad_weight, grad_bn_weight, grad_bn_bias).

    y (the forward output) is read only for the ReLU mask. grad_y and y may have any strides.
    """
    k = _kernel_size(x, weight, stride)
    assert not residual or stride == 1
    assert not relu or y is not None
    x, fmt = _layout(x)
    weight = weight.contiguous()
    B, C, H, W = x.shape
    Ho, Wo = _out_hw(x, stride)
    assert grad_y.shape == (B, C, Ho, Wo), (grad_y.shape, x.shape)
    acc = _acc_dtype(x)
    mean, var = mean.to(acc).contiguous(), var.to(acc).contiguous()
    y_arg = y if relu else grad_y  # unread without ReLU
    strides = (*grad_y.stride(), *y_arg.stride(), *x.stride())
    g = _Grid(B, C, Ho, Wo, fmt)
    meta = dict(K=k, STRIDE=stride, RELU=relu, ACC=_TL[acc], **g.meta)

    part = torch.empty((2 * C, g.P), dtype=acc, device=x.device)
    _bwd_stats_kernel[g.grid](grad_y, y_arg, x, weight, mean, var, part[:C], part[C:], eps,
                              C, H, W, Ho, Wo, g.n_tiles, g.n_cblk, g.P, *strides, **meta)
    sums = _row_sum(part)  # [sum g ; sum g * zhat]

    # dz in the activation dtype, as stock autograd keeps it: half the bytes of pass B's write and C's read
    dz = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    part_w = torch.empty((C * k * k, g.P), dtype=acc, device=x.device)
    _bwd_dz_kernel[g.grid](grad_y, y_arg, x, weight, mean, var, bn_weight.contiguous(), sums[:C], sums[C:], dz,
                           part_w, eps, C, H, W, Ho, Wo, g.n_tiles, g.n_cblk, g.P, *strides, *dz.stride(), **meta)
    grad_weight = _row_sum(part_w).view(C, 1, k, k).to(weight.dtype)

    grad_x = torch.empty_like(x, memory_format=fmt)
    gi = _Grid(B, C, H, W, fmt)
    _bwd_dx_kernel[gi.grid](dz, weight, grad_y, y_arg, grad_x, C, H, W, Ho, Wo, gi.n_tiles, gi.n_cblk,
                            *dz.stride(), *grad_y.stride(), *y_arg.stride(), *grad_x.stride(),
                            K=k, STRIDE=stride, RESIDUAL=residual, RELU=relu, ACC=_TL[acc], **gi.meta)
    # copies: the outputs must not alias each other
    return grad_x, grad_weight, sums[C:].to(bn_weight.dtype, copy=True), sums[:C].to(bn_weight.dtype, copy=True)


# The backend interface of `shvit_kernels.ops.dwconv_bn` (same names as `shvit_kernels.reference.dwconv_bn`).
fwd = dwconv_bn_fwd
train_fwd = dwconv_bn_train_fwd
train_bwd = dwconv_bn_train_bwd
