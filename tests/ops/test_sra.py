"""shvit::sra_reduce / sra_attention on every backend that runs here, against PVT's Attention in float64."""
import pytest
import torch

import shvit_kernels as sk
from shvit_kernels import ops, use_backend
from shvit_kernels.reference import SRA as StockSRA
from tests.helpers import cpu_backends

D = torch.float64
BACKENDS = cpu_backends("sra")
# PVTv2 b0 / b1-b2 stage configs (dim, heads, sr) at small odd token grids, incl. H, W not divisible by sr,
# plus v2-li (linear) and qkv_bias off.
CONFIGS = [
    (dict(dim=32, num_heads=1, sr_ratio=8, qkv_bias=True), 17, 19),
    (dict(dim=64, num_heads=2, sr_ratio=4, qkv_bias=True), 9, 13),
    (dict(dim=160, num_heads=5, sr_ratio=2, qkv_bias=True), 5, 7),
    (dict(dim=256, num_heads=8, sr_ratio=1, qkv_bias=True), 3, 3),
    (dict(dim=128, num_heads=2, sr_ratio=4, qkv_bias=False), 8, 8),
    (dict(dim=64, num_heads=2, linear=True, qkv_bias=True), 10, 15),
]


def _stock(cfg):
    m = StockSRA(**cfg).to(D)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg,h,w", CONFIGS)
def test_fused_module_matches_pvt_attention(backend, cfg, h, w):
    stock = _stock(cfg)
    fused = sk.SRA.from_module(stock)
    x = torch.randn(2, h * w, cfg["dim"], dtype=D, requires_grad=True)
    with use_backend(backend):
        y = fused(x, h, w)
    ref = stock(x, h, w)
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, *fused.parameters()], gy)
    want = torch.autograd.grad(ref, [x, *stock.parameters()], gy)
    for name, a, b in zip(["x"] + [n for n, _ in stock.named_parameters()], got, want):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("linear", [False, True])
def test_gradcheck(backend, linear):
    c, h, w, r = 4, 9 if linear else 5, 8 if linear else 4, 2
    x = torch.randn(2, h * w, c, dtype=D, requires_grad=True)
    sr_w = torch.randn(c, c, 1 if linear else r, 1 if linear else r, dtype=D, requires_grad=True)
    vecs = [torch.randn(c, dtype=D, requires_grad=True) for _ in range(3)]
    q_w, kv_w = (torch.randn(n, c, dtype=D, requires_grad=True) for n in (c, 2 * c))
    q_b = torch.randn(c, dtype=D, requires_grad=True)
    fast = backend == "triton"  # the interpreter is slow: fast mode (random projections) for triton
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: ops.sra_reduce(a[0], h, w, *a[1:], 1e-5, r, linear),
                                        (x, sr_w, *vecs), fast_mode=fast)
        red = torch.randn(2, 3, c, dtype=D, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, red, qw, qb, kvw: ops.sra_attention(x, red, qw, qb, kvw, None, 2, 0.7),
                                        (x, red, q_w, q_b, kv_w), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    c, h, w = 6, 5, 4
    x = torch.randn(2, h * w, c, dtype=D)
    red = torch.randn(2, 3, c, dtype=D)
    q_w, kv_w, q_b = torch.randn(c, c, dtype=D), torch.randn(2 * c, c, dtype=D), torch.randn(c, dtype=D)
    vecs = [torch.randn(c, dtype=D) for _ in range(3)]
    with use_backend(backend):
        torch.library.opcheck(torch.ops.shvit.sra_reduce.default,
                              (x, h, w, torch.randn(c, c, 2, 2, dtype=D), *vecs, 1e-5, 2, False))
        torch.library.opcheck(torch.ops.shvit.sra_reduce.default,
                              (x, h, w, torch.randn(c, c, 1, 1, dtype=D), *vecs, 1e-5, 1, True))
        torch.library.opcheck(torch.ops.shvit.sra_attention.default, (x, red, q_w, q_b, kv_w, None, 3, 0.5))
        o, lse = torch.ops.shvit.sra_attention(x, red, q_w, q_b, kv_w, None, 3, 0.5)
        torch.library.opcheck(torch.ops.shvit.sra_attention_backward.default,
                              (torch.randn_like(o), x, red, q_w, q_b, kv_w, None, o, lse, 3, 0.5))


def test_keys_and_from_module():
    stock = StockSRA(64, 2, sr_ratio=4)
    fused = sk.SRA(64, 2, sr_ratio=4)
    assert list(fused.state_dict()) == list(stock.state_dict())
    fused.load_state_dict(stock.state_dict(), strict=True)
    with pytest.raises(TypeError, match="not a PVT Attention"):
        sk.SRA.from_module(torch.nn.Linear(3, 3))


def test_attn_dropout_in_training_takes_the_stock_path():
    stock = _stock(dict(dim=32, num_heads=2, sr_ratio=2, attn_drop=0.5))
    fused = sk.SRA.from_module(stock).train()
    x = torch.randn(2, 16, 32, dtype=D)
    torch.manual_seed(3)
    a = fused(x, 4, 4)
    torch.manual_seed(3)
    torch.testing.assert_close(a, stock.train()(x, 4, 4))


def test_empty_batch():
    fused = sk.SRA(32, 2, sr_ratio=2).double()
    assert fused(torch.randn(0, 16, 32, dtype=D), 4, 4).shape == (0, 16, 32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda m, x: m(x, 4, 5), ValueError, "H\\*W"),
    (lambda m, x: m(x[0], 4, 4), ValueError, "x must have 3 dims"),
    (lambda m, x: m(x.int(), 4, 4), TypeError, "floating"),
    (lambda m, x: m(x[..., :16], 4, 4), ValueError, r"x must have shape \(B, N, 32\)"),
    (lambda m, x: m(x.float(), 4, 4), TypeError, "dtype"),
])
def test_bad_inputs(call, exc, match):
    m = sk.SRA(32, 2, sr_ratio=2).double()
    with pytest.raises(exc, match=match):
        call(m, torch.randn(2, 16, 32, dtype=D))


def test_bad_sr_ratio_for_tiny_maps():
    m = sk.SRA(8, 2, sr_ratio=4).double()
    with pytest.raises(ValueError, match="sr_ratio"):
        m(torch.randn(1, 6, 8, dtype=D), 2, 3)
