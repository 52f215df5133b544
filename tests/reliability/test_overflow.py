"""Index arithmetic is 64-bit wherever B*C*H*W can exceed 2**31, checked without allocating such tensors.

- Shapes: every op and fused module runs on `meta` tensors of > 2**31 elements (the fake impls, forward and
  backward) and gives the right output / gradient shapes and layouts.
- Triton launchers: the real launchers of shvit_kernels/triton run on meta tensors of a huge logical shape with
  their kernels replaced by recorders; every grid fits CUDA's limits (x < 2**31, y and z <= 65535).
- Triton index helpers: small probe kernels call the kernels' offset helpers with operands whose int32 products
  overflow and compare with Python's exact integers (under the interpreter here, compiled on a GPU).
- CUDA sources: every block / grid index (32-bit unsigned) is widened to int64_t before it is multiplied.

Audit (issue #10, point 4). Found and fixed: Triton dwconv_bn's BatchNorm backward counted B*Ho*Wo as an int32
product (wrong gradients past 2**31 values per channel); its grad_weight partial offsets ((tap) * P), tap offsets
(k//2 * row stride), SHSA's sample offsets (b * rows) and partial-buffer offsets (s * R: Welford, sums, GroupNorm
backward) and the GroupNorm count P * N were int32 products; the ops failed on meta tensors (autocast check).
The C++ CPU kernels (csrc/cpu) index with int64_t throughout (sizes, plane and pixel offsets, partials); `int` holds
only kernel sizes, taps and vector lanes: nothing to fix. The CUDA kernels index with int64_t; their launchers
bound the grids (dwconv: B*H*W <= INT_MAX; SHSA: B <= 65535, B*N and C*C < INT_MAX); the products of a 32-bit
block index with a 64-bit size were already 64-bit, and are now written with the widening explicit.
"""
import re
from pathlib import Path

import pytest
import torch

import shvit_kernels as sk
from shvit_kernels import ops
from shvit_kernels.nn import ResidualDWConvBN
from tests.helpers import replace_triton_kernels

BIG = 2**31
META = torch.device("meta")


def _meta(*shape, grad=True, fmt=torch.contiguous_format):
    return torch.empty(*shape, device=META).contiguous(memory_format=fmt).requires_grad_(grad)


