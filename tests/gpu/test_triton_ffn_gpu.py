"""The Triton residual FFN (shvit_kernels/triton/ffn.py) compiled and run on a GPU: eval and training, forward and
backward, NCHW and channels_last, fp32 / fp16 / bf16 against the float64 oracle by DESIGN.md's rule (error <= 2x
stock PyTorch's error in the same dtype + a tiny atol). SHViT-size shapes reach the GPU tile configurations: d = 448
splits the fused kernels' output channels over programs, fp32 takes the halved FMA tiles. Marked gpu: skipped
without a CUDA device (tests/conftest.py).
"""
import pytest
import torch

import shvit_kernels as sk
from shvit_kernels import ops
from tests.gpu.test_cuda_backend import _close, _layout
from tests.ops.test_ffn import SHAPES as FFN_SHAPES
from tests.ops.test_ffn import _stock_eval, _stock_train

pytestmark = pytest.mark.gpu

DEV = "cuda"
# (B, d, H, W, hidden): the CPU suite's odd shapes, then SHViT stage sizes (S4: 224 / 336 / 448 channels)
SHAPES = FFN_SHAPES + [(8, 224, 14, 14, 448), (4, 336, 7, 7, 672), (2, 448, 7, 9, 896), (2, 128, 28, 28, 256)]


@pytest.fixture(autouse=True)
def _needs_triton():
    if "triton" not in sk.available_backends():
        pytest.skip(f"triton unavailable: {sk.backends.availability()['triton'][1]}")


def _inputs(shape, dtype, channels_last, train):
    """x and the op's parameters: weights in dtype, BN / bias vectors fp32 (as under autocast)."""
    b, d, hh, ww, h = shape
    x = _layout(torch.randn(b, d, hh, ww, device=DEV).to(dtype), channels_last)
    w1, w2 = (torch.randn(h, d, device=DEV) / d ** 0.5).to(dtype), (torch.randn(d, h, device=DEV) / h ** 0.5).to(dtype)
    if train:
        g1, c1, g2, c2 = torch.rand(h, device=DEV) + 0.5, torch.randn(h, device=DEV), torch.rand(d, device=DEV) + 0.5, \
            torch.randn(d, device=DEV)
        return x, w1, g1, c1, w2, g2, c2
    return x, w1, torch.randn(h, device=DEV), w2, torch.randn(d, device=DEV)


def _run(fn, tensors, gy):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(gy.to(y.dtype))
    return out, leaves


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_ffn_triton(dtype, shape, channels_last, train):
    if train and shape[0] * shape[2] * shape[3] < 2:
        pytest.skip("BatchNorm needs more than one value per channel")
    inputs = _inputs(shape, dtype, channels_last, train)
    gy = torch.randn(inputs[0].shape, device=DEV)
    fused_op = (lambda *a: ops.ffn_train(*a)[0]) if train else ops.ffn
    stock_op = (lambda *a: _stock_train(*a)[0]) if train else _stock_eval

    def stock(*a):  # stock PyTorch in the activation dtype (vectors cast to it, as a stock half model holds them)
        return stock_op(*(t.to(a[0].dtype) for t in a))

    with sk.use_backend("triton"):
        y, leaves = _run(fused_op, inputs, gy)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last if channels_last else
                                                torch.contiguous_format)
    ys, stock_leaves = _run(stock, inputs, gy)
    yo, oracle_leaves = _run(stock, [t.double() for t in inputs], gy)
    _close("y", y, ys, yo)
    for i, (a, s, o) in enumerate(zip(leaves, stock_leaves, oracle_leaves, strict=True)):
        assert a.grad.dtype == a.dtype
        _close(f"grad {i}", a.grad, s.grad, o.grad)
    if train:
        with sk.use_backend("triton"):
            _, stats = ops.ffn_train(*inputs)
        z1 = torch.nn.functional.conv2d(inputs[0].double(), inputs[1].double()[:, :, None, None])
        torch.testing.assert_close(stats.pw1_mean.double(), z1.mean((0, 2, 3)), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(stats.pw1_var.double(), z1.var((0, 2, 3), unbiased=False), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_ffn_triton_opcheck(channels_last):
    x, w1, b1, w2, b2 = _inputs((2, 40, 5, 7, 80), torch.float16, channels_last, False)
    _, g1, c1, _, g2, c2 = _inputs((2, 40, 5, 7, 80), torch.float16, channels_last, True)[1:]
    ev = (w1, b1.half(), w2, b2.half())
    with sk.use_backend("triton"):
        torch.library.opcheck(torch.ops.shvit.ffn.default, (x, *ev))
        torch.library.opcheck(torch.ops.shvit.ffn_backward.default, (torch.randn_like(x), x, *ev))
        torch.library.opcheck(torch.ops.shvit.ffn_train.default, (x, w1, g1, c1, 1e-5, w2, g2, c2, 1e-5))


# (shape, the resident forward's token tile): enough tokens (B*N >= 132 * T) for the long tiles the GPU launch picks:
# 128 tokens and 16 warps at S4 stage 1, one 512-row block at stage 2, 16-token samples sharing a tile at stage 3
LONG_TILES = [((72, 224, 16, 16, 448), 128), ((136, 336, 8, 8, 672), 64), ((260, 448, 4, 4, 896), 32)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape, block_t", LONG_TILES, ids=[str(s) for s, _ in LONG_TILES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_ffn_triton_resident_forward(dtype, shape, block_t, channels_last):
    """The eval forward's x-resident kernel at the tile lengths of S4's stages, against stock and the oracle."""
    from shvit_kernels.triton import ffn as T

    x, w1, b1, w2, b2 = _inputs(shape, dtype, channels_last, False)
    assert T._resident_blocks(T._Dims(x, shape[4]))[3] == block_t
    with sk.use_backend("triton"):
        y = ops.ffn(x, w1, b1, w2, b2)
    ys = _stock_eval(x, w1, b1.to(dtype), w2, b2.to(dtype))
    yo = _stock_eval(*(t.double() for t in (x, w1, b1, w2, b2)))
    _close("y", y, ys, yo)
