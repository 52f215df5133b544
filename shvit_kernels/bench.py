"""Microbenchmarks behind `python -m shvit_kernels bench`: stock module vs fused drop-in, same run, same inputs.

Each case builds a stock module with random (non-trivial) weights and BatchNorm statistics, converts a deep copy,
and times both: eval forward, or training forward+backward. Errors are measured against the stock module run in
float64 on the same input (the oracle of DESIGN.md).
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Callable

import torch
from torch import nn

from . import backends
from .convert import convert
from .reference import Residual, SHSA, residual_dwconv


@dataclasses.dataclass
class Result:
    op: str
    mode: str
    shape: str
    dtype: str
    backend: str
    stock_ms: float
    fused_ms: float
    compiled_ms: float | None
    speedup: float
    max_err: float
    stock_err: float


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (SHViT zero-inits some)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn in ms (CUDA: do_bench's median, which flushes L2 and syncs)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    make_stock: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


def cases(batch: int) -> list[Case]:
    """The S4 shapes of the issues: stage 1 (224 ch, 16x16 at 256 px) and stage 2 (336 ch, pdim 72, 8x8)."""
    return [
        Case("dwconv_bn", f"{batch}x224x16x16 k3", lambda: residual_dwconv(224), (batch, 224, 16, 16)),
        Case("shsa", f"{batch}x336x8x8 p72", lambda: Residual(SHSA(336, 16, 72)), (batch, 336, 8, 8)),
    ]


def _fwd_bwd(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    def run():
        module(x).backward(gy)
    return run


def run_case(case: Case, mode: str, device: torch.device, dtype: torch.dtype, compile_stock: bool,
             reps: int) -> Result:
    torch.manual_seed(0)
    stock = randomize_bn(case.make_stock()).to(device)
    oracle = copy.deepcopy(stock).double()
    fused = convert(nn.Sequential(copy.deepcopy(stock))).to(dtype)
    stock = stock.to(dtype)
    train = mode == "train fwd+bwd"
    for m in (stock, fused, oracle):
        m.train(train)
    x = torch.randn(case.input_shape, device=device, dtype=dtype)
    with torch.no_grad():
        ref = oracle(x.double())
        err = (fused(x).double() - ref).abs().max().item()
        stock_err = (stock(x).double() - ref).abs().max().item()
    compiled = torch.compile(stock, mode="max-autotune") if compile_stock else None
    if train:
        xg = x.clone().requires_grad_()
        gy = torch.randn_like(x)
        fns = [_fwd_bwd(m, xg, gy) for m in (stock, fused)] + ([_fwd_bwd(compiled, xg, gy)] if compiled is not None else [])
    else:
        def infer(m):
            return lambda: m(x)
        fns = [torch.no_grad()(infer(m)) for m in (stock, fused)] + ([torch.no_grad()(infer(compiled))] if compiled is not None
                                                                     else [])
    times = [time_ms(f, device, reps) for f in fns]
    return Result(case.op, mode, case.shape, str(dtype).removeprefix("torch."),
                  backends.choose(case.op, device, dtype)[0], times[0], times[1],
                  times[2] if compiled is not None else None, times[0] / times[1], err, stock_err)


def dispatch_overhead_us(device: torch.device, reps: int = 2000) -> dict[str, float]:
    """Per-call cost (us) of a no-op: called directly, through the backend registry, and through the registry
    inside a torch.library custom op (the path every fused op takes)."""
    backends.register("_noop", "reference", _Noop, ("cpu", "cuda"), (torch.float32,))
    x = torch.zeros(1, device=device)
    fns = {"direct": lambda: _Noop.fwd(x),
           "registry": lambda: backends.kernel("_noop", x).fwd(x),
           "registry+custom_op": lambda: _noop_op()(x)}
    out = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - t0) / reps * 1e6
    return out


class _Noop:
    @staticmethod
    def fwd(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)


_NOOP_OP = None


def _noop_op():
    global _NOOP_OP
    if _NOOP_OP is None:
        @torch.library.custom_op("shvit_bench::noop", mutates_args=())
        def noop(x: torch.Tensor) -> torch.Tensor:
            return backends.kernel("_noop", x).fwd(x)

        _NOOP_OP = noop
    return _NOOP_OP


def format_table(results: list[Result]) -> str:
    head = ["op", "mode", "shape", "dtype", "backend", "stock ms", "fused ms", "compile ms", "speedup",
            "max err", "stock err"]
    rows = [[r.op, r.mode, r.shape, r.dtype, r.backend, f"{r.stock_ms:.3f}", f"{r.fused_ms:.3f}",
             "-" if r.compiled_ms is None else f"{r.compiled_ms:.3f}", f"{r.speedup:.2f}x",
             f"{r.max_err:.1e}", f"{r.stock_err:.1e}"] for r in results]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
