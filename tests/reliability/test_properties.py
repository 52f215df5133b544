"""Property tests: random shapes, dtypes, layouts (contiguous, channels_last, sliced views) and modes for every
op on every backend that runs here; outputs and gradients must satisfy DESIGN.md's numerics rule against a
float64 oracle. All data come from a seed that hypothesis draws, so a failure replays exactly: hypothesis prints
the falsifying example (seed included) and a `@reproduce_failure` blob."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shvit_kernels import backends, ops, use_backend
from tests.helpers import cpu_backends, takes
from tests.ops.test_shsa import stock as shsa_stock

# 500 examples per op on the CPU backends (SHVIT_PROPERTY_EXAMPLES overrides); the Triton interpreter costs
# ~8 ms per program instance, so it gets a small sample of small shapes.
EXAMPLES = int(os.environ.get("SHVIT_PROPERTY_EXAMPLES", "500"))
# The default run (CI's) draws the same examples every time (derandomized): a red CI is then a regression, never
# the luck of the draw. SHVIT_PROPERTY_EXPLORE=1 draws fresh examples each run, to search further.
EXPLORE = os.environ.get("SHVIT_PROPERTY_EXPLORE") == "1"
SETTINGS = dict(deadline=None, database=None, print_blob=True, derandomize=not EXPLORE,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEEDS = st.integers(0, 2 ** 32 - 1)
DTYPES = st.sampled_from([torch.float32, torch.float64])
LAYOUTS = st.sampled_from(["contiguous", "channels_last", "sliced"])
# A normalisation (GroupNorm, BatchNorm, LayerNorm) over 1-3 values maps them to (nearly) fixed values: the weights
# in front of it then act only through eps, and their gradients are rounding noise amplified ~1/eps, which no
# two implementations share (stock F.group_norm refuses a group of one value outright). Examples normalise >= 4.
MIN_NORM = 4
EPS = {torch.float64: 1e-10, torch.float32: 2e-5}  # the "tiny atol" of the rule, relative to the result's scale


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _budget(backend, device):
    return settings(max_examples=max(EXAMPLES // 25, 5) if _interpreted(backend, device) else EXAMPLES, **SETTINGS)


def targets(op):
    """(backend, device) pairs: every backend that runs `op` on CPU tensors here, and the `gpu`-marked twins."""
    gpu = [b for b in ("triton", "cuda", "reference") if b in backends.implementations(op)]
    return [pytest.param(b, "cpu", id=b) for b in cpu_backends(op)] + \
        [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu) for b in gpu]


class Rand:
    """Float64 data from one seed."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g, dtype=torch.float64)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g, dtype=torch.float64)


def _layout(x, kind):
    """x (B, C, H, W) or tokens (B, N, C) in the given memory layout, same values."""
    ch = 1 if x.dim() == 4 else 2
    if kind == "channels_last":  # channels innermost for images; for tokens the transposed (B, C, N) storage
        return x.contiguous(memory_format=torch.channels_last) if ch == 1 else x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "sliced":  # a non-contiguous view: every other channel of a wider tensor
        shape = list(x.shape)
        shape[ch] *= 2
        every_other = tuple(slice(None, None, 2) if d == ch else slice(None) for d in range(x.dim()))
        wide = x.new_zeros(shape)
        wide[every_other] = x
        return wide[every_other]
    return x


def _rule(got, stocks, oracle, atol, what="output"):
    """Error of the result vs the float64 oracle <= 2x stock PyTorch's error in the same dtype + atol. `stocks` are
    stock results from equivalent evaluations (e.g. batch and token orders shuffled and undone): one stock run is
    one sample of the rounding noise, which on ill-conditioned inputs (a BatchNorm over near-constant values) can
    be lucky; their max is the noise level the rule compares with."""
    assert got.shape == oracle.shape, what
    if not got.numel():
        return
    err = (got.double().cpu() - oracle).abs().max().item()
    stock_err = max((s.double().cpu() - oracle).abs().max().item() for s in stocks)
    assert err <= 2 * stock_err + atol, f"{what}: error {err:.3e} vs stock {stock_err:.3e} + atol {atol:.1e}"


