"""Triton fused depthwise conv + BN (+ residual) (+ ReLU) against F.conv2d + F.batch_norm in float64.

Devices and the interpreter: tests/triton/__init__.py.
"""
import pytest
import torch
import torch.nn.functional as F

from tests.triton import triton_device

DEVICE = triton_device()

from shvit_kernels.triton import dwconv_bn as T

EPS = 1e-5
CL = torch.channels_last
# Max error relative to the largest reference magnitude. fp16/bf16 round every stored value (y, dz, grad_x)
# once: a few ulps of the output dtype.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _inputs(shape, k, dtype, param_dtype, channels_last, seed=0):
    """Random inputs rounded to dtype, with float64 leaf copies of the rounded values for the reference."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g)
    w = torch.randn(c, 1, k, k, generator=g) / k
    bn_w = torch.randn(c, generator=g)
    bn_b = torch.randn(c, generator=g)
    ours = [x.to(dtype), w.to(dtype), bn_w.to(param_dtype), bn_b.to(param_dtype)]
    if channels_last:
        ours[0] = ours[0].contiguous(memory_format=CL)
    ours = [t.to(DEVICE) for t in ours]
    ref = [t.detach().cpu().double().requires_grad_() for t in ours]
    return ours, ref


def _reference(x, w, bn_w, bn_b, stride, residual, relu):
    """float64 autograd reference; returns (y, mean, biased var)."""
    z = F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, x.shape[1])
    var, mean = torch.var_mean(z.detach(), (0, 2, 3), correction=0)
    if z.numel() // z.shape[1] > 1:
        y = F.batch_norm(z, None, None, bn_w, bn_b, training=True, eps=EPS)
    else:  # F.batch_norm refuses one value per channel; the formula itself is fine (y = bn_b)
        m = z.mean((0, 2, 3), keepdim=True)
        y = (z - m) / torch.sqrt(((z - m) ** 2).mean((0, 2, 3), keepdim=True) + EPS) * bn_w[:, None, None] \
            + bn_b[:, None, None]
    if residual:
        y = y + x
    if relu:
        y = y.relu()
    return y, mean, var


# (shape, k, stride, residual, relu, channels_last)
_FP32_CASES = [
    ((1, 3, 1, 1), 3, 1, True, True, False),
    ((1, 3, 1, 1), 5, 2, False, False, True),
    ((2, 5, 3, 5), 3, 1, True, False, True),
    ((2, 5, 3, 5), 5, 2, False, True, False),
    ((2, 5, 3, 5), 3, 2, False, False, True),
    ((2, 5, 3, 5), 5, 1, False, True, False),
    ((2, 13, 17, 13), 3, 1, True, True, False),
    ((2, 13, 17, 13), 3, 2, False, True, True),
    ((2, 13, 17, 13), 5, 1, True, False, True),
    ((2, 13, 17, 13), 5, 2, False, False, False),
    ((2, 8, 8, 8), 3, 1, False, False, False),
    ((2, 8, 8, 8), 5, 1, True, True, True),
    ((2, 8, 8, 8), 3, 2, False, True, True),
    ((2, 8, 8, 8), 5, 2, False, False, False),
    ((2, 8, 8, 8), 7, 1, True, True, True),
]
# (dtype, param dtype, case): half-precision activations with fp32 BN parameters, as under autocast
_OTHER_CASES = [
    (torch.float16, torch.float32, ((2, 13, 17, 13), 3, 1, True, True, False)),
    (torch.float16, torch.float32, ((2, 8, 8, 8), 5, 2, False, True, True)),
    (torch.float16, torch.float16, ((2, 5, 3, 5), 3, 1, True, False, True)),
    (torch.float16, torch.float32, ((2, 13, 17, 13), 5, 2, False, False, True)),
    (torch.bfloat16, torch.float32, ((2, 8, 8, 8), 3, 1, True, True, True)),
    (torch.float64, torch.float64, ((2, 5, 3, 5), 5, 2, False, True, False)),
]
_TRAIN_CASES = [(torch.float32, torch.float32, c) for c in _FP32_CASES] + _OTHER_CASES


def _case_id(case):
    dtype, _, (shape, k, stride, residual, relu, cl) = case
    return (f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}-k{k}s{stride}"
            f"{'-res' if residual else ''}{'-relu' if relu else ''}{'-cl' if cl else ''}")


def _check_train(ours, ref, gy, stride, residual, relu, dtype, channels_last):
    x, w, bn_w, bn_b = ours
    y, mean, var = T.dwconv_bn_train_fwd(x, w, bn_w, bn_b, EPS, stride, residual, relu)
    y_ref, mean_ref, var_ref = _reference(*ref, stride, residual, relu)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and mean.dtype == stat_dtype and var.dtype == stat_dtype
    assert y.shape == y_ref.shape and y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    tol = TOL[dtype]
    assert _err(y.cpu(), y_ref) < tol
    # the statistics are accumulated in fp32/fp64 from the (rounded) inputs whatever the activation dtype
    assert _err(mean.cpu(), mean_ref) < TOL[stat_dtype]
    assert _err(var.cpu(), var_ref) < TOL[stat_dtype]

    grads = T.dwconv_bn_train_bwd(gy, x, w, bn_w, mean, var, y, EPS, stride, residual, relu)
    grads_ref = torch.autograd.grad(y_ref, ref, gy.cpu().double())
    for name, got, want, like in zip(("x", "weight", "bn_weight", "bn_bias"), grads, grads_ref, ours):
        assert got.dtype == like.dtype and got.shape == like.shape, name
        assert _err(got.cpu(), want) < tol, (name, _err(got.cpu(), want))
    assert grads[0].is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    return (y, mean, var) + tuple(grads)


@pytest.mark.parametrize("case", _TRAIN_CASES, ids=_case_id)
def test_train_fwd_bwd(case):
    dtype, param_dtype, (shape, k, stride, residual, relu, channels_last) = case
    ours, ref = _inputs(shape, k, dtype, param_dtype, channels_last)
    ho, wo = (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1
    gy = torch.randn(shape[0], shape[1], ho, wo, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    if channels_last:
        gy = gy.contiguous(memory_format=CL)
    _check_train(ours, ref, gy, stride, residual, relu, dtype, channels_last)


def test_train_mixed_layouts_and_deterministic():
    """x in neither layout (copied to NCHW), grad_y channels_last and y NCHW; a rerun is bitwise equal."""
    ours, ref = _inputs((2, 8, 11, 6), 3, torch.float32, torch.float32, False)
    ours[0] = ours[0].transpose(2, 3).contiguous().transpose(2, 3)
    assert not ours[0].is_contiguous() and not ours[0].is_contiguous(memory_format=CL)
    gy = torch.randn(2, 8, 11, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE).contiguous(memory_format=CL)
    first = _check_train(ours, ref, gy, 1, True, True, torch.float32, False)
    second = _check_train(ours, ref, gy, 1, True, True, torch.float32, False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# (images per program, shape, k, stride, residual, relu, channels_last, dtype, offset of x)
_GROUP_CASES = [
    (2, (5, 6, 7, 5), 3, 1, True, True, False, torch.float32, 0.0),
    (4, (5, 6, 7, 5), 3, 2, False, True, True, torch.float32, 0.0),
    (2, (3, 5, 6, 6), 5, 1, False, False, True, torch.float64, 0.0),
    (3, (7, 4, 9, 8), 3, 1, True, False, False, torch.float32, 100.0),
    (2, (3, 6, 7, 5), 3, 1, True, True, True, torch.float16, 0.0),
]


@pytest.mark.parametrize("images,shape,k,stride,residual,relu,channels_last,dtype,offset", _GROUP_CASES)
def test_image_groups(monkeypatch, images, shape, k, stride, residual, relu, channels_last, dtype, offset):
    """Programs that run their tile over several images (as on a GPU at large batch), the last group short: eval
    and training forward and backward against float64. The offset case (|mean| ~ 100 x the spread of z) fails if
    the per-pixel statistics across a group lose the mean's cancellation (fp32 sums of squares would err ~1e-3)."""
    monkeypatch.setattr(T, "_PROGRAMS", 1)
    monkeypatch.setattr(T, "_IMAGES", images)
    grid = T._Grid(shape[0], shape[1], shape[2], shape[3], CL if channels_last else torch.contiguous_format)
    assert grid.images == images and shape[0] % images  # several images per program, a short last group
    ours, ref = _inputs(shape, k, dtype, dtype, channels_last)
    if offset:
        ours[0] = ours[0] + offset
        ref[0] = ours[0].detach().cpu().double().requires_grad_()
    x, w, bn_w, _ = ours
    y = T.dwconv_bn_fwd(x, w, bn_w, stride, relu)
    y_ref = F.conv2d(ref[0], ref[1], ref[2], stride, k // 2, 1, shape[1])
    assert _err(y.cpu(), y_ref.relu() if relu else y_ref) < TOL[dtype]
    ho, wo = (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1
    gy = torch.randn(shape[0], shape[1], ho, wo, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    _check_train(ours, ref, gy, stride, residual, relu, dtype, channels_last)


# (shape, k, stride, relu, channels_last, dtype)
_EVAL_CASES = [
    ((1, 3, 1, 1), 3, 1, True, False, torch.float32),
    ((2, 5, 3, 5), 5, 2, False, True, torch.float32),
    ((2, 13, 17, 13), 3, 1, False, True, torch.float32),
    ((2, 13, 17, 13), 5, 2, True, False, torch.float32),
    ((2, 8, 8, 8), 7, 1, True, False, torch.float32),
    ((2, 8, 8, 8), 3, 2, False, True, torch.float16),
    ((2, 13, 17, 13), 3, 1, True, False, torch.float16),
    ((2, 5, 3, 5), 3, 1, False, False, torch.float64),
]


@pytest.mark.parametrize("shape,k,stride,relu,channels_last,dtype", _EVAL_CASES)
def test_eval_fwd(shape, k, stride, relu, channels_last, dtype):
    (x, w, bias, _), (xr, wr, biasr, _) = _inputs(shape, k, dtype, dtype, channels_last)
    y = T.dwconv_bn_fwd(x, w, bias, stride, relu)
    y_ref = F.conv2d(xr, wr, biasr, stride, k // 2, 1, shape[1])
    if relu:
        y_ref = y_ref.relu()
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert _err(y.cpu(), y_ref) < TOL[dtype]


class _TrainFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bn_w, bn_b, stride, residual, relu):
        y, mean, var = T.dwconv_bn_train_fwd(x, w, bn_w, bn_b, EPS, stride, residual, relu)
        ctx.save_for_backward(x, w, bn_w, mean, var, y)
        ctx.args = (stride, residual, relu)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, bn_w, mean, var, y = ctx.saved_tensors
        stride, residual, relu = ctx.args
        return (*T.dwconv_bn_train_bwd(gy, x, w, bn_w, mean, var, y, EPS, stride, residual, relu), None, None, None)


@pytest.mark.parametrize("k,stride,residual,relu,channels_last", [(3, 1, True, True, False), (5, 2, False, True, True)])
def test_gradcheck_float64(k, stride, residual, relu, channels_last):
    _, ref = _inputs((2, 3, 5, 4), k, torch.float64, torch.float64, channels_last)
    args = [t.detach().to(DEVICE).requires_grad_() for t in ref]
    if channels_last:
        args[0] = args[0].detach().contiguous(memory_format=CL).requires_grad_()
    # fast mode (random projections of the Jacobian): the full Jacobian needs ~120 interpreted backward calls
    assert torch.autograd.gradcheck(lambda *a: _TrainFn.apply(*a, stride, residual, relu), args, fast_mode=True)
