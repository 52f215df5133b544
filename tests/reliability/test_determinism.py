"""`torch.use_deterministic_algorithms(True)` is honoured: forward + backward of every op, run twice on the same fresh
random inputs, gives bitwise identical outputs and gradients on every backend that runs here (and, with the marker
`gpu`, on CUDA).

Audit of the kernels for scheduling-dependent arithmetic (issue #10, point 3):
- Triton (shvit_kernels/triton): no `tl.atomic_*` anywhere. Every cross-program reduction (BatchNorm / GroupNorm
  statistics, bias and BN-parameter gradients, the depthwise weight gradient, SHSA's and FFN's split-K weight
  gradients) writes per-program partials that a second kernel (`_sum` / `_welford`) adds in a fixed order;
  tile sizes and the split-K factor depend on the shape and device type only. Deterministic by construction: no mode
  to switch.
- CUDA (csrc/cuda): no `atomicAdd`; per-block partials reduced in a fixed order (reduce.cu), fixed shuffle / shared
  memory trees, split counts fixed by the shape (`wgrad_splits`, `grad_w_partials`, `conv_partials_*`). The same.
- C++ (csrc/cpu): no OpenMP reductions or atomics. dwconv_bn sums each channel inside one task in a fixed order;
  SHSA's and FFN's tasks are fixed by the shapes, their partials added in task order, BLAS runs single-threaded
  inside a task and the weight-gradient GEMMs are split into fixed row chunks. All claim results independent of the
  thread count: checked below for 1 vs 2 threads.
- ATen pieces: the eval-form dwconv_bn backward (every backend) is ATen's depthwise `convolution_backward`:
  deterministic run to run (cuDNN picks deterministic algorithms under the flag), but on CPU with channels_last its
  weight / bias gradients depend on the thread count, so the thread-count check covers the eval forward only.
  The SRA ops (reference backend only) with `linear=True` differentiated `adaptive_avg_pool2d`, whose CUDA backward
  scatters with atomicAdd and raises under the flag: fixed, `reference.sra.adaptive_avg_pool2d_backward` computes it
  with the pooling matrices (two GEMMs) when deterministic algorithms are on (checked on CPU against ATen below).
- On CUDA, cuBLAS (the reference backend's matmuls) is deterministic only with CUBLAS_WORKSPACE_CONFIG set, which
  this module sets before CUDA starts, as PyTorch's reproducibility notes ask.
"""
import os

import pytest
import torch

from shvit_kernels import backends, ops, use_backend
from shvit_kernels.reference.sra import adaptive_avg_pool2d_backward_gemm
from tests.helpers import cpu_backends

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


# ---- the ops as cases: case(device, dtype, size) -> (fn, leaves); fn() returns the op's outputs ---------------------
# size "small": a few Triton programs per launch (the interpreter costs ~8 ms per program); "threads": enough work
# for the C++ kernels to split over 2 threads.

def _leaf(*shape, device, dtype, scale=1.0, fmt=torch.contiguous_format, offset=0.0):
    t = torch.randn(*shape, device=device, dtype=torch.float64) * scale + offset
    return t.to(dtype).contiguous(memory_format=fmt).requires_grad_()


def _dwconv(train: bool, stride: int, channels_last: bool):
    def case(device, dtype, size):
        b, c, h, w = (2, 6, 9, 7) if size == "small" else (4, 32, 24, 20)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = _leaf(b, c, h, w, device=device, dtype=dtype, fmt=fmt)
        wt = _leaf(c, 1, 3, 3, device=device, dtype=dtype, scale=0.3)
        p1 = _leaf(c, device=device, dtype=torch.float32, scale=0.2, offset=1.0)
        p2 = _leaf(c, device=device, dtype=torch.float32, scale=0.2)
        if train:
            return (lambda: ops.dwconv_bn_train(x, wt, p1, p2, 1e-5, stride, stride == 1, True)), [x, wt, p1, p2]
        return (lambda: (ops.dwconv_bn(x, wt, p2.to(dtype), stride, True),)), [x, wt, p2]
    return case