def _scale(t):
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def _check_grads(names, groups, got, stocks, oracle, dtype):
    """Gradients of one layer's parameters are sums of the same upstream terms, so their rounding noise is set by
    the largest of them: a gradient that is exactly 0 by an invariance (a bias in front of a training-mode
    BatchNorm, the key bias under softmax) is all noise, and gets its group's scale in the atol."""
    for group in groups:
        scale = max(_scale(oracle[i]) for i in group)
        for i in group:
            _rule(got[i], [s[i] for s in stocks], oracle[i], 10 * EPS[dtype] * scale, f"grad of {names[i]}")


def _near_kink(pre_relu, dtype):
    """A ReLU input within rounding of 0 may take either side in dtype: its gradient is not comparable there."""
    margin = {torch.float64: 1e-13, torch.float32: 1e-6}[dtype] * _scale(pre_relu)
    return bool((pre_relu.abs() < margin).any())


def _grads(y, leaves, gy):
    return torch.autograd.grad(y, [t for t in leaves if t is not None], gy)


def _shuffles(r, b, n=None, tokens=None, count=3):
    """The identity and `count` random reorderings, each a function (t, inverse) -> t of the batch (and, for an op
    equivariant to it, of the tokens: "nchw" for (B, C, H, W), "bnc" for (B, N, C)). Parameter gradients are
    order-invariant sums, so a reordered stock run is another sample of its rounding noise."""
    def make(pb, pt):
        def shuffle(t, inverse):
            bi, ti = (pb.argsort(), None if pt is None else pt.argsort()) if inverse else (pb, pt)
            t = t[bi]
            if ti is None:
                return t
            return t.flatten(2)[:, :, ti].reshape(t.shape) if tokens == "nchw" else t[:, ti]
        return shuffle

    return [lambda t, inverse: t] + [make(torch.randperm(b, generator=r.g),
                                          torch.randperm(n, generator=r.g) if tokens else None) for _ in range(count)]


def _run(fn, args, gy, shuffle=lambda t, inverse: t, layout=None):
    """fn(x, *params) and its gradients for every non-None arg, with x (and y, gy) reordered by `shuffle`."""
    x = shuffle(args[0].detach(), False)
    x = (_layout(x, layout) if layout else x).requires_grad_()
    params = [None if a is None else a.detach().clone().requires_grad_() for a in args[1:]]
    y = fn(x, *params)
    g = _grads(y, [x, *params], shuffle(gy.to(y), False))
    return shuffle(y, True), [shuffle(g[0], True), *g[1:]]


def _check(fn_stock, fn_op, args64, gy64, dtype, layout, target, shuffles, names, groups):
    """DESIGN.md's rule for the output and every gradient of `fn_op` on `target` = (backend, device) in `dtype`,
    against the float64 oracle on the CPU and stock PyTorch in `dtype` on the device."""
    backend, device = target
    oy, og = _run(fn_stock, args64, gy64)
    cast = [None if a is None else a.to(device, dtype) for a in args64]
    stocks = [_run(fn_stock, cast, gy64, sh) for sh in shuffles]
    with use_backend(backend):
        y, g = _run(fn_op, cast, gy64, layout=layout)
    _rule(y, [s[0] for s in stocks], oy, EPS[dtype] * _scale(oy))
    _check_grads(names, groups, g, [s[1] for s in stocks], og, dtype)


# ---- depthwise conv + BN (+ residual, + ReLU) ------------------------------------------------------------------

def _dw_stock(x, w, g, b, stride, residual, relu, train, rm=None, rv=None):
    z = F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, x.shape[1])
    y = F.batch_norm(z, None if train else rm, None if train else rv, g, b, train, 0.0, 1e-5)
    y = y + x if residual else y
    return y.relu() if relu else y