# ---- shapes on meta tensors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_dwconv_bn_meta_shapes(fmt, stride):
    b, c, h, w = 64, 256, 512, 513  # > 2**32 elements
    x, wt, v = _meta(b, c, h, w, fmt=fmt), _meta(c, 1, 3, 3), _meta(c)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    assert x.numel() > 2 * BIG
    y = ops.dwconv_bn(x, wt, v, stride, True)
    assert y.shape == (b, c, ho, wo) and y.is_contiguous(memory_format=fmt)
    y.sum().backward()
    assert x.grad.shape == x.shape and wt.grad.shape == wt.shape and v.grad.shape == v.shape
    y, mean, var = ops.dwconv_bn_train(x, wt, v, v, 1e-5, stride, stride == 1, False)
    assert y.shape == (b, c, ho, wo) and y.is_contiguous(memory_format=fmt) and mean.shape == var.shape == (c,)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_shsa_meta_shapes(train):
    b, c, p, q, h, w = 4096, 256, 64, 16, 64, 64  # 2**32 elements
    x = _meta(b, c, h, w)
    vec = {n: _meta(m) for n, m in (("gn_w", p), ("gn_b", p), ("o", 2 * q + p), ("c", c))}
    qkv_w, proj_w = _meta(2 * q + p, p), _meta(c, c)
    if train:
        y, stats = ops.shsa_train(x, vec["gn_w"], vec["gn_b"], qkv_w, vec["o"], vec["o"], proj_w, vec["c"], vec["c"],
                                  q, residual=True)
        assert [s.shape for s in stats] == [(2 * q + p,)] * 2 + [(c,)] * 2
    else:
        y = ops.shsa(x, vec["gn_w"], vec["gn_b"], qkv_w, vec["o"], proj_w, vec["c"], q, residual=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and qkv_w.grad.shape == qkv_w.shape and proj_w.grad.shape == proj_w.shape


@pytest.mark.parametrize("linear", [False, True])
def test_sra_meta_shapes(linear):
    b, h, w, c, heads, sr = 2**14, 64, 64, 64, 2, 8  # x: 2**32 elements
    x = _meta(b, h * w, c)
    red = ops.sra_reduce(x, h, w, _meta(c, c, 1 if linear else sr, 1 if linear else sr), _meta(c), _meta(c),
                         _meta(c), 1e-5, sr, linear)
    assert red.shape == (b, 49 if linear else (h // sr) * (w // sr), c)
    o = ops.sra_attention(x, red, _meta(c, c), _meta(c), _meta(2 * c, c), _meta(2 * c), heads, 0.25)
    assert o.shape == x.shape
    o.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_modules_meta_shapes(train):
    x = _meta(64, 256, 512, 512)
    for m in (sk.SHSA(256, 16, 64), ResidualDWConvBN(256)):
        m = m.to(META).train(train)
        with torch.no_grad():
            assert m(x).shape == x.shape
        m(x).sum().backward()
    sra = sk.SRA(64, 2, sr_ratio=8).to(META).train(train)
    t = _meta(2**15, 64 * 64, 64)
    assert sra(t, 64, 64).shape == t.shape


# ---- Triton launchers at a huge logical shape -----------------------------------------------------------------

try:
    import triton
    import triton.language as tl

    from shvit_kernels.triton import dwconv_bn as tdw
    from shvit_kernels.triton import ffn as tffn
    from shvit_kernels.triton import pw_conv_bn as tpw
    from shvit_kernels.triton import shsa as tsh
    from shvit_kernels.triton import sra as tsra
except ImportError:
    triton = None
needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@pytest.fixture
def launches(monkeypatch):
    """Replaces every kernel of the Triton modules by a recorder of (kernel name, grid)."""
    seen = []
    replace_triton_kernels(monkeypatch, lambda name, kernel, grid, args, kwargs: seen.append((name, grid)))
    return seen


def _assert_grids_fit(seen, expect_kernels):
    assert {name for name, _ in seen} >= set(expect_kernels), "the launchers did not run the expected kernels"
    for name, grid in seen:
        assert 1 <= len(grid) <= 3, (name, grid)
        for axis, (g, limit) in enumerate(zip(grid, GRID_LIMITS, strict=False)):
            assert 1 <= g <= limit, f"{name}: grid axis {axis} = {g} is outside 1..{limit}"


@needs_triton
@pytest.mark.parametrize("shape", [(64, 256, 512, 512), (2**17, 32, 33, 33), (2, 3, 40000, 40000)],
                         ids=["large", "batch>65535", "huge-plane"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_triton_dwconv_grids(launches, shape, fmt, stride):
    b, c, h, w = shape
    x = torch.empty(shape, device=META).contiguous(memory_format=fmt)
    assert x.numel() >= 2 * BIG
    wt, v = torch.empty(c, 1, 3, 3, device=META), torch.empty(c, device=META)
    y = tdw.fwd(x, wt, v, stride, True)
    y2, mean, var = tdw.train_fwd(x, wt, v, v, 1e-5, stride, stride == 1, True)
    gx, *_ = tdw.train_bwd(y, x, wt, v, mean, var, y2, 1e-5, stride, stride == 1, True)
    assert y.shape == y2.shape == (b, c, (h - 1) // stride + 1, (w - 1) // stride + 1) and gx.shape == x.shape
    _assert_grids_fit(launches, ["_fwd_eval_kernel", "_fwd_stats_kernel", "_welford_kernel", "_fwd_apply_kernel",
                                 "_bwd_stats_kernel", "_bwd_dz_kernel", "_sum_kernel", "_bwd_dx_kernel"])


@needs_triton
def test_triton_dwconv_refuses_untileable_planes():
    """Pixel indices within a plane are int32 in the kernels: a plane of 2**31 pixels is refused, not wrapped."""
    with pytest.raises(ValueError, match="too large"):
        tdw._Grid(1, 1, 2**16, 2**15, torch.contiguous_format)
    tdw._Grid(1, 1, 2**15, 2**15, torch.contiguous_format)  # 2**30 pixels: fine


@needs_triton
@pytest.mark.parametrize("shape", [(4096, 256, 64, 16, 64, 64), (70000, 128, 16, 16, 16, 16),
                                   (8, 448, 96, 16, 1024, 1024), (2**19 + 1, 64, 16, 16, 8, 8)],
                         ids=["large", "batch>65535", "large-N", "one-kernel-eval"])
def test_triton_shsa_grids(launches, shape):
    b, c, p, q, h, w = shape
    o = 2 * q + p
    x = torch.empty(b, c, h, w, device=META)
    assert x.numel() > BIG
    gn, qkv_w, ov, proj_w, cv = (torch.empty(*s, device=META) for s in ((p,), (o, p), (o,), (c, c), (c,)))
    assert tsh.fwd(x, gn, gn, 1e-5, qkv_w, ov, proj_w, cv, q, True).shape == x.shape
    assert tsh.bwd(x, x, gn, gn, 1e-5, qkv_w, ov, proj_w, cv, q, True)[0].shape == x.shape
    assert tsh.train_fwd(x, gn, gn, 1e-5, qkv_w, ov, ov, 1e-5, proj_w, cv, cv, 1e-5, q, True)[0].shape == x.shape
    grads = tsh.train_bwd(x, x, gn, gn, 1e-5, qkv_w, ov, ov, 1e-5, proj_w, cv, cv, 1e-5, ov, ov, cv, cv, q, True)
    assert grads[0].shape == x.shape
    _assert_grids_fit(launches, ["_gn_stats_kernel", "_qkv_kernel", "_attn_fwd_kernel", "_proj_kernel",
                                 "_bn_apply_kernel", "_wgrad_kernel", "_proj_bwd_kernel", "_attn_bwd_kernel",
                                 "_gn_bwd_dn_kernel", "_gn_bwd_dx_kernel", "_welford_kernel", "_sum_kernel"]
                      + (["_eval_kernel"] if h * w <= 64 else []))


@needs_triton
@pytest.mark.parametrize("shape", [(2**14, 64, 64, 64, 1, 8, False), (2**14, 56, 56, 64, 1, 1, True),
                                   (2**17, 17, 16, 64, 2, 4, False), (32, 400, 400, 512, 8, 1, False)],
                         ids=["sr8", "linear", "batch>65535", "sr1-large-M"])
def test_triton_sra_grids(launches, shape):
    b, h, w, c, heads, sr, linear = shape
    x = torch.empty(b, h * w, c, device=META)
    assert x.numel() > BIG
    vec, k = torch.empty(c, device=META), 1 if linear else sr
    sr_w, q_w, kv_w = (torch.empty(*s, device=META) for s in ((c, c, k, k), (c, c), (2 * c, c)))
    if sr == 1 and not linear:
        red = x  # no reduction: the keys are the tokens (M = N)
    else:
        red = tsra.reduce_fwd(x, h, w, sr_w, vec, vec, vec, 1e-5, sr, linear)
        assert red.shape == (b, 49 if linear else (h // sr) * (w // sr), c)
        grads = tsra.reduce_bwd(red, x, h, w, sr_w, vec, vec, vec, 1e-5, sr, linear)
        assert [g.shape for g in grads] == [x.shape, sr_w.shape, (c,), (c,), (c,)]
    o, lse = tsra.attn_fwd(x, red, q_w, vec, kv_w, None, heads, 0.125)
    assert o.shape == x.shape and lse.shape == (b, heads, h * w)
    grads = tsra.attn_bwd(o, x, red, q_w, vec, kv_w, None, o, lse, heads, 0.125)
    assert [g.shape for g in grads] == [x.shape, red.shape, q_w.shape, (c,), kv_w.shape, (2 * c,)]
    kernels = ["_linear_kernel", "_attn_fwd_kernel", "_attn_bwd_q_kernel", "_attn_bwd_kv_kernel", "_wgrad_kernel",
               "_sum_kernel"]
    if red is not x:
        kernels += ["_reduce_kernel"] + (["_pool_bwd_kernel"] if linear else [])
    _assert_grids_fit(launches, kernels)


@needs_triton
@pytest.mark.parametrize("shape", [(64, 256, 512, 512, 512), (2**17, 32, 33, 33, 64), (2, 3, 40000, 40000, 7)],
                         ids=["large", "batch>65535", "huge-plane"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_triton_ffn_grids(launches, shape, fmt):
    b, d, h, w, hid = shape
    x = torch.empty(b, d, h, w, device=META).contiguous(memory_format=fmt)
    assert x.numel() >= 2 * BIG
    w1, w2, hv, dv = (torch.empty(*s, device=META) for s in ((hid, d), (d, hid), (hid,), (d,)))
    assert tffn.fwd(x, w1, hv, w2, dv).shape == x.shape
    assert tffn.bwd(x, x, w1, hv, w2, dv)[0].shape == x.shape
    y, m1, v1, m2, v2, z1, z2 = tffn.train_fwd(x, w1, hv, hv, 1e-5, w2, dv, dv, 1e-5)
    assert y.shape == x.shape and y.is_contiguous(memory_format=fmt) and z1.shape == (b, hid, h, w)
    grads = tffn.train_bwd(x, x, w1, hv, hv, 1e-5, w2, dv, dv, 1e-5, m1, v1, m2, v2, z1, z2)
    assert grads[0].shape == x.shape and grads[1].shape == w1.shape
    _assert_grids_fit(launches, ["_fused_fwd_kernel", "_fused_bwd_kernel", "_gemm_kernel", "_bn_apply_kernel",
                                 "_bn_sums_kernel", "_wgrad_kernel", "_welford_kernel", "_sum_kernel"])


@needs_triton
@pytest.mark.parametrize("shape", [(64, 256, 512, 512, 512), (2**17, 32, 33, 33, 64), (2, 3, 40000, 40000, 7)],
                         ids=["large", "batch>65535", "huge-plane"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_triton_pw_conv_bn_grids(launches, shape, fmt):
    b, k, h, w, o = shape
    x = torch.empty(b, k, h, w, device=META).contiguous(memory_format=fmt)
    assert x.numel() >= 2 * BIG
    wt, ov, gate = torch.empty(o, k, device=META), torch.empty(o, device=META), torch.empty(b, k, device=META)
    y = tpw.fwd(x, wt, ov, gate, True)
    assert y.shape == (b, o, h, w) and y.is_contiguous(memory_format=fmt)
    assert [g.shape for g in tpw.bwd(y, x, wt, ov, gate, True, y)] == [x.shape, wt.shape, ov.shape, gate.shape]
    y, mean, var, z = tpw.train_fwd(x, wt, ov, ov, 1e-5, gate, True)
    grads = tpw.train_bwd(y, x, wt, ov, ov, 1e-5, gate, True, mean, var, z)
    assert [g.shape for g in grads] == [x.shape, wt.shape, ov.shape, ov.shape, gate.shape]
    _assert_grids_fit(launches, ["_gemm_kernel", "_bn_apply_kernel", "_bn_sums_kernel", "_wgrad_kernel",
                                 "_welford_kernel", "_sum_kernel"])


# ---- Triton index helpers with overflowing operands --------------------------------------------------------------

if triton is not None:
    _ptrs, _img, _tap_off, _count = tdw._ptrs, tdw._img, tdw._tap_off, tdw._count
    _rows, _rows_t, _at = tsh._rows, tsh._rows_t, tsh._at
    _tok_ptrs = tffn._ptrs

    @triton.jit
    def _probe_kernel(out_ptr, cnt_ptr, b, c, h, w, sb, sc, sh, sw, dh, dw, B, hwo, s, R, r, N, t):
        # Each helper with a zero int64 "pointer", so that the offset it adds comes out as a number.
        zero = tl.cast(0, tl.int64)
        one = tl.zeros([1], tl.int32)
        i = tl.arange(0, 1)
        tl.store(out_ptr + 0 + i[:, None], _ptrs(zero + _img(b, sb), c + one, h + one, w + one, sc, sh, sw))
        tl.store(out_ptr + 1, _tap_off(dh, dw, sh, sw))
        tl.store(out_ptr + 2 + i[:, None], _rows(zero, s, r + one, t + one, R, N))
        tl.store(out_ptr + 3 + i[:, None], _rows_t(zero, s, r + one, t + one, R, N))
        tl.store(out_ptr + 4, _at(s, R, r))
        tl.store(out_ptr + 5 + i[:, None], _tok_ptrs(zero, b, sb, r + one, sc, t + one, sh))
        tl.store(cnt_ptr, _count(B, hwo, tl.float64))


@needs_triton
def test_triton_index_helpers_are_64_bit():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Every operand fits int32 (so Triton passes it as one); every product below does not.
    v = dict(b=3, c=250, h=5, w=7, sb=2**30, sc=2**22, sh=2**30, sw=256, dh=-3, dw=3,
             B=2**21, hwo=2**12, s=2**21, R=2**11, r=2000, N=3, t=2)
    expect = [v["b"] * v["sb"] + v["c"] * v["sc"] + v["h"] * v["sh"] + v["w"] * v["sw"],
              v["dh"] * v["sh"] + v["dw"] * v["sw"],
              (v["s"] * v["R"] + v["r"]) * v["N"] + v["t"],
              (v["s"] * v["R"] + v["r"]) * v["N"] + v["t"],
              v["s"] * v["R"] + v["r"],
              v["b"] * v["sb"] + v["r"] * v["sc"] + v["t"] * v["sh"]]
    assert all(abs(e) >= BIG for e in expect)
    out = torch.zeros(6, dtype=torch.int64, device=device)
    cnt = torch.zeros(1, dtype=torch.float64, device=device)
    _probe_kernel[(1,)](out, cnt, *v.values())
    assert out.tolist() == expect
    assert cnt.item() == v["B"] * v["hwo"]  # B * Ho * Wo = 2**33 values per channel


if triton is not None:
    @triton.jit
    def _sra_probe_kernel(out_ptr, r, k, M, N, W, Wo, R, C):
        i = tl.arange(0, 1)
        tl.store(out_ptr + i[:, None], tsra._patch_off(r + i, k + i, M, N, W, Wo, R, C))
        tl.store(out_ptr + 1 + i[:, None], tsra._tok(tl.cast(0, tl.int64), r // M, k + i, N, C, r + i))


@needs_triton
def test_triton_sra_index_helpers_are_64_bit():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    v = dict(r=2**20 * 64 + 9 * 7 + 3, k=3 * 512 + 5, M=64, N=4096, W=64, Wo=8, R=8, C=512)
    b, t = divmod(v["r"], v["M"])
    tap, c = divmod(v["k"], v["C"])
    pix = (t // v["Wo"] * v["R"] + tap // v["R"]) * v["W"] + t % v["Wo"] * v["R"] + tap % v["R"]
    expect = [(b * v["N"] + pix) * v["C"] + c, (b * v["N"] + v["k"]) * v["C"] + v["r"]]
    assert all(e >= BIG for e in expect)
    out = torch.zeros(2, dtype=torch.int64, device=device)
    _sra_probe_kernel[(1,)](out, *v.values())
    assert out.tolist() == expect


# ---- CUDA sources ---------------------------------------------------------------------------------------------

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
# blockIdx / gridDim are 32-bit unsigned: `blockIdx.x * n` is a 32-bit product unless n is 64-bit, which the source
# does not show. The convention `int64_t{blockIdx.x} * n` makes every such product visibly 64-bit. (A convention
# check, not a proof: a 32-bit copy of an index multiplied later is not caught.)
UNWIDENED = re.compile(r"(?<![{(\w])(blockIdx|gridDim)\.[xyz]\s*\*(?!=)")


@pytest.mark.parametrize("src", sorted(CUDA_DIR.glob("*.cu*")) + sorted(CUDA_DIR.glob("*.h")), ids=lambda p: p.name)
def test_cuda_block_indices_are_widened_before_products(src):
    bad = [f"{src.name}:{n}: {line.strip()}" for n, line in enumerate(src.read_text().splitlines(), 1)
           if UNWIDENED.search(line.split("//")[0])]
    assert not bad, "multiply int64_t{blockIdx.x} (not blockIdx.x) by a size:\n" + "\n".join(bad)

