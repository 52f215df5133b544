"""Triton kernels: fused depthwise k x k conv (odd k <= 7, stride 1/2, padding k//2) + BatchNorm (+ residual) (+ ReLU).

Entry points (also exported as `fwd`, `train_fwd`, `train_bwd`, the backend interface of `ops.dwconv_bn`):
  dwconv_bn_fwd        eval form, BN folded:        1 pass   (read x, write y)
  dwconv_bn_train_fwd  batch statistics:            2 passes (stats: read x; apply: read x, write y)
                                                    + a tiny Welford reduction; z is never stored
  dwconv_bn_train_bwd  batch-statistics backward:   3 passes (A: read x, gy[, y] -> sums of g, g*zhat;
                                                    B: read x, gy[, y], write dz;
                                                    C: read dz, x[, gy, y], write grad_x, grad_weight partials)
                                                    + 2 tiny reductions

Every tensor is indexed through its strides, so NCHW and channels_last run without layout copies; a tile is
[BLOCK_C, BLOCK_HW] (channels x flattened pixels) and the wrapper shapes it along the contiguous dimension.
A program runs its tile over a group of up to G images: the index arithmetic, the tap masks and the per-channel
loads are paid once per group, and the statistics are accumulated per pixel across the group in registers, so a
tile is reduced across threads once per group instead of once per image.
Cross-tile reductions go through per-(tile, group) partial buffers summed in a fixed order (`_common`): no atomics,
so results are bitwise reproducible. Accumulation is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _at, _bn_grad_apply, _bn_grad_coef, _rstd, _sum, _welford, _welford_store

_TILE, _WARPS = 1024, 8  # elements per [BLOCK_C, BLOCK_HW] tile: 4 per thread (~50-100 registers)
_ROW_PX = 128  # most pixels of an NCHW tile: one warp's 32 x 4, so a tile row sums within a warp (no barrier)
# Images per program: up to _IMAGES, as long as the grid keeps >= _PROGRAMS programs (~2 waves of 8 blocks on each
# of an H100's 132 SMs); a small batch gets one image per program
_IMAGES, _PROGRAMS = 8, 2048


# ---- device helpers ----------------------------------------------------------------------------------------

@triton.jit
def _tile(B, G, n_tiles, n_cblk, C, HW, Wd, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # 1-D grid (no 65535 limit on axis 1) over (image group, channel block, spatial tile); the spatial tiles of one
    # (group, channel block) are adjacent so their shared halo rows are still in L2. Returns the partial index
    # (group, tile), the group's images [b0, b1), the tile index, channels, pixels and their masks.
    pid = tl.program_id(0)
    t = pid % n_tiles
    gc = pid // n_tiles
    grp = gc // n_cblk
    c = (gc % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = t * BLOCK_HW + tl.arange(0, BLOCK_HW)
    b0 = grp * G
    return grp * n_tiles + t, b0, tl.minimum(b0 + G, B), t, c, c < C, hw // Wd, hw % Wd, hw < HW


@triton.jit
def _ptrs(ptr, c, h, w, sc, sh, sw):
    # Pointers of image 0's [c, (h, w)] tile; image b adds _img(b, sb). int64 before multiplying: B*C*H*W may
    # exceed 2**31.
    return ptr + (c.to(tl.int64) * sc)[:, None] + (h.to(tl.int64) * sh + w.to(tl.int64) * sw)[None, :]


@triton.jit
def _conv_in(x_ptr, c, oh, ow, sxc, sxh, sxw, STRIDE: tl.constexpr):
    # (pointers at input pixel (ih0, iw0) = (oh, ow) * stride of image 0, ih0, iw0): what _dwconv reads from
    ih0 = oh * STRIDE
    iw0 = ow * STRIDE
    return _ptrs(x_ptr, c, ih0, iw0, sxc, sxh, sxw), ih0, iw0


@triton.jit
def _img(b, sb):
    return tl.cast(b, tl.int64) * sb  # tl.cast: the interpreter's loop index is a Python int


@triton.jit
def _tap_off(dh, dw, sh, sw):
    # Offset of the pixel (dh, dw) away, in int64: a row stride times k // 2 may pass 2**31.
    return dh * tl.cast(sh, tl.int64) + dw * tl.cast(sw, tl.int64)


@triton.jit
def _count(B, HWo, ACC: tl.constexpr):
    # Values per channel, B * Ho * Wo, in ACC: the int32 product would overflow once it passes 2**31 (tl.cast also
    # takes the ints Triton specialises to constexprs).
    return tl.cast(B, ACC) * HWo


@triton.jit
def _load_tap(xc, ih0, iw0, c_mask, hw_mask, H, W, sxh, sxw, dh, dw, ACC: tl.constexpr):
    # xc points at input pixel (ih0, iw0) = (oh, ow) * stride; a tap is a scalar offset from it.
    ih = ih0 + dh
    iw = iw0 + dw
    ok = hw_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(xc + _tap_off(dh, dw, sxh, sxw), mask=c_mask[:, None] & ok[None, :], other=0.0).to(ACC)


@triton.jit
def _dwconv(xc, w_ptr, c, c_mask, ih0, iw0, hw_mask, H, W, sxh, sxw,
            K: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # z of one image; xc: _ptrs at (ih0, iw0) = (oh, ow) * stride, plus the image's offset
    z = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for kh in range(K):
        for kw in tl.static_range(K):
            wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw), mask=c_mask, other=0.0).to(ACC)
            z += wv[:, None] * _load_tap(xc, ih0, iw0, c_mask, hw_mask, H, W, sxh, sxw, kh - K // 2, kw - K // 2, ACC)
    return z


@triton.jit
def _upstream_grad(gp, yp, mask, RELU: tl.constexpr, ACC: tl.constexpr):
    # g = grad of the pre-ReLU sum at one image's pointers gp (grad_y) and yp (y); y > 0 is the ReLU mask.
    g = tl.load(gp, mask=mask, other=0.0).to(ACC)
    if RELU:
        g = tl.where(tl.load(yp, mask=mask, other=0.0) > 0, g, 0.0)
    return g


# ---- forward ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_eval_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, B, G, n_tiles, n_cblk, C, H, W, Ho, Wo,
                     sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                     K: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    _, b0, b1, _, c, cm, oh, ow, pm = _tile(B, G, n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    xc, ih0, iw0 = _conv_in(x_ptr, c, oh, ow, sxc, sxh, sxw, STRIDE)
    yc = _ptrs(y_ptr, c, oh, ow, syc, syh, syw)
    bias = tl.load(bias_ptr + c, mask=cm, other=0.0).to(ACC)
    mask = cm[:, None] & pm[None, :]
    for b in range(b0, b1):
        z = _dwconv(xc + _img(b, sxb), w_ptr, c, cm, ih0, iw0, pm, H, W, sxh, sxw, K, ACC, BLOCK_C, BLOCK_HW)
        z += bias[:, None]
        if RELU:
            z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as torch
        tl.store(yc + _img(b, syb), z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_stats_kernel(x_ptr, w_ptr, part_ptr, B, G, n_tiles, n_cblk, S, C, H, W, Ho, Wo,
                      sxb, sxc, sxh, sxw,
                      K: tl.constexpr, STRIDE: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # (mean, M2, count) of z per (tile, group) at [., s, c] of (3, S, C): a Welford update per pixel across the
    # group's images, then one merge of the tile's pixels (each holds b1 - b0 values; masked ones none).
    s, b0, b1, t, c, cm, oh, ow, pm = _tile(B, G, n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    xc, ih0, iw0 = _conv_in(x_ptr, c, oh, ow, sxc, sxh, sxw, STRIDE)
    mean = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for b in range(b0, b1):
        z = _dwconv(xc + _img(b, sxb), w_ptr, c, cm, ih0, iw0, pm, H, W, sxh, sxw, K, ACC, BLOCK_C, BLOCK_HW)
        d = z - mean
        mean += d * (1.0 / tl.cast(b - b0 + 1, ACC))
        m2 += d * (z - mean)  # masked pixels: z = 0, so mean and m2 stay 0
    n = tl.minimum(Ho * Wo - t * BLOCK_HW, BLOCK_HW).to(ACC)
    reps = tl.cast(b1 - b0, ACC)
    tile_mean = tl.sum(mean, axis=1) / n
    d = tl.where(pm[None, :], mean - tile_mean[:, None], 0.0)
    _welford_store(part_ptr, s, S, C, c, cm, tile_mean, tl.sum(m2 + reps * d * d, axis=1), n * reps)


@triton.jit
def _fwd_apply_kernel(x_ptr, w_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, y_ptr, eps: tl.float64,
                      B, G, n_tiles, n_cblk, C, H, W, Ho, Wo,
                      sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                      K: tl.constexpr, STRIDE: tl.constexpr, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    _, b0, b1, _, c, cm, oh, ow, pm = _tile(B, G, n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    xc, ih0, iw0 = _conv_in(x_ptr, c, oh, ow, sxc, sxh, sxw, STRIDE)
    yc = _ptrs(y_ptr, c, oh, ow, syc, syh, syw)
    scale = _rstd(var_ptr, c, cm, eps) * tl.load(bnw_ptr + c, mask=cm, other=0.0).to(ACC)
    shift = tl.load(bnb_ptr + c, mask=cm, other=0.0).to(ACC) - tl.load(mean_ptr + c, mask=cm, other=0.0) * scale
    mask = cm[:, None] & pm[None, :]
    for b in range(b0, b1):
        xb = xc + _img(b, sxb)
        z = _dwconv(xb, w_ptr, c, cm, ih0, iw0, pm, H, W, sxh, sxw, K, ACC, BLOCK_C, BLOCK_HW)
        y = z * scale[:, None] + shift[:, None]
        if RESIDUAL:  # stride 1: output pixel == input pixel, where xb points
            y += tl.load(xb, mask=mask, other=0.0).to(ACC)
        if RELU:
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(yc + _img(b, syb), y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- backward --------------------------------------------------------------------------------------------

@triton.jit
def _bwd_stats_kernel(gy_ptr, y_ptr, x_ptr, w_ptr, mean_ptr, var_ptr, part_ptr, eps: tl.float64,
                      B, G, n_tiles, n_cblk, S, C, H, W, Ho, Wo,
                      sgb, sgc, sgh, sgw, syb, syc, syh, syw, sxb, sxc, sxh, sxw,
                      K: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # Pass A: per-(tile, group) sums of g and g * zhat at [s, c] and [s, C + c] of (S, 2C), accumulated per pixel
    # across the group's images.
    s, b0, b1, _, c, cm, oh, ow, pm = _tile(B, G, n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    mask = cm[:, None] & pm[None, :]
    xc, ih0, iw0 = _conv_in(x_ptr, c, oh, ow, sxc, sxh, sxw, STRIDE)
    gc = _ptrs(gy_ptr, c, oh, ow, sgc, sgh, sgw)
    yc = _ptrs(y_ptr, c, oh, ow, syc, syh, syw)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    rstd = _rstd(var_ptr, c, cm, eps)
    sum_g = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    sum_gz = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for b in range(b0, b1):
        g = _upstream_grad(gc + _img(b, sgb), yc + _img(b, syb), mask, RELU, ACC)
        z = _dwconv(xc + _img(b, sxb), w_ptr, c, cm, ih0, iw0, pm, H, W, sxh, sxw, K, ACC, BLOCK_C, BLOCK_HW)
        sum_g += g  # g is 0 off the tile: no extra masking
        sum_gz += g * ((z - mean[:, None]) * rstd[:, None])
    tl.store(part_ptr + _at(s, 2 * C, c), tl.sum(sum_g, axis=1), mask=cm)
    tl.store(part_ptr + _at(s, 2 * C, C + c), tl.sum(sum_gz, axis=1), mask=cm)


@triton.jit
def _bwd_dz_kernel(gy_ptr, y_ptr, x_ptr, w_ptr, mean_ptr, var_ptr, bnw_ptr, sums_ptr, dz_ptr, eps: tl.float64,
                   B, G, n_tiles, n_cblk, C, H, W, Ho, Wo,
                   sgb, sgc, sgh, sgw, syb, syc, syh, syw, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                   K: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # Pass B: dz = bn_w * rstd * (g - mean(g) - zhat * mean(g * zhat)) (sums_ptr: [sum g | sum g * zhat]).
    _, b0, b1, _, c, cm, oh, ow, pm = _tile(B, G, n_tiles, n_cblk, C, Ho * Wo, Wo, BLOCK_C, BLOCK_HW)
    mask = cm[:, None] & pm[None, :]
    xc, ih0, iw0 = _conv_in(x_ptr, c, oh, ow, sxc, sxh, sxw, STRIDE)
    gc = _ptrs(gy_ptr, c, oh, ow, sgc, sgh, sgw)
    yc = _ptrs(y_ptr, c, oh, ow, syc, syh, syw)
    dc = _ptrs(dz_ptr, c, oh, ow, sdc, sdh, sdw)
    mean, rstd, a, mg, mgz = _bn_grad_coef(mean_ptr, var_ptr, bnw_ptr, sums_ptr, eps, _count(B, Ho * Wo, ACC), c, cm,
                                           C, ACC)
    for b in range(b0, b1):
        g = _upstream_grad(gc + _img(b, sgb), yc + _img(b, syb), mask, RELU, ACC)
        z = _dwconv(xc + _img(b, sxb), w_ptr, c, cm, ih0, iw0, pm, H, W, sxh, sxw, K, ACC, BLOCK_C, BLOCK_HW)
        dz = _bn_grad_apply(g, z, mean, rstd, a, mg, mgz, mask)
        tl.store(dc + _img(b, sdb), dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dx_kernel(dz_ptr, w_ptr, x_ptr, gy_ptr, y_ptr, gx_ptr, part_ptr, B, G, n_tiles, n_cblk, S, C, H, W, Ho, Wo,
                   sdb, sdc, sdh, sdw, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, syb, syc, syh, syw,
                   sob, soc, soh, sow,
                   K: tl.constexpr, STRIDE: tl.constexpr, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, KK_PAD: tl.constexpr):
    # Pass C, tiled over input pixels q: grad_x[q] = sum over taps of w[tap] * dz[output pixel reading q through
    # tap] (+ g for the residual), and, from the same dz loads, grad_weight[tap] = sum over q of that dz * x[q]:
    # per-(tile, group) partials at [s, c * K * K + tap] of (S, C * K * K).
    s, b0, b1, _, c, cm, ih, iw, pm = _tile(B, G, n_tiles, n_cblk, C, H * W, W, BLOCK_C, BLOCK_HW)
    mask = cm[:, None] & pm[None, :]
    d_base = dz_ptr + (c.to(tl.int64) * sdc)[:, None]
    d_ctr = d_base + (ih.to(tl.int64) * sdh + iw.to(tl.int64) * sdw)[None, :]
    xq = _ptrs(x_ptr, c, ih, iw, sxc, sxh, sxw)
    gc = _ptrs(gy_ptr, c, ih, iw, sgc, sgh, sgw)
    yc = _ptrs(y_ptr, c, ih, iw, syc, syh, syw)
    oc = _ptrs(gx_ptr, c, ih, iw, soc, soh, sow)
    tap = tl.arange(0, KK_PAD)
    wsum = tl.zeros([BLOCK_C, KK_PAD], ACC)
    for b in range(b0, b1):
        d_img = _img(b, sdb)
        xv = tl.load(xq + _img(b, sxb), mask=mask, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
        for kh in range(K):
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
                d = tl.load(d_ptr + d_img, mask=cm[:, None] & ok[None, :], other=0.0).to(ACC)
                acc += wv[:, None] * d
                wsum += tl.where(tap[None, :] == kh * K + kw, tl.sum(d * xv, axis=1)[:, None], 0.0)
        if RESIDUAL:
            acc += _upstream_grad(gc + _img(b, sgb), yc + _img(b, syb), mask, RELU, ACC)
        tl.store(oc + _img(b, sob), acc.to(gx_ptr.dtype.element_ty), mask=mask)
    rows = (c * (K * K))[:, None] + tap[None, :]
    tl.store(part_ptr + _at(s, C * (K * K), rows), wsum, mask=cm[:, None] & (tap < K * K)[None, :])


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
    """Tiling of a (B, C, h, w) pixel space into [BLOCK_C, BLOCK_HW] tiles along the contiguous dimension, each
    program running its tile over a group of `images` images."""

    def __init__(self, B: int, C: int, h: int, w: int, fmt: torch.memory_format):
        hw = h * w
        if fmt == torch.channels_last:  # C is contiguous: wide along C
            self.block_c = min(triton.next_power_of_2(C), 64)
            self.block_hw = min(triton.next_power_of_2(hw), max(_TILE // self.block_c, 1))
        else:  # W is contiguous: wide along the flattened pixels
            self.block_hw = min(triton.next_power_of_2(hw), _TILE, _ROW_PX)
            self.block_c = min(triton.next_power_of_2(C), max(_TILE // self.block_hw, 1))
        self.n_tiles = triton.cdiv(hw, self.block_hw)
        self.n_cblk = triton.cdiv(C, self.block_c)
        tiles = self.n_tiles * self.n_cblk
        self.images = max(1, min(_IMAGES, B, B * tiles // _PROGRAMS))
        n_groups = triton.cdiv(B, self.images)
        self.S = n_groups * self.n_tiles  # partials per channel
        self.grid = (n_groups * tiles,)
        self.args = (B, self.images, self.n_tiles, self.n_cblk)
        self.meta = {"BLOCK_C": self.block_c, "BLOCK_HW": self.block_hw, "num_warps": _WARPS}
        # Program ids, pixel indices within a plane and tile indices are int32 in the kernels (every element
        # offset is int64): what they count must fit. Past this the input would be > 2**31 pixels per plane, or
        # > 2**40 elements.
        if hw + self.block_hw >= 2**31 or self.grid[0] >= 2**31:
            raise ValueError(f"dwconv_bn (triton): input too large to tile: B={B}, C={C}, H*W={h}*{w}")


def _out_hw(x: torch.Tensor, stride: int) -> tuple[int, int]:
    return (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1  # odd k, padding k // 2


def dwconv_bn_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, relu: bool) -> torch.Tensor:
    """Eval form: y = [relu](dwconv(x, weight) + bias), BN (and any residual identity) folded by the caller."""
    k = _kernel_size(x, weight, stride)
    x, fmt = _layout(x)
    B, C, H, W = x.shape
    Ho, Wo = _out_hw(x, stride)
    y = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    g = _Grid(B, C, Ho, Wo, fmt)
    _fwd_eval_kernel[g.grid](x, weight.contiguous(), bias.contiguous(), y, *g.args, C, H, W, Ho, Wo,
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
    part = torch.empty((3, g.S, C), dtype=acc, device=x.device)
    _fwd_stats_kernel[g.grid](x, weight, part, *g.args, g.S, C, H, W, Ho, Wo, *x.stride(),
                              K=k, STRIDE=stride, ACC=_TL[acc], **g.meta)
    mean, var = _welford(part)
    y = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    _fwd_apply_kernel[g.grid](x, weight, mean, var, bn_weight.contiguous(), bn_bias.contiguous(), y, eps,
                              *g.args, C, H, W, Ho, Wo, *x.stride(), *y.stride(),
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

    part = torch.empty((g.S, 2 * C), dtype=acc, device=x.device)
    _bwd_stats_kernel[g.grid](grad_y, y_arg, x, weight, mean, var, part, eps, *g.args, g.S, C, H, W, Ho, Wo,
                              *strides, **meta)
    sums = _sum(part)  # [sum g ; sum g * zhat]

    # dz in the activation dtype, as stock autograd keeps it: half the bytes of pass B's write and C's read
    dz = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    _bwd_dz_kernel[g.grid](grad_y, y_arg, x, weight, mean, var, bn_weight.contiguous(), sums, dz, eps, *g.args,
                           C, H, W, Ho, Wo, *strides, *dz.stride(), **meta)

    grad_x = torch.empty_like(x, memory_format=fmt)
    gi = _Grid(B, C, H, W, fmt)
    part_w = torch.empty((gi.S, C * k * k), dtype=acc, device=x.device)
    _bwd_dx_kernel[gi.grid](dz, weight, x, grad_y, y_arg, grad_x, part_w, *gi.args, gi.S, C, H, W, Ho, Wo,
                            *dz.stride(), *x.stride(), *grad_y.stride(), *y_arg.stride(), *grad_x.stride(),
                            K=k, STRIDE=stride, RESIDUAL=residual, RELU=relu, ACC=_TL[acc],
                            KK_PAD=triton.next_power_of_2(k * k), **gi.meta)
    grad_weight = _sum(part_w).view(C, 1, k, k).to(weight.dtype)
    # copies: the outputs must not alias each other
    return grad_x, grad_weight, sums[C:].to(bn_weight.dtype, copy=True), sums[:C].to(bn_weight.dtype, copy=True)


# The backend interface of `shvit_kernels.ops.dwconv_bn` (same names as `shvit_kernels.reference.dwconv_bn`).
fwd = dwconv_bn_fwd
train_fwd = dwconv_bn_train_fwd
train_bwd = dwconv_bn_train_bwd
