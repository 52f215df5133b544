"""How the benchmarks measure (DESIGN.md, performance contract): timing, the machine's ceilings measured in the
same run, the work each op must do counted from its shape, and the % of the roofline that a time reaches.

- Timing: CUDA: `triton.testing.do_bench` median (CUDA events, L2 flushed between calls; events alone when Triton
  is missing); CPU: median of `time.perf_counter` over repeated calls after warm-up, at the thread count the caller
  set (torch.set_num_threads; the CLI prints it). Inputs rotate over sets larger than the last-level cache.
- CPU allocator: PyTorch's CPU tensors come from glibc malloc, which by default hands blocks above a threshold
  back to the kernel on free, so a call that allocates them page-faults (and zero-fills) every time; the
  threshold moves with what the process freed before, so the same call can take several times as long in a
  fresh script as after a larger allocation was freed (README, "CPU allocator"). The CLI therefore holds freed
  memory in the heap for the whole run (`hold_freed_memory`, its `--malloc held` default), so glibc no longer
  hands freed blocks up to 32 MiB back to the kernel, whatever ran before (a fragmented heap can still grow and
  fault in new pages); `benchmarks/fresh_process.py` times each
  implementation in a fresh process with glibc's defaults instead.
- Ceilings (the fastest of a few calls): a copy 4x the last-level cache (bytes read + bytes written over the time)
  for bandwidth, a random matrix product for FLOP/s (in the run's dtype on the GPU; fp32 on the CPU).
- Cost: FLOPs and the fewest bytes an op must move (each input and weight read once, each output written once).
  Backward: twice the forward FLOPs (input and weight gradients, the usual rule); bytes: the saved input and the
  output gradient read, the input gradient written, weights read and their gradients written.
- % of roofline = max(FLOPs / FLOP/s, bytes / bandwidth) / measured time: 100% is the floor no kernel can beat.
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import math
import statistics
import time
from typing import Callable, Sequence

import torch

MODES = ("eval fwd", "train fwd", "train bwd", "train fwd+bwd")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(fn: Callable[[], object], device: torch.device, above_current: bool = False) -> float | None:
    """Peak memory allocated during one call of fn, in MiB (CUDA only; None elsewhere). above_current: less what was
    allocated before the call, i.e. the call's own working memory (outputs, saved activations, temporaries)."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device) if above_current else 0
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 20, warmup: int = 3,
            rep_ms: float = 100.0, stat: str = "median") -> float:
    """Time of one call of fn in ms, the median (or the "min") of repeated calls after warm-up. CUDA: do_bench over
    about rep_ms of calls (reps is ignored). CPU: `reps` timed calls after `warmup` untimed ones; a slow case (calls
    over 0.1 s) gets one warm-up, and stops after 3 timed calls once 2 s are spent, so a 2-core run stays short."""
    if device.type == "cuda":
        try:
            import triton.testing
        except ImportError:
            return _event_times_ms(fn, max(reps, 10), warmup, stat)
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode=stat))
    if warmup and _call_ms(fn) < 100:
        for _ in range(warmup - 1):
            fn()
    times: list[float] = []
    stop = time.perf_counter() + 2.0
    while len(times) < max(reps, 1) and (len(times) < 3 or time.perf_counter() < stop):
        times.append(_call_ms(fn))
    return _STATS[stat](times)


# glibc mallopt parameters, and the largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX = -1, -3, 32 * 2**20


def hold_freed_memory() -> str:
    """Make glibc keep freed memory in the heap from now on (mmap only above 32 MiB, never trim the heap's top), so
    that freed blocks up to 32 MiB are reused instead of being handed back to the kernel and page-faulted in again
    (see the module doc; larger blocks are still mmapped per call). Returns what was done, for the run's header."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return "libc defaults (not glibc)"
    libc = ctypes.CDLL(None)
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if mmap_ok and trim_ok:
        return "held (glibc mmap threshold 32 MiB, no trim)"
    return f"glibc, partly held (mmap threshold {'32 MiB' if mmap_ok else 'unchanged'}, " \
           f"trim {'off' if trim_ok else 'unchanged'})"


def _call_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


_STATS = {"median": statistics.median, "min": min}


def _event_times_ms(fn: Callable[[], object], reps: int, warmup: int, stat: str) -> float:
    for _ in range(warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _STATS[stat]([s.elapsed_time(e) for s, e in pairs])


def cache_bytes(device: torch.device) -> int:
    """The last-level cache that repeated calls on one buffer would be served from (GPU L2, CPU L3)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 * 2**20)


