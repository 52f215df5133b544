"""Host time per call of the fused SHSA, layer by layer, at a shape so small that the kernel itself is negligible:

    python -m benchmarks.host_overhead [--device cpu|cuda] [--backend NAME] [--calls 2000] [--repeats 5]

Rows, each the minimum over `repeats` runs of `calls` back-to-back calls under torch.no_grad. On CUDA the clock
stops before the synchronize that ends a run: the rows are the host's time to issue the calls, as long as the launch
queue (about a thousand launches) never fills, hence --calls 500 by default there:
  backend    the backend's fwd called directly (backends.kernel(...).fwd): the kernel launch(es) and their Python
  dispatcher torch.ops.shvit.shsa: the same through the custom op's dispatcher
  op         shvit_kernels.ops.shsa: argument checks, autocast, then the eager fast path (ops/_dispatch.py)
  op, no fast path   the same forced through the dispatcher (as before the fast path)
  op+grad    the same with parameters requiring grad and grad enabled: the dispatcher and autograd path
  module     shvit_kernels.SHSA in eval: the BN fold cache, then the op
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

import shvit_kernels as sk
from shvit_kernels import backends, ops
from shvit_kernels.ops import _dispatch


def _timer(device: torch.device, calls: int, repeats: int):
    def per_call_us(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, time.perf_counter() - start)  # before the synchronize: the host's time only
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return best / calls * 1e6
    return per_call_us


@contextlib.contextmanager
def _no_fast_path():
    """The public op as it was before ops/_dispatch.py's fast path: always through the dispatcher."""
    saved = _dispatch.direct
    _dispatch.direct = lambda args: False
    try:
        yield
    finally:
        _dispatch.direct = saved


def measure(device: torch.device, backend: str, calls: int, repeats: int) -> dict[str, float]:
    """Per-call host microseconds of each layer (see the module docstring)."""
    dim, qk, pdim = 16, 4, 8
    m = sk.SHSA(dim, qk, pdim).to(device).eval()
    x = torch.randn(1, dim, 2, 2, device=device)
    per_call_us = _timer(device, calls, repeats)
    rows = {}
    with sk.use_backend(backend):
        with torch.no_grad():
            m(x)  # fills the fold cache
            qw, qb, pw, pb = m._fold._entry[1]
            gw, gb = m.pre_norm.weight.detach(), m.pre_norm.bias.detach()
            args = (x, gw, gb, 1e-5, qw, qb, pw, pb, qk, False)
            rows["backend"] = per_call_us(lambda: backends.kernel("shsa", x).fwd(*args))
            rows["dispatcher"] = per_call_us(lambda: torch.ops.shvit.shsa(*args))
            rows["op"] = per_call_us(lambda: ops.shsa(x, gw, gb, qw, qb, pw, pb, qk))
            with _no_fast_path():
                rows["op, no fast path"] = per_call_us(lambda: ops.shsa(x, gw, gb, qw, qb, pw, pb, qk))
            rows["module"] = per_call_us(lambda: m(x))
        gw_, qw_ = gw.clone().requires_grad_(), qw.clone().requires_grad_()
        rows["op+grad"] = per_call_us(lambda: ops.shsa(x, gw_, gb, qw_, qb, pw, pb, qk))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--calls", type=int, help="calls per run (default 2000 on the CPU, 500 on CUDA)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.calls = args.calls or (500 if device.type == "cuda" else 2000)
    rows = measure(device, args.backend, args.calls, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"SHSA host time per call: {name}, backend {args.backend}, the minimum of {args.repeats} runs of {args.calls} "
          f"calls, torch {torch.__version__}")
    for k, us in rows.items():
        print(f"  {k:<17} {us:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
