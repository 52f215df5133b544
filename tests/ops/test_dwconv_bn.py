"""shvit::dwconv_bn / dwconv_bn_train on every backend that runs here, against ATen in float64."""
import pytest
import torch
import torch.nn.functional as F

from shvit_kernels import ops, use_backend
from tests.helpers import cpu_backends

D = torch.float64
BACKENDS = cpu_backends("dwconv_bn")
# (B, C, H, W, k, stride): odd sizes, 1x1, channels not a multiple of 8; kept small for the Triton interpreter
SHAPES = [(2, 5, 7, 9, 3, 1), (1, 3, 1, 1, 3, 1), (2, 13, 17, 13, 3, 2), (2, 6, 3, 5, 5, 1), (1, 4, 6, 6, 7, 2)]


def _layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _params(c, k, dtype=D):
    w = torch.randn(c, 1, k, k, dtype=dtype)
    return w, torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)


def _stock_train(x, w, g, b, stride, residual, relu, eps=1e-5):
    z = F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, x.shape[1])
    y = F.batch_norm(z, None, None, g, b, True, 0.0, eps)
    y = y + x if residual else y
    return y.relu() if relu else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_forward(backend, shape, channels_last):
    b, c, h, w_, k, stride = shape
    x = _layout(torch.randn(b, c, h, w_, dtype=D), channels_last)
    w, _, bias = _params(c, k)
    for relu in (False, True):
        with use_backend(backend):
            y = ops.dwconv_bn(x, w, bias, stride, relu)
        ref = F.conv2d(x, w, bias, stride, k // 2, 1, c)
        torch.testing.assert_close(y, ref.relu() if relu else ref)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_forward_backward(backend, shape, channels_last):
    b, c, h, w_, k, stride = shape
    if b * ((h - 1) // stride + 1) * ((w_ - 1) // stride + 1) < 2:
        pytest.skip("BatchNorm needs more than one value per channel")
    residual, relu = stride == 1, stride == 2
    x = _layout(torch.randn(b, c, h, w_, dtype=D), channels_last)
    params = _params(c, k)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    with use_backend(backend):
        y, mean, var = ops.dwconv_bn_train(*leaves, 1e-5, stride, residual, relu)
    ref_leaves = [t.clone().requires_grad_() for t in (x, *params)]
    ref = _stock_train(*ref_leaves, stride, residual, relu)
    torch.testing.assert_close(y, ref)
    z = F.conv2d(x, params[0], None, stride, k // 2, 1, c)
    torch.testing.assert_close(mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(var, z.var((0, 2, 3), unbiased=False))
    gy = torch.randn_like(ref)
    with use_backend(backend):  # the backward must run on the backend under test too
        y.backward(gy)
    ref.backward(gy)
    for name, a, r in zip(("x", "weight", "bn_weight", "bn_bias"), leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x = torch.randn(2, 3, 5, 4, dtype=D, requires_grad=True)
    w, g, b = (t.requires_grad_() for t in _params(3, 3))
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: ops.dwconv_bn_train(*a, 1e-5, 1, True, True)[0], (x, w, g, b))
        assert torch.autograd.gradcheck(lambda *a: ops.dwconv_bn(*a, 2, True), (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, channels_last):
    x = _layout(torch.randn(2, 4, 6, 5, dtype=D), channels_last)
    w, g, b = _params(4, 3)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.shvit.dwconv_bn.default, (x, w, b, 1, False))
        torch.library.opcheck(torch.ops.shvit.dwconv_bn_train.default, (x, w, g, b, 1e-5, 1, True, False))
        y, mean, var = ops.dwconv_bn_train(x, w, g, b, 1e-5, 2, False, True)
        torch.library.opcheck(torch.ops.shvit.dwconv_bn_train_backward.default,
                              (torch.randn_like(y), x, w, g, mean, var, y, 1e-5, 2, False, True))


def test_empty_batch():
    w, g, b = _params(4, 3)
    x = torch.randn(0, 4, 6, 5, dtype=D)
    assert ops.dwconv_bn(x, w, b, 2).shape == (0, 4, 3, 3)
    y, mean, _ = ops.dwconv_bn_train(x, w, g, b, 1e-5, 1, True)
    assert y.shape == x.shape and mean.isnan().all()


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w, b: ops.dwconv_bn(x[0], w, b), ValueError, "x must have 4 dims"),
    (lambda x, w, b: ops.dwconv_bn(x, w[:3], b), ValueError, "weight must have shape"),
    (lambda x, w, b: ops.dwconv_bn(x, w, b[:3]), ValueError, "bias must have shape"),
    (lambda x, w, b: ops.dwconv_bn(x.int(), w, b), TypeError, "x must be a floating"),
    (lambda x, w, b: ops.dwconv_bn(x, w.float(), b), TypeError, "weight has dtype"),
    (lambda x, w, b: ops.dwconv_bn(x, w, b, stride=3), ValueError, "stride must be 1 or 2"),
    (lambda x, w, b: ops.dwconv_bn(x, torch.randn(4, 1, 2, 2, dtype=D), b), ValueError, "odd"),
    (lambda x, w, b: ops.dwconv_bn(x, torch.randn(4, 1, 9, 9, dtype=D), b), ValueError, "at most 7"),
    (lambda x, w, b: ops.dwconv_bn(x, w, b.to("meta")), ValueError, "bias is on meta"),
    (lambda x, w, b: ops.dwconv_bn_train(x, w, b, b, stride=2, residual=True), ValueError, "residual=True needs"),
    (lambda x, w, b: ops.dwconv_bn_train(x[:1, :, :1, :1], w, b, b), ValueError, "more than 1 value"),
    (lambda x, w, b: ops.dwconv_bn("x", w, b), TypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs(call, exc, match):
    x = torch.randn(2, 4, 6, 5, dtype=D)
    w, _, b = _params(4, 3)
    with pytest.raises(exc, match=match):
        call(x, w, b)
