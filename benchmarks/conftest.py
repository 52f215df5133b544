"""pytest-benchmark suites: stock vs fused ops (test_ops.py) and SHViT models (test_models.py).

Not collected by `python -m pytest` (pyproject's testpaths is tests/). Run them with

    python -m pytest benchmarks/ --benchmark-only                      # CPU: tiny sizes, about a minute
    SHVIT_BENCH_SIZE=full python -m pytest benchmarks/ --benchmark-only  # the issues' sizes (the default on CUDA)

Environment:
  SHVIT_BENCH_SIZE     tiny | full (default: full on CUDA, tiny on CPU)
  SHVIT_BENCH_DTYPES   e.g. bfloat16,float32 (default: CUDA ops bfloat16,float32 and models bfloat16; CPU float32)
  SHVIT_BENCH_MODELS   e.g. S1,S4 (default: S1..S4 at full size, S1 at tiny)
  SHVIT_BENCH_COMPILE  1 | 0: include the torch.compile variants (default: 1 on CUDA at full size; compiling
                       costs minutes with max-autotune, so the tiny CPU run leaves them out)
  SHVIT_BENCH_THREADS  CPU threads (torch.set_num_threads); recorded in every result either way
On the CPU the suites hold freed memory in the heap, as the CLI bench does (shvit_kernels/roofline.py).

pytest-benchmark's own columns time each call (synchronised on CUDA, so they include the launch); every result's
extra_info carries the figure the results use: on CUDA the do_bench median (CUDA events), on CPU pytest-benchmark's
median, with % of the roofline on ceilings measured once per session (shvit_kernels/roofline.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from shvit_kernels import bench
from shvit_kernels.roofline import Cost, time_ms

from .settings import DEVICE, GPU, MALLOC, SIZE, ceilings


def pytest_benchmark_update_machine_info(config, machine_info):
    # GPU name, driver, torch/triton versions, threads; on the CPU how malloc was set
    machine_info["shvit_kernels"] = {**bench.environment(DEVICE), **({"malloc": MALLOC} if MALLOC else {})}


@pytest.fixture
def measure(benchmark):
    """measure(fn, dtype, cost=..., gflop=..., **info): time fn with pytest-benchmark and record in extra_info the
    median ms the results use, % of roofline (cost: Cost of one call) or of matrix peak (gflop: one call), threads."""
    def run(fn, dtype: torch.dtype, cost: Cost | None = None, gflop: float | None = None, **info) -> float | None:
        ceil = ceilings(dtype)
        target = (lambda: (fn(), torch.cuda.synchronize())) if GPU else fn
        benchmark.pedantic(target, rounds=SIZE.rounds, warmup_rounds=1, iterations=1)
        stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
        if GPU:
            ms = time_ms(fn, DEVICE)
        else:
            ms = stats.stats.median * 1e3 if stats is not None else None
        extra = {"median_ms": ms, "threads": torch.get_num_threads(), "device": DEVICE.type, **info}
        if cost is not None:
            extra.update(gflop=cost.flops / 1e9, mbytes=cost.bytes / 1e6, bound=ceil.bound(cost),
                         roofline_pct=ceil.pct(cost, ms))
        if gflop is not None and ms:
            extra.update(gflop=gflop, flops_pct=100 * gflop * 1e9 / (ms * 1e-3) / ceil.flops_per_s)
        extra["ceilings"] = dataclasses.asdict(ceil)
        benchmark.extra_info.update(extra)
        return ms
    return run