def rotation_sets(set_bytes: int, device: torch.device, max_sets: int = 32, max_bytes: int = 2**30) -> int:
    """How many input sets to cycle through so that the data of consecutive calls is not in the cache: their total
    exceeds twice the last-level cache, within max_sets and max_bytes."""
    want = math.ceil(2 * cache_bytes(device) / max(set_bytes, 1)) + 1
    return max(1, min(want, max_sets, max_bytes // max(set_bytes, 1)))


def rotate(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs the next of fns (each bound to its own inputs) at every call."""
    if len(fns) == 1:
        return fns[0]
    it = itertools.cycle(fns)
    return lambda: next(it)()


# ---- ceilings ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Ceilings:
    device: str
    bytes_per_s: float   # large copy: bytes read + bytes written per second
    flops_per_s: float   # large random matrix product
    copy_mib: int        # size of the copied buffer
    matmul: str          # e.g. "bfloat16 8192^3"
    threads: int         # torch.get_num_threads() when measured (CPU figures depend on it)

    def floor_ms(self, cost: Cost) -> float:
        return 1e3 * max(cost.flops / self.flops_per_s, cost.bytes / self.bytes_per_s)

    def bound(self, cost: Cost) -> str:
        return "compute" if cost.flops / self.flops_per_s >= cost.bytes / self.bytes_per_s else "memory"

    def pct(self, cost: Cost, ms: float | None) -> float | None:
        """% of the roofline that a measured time reaches (100 = the floor)."""
        return None if not ms else 100.0 * self.floor_ms(cost) / ms


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    # The CPU runs reduced precision through fp32 arithmetic (and a bf16 GEMM there says little about the kernels).
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """Measure copy bandwidth and matrix-product FLOP/s on `device` now, with the same timer as the benchmarks.

    The copy is 4x the last-level cache (at least 64 MiB), so it streams from memory. The product is 8192^3 on the
    GPU; on the CPU the side doubles from 1024 until one product takes 25 ms (at most 4096), which fills a large
    machine without spending seconds on a small one."""
    copy_mib = max(4 * cache_bytes(device) // 2**20, 64)
    # A ceiling is the best rate the machine showed: the fastest call, not the median (on a shared CPU the median
    # is that of the other tenants' load and would put the benchmarks above 100%).
    mib = 2**18  # fp32 elements
    copy_ms = _best_ms(lambda src, dst: dst.copy_(src), device, [copy_mib * mib] * 2, torch.float32, 5)
    mdt = matmul_dtype(device, dtype)
    n = 8192 if device.type == "cuda" else 1024
    while True:
        mm_ms = _best_ms(torch.matmul, device, [(n, n)] * 2, mdt, 5)
        if device.type == "cuda" or mm_ms >= 25 or n >= 4096:
            break
        n *= 2
    return Ceilings(device.type, 2 * copy_mib * 2**20 / (copy_ms * 1e-3), 2 * n**3 / (mm_ms * 1e-3), copy_mib,
                    f"{str(mdt).removeprefix('torch.')} {n}^3", torch.get_num_threads())


def _best_ms(op: Callable[..., object], device: torch.device, shapes: list, dtype: torch.dtype, reps: int) -> float:
    # Random operands: zeros run measurably faster on some GPUs and would inflate the ceiling.
    args = [torch.randn(s, device=device).to(dtype) for s in shapes]
    return time_ms(lambda: op(*args), device, reps=reps, warmup=1, stat="min")


# ---- work per op -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def by_mode(fwd_flops: float, act_in: float, act_out: float, params: float, elem: int) -> dict[str, Cost]:
    """Cost of every benchmark mode from the forward FLOPs and the element counts of input, output and weights."""
    fwd = Cost(fwd_flops, elem * (act_in + act_out + params))
    bwd = Cost(2 * fwd_flops, elem * (2 * act_in + act_out + 2 * params))
    return {"eval fwd": fwd, "train fwd": fwd, "train bwd": bwd, "train fwd+bwd": fwd + bwd}


def dwconv_bn_cost(b: int, c: int, h: int, w: int, k: int, stride: int, elem: int) -> dict[str, Cost]:
    """Residual depthwise k x k conv + BatchNorm: k*k multiply-adds per output, plus scale, shift and residual."""
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = b * c * ho * wo
    return by_mode(out * (2 * k * k + 3), b * c * h * w, out, c * (k * k + 2), elem)


def shsa_cost(b: int, dim: int, pdim: int, qk: int, n: int, elem: int) -> dict[str, Cost]:
    """Residual SHSA over n tokens: GroupNorm, qkv 1x1, one-head attention, ReLU, proj 1x1 (+ BN affines)."""
    qkv = 2 * qk + pdim
    flops = b * n * (8 * pdim + 2 * pdim * qkv + 2 * n * qk + 5 * n + 2 * n * pdim + dim + 2 * dim * dim + 3 * dim)
    params = pdim * qkv + dim * dim + 2 * pdim + 2 * qkv + 2 * dim
    return by_mode(flops, b * n * dim, b * n * dim, params, elem)


def ffn_cost(b: int, dim: int, hidden: int, n: int, elem: int) -> dict[str, Cost]:
    """Residual FFN over n tokens: 1x1 dim -> hidden, BN, ReLU, 1x1 hidden -> dim, BN, residual add."""
    flops = b * n * (4 * dim * hidden + 3 * hidden + 3 * dim)
    params = 2 * dim * hidden + 2 * hidden + 2 * dim
    return by_mode(flops, b * n * dim, b * n * dim, params, elem)


def patch_merging_cost(b: int, dim: int, out: int, h: int, w: int, rd: int, elem: int) -> dict[str, Cost]:
    """PatchMerging: 1x1 dim -> 4 dim, BN, ReLU; depthwise 3x3 stride 2, BN, ReLU; SqueezeExcite (rd channels);
    1x1 4 dim -> out, BN. Bytes: input, output and weights only (the whole block fused), so the 4 dim-wide
    intermediates that the layer-wise kernels write count against their % of roofline."""
    hid, n = 4 * dim, h * w
    n2 = ((h - 1) // 2 + 1) * ((w - 1) // 2 + 1)
    flops = b * (n * hid * (2 * dim + 3) + n2 * hid * (2 * 9 + 3) + 2 * n2 * hid + 4 * hid * rd
                 + n2 * out * (2 * hid + 2))
    params = dim * hid + 9 * hid + 2 * hid * rd + rd + hid + hid * out + 4 * hid + 2 * out
    return by_mode(flops, b * dim * n, b * out * n2, params, elem)


def sra_cost(b: int, n: int, c: int, heads: int, sr: int, elem: int) -> dict[str, Cost]:
    """PVT spatial-reduction attention (v1 / v2 conv reduction, sr > 1): n tokens, m = n / sr^2 keys."""
    m = n // (sr * sr)
    flops = b * (2 * n * c * c               # reduction conv (kernel = stride = sr) over all tokens
                 + 8 * m * c                 # LayerNorm
                 + 2 * n * c * c             # q
                 + 4 * m * c * c             # kv
                 + 4 * n * m * c             # scores and attention x values, all heads
                 + 5 * heads * n * m         # softmax
                 + 2 * n * c * c + n * c)    # proj
    params = c * c * sr * sr + 4 * c * c + 6 * c
    return by_mode(flops, b * n * c, b * n * c, params, elem)
