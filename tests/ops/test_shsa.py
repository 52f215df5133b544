"""shvit::shsa / shsa_train on every backend that runs here, against the stock module in float64."""
import pytest
import torch
import torch.nn.functional as F

from shvit_kernels import ops, use_backend
from tests.helpers import cpu_backends

D = torch.float64
BACKENDS = cpu_backends("shsa")
# (B, dim, pdim, qk, H, W): 1x1, odd spatial sizes, pdim 66 / 75 / == dim; small for the Triton interpreter
SHAPES = [(2, 24, 8, 4, 4, 4), (1, 9, 9, 2, 1, 1), (2, 80, 66, 16, 7, 9), (2, 96, 75, 16, 3, 5), (2, 20, 7, 4, 33, 31)]


def _params(dim, pdim, qk, train):
    o = 2 * qk + pdim
    p = dict(gn_weight=torch.randn(pdim, dtype=D), gn_bias=torch.randn(pdim, dtype=D),
             qkv_weight=torch.randn(o, pdim, dtype=D) / pdim ** 0.5, proj_weight=torch.randn(dim, dim, dtype=D) / dim ** 0.5)
    if train:
        p.update(qkv_bn_weight=torch.rand(o, dtype=D) + 0.5, qkv_bn_bias=torch.randn(o, dtype=D),
                 proj_bn_weight=torch.rand(dim, dtype=D) + 0.5, proj_bn_bias=torch.randn(dim, dtype=D))
    else:
        p.update(qkv_bias=torch.randn(o, dtype=D), proj_bias=torch.randn(dim, dtype=D))
    return p


def stock(x, qk, residual, gn_weight, gn_bias, qkv_weight, proj_weight, qkv_bias=None, proj_bias=None,
          qkv_bn_weight=None, qkv_bn_bias=None, proj_bn_weight=None, proj_bn_bias=None, taps=None):
    """The official module's computation with F.* ops (BN in training mode when BN weights are given).
    `taps`, a list, receives the attention output before the ReLU (where the kinks are)."""
    b, c, h, w = x.shape
    p = gn_weight.shape[0]
    x1 = F.group_norm(x[:, :p], 1, gn_weight, gn_bias, 1e-5)
    a = F.conv2d(x1, qkv_weight[:, :, None, None], qkv_bias)
    if qkv_bn_weight is not None:
        a = F.batch_norm(a, None, None, qkv_bn_weight, qkv_bn_bias, True, 0.0, 1e-5)
    q, k, v = a.flatten(2).split([qk, qk, p], 1)
    attn = ((q.transpose(-2, -1) @ k) * qk ** -0.5).softmax(-1)
    o = (v @ attn.transpose(-2, -1)).reshape(b, p, h, w)
    if taps is not None:
        taps.append(o)
    y = F.conv2d(torch.cat([o, x[:, p:]], 1).relu(), proj_weight[:, :, None, None], proj_bias)
    if proj_bn_weight is not None:
        y = F.batch_norm(y, None, None, proj_bn_weight, proj_bn_bias, True, 0.0, 1e-5)
    return y + x if residual else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [False, True])
def test_forward_backward(backend, shape, train):
    b, dim, pdim, qk, h, w = shape
    if train and b * h * w < 2:
        pytest.skip("BatchNorm needs more than one value per channel")
    residual = dim % 2 == 0
    x = torch.randn(b, dim, h, w, dtype=D)
    params = _params(dim, pdim, qk, train)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    xl = x.clone().requires_grad_()
    with use_backend(backend):
        if train:
            y, st = ops.shsa_train(xl, qk_dim=qk, residual=residual, **leaves)
        else:
            y = ops.shsa(xl, qk_dim=qk, residual=residual, **leaves)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    xr = x.clone().requires_grad_()
    ref = stock(xr, qk, residual, **ref_leaves)
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(ref)
    with use_backend(backend):  # the backward must run on the backend under test too
        y.backward(gy)
    ref.backward(gy)
    torch.testing.assert_close(xl.grad, xr.grad, msg="x")
    for k in params:
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, msg=k)
    if train:
        x1 = F.group_norm(x[:, :pdim], 1, params["gn_weight"], params["gn_bias"], 1e-5)
        z = F.conv2d(x1, params["qkv_weight"][:, :, None, None])
        torch.testing.assert_close(st.qkv_mean, z.mean((0, 2, 3)))
        torch.testing.assert_close(st.qkv_var, z.var((0, 2, 3), unbiased=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True])
