"""shvit::pw_conv_bn / pw_conv_bn_train (PatchMerging's 1x1 Conv2d_BN, ReLU and SE gate) on every backend that runs
here, against stock PyTorch (conv, BatchNorm, x * gate as separate ops) in float64."""
import pytest
import torch
import torch.nn.functional as F

from shvit_kernels import ops, use_backend
from tests.helpers import assert_close_to_oracle, cpu_backends

D = torch.float64
BACKENDS = cpu_backends("pw_conv_bn")
# (B, K, H, W, O): odd channel counts, a 1x1 map, 33x31 (several token blocks per sample), O above and below K
SHAPES = [(2, 7, 5, 4, 13), (3, 66, 1, 1, 75), (2, 75, 33, 31, 40), (1, 5, 3, 7, 9)]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
GATE = pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
RELU = pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])


def _cases(shapes):
    """(backend, shape) pairs; the Triton interpreter (~8 ms a program) only on the small maps."""
    return [pytest.param(b, s, id=f"{s}-{b}") for b in BACKENDS for s in shapes if b != "triton" or s[2] * s[3] <= 64]


def _layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _inputs(shape, channels_last, gated, train):
    b, k, h, w, o = shape
    x = _layout(torch.randn(b, k, h, w, dtype=D), channels_last)
    weight = torch.randn(o, k, dtype=D) / k ** 0.5
    vectors = (torch.rand(o, dtype=D) + 0.5, torch.randn(o, dtype=D)) if train else (torch.randn(o, dtype=D),)
    gate = torch.rand(b, k, dtype=D) if gated else None
    return x, weight, vectors, gate


def _stock(x, weight, vectors, gate, relu, train):
    a = x if gate is None else x * gate[:, :, None, None]
    z = F.conv2d(a, weight[:, :, None, None])
    y = F.batch_norm(z, None, None, *vectors, True) if train else z + vectors[0][:, None, None]
    return (y.relu() if relu else y), z