@pytest.mark.parametrize("backend,device", targets("dwconv_bn"))
def test_dwconv_bn_properties(backend, device):
    @_budget(backend, device)
    @given(b=st.integers(1, 9), c=st.integers(1, 24), h=st.integers(1, 40), w=st.integers(1, 40),
           k=st.sampled_from([3, 5, 7]), stride=st.sampled_from([1, 2]), dtype=DTYPES, layout=LAYOUTS,
           train=st.booleans(), relu=st.booleans(), residual=st.booleans(), seed=SEEDS)
    def check(b, c, h, w, k, stride, dtype, layout, train, relu, residual, seed):
        if _interpreted(backend, device):
            b, c, h, w = min(b, 2), min(c, 8), min(h, 12), min(w, 12)
        residual = residual and stride == 1
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        if train and b * ho * wo < MIN_NORM:
            return
        r = Rand(seed)
        x64, wt64, g64, bb64 = r.randn(b, c, h, w), r.randn(c, 1, k, k), r.rand(c) + 0.5, r.randn(c)
        rm, rv = r.randn(c), r.rand(c) + 0.5
        if relu and _near_kink(_dw_stock(x64, wt64, g64, bb64, stride, residual, False, train, rm, rv), dtype):
            return
        gy = r.randn(b, c, ho, wo)

        def fused(x, wt, g, bb):
            if train:
                return ops.dwconv_bn_train(x, wt, g, bb, 1e-5, stride, residual, relu)[0]
            scale = g / torch.sqrt(rv.to(g) + 1e-5)  # the eval op takes BN (and the identity tap) folded
            wf = wt * scale[:, None, None, None]
            if residual:
                wf = wf + F.pad(torch.ones(c, 1, 1, 1).to(g), [k // 2] * 4)
            return ops.dwconv_bn(x, wf, bb - rm.to(g) * scale, stride, relu)

        _check(lambda *a: _dw_stock(*a, stride, residual, relu, train, rm.to(a[0]), rv.to(a[0])), fused,
               [x64, wt64, g64, bb64], gy, dtype, layout, (backend, device), _shuffles(r, b),
               ["x", "weight", "bn_weight", "bn_bias"], [(0,), (1, 2, 3)])

    check()


# ---- SHSA ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", targets("shsa"))
def test_shsa_properties(backend, device):
    @_budget(backend, device)
    @given(b=st.integers(1, 5), dim=st.integers(1, 40), h=st.integers(1, 12), w=st.integers(1, 12),
           qk=st.integers(1, 16), dtype=DTYPES, layout=LAYOUTS, train=st.booleans(), residual=st.booleans(),
           pdim_frac=st.floats(0, 1), seed=SEEDS)
    def check(b, dim, h, w, qk, dtype, layout, train, residual, pdim_frac, seed):
        if not takes("shsa", backend, device, dtype):
            return
        if _interpreted(backend, device):
            b, dim, h, w = min(b, 2), min(dim, 12), min(h, 5), min(w, 5)
        pdim = 1 + round(pdim_frac * (dim - 1))
        if pdim * h * w < MIN_NORM or (train and b * h * w < MIN_NORM):
            return
        if train and min(pdim, dim) < 2:  # a 1x1 conv from one channel into a training-mode BatchNorm is a scalar
            return  # scale that the BN undoes: its weight acts only through eps (same ill-conditioning as MIN_NORM)
        r, o = Rand(seed), 2 * qk + pdim
        base = dict(gn_weight=r.randn(pdim), gn_bias=r.randn(pdim), qkv_weight=r.randn(o, pdim) / pdim ** .5,
                    proj_weight=r.randn(dim, dim) / dim ** .5)
        if train:
            base.update(qkv_bn_weight=r.rand(o) + .5, qkv_bn_bias=r.randn(o), proj_bn_weight=r.rand(dim) + .5,
                        proj_bn_bias=r.randn(dim))
        else:
            base.update(qkv_bias=r.randn(o), proj_bias=r.randn(dim))
        x64 = r.randn(b, dim, h, w)
        gy64 = r.randn(b, dim, h, w)
        taps = []
        shsa_stock(x64, qk, residual, **base, taps=taps)
        if _near_kink(taps[0], dtype):
            return

        names = ["x", *base]
        groups = [(0,), (1, 2), tuple(i for i, n in enumerate(names) if n.startswith("qkv")),
                  tuple(i for i, n in enumerate(names) if n.startswith("proj"))]

        def fused(x, *p):
            if train:
                return ops.shsa_train(x, qk_dim=qk, residual=residual, **dict(zip(base, p)))[0]
            return ops.shsa(x, qk_dim=qk, residual=residual, **dict(zip(base, p)))

        _check(lambda x, *p: shsa_stock(x, qk, residual, **dict(zip(base, p))), fused, [x64, *base.values()], gy64,
               dtype, layout, (backend, device), _shuffles(r, b, h * w, "nchw"), names, groups)

    check()


# ---- residual FFN ------------------------------------------------------------------------------------------------

def _ffn_stock(x, w1, a1, c1, w2, a2, c2, train, taps=None):
    """x + Conv2d_BN(ReLU(Conv2d_BN(x))) with 1x1 convs, as stock PyTorch runs it. Eval: (a, c) are the folded
    biases (c None); training: BatchNorm weight and bias with batch statistics. taps gets the ReLU's input."""
    def conv_bn(t, w, a, c):
        z = F.conv2d(t, w[:, :, None, None])
        return F.batch_norm(z, None, None, a, c, True, 0.0, 1e-5) if train else z + a[:, None, None]
    pre = conv_bn(x, w1, a1, c1)
    if taps is not None:
        taps.append(pre)
    return x + conv_bn(pre.relu(), w2, a2, c2)


@pytest.mark.parametrize("backend,device", targets("ffn"))
def test_ffn_properties(backend, device):
    @_budget(backend, device)
    @given(b=st.integers(1, 5), d=st.integers(1, 40), hid=st.integers(1, 80), h=st.integers(1, 12),
           w=st.integers(1, 12), dtype=DTYPES, layout=LAYOUTS, train=st.booleans(), seed=SEEDS)
    def check(b, d, hid, h, w, dtype, layout, train, seed):
        if _interpreted(backend, device):
            b, d, hid, h, w = min(b, 2), min(d, 12), min(hid, 24), min(h, 5), min(w, 5)
        if train and (b * h * w < MIN_NORM or min(d, hid) < 2):  # see MIN_NORM and the SHSA case
            return
        r = Rand(seed)
        base = {"pw1_weight": r.randn(hid, d) / d ** .5}
        base.update(dict(bn1_weight=r.rand(hid) + .5, bn1_bias=r.randn(hid)) if train else dict(pw1_bias=r.randn(hid)))
        base["pw2_weight"] = r.randn(d, hid) / hid ** .5
        base.update(dict(bn2_weight=r.rand(d) + .5, bn2_bias=r.randn(d)) if train else dict(pw2_bias=r.randn(d)))
        x64, gy64 = r.randn(b, d, h, w), r.randn(b, d, h, w)

        def stock(x, *p):
            p = list(p) if train else [p[0], p[1], None, p[2], p[3], None]
            return _ffn_stock(x, *p, train)

        taps = []
        _ffn_stock(x64, *(list(base.values()) if train else [*list(base.values())[:2], None,
                                                             *list(base.values())[2:], None]), train, taps)
        if _near_kink(taps[0], dtype):
            return

        def fused(x, *p):
            kw = dict(zip(base, p))
            return ops.ffn_train(x, **kw)[0] if train else ops.ffn(x, **kw)

        names = ["x", *base]
        groups = [(0,), tuple(i for i, n in enumerate(names) if n[:3] in ("pw1", "bn1")),
                  tuple(i for i, n in enumerate(names) if n[:3] in ("pw2", "bn2"))]
        _check(stock, fused, [x64, *base.values()], gy64, dtype, layout, (backend, device),
               _shuffles(r, b, h * w, "nchw"), names, groups)

    check()


# ---- SRA (PVT) -------------------------------------------------------------------------------------------------

def _sra_reduce_stock(x, h, w, sr_w, sr_b, ln_w, ln_b, sr_ratio, linear):
    b, _, c = x.shape
    img = x.transpose(1, 2).reshape(b, c, h, w)
    if linear:
        img = F.adaptive_avg_pool2d(img, 7)
    t = F.conv2d(img, sr_w, sr_b, stride=1 if linear else sr_ratio).flatten(2).transpose(1, 2)
    t = F.layer_norm(t, (c,), ln_w, ln_b, 1e-5)
    return F.gelu(t) if linear else t


def _sra_attention_stock(x, red, q_w, q_b, kv_w, kv_b, heads, scale):
    b, n, c = x.shape
    q = F.linear(x, q_w, q_b).reshape(b, n, heads, c // heads).transpose(1, 2)
    k, v = F.linear(red, kv_w, kv_b).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
    o = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
    return o.transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("backend,device", targets("sra"))
def test_sra_reduce_properties(backend, device):
    @_budget(backend, device)
    @given(b=st.integers(1, 9), h=st.integers(1, 40), w=st.integers(1, 40), c=st.integers(1, 24),
           sr=st.integers(2, 8), linear=st.booleans(), dtype=DTYPES, layout=LAYOUTS, seed=SEEDS)
    def check(b, h, w, c, sr, linear, dtype, layout, seed):
        if _interpreted(backend, device):
            b, h, w, c = min(b, 2), min(h, 16), min(w, 16), min(c, 12)
        if not linear and (h < sr or w < sr):
            return
        if c < MIN_NORM:
            return
        r, k = Rand(seed), 1 if linear else sr
        args = [r.randn(b, h * w, c), r.randn(c, c, k, k) / (c * k * k) ** .5, r.randn(c), r.rand(c) + .5, r.randn(c)]
        ho, wo = (7, 7) if linear else (h // sr, w // sr)
        gy = r.randn(b, ho * wo, c)
        _check(lambda x, *p: _sra_reduce_stock(x, h, w, *p, sr, linear),
               lambda x, *p: ops.sra_reduce(x, h, w, *p, 1e-5, sr, linear), args, gy, dtype, layout, (backend, device),
               _shuffles(r, b), ["x", "sr_weight", "sr_bias", "ln_weight", "ln_bias"], [(0,), (1, 2), (3, 4)])

    check()


@pytest.mark.parametrize("backend,device", targets("sra"))
def test_sra_attention_properties(backend, device):
    @_budget(backend, device)
    @given(b=st.integers(1, 9), n=st.integers(1, 300), m=st.integers(1, 64), heads=st.integers(1, 4),
           head_dim=st.integers(1, 16), bias=st.booleans(), dtype=DTYPES, layout=LAYOUTS, seed=SEEDS)
    def check(b, n, m, heads, head_dim, bias, dtype, layout, seed):
        if _interpreted(backend, device):
            b, n, m, heads, head_dim = min(b, 2), min(n, 40), min(m, 20), min(heads, 2), min(head_dim, 8)
        r, c = Rand(seed), heads * head_dim
        args = [r.randn(b, n, c), r.randn(b, m, c), r.randn(c, c) / c ** .5, r.randn(c) if bias else None,
                r.randn(2 * c, c) / c ** .5, r.randn(2 * c) if bias else None]
        gy, scale = r.randn(b, n, c), head_dim ** -0.5
        names = ["x", "red", "q_weight"] + (["q_bias"] if bias else []) + ["kv_weight"] + (["kv_bias"] if bias else [])
        groups = [(0,), (1,), tuple(i for i, nm in enumerate(names) if nm.startswith("q_")),
                  tuple(i for i, nm in enumerate(names) if nm.startswith("kv_"))]
        _check(lambda *a: _sra_attention_stock(*a, heads, scale), lambda *a: ops.sra_attention(*a, heads, scale),
               args, gy, dtype, layout, (backend, device), _shuffles(r, b, n, "bnc"), names, groups)

    check()
