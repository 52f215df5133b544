"""FusedPatchMerging (official / reference layout and timm's): conv3 takes the SqueezeExcite gate into the pw_conv_bn
op (on the CPU in eval; on CUDA, tests/gpu, both 1x1 convs in training too); outputs, every parameter's gradient and
the running stats equal the stock module's in float64, in eval and training, NCHW and channels_last."""
import copy

import pytest
import torch

import shvit_kernels as sk
from shvit_kernels import ops, use_backend
from shvit_kernels import reference as R
from shvit_kernels.models.timm_compat import import_timm
from shvit_kernels.nn import ConvBN, FusedPatchMerging
from shvit_kernels.nn._match import is_pointwise
from tests.helpers import bn_states, cpu_backends, randomize_bn

D = torch.float64


def _stock(kind):
    if kind == "timm":
        return import_timm().models.shvit.PatchMerging(6, 10)
    return R.PatchMerging(6, 10)


def _pair(kind):
    stock = randomize_bn(_stock(kind)).to(D)
    with torch.no_grad():  # a gate away from 0.5 everywhere: fc2's bias spread
        stock.se.fc2.bias.normal_(0, 2)
    fused = sk.convert(torch.nn.Sequential(copy.deepcopy(stock)))[0]
    assert type(fused) is FusedPatchMerging and list(fused.state_dict()) == list(stock.state_dict())
    return stock, fused


def _spy(monkeypatch):
    """Record, per call of the pw_conv_bn ops, whether a gate was passed."""
    calls = []
    for name in ("pw_conv_bn", "pw_conv_bn_train"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            gate = kwargs.get("gate", args[3] if _name == "pw_conv_bn" else args[5] if len(args) > 5 else None)
            calls.append((_name, gate is not None))
            return _real(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)
    return calls


@pytest.mark.parametrize("backend", cpu_backends("pw_conv_bn"))
@pytest.mark.parametrize("kind", ["reference", "timm"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("everywhere", [False, True], ids=["cpu-policy", "op-everywhere"])
def test_matches_stock_in_eval_and_training(monkeypatch, backend, kind, channels_last, everywhere):
    """op-everywhere: both 1x1 convs on the op in training too, as on CUDA (ConvBN._runs_op), on the CPU backends."""
    stock, fused = _pair(kind)
    if everywhere:
        monkeypatch.setattr(ConvBN, "_runs_op", lambda self, x, train, gated: is_pointwise(self))
    calls = _spy(monkeypatch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with use_backend(backend):
        for train in (False, True, True, False):  # eval after training: the refreshed fold
            stock.train(train), fused.train(train)
            x = torch.randn(3, 6, 9, 7, dtype=D).contiguous(memory_format=fmt)
            xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            ys, yf = stock(xs), fused(xf)
            torch.testing.assert_close(yf, ys)
            gy = torch.randn_like(ys)
            ys.backward(gy), yf.backward(gy)
            torch.testing.assert_close(xf.grad, xs.grad)
            for (k, a), b in zip(fused.named_parameters(), stock.parameters()):
                torch.testing.assert_close(a.grad, b.grad, msg=f"{k} (train={train})")
            for (k, a), b in zip(bn_states(fused).items(), bn_states(stock).values()):
                torch.testing.assert_close(a, b, msg=k)
            stock.zero_grad(), fused.zero_grad()
    if everywhere:  # eval: the gated conv3 (an ungated eval conv is one library call); training: both
        train_calls = [("pw_conv_bn_train", False), ("pw_conv_bn_train", True)]
        assert calls == [("pw_conv_bn", True)] + train_calls * 2 + [("pw_conv_bn", True)]
    else:  # on the CPU: the gated eval conv3 only (conv1 stays one oneDNN call, training stock's convolutions)
        assert calls == [("pw_conv_bn", True)] * 2


def test_unrecognised_squeeze_excite_runs_it_as_is(monkeypatch):
    stock, fused = _pair("timm")
    for m in (stock, fused):
        m.se.add_maxpool = True  # timm's experimental max-pool branch: not the gate the op takes
    calls = _spy(monkeypatch)
    x = torch.randn(2, 6, 8, 8, dtype=D)
    stock.eval(), fused.eval()
    torch.testing.assert_close(fused(x), stock(x))
    assert calls == []


def test_autocast_keeps_the_stock_convs(monkeypatch):
    stock, fused = (m.float() for m in _pair("reference"))
    calls = _spy(monkeypatch)
    x = torch.randn(2, 6, 9, 7)
    for train in (True, False):
        stock.train(train), fused.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, ys = fused(x), stock(x)
        assert y.dtype == ys.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ys.float(), atol=0.1, rtol=0.05)
    assert calls == []


@pytest.mark.parametrize("everywhere", [False, True], ids=["cpu-policy", "op-everywhere"])
def test_compile_fullgraph_matches_stock(monkeypatch, everywhere):
    """Forward and backward of the compiled module (op-everywhere: the training op under compile too, as on CUDA)."""
    if everywhere:
        monkeypatch.setattr(ConvBN, "_runs_op", lambda self, x, train, gated: is_pointwise(self))
    stock, fused = (m.float() for m in _pair("reference"))
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)
    for train in (True, False):
        stock.train(train), fused.train(train)
        x = torch.randn(2, 6, 9, 7)
        xs, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yc = stock(xs), compiled(xc)
        torch.testing.assert_close(yc, ys, atol=1e-5, rtol=1e-4)
        ys.square().sum().backward(), yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xs.grad, atol=1e-4, rtol=1e-3)
    for (k, a), b in zip(bn_states(fused).items(), bn_states(stock).values()):
        torch.testing.assert_close(a, b, msg=k)
