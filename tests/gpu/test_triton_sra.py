"""The "triton" backend of the SRA ops on a GPU, at PVTv2-b0..b2 stage shapes, in fp32 / fp16 / bf16, against the
float64 oracle by DESIGN.md's rule (error <= 2x stock PyTorch's error in the same dtype + a tiny atol), and bitwise
determinism. Marked gpu: skipped without a CUDA device (tests/conftest.py)."""
import pytest
import torch

import shvit_kernels as sk
from shvit_kernels import ops
from tests.gpu.test_cuda_backend import _close
from tests.reliability.test_properties import _sra_attention_stock, _sra_reduce_stock

pytestmark = pytest.mark.gpu
DEV = "cuda"

# (B, H, W, C, heads, sr, linear): b2 stages 1-4 (sr 8 / 4 / 2 / 1, head dims 64 / 64 / 64 / 64), v2-li, a map
# not divisible by sr, and sr 1 with M = 900 > 256 keys (online softmax)
SHAPES = [(2, 56, 56, 64, 1, 8, False), (2, 28, 28, 128, 2, 4, False), (2, 14, 14, 320, 5, 2, False),
          (2, 7, 7, 512, 8, 1, False), (2, 56, 56, 64, 1, 1, True), (2, 33, 31, 64, 2, 4, False),
          (1, 30, 30, 64, 2, 1, False), (2, 14, 14, 32, 1, 2, False)]
_ids = ["{}x{}-c{}-h{}-{}".format(s[1], s[2], s[3], s[4], "li" if s[6] else f"sr{s[5]}") for s in SHAPES]


@pytest.fixture(autouse=True)
def _needs_triton():
    if "triton" not in sk.available_backends():
        pytest.skip(f"triton unavailable: {sk.backends.availability()['triton'][1]}")


def _params(shape, seed=0):
    b, h, w, c, _, sr, linear = shape
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    k = 1 if linear else sr
    reduce = sr > 1 or linear
    p = {"x": randn(b, h * w, c), "q_w": randn(c, c) / c ** .5, "q_b": randn(c) * .1,
         "kv_w": randn(2 * c, c) / c ** .5, "kv_b": randn(2 * c) * .1}
    if reduce:
        p.update(sr_w=randn(c, c, k, k) / (c * k * k) ** .5, sr_b=randn(c) * .1,
                 ln_w=torch.rand(c, generator=g, dtype=torch.float64) + .5, ln_b=randn(c) * .1)
    return p, randn(b, h * w, c)


def _run(shape, p, gy, fused):
    _, h, w, c, heads, sr, linear = shape
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    x = leaves["x"]
    reduce = sr > 1 or linear
    if fused:
        red = ops.sra_reduce(x, h, w, *(leaves[k] for k in ("sr_w", "sr_b", "ln_w", "ln_b")), 1e-5, sr,
                             linear) if reduce else x
        y = ops.sra_attention(x, red, leaves["q_w"], leaves["q_b"], leaves["kv_w"], leaves["kv_b"], heads,
                              (c // heads) ** -0.5)
    else:
        red = _sra_reduce_stock(x, h, w, *(leaves[k] for k in ("sr_w", "sr_b", "ln_w", "ln_b")), sr,
                                linear) if reduce else x
        y = _sra_attention_stock(x, red, leaves["q_w"], leaves["q_b"], leaves["kv_w"], leaves["kv_b"], heads,
                                 (c // heads) ** -0.5)
    grads = torch.autograd.grad(y, list(leaves.values()), gy.to(y))
    return y, dict(zip(leaves, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_sra_triton_matches_oracle(shape, dtype):
    p, gy = _params(shape)
    cast = {k: v.to(DEV, dtype) for k, v in p.items()}
    oracle_in = {k: v.double() for k, v in cast.items()}
    with sk.use_backend("triton"):
        y, g = _run(shape, cast, gy.to(DEV), fused=True)
    ys, gs = _run(shape, cast, gy.to(DEV), fused=False)
    yo, go = _run(shape, oracle_in, gy.to(DEV), fused=False)
    _close("y", y, ys, yo)
    for k in g:
        _close(f"grad of {k}", g[k], gs[k], go[k])


def test_sra_triton_deterministic():
    shape = (4, 28, 28, 128, 2, 4, False)
    p, gy = _params(shape)
    cast = {k: v.to(DEV) for k, v in p.items()}
    with sk.use_backend("triton"):
        runs = [_run(shape, cast, gy.to(DEV), fused=True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
