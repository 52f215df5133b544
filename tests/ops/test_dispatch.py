"""The ops' eager fast path (shvit_kernels.ops._dispatch): the implementation is called directly only when the
dispatcher would do nothing else, and gives the dispatcher's result bit for bit."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shvit_kernels import ops
from shvit_kernels.ops import _dispatch

SHSA_MODULE = importlib.import_module("shvit_kernels.ops.shsa")  # `ops.shsa` is the function


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def _shsa_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    c, p, q = 12, 6, 3
    r = lambda *s: torch.randn(*s, generator=g)
    return r(2, c, 3, 4), r(p), r(p), r(2 * q + p, p), r(2 * q + p), r(c, c) / c ** 0.5, r(c), q


def test_direct_when_the_dispatcher_has_nothing_to_do():
    x = torch.randn(2, 3)
    w = torch.nn.Parameter(torch.randn(3))
    assert _dispatch.direct((x, None, 1.0, 2))
    assert not _dispatch.direct((x, w))  # an autograd edge to record
    with torch.no_grad():
        assert _dispatch.direct((x, w))
    with torch.inference_mode():
        assert _dispatch.direct((x, w))
    assert not _dispatch.direct((x.to("meta"),))  # the fake impl's job
    assert not _dispatch.direct((x.as_subclass(_Sub),))
    with torch.no_grad():
        with _Seen():
            assert not _dispatch.direct((x,))  # a dispatch mode (FakeTensorMode, export, tests) must see the op
        with torch.device("cpu"):
            assert not _dispatch.direct((x,))  # a torch-function mode
        with torch.profiler.profile():
            assert not _dispatch.direct((x,))  # the profiler records the op by name
        assert torch.func.vmap(lambda t: torch.tensor(_dispatch.direct((t,))))(x).logical_not().all()
        with torch.autograd.forward_ad.dual_level():
            assert not _dispatch.direct((x,))  # dual tensors do not require grad, yet autograd must see the op


@pytest.mark.parametrize("grad", [False, True])
def test_fast_path_matches_the_dispatcher(grad):
    x, gw, gb, qw, qb, pw, pb, q = _shsa_args()
    with torch.set_grad_enabled(grad):
        fast = ops.shsa(x, gw, gb, qw, qb, pw, pb, q, residual=True)
        with _Seen() as seen:
            slow = ops.shsa(x, gw, gb, qw, qb, pw, pb, q, residual=True)
    assert "shvit.shsa.default" in seen.ops  # the second call went through the dispatcher
    assert torch.equal(fast, slow)


def test_fast_path_skips_the_dispatcher(monkeypatch):
    """Under no_grad the public op calls the implementation itself: the registered op is never entered."""
    x, gw, gb, qw, qb, pw, pb, q = _shsa_args(1)
    op = SHSA_MODULE._shsa
    entered = []
    impl = _dispatch._IMPLS[op]
    monkeypatch.setitem(_dispatch._IMPLS, op, lambda *a: entered.append(1) or impl(*a))
    monkeypatch.setattr(type(op), "__call__", lambda *a, **k: pytest.fail("went through the dispatcher"))
    with torch.no_grad():
        y = ops.shsa(x, gw, gb, qw, qb, pw, pb, q)
    assert entered == [1] and y.shape == x.shape