def _fused(x, weight, vectors, gate, relu, train):
    if train:
        return ops.pw_conv_bn_train(x, weight, *vectors, 1e-5, gate, relu)
    return ops.pw_conv_bn(x, weight, *vectors, gate, relu), None, None


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend,shape", _cases(SHAPES))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@LAYOUTS
@GATE
@RELU
def test_forward_backward_match_stock(backend, shape, train, channels_last, gated, relu):
    x, weight, vectors, gate = _inputs(shape, channels_last, gated, train)
    fx, fw, fg, *fv = _leaves(x, weight, gate, *vectors)
    sx, sw, sg, *sv = _leaves(x, weight, gate, *vectors)
    with use_backend(backend):
        y, mean, var = _fused(fx, fw, fv, fg, relu, train)
    ref, z = _stock(sx, sw, sv, sg, relu, train)
    torch.testing.assert_close(y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if train:
        torch.testing.assert_close(mean, z.mean((0, 2, 3)))
        torch.testing.assert_close(var, z.var((0, 2, 3), unbiased=False))
    gy = torch.randn_like(ref)
    with use_backend(backend):  # the backward runs on the backend under test too
        y.backward(gy)
    ref.backward(gy)
    for name, a, r in zip(("x", "weight", "gate", "bn/bias 0", "bn 1"), (fx, fw, fg, *fv), (sx, sw, sg, *sv)):
        if a is not None:
            torch.testing.assert_close(a.grad, r.grad, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
def test_gradcheck(backend, channels_last):
    fast = backend == "triton"
    for train in (False, True):
        x, weight, vectors, gate = _inputs((2, 3, 4, 3, 5), channels_last, True, train)
        args = [t.requires_grad_() for t in (x, weight, gate, *vectors)]
        for relu in (False, True):
            def f(x, w, g, *v):
                return _fused(x, w, v, g, relu, train)[0]
            with use_backend(backend):
                assert torch.autograd.gradcheck(f, args, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
@GATE
def test_opcheck(backend, channels_last, gated):
    x, weight, (b,), gate = _inputs((2, 5, 4, 3, 7), channels_last, gated, False)
    _, _, bn, _ = _inputs((2, 5, 4, 3, 7), channels_last, gated, True)
    with use_backend(backend):
        for relu in (False, True):
            torch.library.opcheck(torch.ops.shvit.pw_conv_bn.default, (x, weight, b, gate, relu))
            y = torch.ops.shvit.pw_conv_bn(x, weight, b, gate, relu)
            torch.library.opcheck(torch.ops.shvit.pw_conv_bn_backward.default,
                                  (torch.randn_like(y), x, weight, b, gate, relu, y if relu else None))
            train_args = (x, weight, *bn, 1e-5, gate, relu)
            torch.library.opcheck(torch.ops.shvit.pw_conv_bn_train.default, train_args)
            y, *saved = torch.ops.shvit.pw_conv_bn_train(*train_args)
            torch.library.opcheck(torch.ops.shvit.pw_conv_bn_train_backward.default,
                                  (torch.randn_like(y), *train_args, *saved))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_float32_within_numerics_rule(backend, train):
    """DESIGN.md's rule: the fp32 error against the fp64 oracle is at most 2x stock fp32's, outputs and grads."""
    x, weight, vectors, gate = _inputs((4, 96, 9, 7, 80), True, True, train)
    gy = torch.randn(4, 80, 9, 7, dtype=D)
    results = []
    for fn, dtype in ((_stock, D), (_stock, torch.float32), (_fused, torch.float32)):
        lx, lw, lg, *lv = _leaves(*(t.to(dtype) for t in (x, weight, gate, *vectors)))
        with use_backend(backend):
            y = fn(lx, lw, lv, lg, True, train)[0]
            y.backward(gy.to(dtype))
        results.append([y, lx.grad, lw.grad, lg.grad, *(t.grad for t in lv)])
    for oracle, stock, fused in zip(*results):
        assert_close_to_oracle(fused, stock, oracle, atol=1e-6 * oracle.abs().max().item())


def test_empty_batch():
    x, weight, (b,), gate = _inputs((0, 4, 3, 3, 6), False, True, False)
    assert ops.pw_conv_bn(x, weight, b, gate, True).shape == (0, 6, 3, 3)
    _, _, bn, _ = _inputs((0, 4, 3, 3, 6), False, True, True)
    y, mean, var = ops.pw_conv_bn_train(x, weight, *bn, 1e-5, gate)
    assert y.shape == (0, 6, 3, 3) and mean.isnan().all() and var.isnan().all()


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w, b, g: ops.pw_conv_bn(x[0], w, b, g), ValueError, "^x must have 4 dims"),
    (lambda x, w, b, g: ops.pw_conv_bn(x.int(), w, b, g), TypeError, "^x must be a floating"),
    (lambda x, w, b, g: ops.pw_conv_bn(x, w[:, :3], b, g), ValueError, r"^weight must have shape \(O, 4\) for x"),
    (lambda x, w, b, g: ops.pw_conv_bn(x, w, b[:5], g), ValueError, r"^bias must have shape \(6,\)"),
    (lambda x, w, b, g: ops.pw_conv_bn(x, w, b, g[:1]), ValueError, r"^gate must have shape \(2, 4\) for x"),
    (lambda x, w, b, g: ops.pw_conv_bn(x, w, b, g.to("meta")), ValueError, "^gate is on meta but x is on cpu"),
    (lambda x, w, b, g: ops.pw_conv_bn(x, w.float(), b, g), TypeError, "^weight has dtype torch.float32"),
    (lambda x, w, b, g: ops.pw_conv_bn(x[:, :, :0], w, b, g), ValueError, "^x must have non-empty"),
    (lambda x, w, b, g: ops.pw_conv_bn_train(x, w, b, b[:3]), ValueError, r"^bn_bias must have shape \(6,\)"),
    (lambda x, w, b, g: ops.pw_conv_bn_train(x[:1, :, :1, :1], w, b, b), ValueError,
     "^x: BatchNorm training needs more than 1 value"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(call, exc, match, backend):
    x, weight, (b,), gate = _inputs((2, 4, 3, 3, 6), False, True, False)
    with use_backend(backend), pytest.raises(exc, match=match):
        call(x, weight, b, gate)