def _shsa(train: bool):
    def case(device, dtype, size):
        b, c, p, q, h, w = (2, 10, 6, 4, 3, 5) if size == "small" else (8, 24, 10, 4, 7, 7)
        kw = dict(device=device, dtype=dtype)
        x = _leaf(b, c, h, w, **kw)
        gn_w, gn_b = _leaf(p, **kw, scale=0.2, offset=1.0), _leaf(p, **kw, scale=0.2)
        qkv_w, proj_w = _leaf(2 * q + p, p, **kw, scale=p ** -0.5), _leaf(c, c, **kw, scale=c ** -0.5)
        o1, o2 = _leaf(2 * q + p, **kw, scale=0.2, offset=1.0), _leaf(2 * q + p, **kw, scale=0.2)
        c1, c2 = _leaf(c, **kw, scale=0.2, offset=1.0), _leaf(c, **kw, scale=0.2)
        if train:
            leaves = [x, gn_w, gn_b, qkv_w, o1, o2, proj_w, c1, c2]
            return (lambda: _flat(*ops.shsa_train(*leaves, q, residual=True))), leaves
        leaves = [x, gn_w, gn_b, qkv_w, o2, proj_w, c2]
        return (lambda: (ops.shsa(*leaves, q, residual=True),)), leaves
    return case


def _ffn(train: bool, channels_last: bool):
    def case(device, dtype, size):
        b, c, h, w = (2, 6, 3, 5) if size == "small" else (8, 24, 7, 7)
        kw = dict(device=device, dtype=dtype)
        x = _leaf(b, c, h, w, **kw, fmt=torch.channels_last if channels_last else torch.contiguous_format)
        w1, w2 = _leaf(2 * c, c, **kw, scale=c ** -0.5), _leaf(c, 2 * c, **kw, scale=(2 * c) ** -0.5)
        g1, b1 = _leaf(2 * c, **kw, scale=0.2, offset=1.0), _leaf(2 * c, **kw, scale=0.2)
        g2, b2 = _leaf(c, **kw, scale=0.2, offset=1.0), _leaf(c, **kw, scale=0.2)
        if train:
            leaves = [x, w1, g1, b1, w2, g2, b2]
            return (lambda: _flat(*ops.ffn_train(*leaves))), leaves
        leaves = [x, w1, b1, w2, b2]
        return (lambda: (ops.ffn(*leaves),)), leaves
    return case


def _pw_conv_bn(train: bool, channels_last: bool):
    def case(device, dtype, size):
        b, k, h, w, o = (2, 6, 3, 5, 9) if size == "small" else (8, 24, 7, 7, 40)
        kw = dict(device=device, dtype=dtype)
        x = _leaf(b, k, h, w, **kw, fmt=torch.channels_last if channels_last else torch.contiguous_format)
        wt, gate = _leaf(o, k, **kw, scale=k ** -0.5), _leaf(b, k, **kw, scale=0.2, offset=0.5)
        g, c = _leaf(o, **kw, scale=0.2, offset=1.0), _leaf(o, **kw, scale=0.2)
        if train:
            leaves = [x, wt, g, c, gate]
            return (lambda: ops.pw_conv_bn_train(x, wt, g, c, 1e-5, gate, True)), leaves
        leaves = [x, wt, c, gate]
        return (lambda: (ops.pw_conv_bn(x, wt, c, gate, True),)), leaves
    return case


def _flat(y, stats):
    return (y, *stats)


def _sra_reduce(linear: bool):
    def case(device, dtype, size):
        b, c, h, w = 2, 8, 9, 12
        kw = dict(device=device, dtype=dtype)
        k = 1 if linear else 3
        x, sr_w = _leaf(b, h * w, c, **kw), _leaf(c, c, k, k, **kw, scale=0.3)
        sr_b, ln_w, ln_b = _leaf(c, **kw, scale=0.1), _leaf(c, **kw, scale=0.2, offset=1.0), _leaf(c, **kw)
        leaves = [x, sr_w, sr_b, ln_w, ln_b]
        return (lambda: (ops.sra_reduce(x, h, w, sr_w, sr_b, ln_w, ln_b, 1e-5, 3, linear),)), leaves
    return case


