"""Triton fused SHSA (shvit_kernels.triton.shsa) against the float64 reference spec (shvit_kernels.reference.shsa).

Devices and the interpreter: tests/triton/__init__.py.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.triton import triton_device

DEVICE = triton_device()

import shvit_kernels
from shvit_kernels.reference import shsa as ref
from shvit_kernels.triton import shsa as T

EPS = 1e-5
# Max error over the larger of the reference's largest magnitude and 1: some grads are ~0 in exact arithmetic
# (e.g. the GroupNorm bias grad behind a training BN), so a purely relative measure would be noise.
TOL = {torch.float64: 1e-11, torch.float32: 1e-4, torch.float16: 1e-2}


def _err(out, want):
    return ((out.detach().cpu().double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


def _inputs(b, dim, pdim, qk, h, w, dtype, param_dtype, train, seed=0):
    """(x, grad_y, params in the reference's argument order) rounded to dtype (1-D params to param_dtype), on
    DEVICE, and float64 CPU copies of the rounded values for the reference."""
    g = torch.Generator().manual_seed(seed)
    o = 2 * qk + pdim
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    uniform = lambda n: torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    x, gy = randn(b, dim, h, w), randn(b, dim, h, w)
    params = [randn(pdim), randn(pdim), EPS, randn(o, pdim) / pdim ** 0.5]
    if train:
        params += [uniform(o), randn(o), EPS, randn(dim, dim) / dim ** 0.5, uniform(dim), randn(dim), EPS]
    else:
        params += [randn(o), randn(dim, dim) / dim ** 0.5, randn(dim)]
    ours = [x.to(dtype), gy.to(dtype)]
    for p in params:
        if isinstance(p, torch.Tensor):
            p = p.to(dtype if p.dim() == 2 else param_dtype)
        ours.append(p)
    ours = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in ours]
    ref_args = [t.cpu().double() if isinstance(t, torch.Tensor) else t for t in ours]
    return ours, ref_args


def _check(got, want, like, dtype, what):
    tol = TOL[dtype]
    for i, (a, b, t) in enumerate(zip(got, want, like)):
        assert a.shape == b.shape and a.dtype == t.dtype and a.device.type == DEVICE, (what, i, a.shape, a.dtype)
        assert _err(a, b) < tol, (what, i, _err(a, b))


def _run_eval(ours, refs, qk, residual, dtype):
    x, gy, *p = ours
    xr, gyr, *pr = refs
    y = T.fwd(x, *p, qk, residual)
    _check([y], [ref.fwd(xr, *pr, qk, residual)], [x], dtype, "fwd")
    grads = T.bwd(gy, x, *p, qk, residual)
    tensors = [x] + [t for t in p if isinstance(t, torch.Tensor)]
    _check(grads, ref.bwd(gyr, xr, *pr, qk, residual), tensors, dtype, "bwd")
    return (y, *grads)


def _run_train(ours, refs, qk, residual, dtype):
    x, gy, *p = ours
    xr, gyr, *pr = refs
    y, *stats = T.train_fwd(x, *p, qk, residual)
    y_ref, *stats_ref = ref.train_fwd(xr, *pr, qk, residual)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    _check([y], [y_ref], [x], dtype, "train_fwd y")
    # batch statistics are accumulated in fp32/fp64 whatever the activation dtype; z is rounded in fp16
    _check(stats, stats_ref, [torch.empty(0, dtype=stat_dtype)] * 4, dtype, "train_fwd stats")
    grads = T.train_bwd(gy, x, *p, *stats, qk, residual)
    tensors = [x] + [t for t in p if isinstance(t, torch.Tensor)]
    _check(grads, ref.train_bwd(gyr, xr, *pr, *stats_ref, qk, residual), tensors, dtype, "train_bwd")
    return (y, *stats, *grads)


@pytest.fixture
def small_blocks(monkeypatch):
    """Attention blocks of 16 tokens: N = 63 takes 4 key blocks (online softmax; multi-block backward)."""
    monkeypatch.setattr(T, "BLOCK_KEYS", 16)
    monkeypatch.setattr(T, "BLOCK_QUERIES", 16)
    monkeypatch.setattr(T, "SINGLE_PASS_MAX", 16)


@pytest.fixture(params=["one_kernel", "launches"])
def eval_path(request, monkeypatch):
    """The eval forward's two paths: _eval_kernel, or (ONE_KERNEL_TILE = 0) the launches the backward also makes."""
    if request.param == "launches":
        monkeypatch.setattr(T, "ONE_KERNEL_TILE", 0)
    return request.param


# (B, dim, pdim, qk, H, W): N = 1; pdim == dim; 7x9; pdim 66 / 75 (padded to 128) with few other channels
SHAPES = [(1, 9, 9, 2, 1, 1), (2, 12, 12, 4, 2, 3), (2, 20, 8, 4, 7, 9), (2, 70, 66, 16, 2, 3),
          (2, 78, 75, 16, 3, 2)]
_ids = ["x".join(map(str, s)) for s in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_eval_fp32(shape, eval_path, token_tiles):
    ours, refs = _inputs(*shape, torch.float32, torch.float32, train=False)
    _run_eval(ours, refs, shape[3], shape[1] % 2 == 0, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_one_kernel_channel_groups(monkeypatch, dtype):
    """The eval forward in one launch, each sample's output channels split over 3 programs (blocks of 16 of 70
    channels: 2, 2 and 1 blocks), against float64; the multi-launch path must not run."""
    monkeypatch.setattr(T, "_EVAL_BLOCK_C", 16)
    monkeypatch.setattr(T, "INTERP_EVAL_PROGRAMS", 6)
    monkeypatch.setattr(T, "_Front", None)
    ours, refs = _inputs(2, 70, 17, 5, 3, 5, dtype, torch.float32 if dtype == torch.float16 else dtype, train=False)
    (x, _, *p), (xr, _, *pr) = ours, refs
    for residual in (False, True):
        _check([T.fwd(x, *p, 5, residual)], [ref.fwd(xr, *pr, 5, residual)], [x], dtype, "fwd")


@pytest.mark.parametrize("shape", SHAPES[1:], ids=_ids[1:])  # BN training needs B * N > 1
def test_train_fp32(shape, token_tiles):
    ours, refs = _inputs(*shape, torch.float32, torch.float32, train=True)
    _run_train(ours, refs, shape[3], shape[1] % 2 == 1, torch.float32)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_online_softmax_multiblock(small_blocks, train, dtype):
    shape = (2, 20, 7, 3, 7, 9)
    sizes = T._Sizes(torch.empty(2, 20, 7, 9), torch.empty(7), 3)
    assert T._attn_blocks(sizes)[1:] == (16, 16)  # key blocks of 16 < N = 63: the online path
    ours, refs = _inputs(*shape, dtype, dtype, train=train)
    (_run_train if train else _run_eval)(ours, refs, 3, True, dtype)


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("train", [False, True])
def test_fp16(train, param_dtype):
    """fp16 activations and weights; norm parameters in fp16 or, as under autocast, fp32."""
    shape = (2, 24, 8, 4, 4, 4)
    ours, refs = _inputs(*shape, torch.float16, param_dtype, train=train)
    (_run_train if train else _run_eval)(ours, refs, 4, True, torch.float16)


def test_fp16_multiblock(small_blocks):
    ours, refs = _inputs(2, 20, 7, 3, 7, 9, torch.float16, torch.float32, train=False)
    _run_eval(ours, refs, 3, False, torch.float16)


def test_deterministic(small_blocks):
    ours, refs = _inputs(2, 20, 7, 3, 7, 9, torch.float32, torch.float32, train=True)
    first = _run_train(ours, refs, 3, True, torch.float32)
    second = _run_train(ours, refs, 3, True, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


class _LargestAllocation(TorchDispatchMode):
    """Records the largest floating tensor any torch op (allocations included) returns inside the block (the
    interpreter's own byte-storage copies are uint8)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.numel = max(self.numel, t.numel())
        return out


def test_no_n_by_n_buffer(small_blocks):
    """N = 128 tokens in blocks of 16: no host-side buffer of any entry point comes near N x N elements."""
    b, dim, pdim, qk, h, w = 1, 6, 4, 2, 8, 16
    n = h * w
    (x, gy, *p), _ = _inputs(b, dim, pdim, qk, h, w, torch.float32, torch.float32, train=False)
    (_, _, *pt), _ = _inputs(b, dim, pdim, qk, h, w, torch.float32, torch.float32, train=True)
    with _LargestAllocation() as mode:
        T.fwd(x, *p, qk, True)
        T.bwd(gy, x, *p, qk, True)
        _, *stats = T.train_fwd(x, *pt, qk, True)
        T.train_bwd(gy, x, *pt, *stats, qk, True)
    assert mode.numel <= (2 * qk + pdim) * n < n * n // 8, mode.numel  # the largest is z: (B, 2 qk + pdim, N)


def test_gradcheck_through_op():
    """float64 gradcheck of torch.ops.shvit.shsa_train on the triton backend (forward and backward ops)."""
    dim, pdim, qk = 6, 4, 2
    _, refs = _inputs(2, dim, pdim, qk, 3, 2, torch.float64, torch.float64, train=True)
    x, _, *p = [t.to(DEVICE).requires_grad_() if isinstance(t, torch.Tensor) else t for t in refs]

    def f(x, gn_w, gn_b, qkv_w, qkv_bn_w, qkv_bn_b, proj_w, proj_bn_w, proj_bn_b):
        return torch.ops.shvit.shsa_train(x, gn_w, gn_b, EPS, qkv_w, qkv_bn_w, qkv_bn_b, EPS, proj_w, proj_bn_w,
                                          proj_bn_b, EPS, qk, True)[0]

    with shvit_kernels.use_backend("triton"):
        # fast mode (random projections of the Jacobian): the full Jacobian needs ~350 interpreted forwards
        assert torch.autograd.gradcheck(f, [x] + [t for t in p if isinstance(t, torch.Tensor)], fast_mode=True)
