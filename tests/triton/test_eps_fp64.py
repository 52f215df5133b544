"""float64 Triton kernels use eps at full precision. With variances the size of eps, an eps rounded to fp32 (what a
plain float kernel argument becomes in a compiled kernel, and what tl.cast makes of the interpreter's Python float)
moves the normalised outputs by ~1e-8 relative, far above float64's rounding. Each normalisation (the training
BatchNorms, SHSA's GroupNorm, SRA's LayerNorm) on inputs scaled to such variances, against the float64 reference.

Devices and the interpreter: tests/triton/__init__.py.
"""
import importlib

import pytest
import torch

from tests.triton import triton_device

DEVICE = triton_device()

from shvit_kernels import reference
from shvit_kernels import triton as kernels

EPS = 1e-5
SMALL = 3e-3  # input scale: the normalised variances come out ~1e-5, the size of eps


def _r(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def _u(n):
    return torch.rand(n, dtype=torch.float64) + 0.5


def _cases():
    x4 = _r(2, 6, 5, 4, scale=SMALL)
    qk, pdim, dim = 4, 6, 10
    o = 2 * qk + pdim
    return {
        "dwconv_bn": ("train_fwd", (x4, _r(6, 1, 3, 3) / 3, _u(6), _r(6), EPS, 1, True, False)),
        "pw_conv_bn": ("train_fwd", (x4, _r(5, 6) / 6 ** 0.5, _u(5), _r(5), EPS, None, False)),
        "ffn": ("train_fwd", (x4, _r(12, 6) / 6 ** 0.5, _u(12), _r(12), EPS, _r(6, 12) / 12 ** 0.5, _u(6), _r(6),
                              EPS)),
        "shsa": ("train_fwd", (_r(2, dim, 3, 4, scale=SMALL), _u(pdim), _r(pdim), EPS, _r(o, pdim) / pdim ** 0.5,
                               _u(o), _r(o), EPS, _r(dim, dim) / dim ** 0.5, _u(dim), _r(dim), EPS, qk, True)),
        "sra": ("reduce_fwd", (_r(2, 16, 8, scale=SMALL), 4, 4, _r(8, 8, 2, 2) / 32 ** 0.5, _r(8, scale=SMALL), _u(8),
                               _r(8), EPS, 2, False)),
    }


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("op", ["dwconv_bn", "pw_conv_bn", "ffn", "shsa", "sra"])
def test_eps_is_float64(op):
    name, args = _cases()[op]
    want = getattr(getattr(reference, op), name)(*args)
    kernel = getattr(importlib.import_module(f"{kernels.__name__}.{op}"), name)
    got = kernel(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    for i, (a, b) in enumerate(zip(_tensors(got), _tensors(want), strict=True)):
        err = ((a.cpu().double() - b).abs().max() / b.abs().max()).item()
        assert err < 1e-12, (op, i, err)
