"""The "cuda" backend (hand-written CUDA kernels) on a GPU: the cases of tests/ops/test_dwconv_bn.py and
tests/ops/test_shsa.py in fp32 / fp16 / bf16 against the float64 reference (DESIGN.md's rule: error <= 2x stock
PyTorch's error in the same dtype + a tiny atol), against the Triton backend, bitwise determinism, large N for
SHSA, and CUDA-graph capture. Every test is marked gpu: they skip without a CUDA device (tests/conftest.py), and
skip when the extension was built without the CUDA kernels.
"""
import pytest
import torch
import torch.nn.functional as F

import shvit_kernels as sk
from shvit_kernels import ops
from tests.ops.test_dwconv_bn import SHAPES as DW_SHAPES
from tests.ops.test_dwconv_bn import _stock_train as dw_stock_train
from tests.ops.test_shsa import SHAPES as SHSA_SHAPES
from tests.ops.test_shsa import stock as shsa_stock

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda"
# Larger shapes than the CPU suite: multi-tile planes, vectorised channels_last (C % 8 == 0), k = 5 / 7.
DW_SHAPES_GPU = DW_SHAPES + [(8, 64, 56, 56, 3, 1), (4, 96, 28, 27, 5, 2), (2, 128, 14, 14, 7, 1), (3, 40, 9, 9, 3, 2)]
# (B, dim, pdim, qk, H, W): SHViT-like dims, pdim > 128 (several channel chunks), qk_dim > 64 (FMA attention path).
SHSA_SHAPES_GPU = SHSA_SHAPES + [(4, 224, 48, 16, 14, 14), (2, 336, 72, 16, 7, 7), (1, 200, 150, 16, 9, 9),
                                 (2, 40, 24, 80, 5, 7), (1, 64, 48, 16, 33, 32)]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if "cuda" not in sk.available_backends():
        pytest.skip(f"cuda backend unavailable: {sk.backends.availability()['cuda'][1]}")


def _atol(dtype, oracle):
    return 4 * torch.finfo(dtype).eps * max(1.0, oracle.abs().max().item())


def _close(name, out, stock, oracle, stock_oracle=None):
    """DESIGN.md: |out - oracle| <= 2 |stock - stock_oracle| + tiny atol (max norms). stock_oracle (default: oracle)
    where stock is judged at another point, e.g. its own ReLU mask (relu_masked)."""
    oracle = oracle.double()
    stock_oracle = oracle if stock_oracle is None else stock_oracle.double()
    err = (out.double() - oracle).abs().max().item()
    stock_err = (stock.double() - stock_oracle).abs().max().item()
    atol = _atol(out.dtype, oracle)
    assert err <= 2 * stock_err + atol, f"{name}: cuda error {err:.3e} > 2 x stock error {stock_err:.3e} + {atol:.1e}"


def relu_masked(gy, y, relu):
    """gy through a final ReLU at the mask of the output y (y > 0). A pre-activation within rounding of zero is a coin
    flip of the mask that moves a whole gradient term instead of rounding it, so a result's gradients are judged
    against the float64 gradients at its own mask: the fused result's at the fused output's, stock's at stock's."""
    return gy * (y > 0) if relu else gy


def _triton(fn, *args):
    if "triton" not in sk.available_backends():
        return None
    with sk.use_backend("triton"):
        return fn(*args)


def _layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ---- depthwise conv + BN --------------------------------------------------------------------------------------

def _dw_inputs(shape, dtype, channels_last):
    b, c, h, w_, k, _ = shape
    x = _layout(torch.randn(b, c, h, w_, device=DEV).to(dtype), channels_last)
    w = (torch.randn(c, 1, k, k, device=DEV) / k).to(dtype)
    # BatchNorm parameters stay fp32, as under autocast.
    return x, w, torch.rand(c, device=DEV) + 0.5, torch.randn(c, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DW_SHAPES_GPU)
