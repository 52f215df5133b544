"""Triton fused residual FFN (shvit_kernels.triton.ffn) against the float64 reference spec
(shvit_kernels.reference.ffn).

Devices and the interpreter: tests/triton/__init__.py.
"""
import pytest
import torch

from tests.triton import gpu_dims, triton_device

DEVICE = triton_device()

import shvit_kernels
from shvit_kernels.reference import ffn as ref
from shvit_kernels.triton import _common
from shvit_kernels.triton import _token_gemm as TG
from shvit_kernels.triton import ffn as T
from tests.triton.test_shsa_triton import _LargestAllocation

EPS = 1e-5
# Max error over the larger of the reference's largest magnitude and 1 (as in test_shsa_triton)
TOL = {torch.float64: 1e-11, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
INTERPRETED = DEVICE == "cpu"
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


def _err(out, want):
    return ((out.detach().cpu().double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


def _inputs(b, d, h, hh, ww, dtype, param_dtype, train, channels_last, seed=None):
    """(x, grad_y, params in the reference's argument order) rounded to dtype (1-D params to param_dtype), on
    DEVICE, and float64 CPU copies of the rounded values for the reference. Fresh random values unless seeded."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ())))
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    uniform = lambda n: torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, gy = (randn(b, d, hh, ww).contiguous(memory_format=fmt) for _ in range(2))
    w1, w2 = randn(h, d) / d ** 0.5, randn(d, h) / h ** 0.5
    if train:
        params = [w1, uniform(h), randn(h), EPS, w2, uniform(d), randn(d), EPS]
    else:
        params = [w1, randn(h), w2, randn(d)]
    ours = [x.to(dtype), gy.to(dtype)]
    for p in params:
        ours.append(p.to(dtype if p.dim() == 2 else param_dtype) if isinstance(p, torch.Tensor) else p)
    ours = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in ours]
    refs = [t.cpu().double() if isinstance(t, torch.Tensor) else t for t in ours]
    return ours, refs


def _check(got, want, like, dtype, what, fmt=None):
    for i, (a, b, t) in enumerate(zip(got, want, like, strict=True)):
        assert a.shape == b.shape and a.dtype == t.dtype and a.device.type == DEVICE, (what, i, a.shape, a.dtype)
        assert _err(a, b) < TOL[dtype], (what, i, _err(a, b))
    if fmt is not None:  # outputs and grad_x keep x's layout
        assert got[0].is_contiguous(memory_format=fmt), what


def _run_eval(ours, refs, dtype):
    x, gy, *p = ours
    xr, gyr, *pr = refs
    fmt = ref.memory_format(x)
    y = T.fwd(x, *p)
    _check([y], [ref.fwd(xr, *pr)], [x], dtype, "fwd", fmt)
    grads = T.bwd(gy, x, *p)
    _check(grads, ref.bwd(gyr, xr, *pr), [x, *p], dtype, "bwd", fmt)
    return (y, *grads)


def _run_train(ours, refs, dtype):
    x, gy, *p = ours
    xr, gyr, *pr = refs
    fmt = ref.memory_format(x)
    y, *stats, z1, z2 = T.train_fwd(x, *p)
    y_ref, *stats_ref, z1_ref, z2_ref = ref.train_fwd(xr, *pr)
    _check([y], [y_ref], [x], dtype, "train_fwd y", fmt)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    _check(stats, stats_ref, [torch.empty(0, dtype=stat_dtype)] * 4, dtype, "train_fwd stats")
    _check([z1, z2], [z1_ref, z2_ref], [x, x], dtype, "train_fwd z1, z2")
    assert z1.is_contiguous(memory_format=torch.channels_last) and z2.is_contiguous(memory_format=torch.channels_last)
    grads = T.train_bwd(gy, x, *p, *stats, z1, z2)
    # the reference backward from the same saved tensors: the forward's rounding of z1 to fp16 flips ReLU masks
    # where bn1(z1) ~ 0, a difference of whole grad values that is the forward's (tested above), not the backward's
    saved = [t.detach().cpu().double() for t in (*stats, z1, z2)]
    want = ref.train_bwd(gyr, xr, *pr, *saved)
    _check(grads, want, [x] + [t for t in p if isinstance(t, torch.Tensor)], dtype, "train_bwd", fmt)
    return (y, *stats, z1, z2, *grads)


# (B, d, h, H, W): N = 1 (B = 4: a BN over 2 values is ill-conditioned in fp32); h = 2d; odd h; 3x5 and 7x9 maps;
# d not a multiple of 8 (20, 36)
SHAPES = [(4, 20, 40, 1, 1), (2, 20, 37, 3, 5), (1, 36, 72, 7, 9), (3, 12, 24, 2, 3)]
_ids = ["x".join(map(str, s)) for s in SHAPES]


@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_eval(shape, dtype, channels_last, x_path):
    _run_eval(*_inputs(*shape, dtype, dtype, False, channels_last), dtype)


@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_train(shape, dtype, channels_last):
    _run_train(*_inputs(*shape, dtype, dtype, True, channels_last), dtype)


HALF = [torch.float16, pytest.param(torch.bfloat16, marks=[
    pytest.mark.gpu, pytest.mark.skipif(INTERPRETED, reason="the interpreter's bf16 dot is wrong (DESIGN.md)")])]


@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["params-same", "params-fp32"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_half(dtype, train, param_dtype):
    """fp16 / bf16 activations and weights; BN / bias vectors in the same dtype or, as under autocast, fp32."""
    ours, refs = _inputs(2, 20, 37, 3, 5, dtype, param_dtype or dtype, train, train)
    (_run_train if train else _run_eval)(ours, refs, dtype)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 and several weight-grad splits, so that a small shape takes every multi-block path: d row blocks
    (hidden recomputed per block), hidden blocks, K chunks, token tiles and split-K partials."""
    for mod in (T, _common):
        monkeypatch.setattr(mod, "_BLOCK_T", 16)
    for name in ("FUSED_ROWS", "FUSED_HIDDEN", "FUSED_K"):  # a GPU's float64 takes the FMA path, which halves them
        monkeypatch.setattr(T, name, 32 if DEVICE == "cuda" else 16)
    for name in ("_BLOCK_R", "_BLOCK_K"):  # the training GEMMs' tiles
        monkeypatch.setattr(TG, name, 16)
    for name in ("INTERP_WGRAD_PROGRAMS", "_GPU_PROGRAMS"):  # programs wanted under the interpreter / on a GPU
        monkeypatch.setattr(TG, name, 12)
    monkeypatch.setattr(TG, "RESIDENT_TOKENS", 16)  # the resident forward: 2 row blocks, 3 token tiles of 16
    monkeypatch.setattr(T, "_FWD_ACC", 256)


@LAYOUTS
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_multiblock(small_tiles, train, channels_last, x_path, token_tiles):
    b, d, h, hh, ww = 2, 20, 40, 3, 7
    dm = T._Dims(torch.empty(b, d, hh, ww, device=DEVICE), h)
    assert T._fused_blocks(dm, dm.N) == (16, 16, 16, 16)  # 2 row blocks, 3 hidden blocks, 2 K chunks
    # 42 tokens in 3 tiles, the second holding tokens of both samples; per sample, 2 tiles each
    flat = token_tiles == "flat"
    assert dm.tiles(flat) == ((16, 1, 3) if flat else (16, 2, 4))
    if x_path == "resident" and DEVICE == "cpu":
        assert T._resident_blocks(dm) == (16, 16, 32, 16)
    grid_rk = 3 * 2  # weight grads (h x d) in 16 x 16 blocks: 3 token tiles in splits of 2 + 1, or 4 in 2 + 2
    assert _common._split_k(dm.tiles(flat)[2], grid_rk, TG.INTERP_WGRAD_PROGRAMS) == (2, 2)
    ours, refs = _inputs(b, d, h, hh, ww, torch.float64, torch.float64, train, channels_last)
    (_run_train if train else _run_eval)(ours, refs, torch.float64)


def test_resident_rule_on_a_gpu():
    """The eval forward's tiles on a GPU (sizes only, no kernel runs): x resident with 128-token tiles and 16 warps'
    worth of accumulator at S4 stage 1 and batch 256, one 512-row block at stage 2; the K-step path for d > 512
    (a 16-row W1 / W2 step would not fit beside x's tile), for fp32 (FMA dots) and for N % 16 != 0 (224 px's
    14x14 and 7x7 maps, where the resident tile spilled)."""
    def rule(b, d, hw, dtype=torch.float16):
        return T._resident_blocks(gpu_dims(b, d, hw, 2 * d, dtype))

    assert rule(256, 224, 16) == (256, 32, 256, 128)
    assert rule(256, 336, 8) == (512, 16, 512, 64)
    assert rule(256, 640, 8) is None
    assert rule(256, 224, 16, torch.float32) is None
    assert rule(256, 192, 14) is None and rule(256, 308, 7) is None  # N % 16 != 0: the resident tile spilled


def test_flat_token_rule(monkeypatch):
    """The token GEMMs tile the flattened B*N tokens where N % 16 == 0: S4's maps at 256 px (256, 64 and 16 tokens)
    and its last stage at 224 px (16). 196 and 49 tokens (224 px) keep per-sample tiles: there a flat tile's
    per-token indices cost registers (sm_90 ptxas). FLAT_TOKENS = 1 / 0 forces either. Tiles never exceed 64
    tokens, whatever cap a launcher asks."""
    maps = [(16, 16), (8, 8), (4, 4), (14, 14), (7, 7), (1, 1)]

    def flat(hw):
        return T._Dims(torch.empty(2, 8, *hw), 16).flat

    assert [flat(hw) for hw in maps] == [True, True, True, False, False, False]
    monkeypatch.setattr(_common, "FLAT_TOKENS", 1)
    assert all(flat(hw) for hw in maps)
    monkeypatch.setattr(_common, "FLAT_TOKENS", 0)
    assert not any(flat(hw) for hw in maps)
    dm = T._Dims(torch.empty(256, 8, 4, 4), 16)
    assert dm.tiles(True, 512) == (64, 1, 64) and dm.tiles(False, 512) == (16, 1, 256)


def test_eval_forward_keeps_the_hidden_on_chip():
    """The eval forward allocates nothing larger than y (the hidden, 2x larger, never reaches memory); the training
    forward's largest buffer is the saved z1."""
    (x, _, *p), _ = _inputs(2, 8, 16, 8, 8, torch.float32, torch.float32, False, False)
    with _LargestAllocation() as mode:
        T.fwd(x, *p)
    assert mode.numel == x.numel(), mode.numel
    (x, _, *p), _ = _inputs(2, 8, 16, 8, 8, torch.float32, torch.float32, True, False)
    with _LargestAllocation() as mode:
        T.train_fwd(x, *p)
    assert mode.numel == 2 * x.numel(), mode.numel


@LAYOUTS
def test_gradcheck_through_ops(monkeypatch, channels_last):
    """float64 gradcheck of shvit::ffn and shvit::ffn_train on the triton backend (forward and backward ops)."""
    calls = []
    for name in ("fwd", "bwd", "train_fwd", "train_bwd"):
        fn = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    (_, _, *pe), (x, _, *_) = _inputs(2, 3, 5, 3, 2, torch.float64, torch.float64, False, channels_last)
    (_, _, *pt), _ = _inputs(2, 3, 5, 3, 2, torch.float64, torch.float64, True, channels_last)
    x = x.to(DEVICE).requires_grad_()
    ev = [t.requires_grad_() for t in pe]
    tr = [t.requires_grad_() for t in pt if isinstance(t, torch.Tensor)]
    with shvit_kernels.use_backend("triton"):
        # fast mode (random projections of the Jacobian): the full Jacobian needs ~100 interpreted calls per input
        assert torch.autograd.gradcheck(torch.ops.shvit.ffn, [x, *ev], fast_mode=True)
        assert torch.autograd.gradcheck(lambda *a: torch.ops.shvit.ffn_train(*a[:4], EPS, *a[4:], EPS)[0], [x, *tr],
                                        fast_mode=True)
    assert set(calls) == {"fwd", "bwd", "train_fwd", "train_bwd"}  # the op dispatched to these kernels
