"""shvit::ffn / ffn_train (the residual FFN block) on every backend that runs here, against stock PyTorch in float64,
and the ResidualFFN drop-in against the stock Residual(FFN)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import shvit_kernels as sk
from shvit_kernels import ops, use_backend
from shvit_kernels import reference as R
from shvit_kernels.nn import FoldedResidualFFN, ResidualFFN
from tests.helpers import assert_close_to_oracle, bn_states, cpu_backends, randomize_bn

D = torch.float64
BACKENDS = cpu_backends("ffn")
# (B, d, H, W, hidden): odd channel counts (7, 66, 75), 1x1 and 33x31 maps, a hidden size other than 2d
SHAPES = [(2, 7, 5, 4, 14), (3, 66, 1, 1, 132), (2, 75, 33, 31, 150), (1, 5, 3, 7, 13)]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


def _interpretable(shapes, tokens=lambda s: s[2] * s[3]):
    """(backend, shape) pairs: every backend on every shape, except the Triton interpreter (~8 ms a program) on the
    33x31 map; tests/triton/test_ffn_triton.py covers odd maps and the multi-tile paths of the Triton kernels."""
    return [pytest.param(b, s, id=f"{s}-{b}") for b in BACKENDS for s in shapes if b != "triton" or tokens(s) <= 64]


def _layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _params(d, h, train):
    """Weights as matrices, then (eval) the folded biases or (train) the BN weights and biases."""
    w1, w2 = torch.randn(h, d, dtype=D) / d ** 0.5, torch.randn(d, h, dtype=D) / h ** 0.5
    if train:
        return w1, torch.rand(h, dtype=D) + 0.5, torch.randn(h, dtype=D), w2, torch.rand(d, dtype=D) + 0.5, \
            torch.randn(d, dtype=D)
    return w1, torch.randn(h, dtype=D), w2, torch.randn(d, dtype=D)


def _conv(x, w):
    return F.conv2d(x, w[:, :, None, None])


def _stock_eval(x, w1, b1, w2, b2):
    return x + F.conv2d(_conv(x, w1).add(b1[:, None, None]).relu(), w2[:, :, None, None], b2)


def _stock_train(x, w1, g1, b1, w2, g2, b2):
    z1 = _conv(x, w1)
    z2 = _conv(F.batch_norm(z1, None, None, g1, b1, True).relu(), w2)
    return x + F.batch_norm(z2, None, None, g2, b2, True), z1, z2


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend,shape", _interpretable(SHAPES))
@LAYOUTS
def test_eval_forward_backward(backend, shape, channels_last):
    b, d, hh, ww, h = shape
    x = _layout(torch.randn(b, d, hh, ww, dtype=D), channels_last)
    inputs = (x, *_params(d, h, False))
    leaves, ref_leaves = _leaves(*inputs), _leaves(*inputs)
    with use_backend(backend):
        y = ops.ffn(*leaves)
    ref = _stock_eval(*ref_leaves)
    torch.testing.assert_close(y, ref)
    assert y.is_contiguous(memory_format=_fmt(channels_last))
    gy = torch.randn_like(ref)
    with use_backend(backend):  # the backward must run on the backend under test too
        y.backward(gy)
    ref.backward(gy)
    for name, a, r in zip(("x", "pw1_weight", "pw1_bias", "pw2_weight", "pw2_bias"), leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, msg=name)


@pytest.mark.parametrize("backend,shape", _interpretable(SHAPES))
@LAYOUTS
def test_train_forward_backward(backend, shape, channels_last):
    b, d, hh, ww, h = shape
    x = _layout(torch.randn(b, d, hh, ww, dtype=D), channels_last)
    inputs = (x, *_params(d, h, True))
    leaves, ref_leaves = _leaves(*inputs), _leaves(*inputs)
    with use_backend(backend):
        y, stats = ops.ffn_train(*leaves)
    ref, z1, z2 = _stock_train(*ref_leaves)
    torch.testing.assert_close(y, ref)
    assert y.is_contiguous(memory_format=_fmt(channels_last))
    for got, z in ((stats[:2], z1), (stats[2:], z2)):
        torch.testing.assert_close(got[0], z.mean((0, 2, 3)))
        torch.testing.assert_close(got[1], z.var((0, 2, 3), unbiased=False))
    gy = torch.randn_like(ref)
    with use_backend(backend):
        y.backward(gy)
    ref.backward(gy)
    names = ("x", "pw1_weight", "bn1_weight", "bn1_bias", "pw2_weight", "bn2_weight", "bn2_bias")
    for name, a, r in zip(names, leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
def test_gradcheck(backend, channels_last):
    x = _layout(torch.randn(2, 3, 4, 3, dtype=D), channels_last).requires_grad_()
    fast = backend == "triton"  # the interpreter is slow: fast mode (random projections) for triton
    with use_backend(backend):
        assert torch.autograd.gradcheck(ops.ffn, (x, *(t.requires_grad_() for t in _params(3, 5, False))),
                                        fast_mode=fast)
        assert torch.autograd.gradcheck(lambda *a: ops.ffn_train(*a)[0],
                                        (x, *(t.requires_grad_() for t in _params(3, 5, True))), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
def test_opcheck(backend, channels_last):
    x = _layout(torch.randn(2, 5, 4, 3, dtype=D), channels_last)
    ev, tr = _params(5, 9, False), _params(5, 9, True)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.shvit.ffn.default, (x, *ev))
        torch.library.opcheck(torch.ops.shvit.ffn_backward.default, (torch.randn_like(x), x, *ev))
        train_args = (x, *tr[:3], 1e-5, *tr[3:], 1e-5)
        torch.library.opcheck(torch.ops.shvit.ffn_train.default, train_args)
        _, *saved = torch.ops.shvit.ffn_train(*train_args)
        torch.library.opcheck(torch.ops.shvit.ffn_train_backward.default,
                              (torch.randn_like(x), *train_args, *saved))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@LAYOUTS
def test_float32_within_numerics_rule(backend, train, channels_last):
    """DESIGN.md's rule: the fp32 error against the fp64 oracle is at most 2x stock fp32's, outputs and grads."""
    x = _layout(torch.randn(4, 66, 9, 7, dtype=D), channels_last)
    inputs = (x, *_params(66, 132, train))
    gy = torch.randn_like(x)
    fused_op = (lambda *a: ops.ffn_train(*a)[0]) if train else ops.ffn
    stock_op = (lambda *a: _stock_train(*a)[0]) if train else _stock_eval
    results = []
    for fn, dtype in ((stock_op, D), (stock_op, torch.float32), (fused_op, torch.float32)):
        leaves = _leaves(*(t.to(dtype) for t in inputs))
        with use_backend(backend):
            y = fn(*leaves)
            y.backward(gy.to(dtype))
        results.append([y, *(t.grad for t in leaves)])
    for oracle, stock, fused in zip(*results):  # (a tiny atol on each tensor's own scale)
        assert_close_to_oracle(fused, stock, oracle, atol=1e-6 * oracle.abs().max().item())


def test_empty_batch():
    x = torch.randn(0, 4, 3, 3, dtype=D)
    assert ops.ffn(x, *_params(4, 8, False)).shape == x.shape
    y, stats = ops.ffn_train(x, *_params(4, 8, True))
    assert y.shape == x.shape and all(s.isnan().all() for s in stats) and stats.pw1_mean.shape == (8,)


def test_bf16_autocast_on_reference():
    x = torch.randn(2, 4, 3, 3)
    w1, b1, w2, b2 = (t.float() for t in _params(4, 8, False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.ffn(x, w1, b1, w2, b2)  # auto: the cpu kernels take no bf16, the reference does
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _stock_eval(x, w1, b1, w2, b2), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, p: ops.ffn(x[0], *p), ValueError, "^x must have 4 dims"),
    (lambda x, p: ops.ffn(x.int(), *p), TypeError, "^x must be a floating"),
    (lambda x, p: ops.ffn("x", *p), TypeError, r"^x must be a torch\.Tensor"),
    (lambda x, p: ops.ffn(x, p[0][:, :3], *p[1:]), ValueError, r"^pw1_weight must have shape \(h, 4\) for x with 4"),
    (lambda x, p: ops.ffn(x, p[0][0], *p[1:]), ValueError, "^pw1_weight must have 2 dims"),
    (lambda x, p: ops.ffn(x, *p[:2], p[2][:, :7], p[3]), ValueError, r"^pw2_weight must have shape \(4, 8\)"),
    (lambda x, p: ops.ffn(x, p[0], p[1][:7], *p[2:]), ValueError, r"^pw1_bias must have shape \(8,\)"),
    (lambda x, p: ops.ffn(x, *p[:3], p[3][:3]), ValueError, r"^pw2_bias must have shape \(4,\)"),
    (lambda x, p: ops.ffn(x, p[0].float(), *p[1:]), TypeError, "^pw1_weight has dtype torch.float32"),
    (lambda x, p: ops.ffn(x, *p[:3], p[3].to("meta")), ValueError, "^pw2_bias is on meta but x is on cpu"),
    (lambda x, p: ops.ffn(x[:, :, :0], *p), ValueError, "^x must have non-empty"),
    (lambda x, p: ops.ffn_train(x, p[0], p[1][:3], p[1], p[2], p[3], p[3]), ValueError,
     r"^bn1_weight must have shape \(8,\)"),
    (lambda x, p: ops.ffn_train(x[:1, :, :1, :1], p[0], p[1], p[1], p[2], p[3], p[3]), ValueError,
     "^x: BatchNorm training needs more than 1 value"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(call, exc, match, backend):
    x = torch.randn(2, 4, 3, 3, dtype=D)
    with use_backend(backend), pytest.raises(exc, match=match):
        call(x, _params(4, 8, False))


# ---- the drop-in module ------------------------------------------------------------------------------------

def _pair(d, h=None):
    stock = randomize_bn(R.Residual(R.FFN(d, h or 2 * d))).to(D)
    return stock, sk.convert(torch.nn.Sequential(copy.deepcopy(stock)))[0]


@pytest.mark.parametrize("backend,case", _interpretable([(7, (5, 4)), (66, (1, 1)), (75, (33, 31))],
                                                       tokens=lambda c: c[1][0] * c[1][1]))
@LAYOUTS
def test_module_eval_and_train_match_stock(backend, case, channels_last):
    d, hw = case
    stock, fused = _pair(d)
    assert type(fused) is ResidualFFN and list(fused.state_dict()) == list(stock.state_dict())
    shape = (3, d, *hw)
    x = _layout(torch.randn(shape, dtype=D), channels_last)
    stock.eval(), fused.eval()
    with use_backend(backend):
        torch.testing.assert_close(fused(x), stock(x))
        stock.train(), fused.train()
        for step in range(3):
            x = _layout(torch.randn(shape, dtype=D), channels_last)
            torch.testing.assert_close(fused(x), stock(x))
            for (k, a), b in zip(bn_states(fused).items(), bn_states(stock).values()):
                torch.testing.assert_close(a, b, msg=f"{k} after step {step}")
        # the eval fold is refreshed by the training steps' new running statistics
        stock.eval(), fused.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(x), stock(x))


def test_module_gradients_match_stock_in_both_modes():
    stock, fused = _pair(6, 10)
    for train in (False, True):
        stock.train(train), fused.train(train)
        stock.zero_grad(), fused.zero_grad()
        x = torch.randn(2, 6, 4, 5, dtype=D)
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        gy = torch.randn_like(x)
        stock(xs).backward(gy)
        fused(xf).backward(gy)
        torch.testing.assert_close(xf.grad, xs.grad)
        for (k, a), b in zip(fused.named_parameters(), stock.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=f"{k} (train={train})")


def test_stochastic_depth_runs_the_stock_path():
    stock, fused = _pair(5)
    stock.drop = fused.drop = 0.5
    stock.train(), fused.train()
    x = torch.randn(8, 5, 3, 3, dtype=D)
    torch.manual_seed(3)
    ys = stock(x)
    torch.manual_seed(3)
    torch.testing.assert_close(fused(x), ys)
    torch.testing.assert_close(fused.m.pw1.bn.running_var, stock.m.pw1.bn.running_var)


def test_public_constructor_and_from_module_checks():
    fused, stock = ResidualFFN(12), R.Residual(R.FFN(12, 24))
    assert list(fused.state_dict()) == list(stock.state_dict())
    assert torch.all(fused.m.pw2.bn.weight == 0)  # as the official init
    with pytest.raises(ValueError, match="^ResidualFFN: hidden must be a positive int, got 0"):
        ResidualFFN(4, 0)
    with pytest.raises(TypeError, match="needs a Residual around an FFN"):
        ResidualFFN.from_module(R.residual_dwconv(4))
    with pytest.raises(TypeError, match="needs a Residual around an FFN"):
        ResidualFFN.from_module(R.FFN(4, 8))


def test_folded_form_equals_stock_eval():
    stock, fused = _pair(9)
    folded = sk.convert(torch.nn.Sequential(fused), inference=True)[0]
    assert type(folded) is FoldedResidualFFN
    assert list(folded.state_dict()) == ["m.pw1.weight", "m.pw1.bias", "m.pw2.weight", "m.pw2.bias"]
    x = torch.randn(2, 9, 6, 5, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), stock.eval()(x))
        with sk.reference_math(folded):
            torch.testing.assert_close(folded(x), stock(x))


def test_compile_fullgraph_eval_and_train():
    torch._dynamo.reset()
    stock, fused = _pair(8)
    stock, fused = stock.float(), fused.float()
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), stock.eval()(x), atol=1e-5, rtol=1e-4)
    stock.train(), fused.train()
    xc, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, ys = compiled(xc), stock(xs)
    torch.testing.assert_close(y, ys, atol=1e-5, rtol=1e-4)
    y.square().sum().backward()
    ys.square().sum().backward()
    torch.testing.assert_close(xc.grad, xs.grad, atol=1e-4, rtol=1e-3)
    for (k, a), b in zip(bn_states(fused).items(), bn_states(stock).values()):
        torch.testing.assert_close(a, b, msg=k)


def test_models_use_the_fused_block():
    from shvit_kernels.models import shvit_s1

    kinds = [type(m) for m in shvit_s1(num_classes=10).modules()]
    assert kinds.count(ResidualFFN) == 15  # one per BasicBlock (11) and two on each side of 2 PatchMergings