@pytest.mark.parametrize("channels_last", [False, True])
def test_dwconv_eval(dtype, shape, channels_last):
    x, w, _, bias = _dw_inputs(shape, dtype, channels_last)
    k, stride = shape[4], shape[5]
    for relu in (False, True):
        with sk.use_backend("cuda"):
            y = ops.dwconv_bn(x, w, bias, stride, relu)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        oracle = F.conv2d(x.double(), w.double(), bias.double(), stride, k // 2, 1, x.shape[1])
        stock = F.conv2d(x, w, bias.to(dtype), stride, k // 2, 1, x.shape[1])
        if relu:
            oracle, stock = oracle.relu(), stock.relu()
        _close("y", y, stock, oracle)
        tri = _triton(ops.dwconv_bn, x, w, bias, stride, relu)
        if tri is not None:
            _close("y vs triton", y, stock, tri.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DW_SHAPES_GPU)
@pytest.mark.parametrize("channels_last", [False, True])
def test_dwconv_train(dtype, shape, channels_last):
    b, c, h, w_, k, stride = shape
    if b * ((h - 1) // stride + 1) * ((w_ - 1) // stride + 1) < 2:
        pytest.skip("BatchNorm needs more than one value per channel")
    residual, relu = stride == 1, stride == 2
    inputs = _dw_inputs(shape, dtype, channels_last)

    def run(backend, tensors, relu=relu):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        if backend is None:
            y = dw_stock_train(*leaves, stride, residual, relu)
            mean = var = None
        else:
            with sk.use_backend(backend):
                y, mean, var = ops.dwconv_bn_train(*leaves, 1e-5, stride, residual, relu)
        return y, mean, var, leaves

    gy = torch.randn(b, c, (h - 1) // stride + 1, (w_ - 1) // stride + 1, device=DEV)
    y, mean, var, leaves = run("cuda", inputs)
    y.backward(gy.to(dtype))
    ys, _, _, stock_leaves = run(None, inputs)
    ys.backward(gy.to(dtype))
    yo = run(None, [t.double() for t in inputs])[0]
    _close("y", y, ys, yo)

    def oracle_grads(y_mask):
        yo, _, _, leaves = run(None, [t.double() for t in inputs], relu=False)
        yo.backward(relu_masked(gy.double(), y_mask, relu))
        return leaves

    z = F.conv2d(inputs[0].double(), inputs[1].double(), None, stride, k // 2, 1, c)
    torch.testing.assert_close(mean.double(), z.mean((0, 2, 3)), rtol=1e-3, atol=1e-3 * z.abs().max().item())
    torch.testing.assert_close(var.double(), z.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-4)
    names = ("x", "weight", "bn_weight", "bn_bias")
    for name, a, s, o, so in zip(names, leaves, stock_leaves, oracle_grads(y), oracle_grads(ys), strict=True):
        assert a.grad.dtype == a.dtype
        _close(f"grad {name}", a.grad, s.grad, o.grad, so.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_dwconv_deterministic(channels_last):
    x, w, g, bb = _dw_inputs((4, 48, 30, 30, 3, 1), torch.float32, channels_last)
    gy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        y, mean, var = torch.ops.shvit.dwconv_bn_train_fwd_cuda(x, w, g, bb, 1e-5, 1, True, True)
        runs.append((y, mean, var, *torch.ops.shvit.dwconv_bn_train_bwd_cuda(gy, x, w, g, mean, var, y, 1e-5, 1,
                                                                              True, True)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dwconv_opcheck():
    x, w, g, bb = _dw_inputs((2, 16, 6, 5, 3, 1), torch.float32, False)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        with sk.use_backend("cuda"):
            torch.library.opcheck(torch.ops.shvit.dwconv_bn.default, (xx, w, bb, 1, False))
            torch.library.opcheck(torch.ops.shvit.dwconv_bn_train.default, (xx, w, g, bb, 1e-5, 1, True, False))


# ---- SHSA ----------------------------------------------------------------------------------------------------

def _shsa_params(dim, pdim, qk, train, dtype):
    o = 2 * qk + pdim
    p = dict(gn_weight=torch.randn(pdim, device=DEV), gn_bias=torch.randn(pdim, device=DEV),
             qkv_weight=(torch.randn(o, pdim, device=DEV) / pdim ** 0.5).to(dtype),
             proj_weight=(torch.randn(dim, dim, device=DEV) / dim ** 0.5).to(dtype))
    if train:
        p.update(qkv_bn_weight=torch.rand(o, device=DEV) + 0.5, qkv_bn_bias=torch.randn(o, device=DEV),
                 proj_bn_weight=torch.rand(dim, device=DEV) + 0.5, proj_bn_bias=torch.randn(dim, device=DEV))
    else:
        p.update(qkv_bias=torch.randn(o, device=DEV), proj_bias=torch.randn(dim, device=DEV))
    return p


def _shsa_stock(x, qk, residual, p):
    """Stock PyTorch in x's dtype (1-D parameters cast to it, as the stock module in that dtype has them)."""
    return shsa_stock(x, qk, residual, **{k: v.to(x.dtype) for k, v in p.items()})


def _shsa_case(shape, dtype, train, backend="cuda"):
    b, dim, pdim, qk, h, w = shape
    residual = dim % 2 == 0
    x = torch.randn(b, dim, h, w, device=DEV).to(dtype)
    p = _shsa_params(dim, pdim, qk, train, dtype)
    gy = torch.randn(b, dim, h, w, device=DEV)

    def run(fn, xx, pp):
        xl = xx.detach().clone().requires_grad_()
        pl = {k: v.detach().clone().requires_grad_() for k, v in pp.items()}
        out = fn(xl, pl)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(gy.to(y.dtype))
        return y, out, xl, pl

    op = ops.shsa_train if train else ops.shsa

    def fused(xl, pl):
        with sk.use_backend(backend):
            return op(xl, qk_dim=qk, residual=residual, **pl)

    ours = run(fused, x, p)
    st = run(lambda xl, pl: _shsa_stock(xl, qk, residual, pl), x, p)
    orc = run(lambda xl, pl: shsa_stock(xl, qk, residual, **pl), x.double(), {k: v.double() for k, v in p.items()})
    return ours, st, orc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHSA_SHAPES_GPU)
@pytest.mark.parametrize("train", [False, True])
def test_shsa(dtype, shape, train):
    b, _, _, _, h, w = shape
    if train and b * h * w < 2:
        pytest.skip("BatchNorm needs more than one value per channel")
    (y, out, xl, pl), (ys, _, xs, ps), (yo, _, xo, po) = _shsa_case(shape, dtype, train)
    assert y.dtype == dtype and y.is_contiguous()
    _close("y", y, ys, yo)
    _close("grad x", xl.grad, xs.grad, xo.grad)
    for k in pl:
        assert pl[k].grad.dtype == pl[k].dtype
        _close(f"grad {k}", pl[k].grad, ps[k].grad, po[k].grad)
    if train:
        stats = out[1]
        x1 = F.group_norm(xo.detach()[:, : shape[2]], 1, po["gn_weight"].detach(), po["gn_bias"].detach(), 1e-5)
        z = F.conv2d(x1, po["qkv_weight"].detach()[:, :, None, None])
        torch.testing.assert_close(stats.qkv_mean.double(), z.mean((0, 2, 3)), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(stats.qkv_var.double(), z.var((0, 2, 3), unbiased=False), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
def test_shsa_matches_triton(dtype, train):
    if "triton" not in sk.available_backends():
        pytest.skip("triton unavailable")
    shape = (2, 80, 66, 16, 7, 9)
    torch.manual_seed(0)
    (y, _, xl, _), (ys, _, _, _), (yo, _, xo, _) = _shsa_case(shape, dtype, train)
    torch.manual_seed(0)
    (yt, _, xt, _), _, _ = _shsa_case(shape, dtype, train, backend="triton")
    _close("y vs triton", y, ys, yt.double())
    # Both backends are within the rule of the oracle, so they differ by at most the sum of their errors.
    err = (xl.grad.double() - xt.grad.double()).abs().max().item()
    bound = (xl.grad.double() - xo.grad).abs().max().item() + (xt.grad.double() - xo.grad).abs().max().item()
    assert err <= bound + _atol(dtype, xo.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw", [64, 128])  # N = 4096, 16384
@pytest.mark.parametrize("train", [False, True])
def test_shsa_large_n(dtype, hw, train):
    """test_shsa at large N, by the same rule: only stock and the float64 oracle hold the N x N scores."""
    test_shsa(dtype, (1, 64, 48, 16, hw, hw), train)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("train", [False, True])
def test_shsa_peak_memory_at_n4096(backend, train):
    """Peak memory allocated during forward + backward at N = 4096 (64 x 64 tokens) under a quarter of stock's: the
    fused kernels never hold the N x N scores, stock holds them in the forward and the backward."""
    if backend not in sk.available_backends():
        pytest.skip(f"{backend} unavailable")
    dim, pdim, qk = 64, 48, 16
    x = torch.randn(4, dim, 64, 64, device=DEV, dtype=torch.float16)
    p = _shsa_params(dim, pdim, qk, train, torch.float16)
    gy = torch.randn_like(x)
    op = ops.shsa_train if train else ops.shsa

    def fused(xl, pl):
        with sk.use_backend(backend):
            return op(xl, qk_dim=qk, residual=True, **pl)

    def peak(fn):  # bytes allocated above what the inputs and parameters hold
        xl = x.detach().clone().requires_grad_()
        pl = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(xl, pl)
        (out[0] if isinstance(out, tuple) else out).backward(gy)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours, stock = peak(fused), peak(lambda xl, pl: _shsa_stock(xl, qk, True, pl))
    assert ours < stock / 4, f"fused peak {ours / 2**20:.1f} MiB >= a quarter of stock's {stock / 2**20:.1f} MiB"


def test_shsa_deterministic():
    shape = (3, 96, 75, 16, 11, 9)
    x = torch.randn(shape[0], shape[1], shape[4], shape[5], device=DEV)
    p = _shsa_params(shape[1], shape[2], shape[3], True, torch.float32)
    args = (p["gn_weight"], p["gn_bias"], 1e-5, p["qkv_weight"], p["qkv_bn_weight"], p["qkv_bn_bias"], 1e-5,
            p["proj_weight"], p["proj_bn_weight"], p["proj_bn_bias"], 1e-5, shape[3], True)
    gy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        y, *stats = torch.ops.shvit.shsa_train_fwd_cuda(x, *args)
        runs.append((y, *stats, *torch.ops.shvit.shsa_train_bwd_cuda(gy, x, *args[:11], *stats, *args[11:])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_shsa_opcheck():
    dim, pdim, qk = 10, 6, 4
    x = torch.randn(2, dim, 3, 4, device=DEV)
    e = _shsa_params(dim, pdim, qk, False, torch.float32)
    args = (x, e["gn_weight"], e["gn_bias"], 1e-5, e["qkv_weight"], e["qkv_bias"], e["proj_weight"], e["proj_bias"],
            qk, True)
    with sk.use_backend("cuda"):
        torch.library.opcheck(torch.ops.shvit.shsa.default, args)
        torch.library.opcheck(torch.ops.shvit.shsa_backward.default, (torch.randn_like(x), *args))


# ---- CUDA graphs ---------------------------------------------------------------------------------------------

def _graph_equals_eager(fn, inputs):
    """Capture fn(*inputs) (a tuple of tensors) in a CUDA graph, replay it on fresh inputs, compare with eager."""
    static = [t.clone() for t in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (allocator, lazy init)
        fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    for s, t in zip(static, inputs):
        s.copy_(torch.randn_like(t) if t.is_floating_point() else t)
    graph.replay()
    torch.cuda.synchronize()
    want = fn(*[s.clone() for s in static])
    for a, b in zip(out, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dwconv_cuda_graph(dtype, channels_last):
    x, w, g, bb = _dw_inputs((4, 64, 14, 14, 3, 1), dtype, channels_last)

    def step(x, w, g, bb):
        y0 = torch.ops.shvit.dwconv_bn_fwd_cuda(x, w, bb, 1, True)
        y, mean, var = torch.ops.shvit.dwconv_bn_train_fwd_cuda(x, w, g, bb, 1e-5, 1, True, True)
        grads = torch.ops.shvit.dwconv_bn_train_bwd_cuda(y0, x, w, g, mean, var, y, 1e-5, 1, True, True)
        return (y0, y, mean, var, *grads)

    _graph_equals_eager(step, [x, w, g, bb])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shsa_cuda_graph(dtype):
    dim, pdim, qk = 96, 72, 16
    x = torch.randn(2, dim, 7, 7, device=DEV).to(dtype)
    p = _shsa_params(dim, pdim, qk, True, dtype)
    e = _shsa_params(dim, pdim, qk, False, dtype)

    def step(x):
        ev = (e["gn_weight"], e["gn_bias"], 1e-5, e["qkv_weight"], e["qkv_bias"], e["proj_weight"], e["proj_bias"],
              qk, True)
        tr = (p["gn_weight"], p["gn_bias"], 1e-5, p["qkv_weight"], p["qkv_bn_weight"], p["qkv_bn_bias"], 1e-5,
              p["proj_weight"], p["proj_bn_weight"], p["proj_bn_bias"], 1e-5, qk, True)
        y0 = torch.ops.shvit.shsa_fwd_cuda(x, *ev)
        g0 = torch.ops.shvit.shsa_bwd_cuda(y0, x, *ev)
        y, *stats = torch.ops.shvit.shsa_train_fwd_cuda(x, *tr)
        g1 = torch.ops.shvit.shsa_train_bwd_cuda(y0, x, *tr[:11], *stats, *tr[11:])
        return (y0, *g0, y, *stats, *g1)

    _graph_equals_eager(step, [x])


def test_build_info():
    info = torch.ops.shvit.cuda_build_info()
    assert info.startswith("CUDA ") and "archs" in info