def _sra_attention(device, dtype, size):
    b, n, m, c, heads = 2, 15, 6, 8, 2
    kw = dict(device=device, dtype=dtype)
    x, red = _leaf(b, n, c, **kw), _leaf(b, m, c, **kw)
    q_w, q_b = _leaf(c, c, **kw, scale=c ** -0.5), _leaf(c, **kw, scale=0.1)
    kv_w, kv_b = _leaf(2 * c, c, **kw, scale=c ** -0.5), _leaf(2 * c, **kw, scale=0.1)
    leaves = [x, red, q_w, q_b, kv_w, kv_b]
    return (lambda: (ops.sra_attention(*leaves, heads, (c // heads) ** -0.5),)), leaves


# name -> (backend registry op, case builder, implemented by the C++ CPU backend)
CASES = {
    "dwconv_bn-eval": ("dwconv_bn", _dwconv(False, 2, False), True),
    "dwconv_bn-eval-channels_last": ("dwconv_bn", _dwconv(False, 1, True), True),
    "dwconv_bn-train": ("dwconv_bn", _dwconv(True, 1, False), True),
    "dwconv_bn-train-channels_last-stride2": ("dwconv_bn", _dwconv(True, 2, True), True),
    "shsa-eval": ("shsa", _shsa(False), True),
    "shsa-train": ("shsa", _shsa(True), True),
    "ffn-eval": ("ffn", _ffn(False, False), True),
    "ffn-train-channels_last": ("ffn", _ffn(True, True), True),
    "pw_conv_bn-eval": ("pw_conv_bn", _pw_conv_bn(False, False), True),
    "pw_conv_bn-train-channels_last": ("pw_conv_bn", _pw_conv_bn(True, True), True),
    "sra_reduce": ("sra", _sra_reduce(False), False),
    "sra_reduce-linear": ("sra", _sra_reduce(True), False),
    "sra_attention": ("sra", _sra_attention, False),
}


def _run(fn, leaves, grad_outputs=None):
    """Outputs and the gradients of every leaf (w.r.t. the differentiable outputs, seeded by grad_outputs)."""
    outs = fn()
    diff = [o for o in outs if o.requires_grad]
    if grad_outputs is None:
        grad_outputs = [torch.randn_like(o) for o in diff]
    grads = torch.autograd.grad(diff, leaves, grad_outputs)
    return [o.detach() for o in outs], list(grads), grad_outputs


def _assert_bitwise_twice(backend, case, device, dtype, size="small"):
    fn, leaves = case(device, dtype, size)
    with use_backend(backend):
        outs1, grads1, gos = _run(fn, leaves)
        outs2, grads2, _ = _run(fn, leaves, gos)
    for kind, a, b in (("output", outs1, outs2), ("grad of input", grads1, grads2)):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(u, v), f"{kind} {i} differs between two identical runs (max diff " \
                                      f"{(u.double() - v.double()).abs().max().item():.3e})"


def _params(device_backends):
    return [pytest.param(name, backend, id=f"{name}-{backend}")
            for name, (op, _, _) in CASES.items() for backend in device_backends(op)]


@pytest.mark.parametrize("name, backend", _params(cpu_backends))
def test_bitwise_identical_twice_cpu(name, backend):
    _assert_bitwise_twice(backend, CASES[name][1], "cpu", torch.float32)


def _cuda_backends(op):
    if not torch.cuda.is_available():
        return ["reference", "triton", "cuda"]  # collected for the listing; the conftest skips them
    return [b for b in ("reference", "triton", "cuda")
            if b in backends.available_backends() and b in backends.implementations(op)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, backend", _params(_cuda_backends))
def test_bitwise_identical_twice_cuda(name, backend, dtype):
    _assert_bitwise_twice(backend, CASES[name][1], "cuda", dtype)


@pytest.mark.skipif("cpu" not in backends.available_backends(), reason="C++ extension not built")
@pytest.mark.parametrize("name", [n for n, (_, _, cpp) in CASES.items() if cpp])
def test_cpp_kernels_independent_of_thread_count(name):
    """The C++ kernels claim a fixed reduction order: 1 and 2 threads give the same bits."""
    fn, leaves = CASES[name][1]("cpu", torch.float32, "threads")
    eval_dwconv = name.startswith("dwconv_bn-eval")  # its backward is ATen's: see the module docstring
    threads = torch.get_num_threads()
    runs, gos = [], None
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with use_backend("cpu"):
                outs, grads, gos = _run(fn, leaves, gos)
            runs.append(outs if eval_dwconv else outs + grads)
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        assert torch.equal(a, b), f"result {i} depends on the thread count"


def test_deterministic_adaptive_pool_backward_matches_aten():
    """The GEMM form of adaptive_avg_pool2d's backward (used on CUDA under the flag) is ATen's, bins included."""
    for h, w in ((13, 9), (7, 7), (8, 30), (3, 5), (50, 49)):
        img = torch.randn(2, 3, h, w, dtype=torch.float64)
        g = torch.randn(2, 3, 7, 7, dtype=torch.float64)
        torch.testing.assert_close(adaptive_avg_pool2d_backward_gemm(g, img),
                                   torch.ops.aten._adaptive_avg_pool2d_backward(g, img), rtol=0, atol=1e-14)
