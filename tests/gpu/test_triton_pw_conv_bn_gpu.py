"""The Triton pointwise Conv2d_BN (shvit_kernels/triton/pw_conv_bn.py) compiled and run on a GPU: eval and training,
with and without the SE gate and the ReLU, NCHW and channels_last, fp32 / fp16 / bf16 against the float64 oracle by
DESIGN.md's rule (error <= 2x stock PyTorch's in the same dtype + a tiny atol), at PatchMerging's SHViT sizes
(S4: 224 -> 896 at 16x16, 896 -> 336 at 8x8), and opcheck. Marked gpu: skipped without a CUDA device."""
import pytest
import torch

import shvit_kernels as sk
from tests.gpu.test_cuda_backend import _close, relu_masked
from tests.ops.test_pw_conv_bn import _fused, _stock

pytestmark = pytest.mark.gpu

DEV = "cuda"
# (B, K, H, W, O): odd sizes, then PatchMerging's conv1 and conv3 of S4 (stage 1 -> 2, 2 -> 3)
SHAPES = [(2, 7, 5, 4, 13), (3, 75, 33, 31, 40), (8, 224, 16, 16, 896), (8, 896, 8, 8, 336), (4, 1344, 4, 4, 448)]


@pytest.fixture(autouse=True)
def _needs_triton():
    if "triton" not in sk.available_backends():
        pytest.skip(f"triton unavailable: {sk.backends.availability()['triton'][1]}")


def _inputs(shape, dtype, channels_last, train, gated):
    b, k, h, w, o = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, k, h, w, device=DEV).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(o, k, device=DEV) / k ** 0.5).to(dtype)
    vectors = [torch.rand(o, device=DEV) + 0.5, torch.randn(o, device=DEV)] if train else [torch.randn(o, device=DEV)]
    gate = torch.rand(b, k, device=DEV) if gated else None
    return x, weight, vectors, gate


def _run(fn, x, weight, vectors, gate, relu, train, gy, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    leaves = [None if t is None else cast(t).detach().clone().requires_grad_() for t in (x, weight, gate, *vectors)]
    lx, lw, lg, *lv = leaves
    y = fn(lx, lw, lv, lg, relu, train)[0]
    y.backward(gy.to(y.dtype))
    return y, [t for t in leaves if t is not None]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("gated,relu", [(True, False), (False, True)], ids=["gated", "relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_pw_conv_bn_triton(dtype, shape, channels_last, gated, relu, train):
    x, weight, vectors, gate = _inputs(shape, dtype, channels_last, train, gated)
    gy = torch.randn(x.shape[0], weight.shape[0], *x.shape[2:], device=DEV)
    with sk.use_backend("triton"):
        y, leaves = _run(_fused, x, weight, vectors, gate, relu, train, gy)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last if channels_last else
                                                torch.contiguous_format)
    ys, stock_leaves = _run(_stock, x, weight, vectors, gate, relu, train, gy, dtype)  # stock in the activation dtype
    yo, _ = _run(_stock, x, weight, vectors, gate, relu, train, gy, torch.float64)
    _close("y", y, ys, yo)

    def oracle_grads(y_mask):  # float64, at y_mask's ReLU mask
        return _run(_stock, x, weight, vectors, gate, False, train, relu_masked(gy, y_mask, relu), torch.float64)[1]

    for i, (a, s, o, so) in enumerate(zip(leaves, stock_leaves, oracle_grads(y), oracle_grads(ys), strict=True)):
        _close(f"grad {i}", a.grad, s.grad, o.grad, so.grad)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck(channels_last):
    x, weight, (b,), gate = _inputs((2, 24, 5, 7, 40), torch.float32, channels_last, False, True)
    _, _, bn, _ = _inputs((2, 24, 5, 7, 40), torch.float32, channels_last, True, True)
    with sk.use_backend("triton"):
        for relu in (False, True):
            torch.library.opcheck(torch.ops.shvit.pw_conv_bn.default, (x, weight, b, gate, relu))
            torch.library.opcheck(torch.ops.shvit.pw_conv_bn_train.default, (x, weight, *bn, 1e-5, gate, relu))


# PatchMerging's conv1 at a batch that gives the eval forward its x-resident kernel on a GPU (tiles of >= 64 tokens)
RESIDENT = [((72, 224, 16, 16, 896), (256, 128, 64)), ((136, 336, 8, 8, 1344), (512, 64, 32))]


@pytest.mark.parametrize("gated,relu", [(True, False), (False, True)], ids=["gated", "relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape, tiles", RESIDENT, ids=[str(s) for s, _ in RESIDENT])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_pw_conv_bn_resident_forward(dtype, shape, tiles, channels_last, gated, relu):
    """The eval forward's _resident_kernel (asserted to be the one taken) against stock and the float64 oracle."""
    from shvit_kernels.triton import _token_gemm as TG

    x, weight, vectors, gate = _inputs(shape, dtype, channels_last, False, gated)
    assert TG._resident_gemm(TG._Dims(x, shape[4]), shape[1], shape[4]) == tiles
    with sk.use_backend("triton"):
        y = _fused(x, weight, vectors, gate, relu, False)[0]

    def stock(dt):  # every input in dt, as a stock model in that dtype holds it
        return _stock(x.to(dt), weight.to(dt), [v.to(dt) for v in vectors], None if gate is None else gate.to(dt),
                      relu, False)[0]

    ys, yo = stock(dtype), stock(torch.float64)
    _close("y", y, ys, yo)
