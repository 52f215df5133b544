"""Several Python threads using the fused modules and the backend registry at once.

- One module shared by 4 threads, each with its own input, in eval (with and without autograd: the cached BN fold)
  and training mode: every thread gets exactly (bitwise) the single-threaded outputs and gradients. Gradients are
  taken with torch.autograd.grad, so threads do not accumulate into the shared .grad. (In training mode the threads
  also update the shared running statistics, in an unspecified interleaving, as nn.BatchNorm2d would: not checked.)
- `use_backend` in one thread does not leak into another (it is a ContextVar; a new thread starts with the default).
- The registry's caches are safe under concurrent first use: one choice and import per key, one implementation for all.
- Triton kernels on CPU tensors run under Triton's interpreter, whose state is global: the registry serialises them.
"""
import threading
import time

import pytest
import torch

import shvit_kernels as sk
from shvit_kernels import backends
from shvit_kernels.nn import ResidualDWConvBN
from tests.helpers import cpu_backends, rand_bn_

THREADS = 4


def _concurrently(fn, inputs):
    """fn(input) in one thread per input, all released at once; the results in input order (errors re-raised)."""
    barrier = threading.Barrier(len(inputs))
    results, errors = [None] * len(inputs), []

    def work(i):
        try:
            barrier.wait()
            results[i] = fn(inputs[i])
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


# ---- modules shared by threads -------------------------------------------------------------------------------

def _shsa():
    m = sk.SHSA(12, 4, 6)
    for bn in (m.qkv.bn, m.proj[1].bn):
        rand_bn_(bn)
    return m, (lambda: torch.randn(2, 12, 3, 5)), (lambda m, x: m(x))


def _dwconv():
    m = ResidualDWConvBN(6)
    rand_bn_(m.m.bn)
    return m, (lambda: torch.randn(2, 6, 7, 9)), (lambda m, x: m(x))


def _sra(linear):
    def make():
        m = sk.SRA(16, 2, qkv_bias=True, sr_ratio=2, linear=linear)
        return m, (lambda: torch.randn(2, 8 * 8, 16)), (lambda m, x: m(x, 8, 8))
    return make


MODULES = {"SHSA": ("shsa", _shsa), "ResidualDWConvBN": ("dwconv_bn", _dwconv), "SRA": ("sra", _sra(False)),
           "SRA-linear": ("sra", _sra(True))}


def _step(m, call, backend, mode, x):
    """Outputs (and gradients w.r.t. x and the parameters) of one call of m on x under `backend`."""
    with sk.use_backend(backend):  # per thread: the setting is a ContextVar
        if mode == "eval-no_grad":  # the cached BN fold
            with torch.no_grad():
                return [call(m, x)]
        x = x.clone().requires_grad_()
        y = call(m, x)
        params = [p for p in m.parameters() if p.requires_grad]
        return [y.detach(), *torch.autograd.grad(y, [x, *params], torch.ones_like(y))]


@pytest.mark.parametrize("mode", ["eval-no_grad", "eval", "train"])
@pytest.mark.parametrize("name, backend", [(n, b) for n, (op, _) in MODULES.items() for b in cpu_backends(op)])
def test_shared_module_gives_single_threaded_results(name, backend, mode):
    m, make_input, call = MODULES[name][1]()
    m.train(mode == "train")
    inputs = [make_input() for _ in range(THREADS)]
    alone = [_step(m, call, backend, mode, x) for x in inputs]
    together = _concurrently(lambda x: _step(m, call, backend, mode, x), inputs)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        for j, (u, v) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(u, v), f"thread {i}: result {j} differs from the single-threaded one"


# ---- backend setting and registry -------------------------------------------------------------------------------

def test_use_backend_does_not_leak_between_threads():
    x = torch.randn(2, 3, 4, 4)
    default = backends.kernel("dwconv_bn", x)  # what "auto" runs here
    reference = backends._kernels[("dwconv_bn", "reference")].resolve()
    inside = threading.Barrier(2)

    def pinned(_):
        with sk.use_backend("reference"):
            inside.wait()  # both threads are now running: one inside use_backend, one outside
            seen = sk.current_backend(), backends.kernel("dwconv_bn", x)
            inside.wait()
        return seen

    def free(_):
        inside.wait()
        seen = sk.current_backend(), backends.kernel("dwconv_bn", x)
        inside.wait()
        return seen

    got = _concurrently(lambda f: f(None), [pinned, free])
    assert got[0] == ("reference", reference)
    assert got[1] == ("auto", default)
    assert sk.current_backend() == "auto"


def test_registry_first_use_is_once_and_consistent(monkeypatch):
    """Threads racing on an empty cache: one choice per key, one import, the same implementation for all."""
    op = "_thread_race"
    backends.register(op, "reference", "shvit_kernels.reference.dwconv_bn", ("cpu",), (torch.float32,))
    choose, calls = backends.choose, []

    def slow_choose(*args):  # widens the window in which the threads race
        calls.append(args)
        time.sleep(0.05)
        return choose(*args)

    monkeypatch.setattr(backends, "choose", slow_choose)
    try:
        got = _concurrently(lambda _: backends.kernel(op, torch.zeros(1)), [None] * 8)
    finally:
        backends._kernels.pop((op, "reference"))
        backends._chosen.clear()
    assert len(calls) == 1, f"the backend was chosen {len(calls)} times"
    assert all(g is got[0] for g in got) and got[0].__name__ == "shvit_kernels.reference.dwconv_bn"


@pytest.mark.skipif("triton" not in cpu_backends("shsa") or torch.cuda.is_available(),
                    reason="needs Triton's CPU interpreter")
def test_interpreted_triton_calls_are_serialised():
    """Triton's interpreter keeps the program id and its patches of triton.language in globals: concurrent
    interpreted launches would read each other's program ids. The registry hands out a serialising wrapper."""
    x = torch.randn(2, 6, 5, 5)
    with sk.use_backend("triton"):
        impl = backends.kernel("dwconv_bn", x)
    assert isinstance(impl, backends._Serialized)
    w, b = torch.randn(6, 1, 3, 3), torch.randn(6)
    expect = impl.fwd(x, w, b, 1, False)
    got = _concurrently(lambda _: impl.fwd(x, w, b, 1, False), [None] * THREADS)
    assert all(torch.equal(g, expect) for g in got)
