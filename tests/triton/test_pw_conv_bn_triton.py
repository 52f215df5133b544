"""Triton pointwise Conv2d_BN (shvit_kernels.triton.pw_conv_bn) against the float64 reference spec
(shvit_kernels.reference.pw_conv_bn): every path of the shared token GEMMs it uses (gate prologue, ReLU masks, BN
backward prologues, the gate-gradient epilogue), multi-tile shapes, fp16, and an allocation check that the gated
input is never materialised. tests/ops/test_pw_conv_bn.py runs the op-level tests on this backend too.

Devices and the interpreter: tests/triton/__init__.py.
"""
import pytest
import torch

from tests.triton import gpu_dims, triton_device

DEVICE = triton_device()

from shvit_kernels.reference import pw_conv_bn as ref
from shvit_kernels.triton import _common
from shvit_kernels.triton import _token_gemm as TG
from shvit_kernels.triton import pw_conv_bn as T
from torch.utils._python_dispatch import TorchDispatchMode

TOL = {torch.float64: 1e-11, torch.float32: 1e-4, torch.float16: 1e-2}


def _err(out, want):
    return ((out.detach().cpu().double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


def _inputs(b, k, o, hh, ww, dtype, train, gated, channels_last):
    """Our arguments (dtype, on DEVICE) of fwd / train_fwd, grad_y, and float64 CPU copies of both."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, k, hh, ww, dtype=torch.float64).contiguous(memory_format=fmt)
    gy = torch.randn(b, o, hh, ww, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(o, k, dtype=torch.float64) / k ** 0.5
    gate = torch.rand(b, k, dtype=torch.float64) if gated else None
    vec = [torch.rand(o, dtype=torch.float64) + 0.5, torch.randn(o, dtype=torch.float64), 1e-5] if train \
        else [torch.randn(o, dtype=torch.float64)]
    args = [x, w, *vec, gate]
    ours = [t.to(dtype).to(DEVICE) if isinstance(t, torch.Tensor) else t for t in args]
    refs = [t.cpu().double() if isinstance(t, torch.Tensor) else t for t in ours]
    return ours, refs, gy.to(dtype).to(DEVICE), gy.to(dtype).double()


def _check(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and a.device.type == DEVICE, (what, i, a.shape)
        assert a.numel() == 0 or _err(a, b) < TOL[dtype], (what, i, _err(a, b))  # (no gate: an empty grad)


def _run(b, k, o, hh, ww, dtype, train, gated, relu, channels_last):
    ours, refs, gy, gy_ref = _inputs(b, k, o, hh, ww, dtype, train, gated, channels_last)
    if train:
        y, mean, var, z = T.train_fwd(*ours, relu)
        want = ref.train_fwd(*refs, relu)
        _check((y, mean, var, z), want, dtype, "train_fwd")
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        stats = [t.cpu().double() for t in (mean, var, z)]
        got = T.train_bwd(gy, *ours, relu, mean, var, z)
        want = ref.train_bwd(gy_ref, *refs, relu, *stats)
    else:
        y = T.fwd(*ours, relu)
        _check((y,), (ref.fwd(*refs, relu),), dtype, "fwd")
        got = T.bwd(gy, *ours, relu, y if relu else None)
        want = ref.bwd(gy_ref, *refs, relu, y.cpu().double() if relu else None)
    _check(got, want, dtype, "train_bwd" if train else "bwd")


CASES = pytest.mark.parametrize("train,gated,relu", [(False, True, False), (False, False, True), (True, True, False),
                                                     (True, False, True), (True, True, True)])


@CASES
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_float64_matches_reference(train, gated, relu, channels_last, x_path):
    _run(2, 7, 13, 5, 3, torch.float64, train, gated, relu, channels_last)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 and several weight-grad splits: a small shape takes every multi-tile path (output row blocks, K
    chunks, token tiles per sample, split-K partials, the gate gradient summed over a sample's tiles)."""
    monkeypatch.setattr(_common, "_BLOCK_T", 16)
    for name in ("_BLOCK_R", "_BLOCK_K"):
        monkeypatch.setattr(TG, name, 16)
    monkeypatch.setattr(TG, "INTERP_WGRAD_PROGRAMS", 12)
    monkeypatch.setattr(TG, "RESIDENT_TOKENS", 16)  # the resident eval forward: 2 row blocks of 16, 3 token tiles
    monkeypatch.setattr(TG, "RESIDENT_W", 1024)


@CASES
def test_multitile(small_tiles, train, gated, relu, x_path, token_tiles):
    b, k, o, hh, ww = 2, 40, 20, 3, 7  # 3 K chunks, 2 row blocks (grad_x: 3); 2 token tiles per sample, or 3 flat
    dm = TG._Dims(torch.empty(b, k, hh, ww, device=DEVICE), o)
    assert dm.tiles(False) == (16, 2, 4) and dm.tiles(True) == (16, 1, 3)
    if x_path == "resident" and DEVICE == "cpu":  # 42 tokens in tiles of 16: the second holds both samples' tokens
        assert TG._resident_gemm(dm, k, o) == (64, 16, 16)
    _run(b, k, o, hh, ww, torch.float64, train, gated, relu, True)


def test_resident_rule_on_a_gpu():
    """Which eval forwards take _resident_kernel on a GPU (sizes only, no kernel runs): PatchMerging's conv1 at S4
    stage 1 and batch 256 (128-token tiles, 64-row blocks); not conv3 (K 896: 32-token tiles would stream W more
    often than _gemm_kernel), not a batch of 8 (tiles under 64 tokens), not fp32 (FMA dots); a narrow K with many
    rows keeps its accumulator at 16384 elements (128 rows of 128 tokens, not 1024: 8 warps would spill)."""
    def rule(b, k, hw, o, dtype=torch.float16):
        return TG._resident_gemm(gpu_dims(b, k, hw, o, dtype), k, o)

    assert rule(256, 224, 16, 896) == (256, 128, 64)
    assert rule(256, 896, 8, 336) is None
    assert rule(8, 224, 16, 896) is None
    assert rule(256, 224, 16, 896, torch.float32) is None
    assert rule(256, 128, 14, 512) is None  # N % 16 != 0: no tile spans samples
    assert rule(256, 16, 16, 1024) == (16, 128, 128)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_float16(train, x_path):
    _run(2, 24, 40, 4, 4, torch.float16, train, True, True, False)


class _Allocations(TorchDispatchMode):
    """Element counts of the floating tensors that torch ops inside the block return in new storage (not a view
    or the input itself, as contiguous() of a dense tensor)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out


def test_gated_input_is_never_written():
    """With the gate, the eval forward allocates y and nothing else of x's size or more (x * gate never exists); the
    training forward, z and y."""
    (x, w, b, gate), _, _, _ = _inputs(2, 64, 16, 8, 8, torch.float32, False, True, False)
    with _Allocations() as mode:
        T.fwd(x, w, b, gate, False)
    assert max(mode.sizes) == 2 * 16 * 8 * 8 < x.numel()
    (x, w, *bn, gate), _, _, _ = _inputs(2, 64, 16, 8, 8, torch.float32, True, True, False)
    with _Allocations() as mode:
        T.train_fwd(x, w, *bn, gate, False)
    assert sorted(mode.sizes)[-2:] == [2 * 16 * 8 * 8] * 2