def test_gradcheck(backend, train):
    dim, pdim, qk = 6, 4, 2
    x = torch.randn(2, dim, 3, 2, dtype=D, requires_grad=True)
    params = {k: v.requires_grad_() for k, v in _params(dim, pdim, qk, train).items()}
    names = list(params)
    fn = ops.shsa_train if train else ops.shsa

    def f(x, *ps):
        out = fn(x, qk_dim=qk, residual=True, **dict(zip(names, ps)))
        return out[0] if train else out

    with use_backend(backend):  # the interpreter is slow: fast mode (random projections) for triton
        assert torch.autograd.gradcheck(f, (x, *params.values()), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dim, pdim, qk = 10, 6, 4
    x = torch.randn(2, dim, 3, 4, dtype=D)
    e, t = _params(dim, pdim, qk, False), _params(dim, pdim, qk, True)
    eval_args = (x, e["gn_weight"], e["gn_bias"], 1e-5, e["qkv_weight"], e["qkv_bias"], e["proj_weight"],
                 e["proj_bias"], qk, True)
    train_args = (x, t["gn_weight"], t["gn_bias"], 1e-5, t["qkv_weight"], t["qkv_bn_weight"], t["qkv_bn_bias"], 1e-5,
                  t["proj_weight"], t["proj_bn_weight"], t["proj_bn_bias"], 1e-5, qk, False)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.shvit.shsa.default, eval_args)
        torch.library.opcheck(torch.ops.shvit.shsa_train.default, train_args)
        torch.library.opcheck(torch.ops.shvit.shsa_backward.default, (torch.randn_like(x), *eval_args))
        _, *stats = torch.ops.shvit.shsa_train(*train_args)
        torch.library.opcheck(torch.ops.shvit.shsa_train_backward.default,
                              (torch.randn_like(x), *train_args[:12], *stats, qk, False))


def test_channels_last_input_gives_same_result():
    dim, pdim, qk = 12, 5, 4
    x = torch.randn(2, dim, 5, 3, dtype=D)
    p = _params(dim, pdim, qk, False)
    y = ops.shsa(x.contiguous(memory_format=torch.channels_last), qk_dim=qk, **p)
    torch.testing.assert_close(y, ops.shsa(x, qk_dim=qk, **p))


def test_empty_batch():
    p = _params(12, 5, 4, True)
    y, st = ops.shsa_train(torch.randn(0, 12, 4, 4, dtype=D), qk_dim=4, **p)
    assert y.shape == (0, 12, 4, 4) and st.qkv_mean.isnan().all()


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda x, p: (x[0], p), ValueError, "x must have 4 dims"),
    (lambda x, p: (x[:, :10], p), ValueError, "proj_weight must have shape"),
    (lambda x, p: (x.int(), p), TypeError, "x must be a floating"),
    (lambda x, p: (x, {**p, "qkv_weight": p["qkv_weight"].float()}), TypeError, "qkv_weight has dtype"),
    (lambda x, p: (x, {**p, "qkv_bias": p["qkv_bias"][:3]}), ValueError, "qkv_bias must have shape"),
    (lambda x, p: (x, {**p, "gn_bias": p["gn_bias"].to("meta")}), ValueError, "gn_bias is on meta"),
    (lambda x, p: (x[:, :, :0], p), ValueError, "non-empty"),
    (lambda x, p: (x, {**p, "gn_weight": torch.randn(13, dtype=D)}), ValueError, "pdim"),
])
def test_bad_inputs(mutate, exc, match):
    x, p = mutate(torch.randn(2, 12, 4, 4, dtype=D), _params(12, 5, 4, False))
    with pytest.raises(exc, match=match):
        ops.shsa(x, qk_dim=4, **p)


def test_bad_qk_dim():
    with pytest.raises(ValueError, match="qk_dim"):
        ops.shsa(torch.randn(2, 12, 4, 4, dtype=D), qk_dim=0, **_params(12, 5, 4, False))
