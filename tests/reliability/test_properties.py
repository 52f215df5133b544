"""Property tests: random shapes, dtypes, layouts (contiguous, channels_last, sliced views) and modes for every
op on every backend that runs here; outputs and gradients must satisfy DESIGN.md's numerics rule against a
float64 oracle. Hypothesis prints the failing example and a `@reproduce_failure` blob to replay it."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shvit_kernels import ops, use_backend
from tests.helpers import cpu_backends
from tests.ops.test_shsa import stock as shsa_stock

# 500 examples per op on the CPU backends (SHVIT_PROPERTY_EXAMPLES overrides); the Triton interpreter costs
# ~8 ms per program instance, so it gets a small sample of small shapes.
EXAMPLES = int(os.environ.get("SHVIT_PROPERTY_EXAMPLES", "500"))
SETTINGS = dict(deadline=None, database=None, print_blob=True, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _budget(backend):
    return settings(max_examples=EXAMPLES if backend != "triton" else max(EXAMPLES // 25, 5), **SETTINGS)


def _layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":  # a non-contiguous view: every other channel of a wider tensor
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def _rule(got, stock_same_dtype, oracle, atol):
    """Error of the result vs the float64 oracle <= 2x stock PyTorch's error in the same dtype + atol."""
    err = (got.double() - oracle).abs().max().item() if got.numel() else 0.0
    stock_err = (stock_same_dtype.double() - oracle).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * stock_err + atol, f"error {err:.3e} vs stock {stock_err:.3e}"


def _atol(dtype, scale):
    return {torch.float64: 1e-10, torch.float32: 2e-5}[dtype] * max(1.0, scale)


DTYPES = st.sampled_from([torch.float32, torch.float64])
LAYOUTS = st.sampled_from(["contiguous", "channels_last", "sliced"])


def _dw_stock(x, w, g, b, stride, residual, relu, train, rm=None, rv=None):
    z = F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, x.shape[1])
    y = F.batch_norm(z, rm, rv, g, b, train, 0.0, 1e-5) if train else F.batch_norm(z, rm, rv, g, b, False, 0.0, 1e-5)
    y = y + x if residual else y
    return y.relu() if relu else y


@pytest.mark.parametrize("backend", cpu_backends("dwconv_bn"))
def test_dwconv_bn_properties(backend):
    @_budget(backend)
    @given(b=st.integers(1, 9), c=st.integers(1, 24), h=st.integers(1, 40), w=st.integers(1, 40),
           k=st.sampled_from([3, 5, 7]), stride=st.sampled_from([1, 2]), dtype=DTYPES, layout=LAYOUTS,
           train=st.booleans(), relu=st.booleans(), data=st.data())
    def check(b, c, h, w, k, stride, dtype, layout, train, relu, data):
        if backend == "triton":
            b, c, h, w = min(b, 2), min(c, 8), min(h, 12), min(w, 12)
        residual = stride == 1 and data.draw(st.booleans())
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        if train and b * ho * wo < 2:
            return
        x64 = torch.randn(b, c, h, w, dtype=torch.float64)
        wt64, g64, bb64 = torch.randn(c, 1, k, k, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5, \
            torch.randn(c, dtype=torch.float64)
        rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
        leaves64 = [t.clone().requires_grad_() for t in (x64, wt64, g64, bb64)]
        oracle = _dw_stock(*leaves64, stride, residual, relu, train, None if train else rm, None if train else rv)
        gy = torch.randn_like(oracle)
        ograds = torch.autograd.grad(oracle, leaves64, gy)
        cast = [t.to(dtype) for t in (x64, wt64, g64, bb64)]
        leaves_s = [t.clone().requires_grad_() for t in cast]
        stock = _dw_stock(*leaves_s, stride, residual, relu, train, None if train else rm.to(dtype),
                          None if train else rv.to(dtype))
        sgrads = torch.autograd.grad(stock, leaves_s, gy.to(dtype))
        x = _layout(cast[0], layout).requires_grad_()
        params = [t.clone().requires_grad_() for t in cast[1:]]
        with use_backend(backend):
            if train:
                y = ops.dwconv_bn_train(x, *params, 1e-5, stride, residual, relu)[0]
            else:
                scale = params[1] / torch.sqrt(rv.to(dtype) + 1e-5)
                wf = params[0] * scale[:, None, None, None]
                if residual:
                    wf = wf + F.pad(torch.ones(c, 1, 1, 1, dtype=dtype), [k // 2] * 4)
                y = ops.dwconv_bn(x, wf, params[2] - rm.to(dtype) * scale, stride, relu)
        grads = torch.autograd.grad(y, [x, *params], gy.to(dtype))
        scale = oracle.abs().max().item()
        _rule(y, stock, oracle, _atol(dtype, scale))
        for got, s, o in zip(grads, sgrads, ograds):
            _rule(got, s, o, _atol(dtype, o.abs().max().item()))

    check()


@pytest.mark.parametrize("backend", cpu_backends("shsa"))
def test_shsa_properties(backend):
    @_budget(backend)
    @given(b=st.integers(1, 5), dim=st.integers(1, 40), h=st.integers(1, 12), w=st.integers(1, 12),
           qk=st.integers(1, 16), dtype=DTYPES, layout=LAYOUTS, train=st.booleans(), residual=st.booleans(),
           data=st.data())
    def check(b, dim, h, w, qk, dtype, layout, train, residual, data):
        if backend == "triton":
            b, dim, h, w = min(b, 2), min(dim, 12), min(h, 5), min(w, 5)
        if train and b * h * w < 2:
            return
        pdim = data.draw(st.integers(1, dim))
        if pdim * h * w < 2:  # stock F.group_norm refuses a group of one value: no oracle to compare with
            return
        o = 2 * qk + pdim
        base = dict(gn_weight=torch.randn(pdim), gn_bias=torch.randn(pdim), qkv_weight=torch.randn(o, pdim) / pdim ** .5,
                    proj_weight=torch.randn(dim, dim) / dim ** .5)
        if train:
            base.update(qkv_bn_weight=torch.rand(o) + .5, qkv_bn_bias=torch.randn(o), proj_bn_weight=torch.rand(dim) + .5,
                        proj_bn_bias=torch.randn(dim))
        else:
            base.update(qkv_bias=torch.randn(o), proj_bias=torch.randn(dim))
        x64 = torch.randn(b, dim, h, w, dtype=torch.float64)

        def run(fn, x, ps):
            leaves = {k: v.clone().requires_grad_() for k, v in ps.items()}
            xl = x.detach().requires_grad_() if x.is_leaf else x
            y = fn(xl, leaves)
            gy = torch.ones_like(y) * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
            return y, torch.autograd.grad(y, [xl, *leaves.values()], gy)

        p64 = {k: v.double() for k, v in base.items()}
        pd = {k: v.to(dtype) for k, v in base.items()}
        oracle, og = run(lambda x, p: shsa_stock(x, qk, residual, **p), x64, p64)
        stock, sg = run(lambda x, p: shsa_stock(x, qk, residual, **p), x64.to(dtype), pd)
        fn = ops.shsa_train if train else ops.shsa
        xin = _layout(x64.to(dtype), layout).requires_grad_()
        with use_backend(backend):
            got, gg = run(lambda x, p: (fn(x, qk_dim=qk, residual=residual, **p)[0] if train
                                        else fn(x, qk_dim=qk, residual=residual, **p)), xin, pd)
        _rule(got, stock, oracle, _atol(dtype, oracle.abs().max().item()))
        for a, s, r in zip(gg, sg, og):
            _rule(a, s, r, _atol(dtype, r.abs().max().item()) * 10)

    check()
