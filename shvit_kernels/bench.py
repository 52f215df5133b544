"""Op microbenchmarks behind `python -m shvit_kernels bench` and `benchmarks/test_ops.py`: the stock module vs its
fused drop-in (and optionally torch.compile of the stock one), same run, same weights, same inputs.

Each case builds a stock module with random (non-trivial) weights and BatchNorm statistics and a fused copy, and
times, per mode of `roofline.MODES`: the eval forward, the training forward (graph built), the backward alone
(input and weight gradients of a kept graph), and forward + backward. Inputs rotate over enough sets to exceed the
last-level cache. Errors are measured against the stock module run in float64 on the same input (DESIGN.md's oracle).
How times, ceilings and % of roofline are obtained: `roofline.py`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import platform
import subprocess
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import autotable, backends
from .convert import convert
from .nn import SRA as FusedSRA
from .reference import FFN, SRA, BN_Linear, Conv2d_BN, PatchMerging, Residual, SHSA, residual_dwconv
from .reference.patch_merging import make_divisible
from .roofline import (MODES, Ceilings, Cost, dwconv_bn_cost, ffn_cost, patch_merging_cost, peak_mib, rotate, rotation_sets,
                       shsa_cost, sra_cost, time_ms)

__all__ = ["IMPLS", "MODES", "Case", "Prepared", "Result", "add_compiled", "cases", "compile_module", "environment",
           "fold_stock", "format_table", "has_bn", "prepare", "randomize_bn", "run_case", "table", "time_ms"]


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
    speedup: float                       # stock eager / fused
    speedup_vs_compiled: float | None    # torch.compile(stock) / fused
    max_err: float
    stock_err: float
    gflop: float                         # counted work of one call (roofline.py)
    mbytes: float                        # fewest bytes one call must move, in MB
    bound: str                           # "memory" or "compute" on this machine's ceilings
    fused_roofline_pct: float
    stock_roofline_pct: float
    compiled_roofline_pct: float | None
    input_sets: int                      # inputs rotated over, to defeat the cache
    folded_ms: float | None = None       # stock eager with its BatchNorms folded (eval forward of a case with BN)
    speedup_vs_folded: float | None = None
    stock_peak_mib: float | None = None  # CUDA: peak memory one call allocates above what it starts with
    fused_peak_mib: float | None = None
    fused_gbps: float = dataclasses.field(init=False)  # achieved: the fewest bytes over the fused time

    def __post_init__(self):
        self.fused_gbps = self.mbytes / self.fused_ms


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


def fold_stock(m: nn.Module) -> nn.Module:
    """m (in place) with every BatchNorm folded the way the official SHViT deploys (`replace_batchnorm`): each
    Conv2d_BN / BN_Linear replaced by its `.fuse()`, a residual depthwise Conv2d_BN by one conv whose centre tap
    holds the identity. Stock PyTorch ops throughout: the "eager, BN folded" baseline of the eval forward."""
    for name, child in m.named_children():
        if isinstance(child, (Conv2d_BN, BN_Linear)) or (isinstance(child, Residual) and isinstance(child.m, Conv2d_BN)):
            setattr(m, name, child.fuse())
        else:
            fold_stock(child)
    return m


def has_bn(m: nn.Module) -> bool:
    return any(isinstance(c, nn.modules.batchnorm._BatchNorm) for c in m.modules())


def compile_module(m: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile as the comparison uses it: mode="max-autotune" on CUDA, the default mode on the CPU (where
    max-autotune's GEMM search costs minutes and has little to choose from)."""
    # Every benchmark compiles a fresh module of the same classes: past dynamo's recompile limit, later ones would
    # silently run eager. Start each from an empty cache.
    torch._dynamo.reset()
    return torch.compile(m, mode="max-autotune" if device.type == "cuda" else None)


def _convert_block(stock: nn.Module) -> nn.Module:
    # convert() swaps children, so give the block a parent; the block runs in the case's own layout
    return convert(nn.Sequential(stock), channels_last=False)


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    make_stock: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    cost: Callable[[int], dict[str, Cost]]           # bytes per element -> Cost per mode
    args: tuple = ()                                 # forward arguments after x (SRA's H, W)
    make_fused: Callable[[nn.Module], nn.Module] = _convert_block


def cases(batch: int) -> list[Case]:
    """SHViT-S4 shapes of the issues, stage 1 (224 ch, 16x16 at 256 px: depthwise block and FFN 224 -> 448 -> 224),
    the FFN of stage 3 (448 ch, 4x4: 16 tokens a sample), the PatchMerging into stage 2 (its 1x1 convs on `pw_conv_bn`), the SHSA of stages 2 and 3 (336 ch, pdim 72, 8x8;
    448 ch, pdim 96, 4x4) and at detection size (336 ch, pdim 72, 42x25 tokens, always batch 8), and PVTv2-b2's
    stage 1 and 2 attention (56x56 tokens, 64 ch, one head, sr 8; 28x28 tokens, 128 ch, two heads, sr 4) against
    stock PVT and stock with SDPA ("sdpa" rows)."""
    return [
        Case("dwconv_bn", f"{batch}x224x16x16 k3", lambda: residual_dwconv(224), (batch, 224, 16, 16),
             lambda e: dwconv_bn_cost(batch, 224, 16, 16, 3, 1, e)),
        Case("ffn", f"{batch}x224x16x16 h448", lambda: Residual(FFN(224, 448)), (batch, 224, 16, 16),
             lambda e: ffn_cost(batch, 224, 448, 256, e)),
        Case("ffn", f"{batch}x448x4x4 h896", lambda: Residual(FFN(448, 896)), (batch, 448, 4, 4),
             lambda e: ffn_cost(batch, 448, 896, 16, e)),
        Case("pw_conv_bn", f"{batch}x224x16x16 PatchMerging->336", lambda: PatchMerging(224, 336),
             (batch, 224, 16, 16), lambda e: patch_merging_cost(batch, 224, 336, 16, 16, make_divisible(224), e)),
        Case("shsa", f"{batch}x336x8x8 p72", lambda: Residual(SHSA(336, 16, 72)), (batch, 336, 8, 8),
             lambda e: shsa_cost(batch, 336, 72, 16, 64, e)),
        Case("shsa", f"{batch}x448x4x4 p96", lambda: Residual(SHSA(448, 16, 96)), (batch, 448, 4, 4),
             lambda e: shsa_cost(batch, 448, 96, 16, 16, e)),
        Case("shsa", "8x336x42x25 p72 detection", lambda: Residual(SHSA(336, 16, 72)), (8, 336, 42, 25),
             lambda e: shsa_cost(8, 336, 72, 16, 42 * 25, e)),
        *(Case("sra", f"{batch}x{hw * hw}x{dim} h{heads} sr{sr}{tag}", _sra_maker(cls, dim, heads, sr),
               (batch, hw * hw, dim), _sra_cost(batch, hw, dim, heads, sr), args=(hw, hw),
               make_fused=FusedSRA.from_module)
          for hw, dim, heads, sr in ((56, 64, 1, 8), (28, 128, 2, 4)) for cls, tag in ((SRA, ""), (SDPASRA, " sdpa"))),
    ]


class SDPASRA(SRA):
    """Stock SRA with its attention through F.scaled_dot_product_attention (as timm's PVT v2 runs it): the
    strongest stock baseline for the fused SRA. Same parameters, same outputs."""

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        kv = self.kv(self.reduce(x, H, W)).reshape(b, -1, 2, self.num_heads, c // self.num_heads)
        k, v = kv.permute(2, 0, 3, 1, 4)
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


def _sra_maker(cls: type, dim: int, heads: int, sr: int) -> Callable[[], nn.Module]:
    return lambda: cls(dim, heads, qkv_bias=True, sr_ratio=sr)


def _sra_cost(batch: int, hw: int, dim: int, heads: int, sr: int) -> Callable[[int], dict[str, Cost]]:
    return lambda e: sra_cost(batch, hw * hw, dim, heads, sr, e)


def _bind(m: nn.Module, mode: str, x: torch.Tensor, args: tuple) -> Callable[[], object]:
    """A call of m on x in `mode`. Gradients go through autograd.grad, so nothing accumulates between calls."""
    if mode == "eval fwd":
        return torch.no_grad()(lambda: m(x, *args))
    x = x.detach().requires_grad_()
    if mode == "train fwd":
        return lambda: m(x, *args)
    wrt = [x, *(p for p in m.parameters() if p.requires_grad)]
    y = m(x, *args)  # "train bwd": one forward per input set, its graph kept for the repeated backward passes
    gy = torch.randn_like(y)  # (PatchMerging's output is not its input's shape)
    if mode == "train fwd+bwd":
        return lambda: torch.autograd.grad(m(x, *args), wrt, gy, allow_unused=True)
    return lambda: torch.autograd.grad(y, wrt, gy, retain_graph=True, allow_unused=True)


def backends_of(op: str, names: Sequence[str]) -> list[str]:
    """Those of `names` with a kernel of `op`, and "auto": one row each ("cuda" has SHSA and dwconv_bn only)."""
    return [b for b in names if b == "auto" or b in backends.implementations(op)]


def _under(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the ops on `backend` (the backward picks its kernels when it runs, so the call must be inside)."""
    if backend == "auto":
        return fn

    def run():
        with backends.use_backend(backend):
            return fn()
    return run


def _keeping_buffers(on: bool) -> contextlib.AbstractContextManager:
    """"train bwd" runs the backward of one kept graph repeatedly (retain_graph); a compiled graph must then not
    donate (free) its saved buffers to the first backward."""
    return torch._functorch.config.patch(donated_buffer=False) if on else contextlib.nullcontext()


@dataclasses.dataclass
class Prepared:
    fns: dict[str, Callable[[], object]]   # one timed call per implementation asked for
    cost: Cost
    backend: str                           # what the fused module's op runs on
    max_err: float
    stock_err: float
    input_sets: int


# compiled: torch.compile of the stock module (`compile_module`); folded: the stock module after `fold_stock`
IMPLS = ("stock", "fused", "compiled", "folded")


def prepare(case: Case, mode: str, device: torch.device, dtype: torch.dtype,
            impls: Sequence[str] = ("stock", "fused"), backend: str = "auto") -> Prepared:
    """Build stock and fused modules for `case`, check both against the float64 oracle, and bind the timed calls
    of `impls` (the fused one with its ops on `backend`)."""
    if mode not in MODES or not set(impls) <= set(IMPLS) or ("folded" in impls and mode != "eval fwd"):
        raise ValueError(f"mode in {MODES} and impls in {IMPLS} (folded: eval fwd only); got {mode!r}, {impls!r}")
    torch.manual_seed(0)
    stock = randomize_bn(case.make_stock()).to(device)
    oracle = copy.deepcopy(stock).double()
    fused = case.make_fused(copy.deepcopy(stock)).to(dtype)
    stock = stock.to(dtype)
    for m in (stock, fused, oracle):
        m.train(mode != "eval fwd")
    elem = torch.finfo(dtype).bits // 8
    xs = [torch.randn(case.input_shape, device=device, dtype=dtype)
          for _ in range(rotation_sets(2 * math.prod(case.input_shape) * elem, device))]  # input + output per set
    with backends.use_backend(backend), torch.no_grad():
        chosen = backends.choose(case.op, device, dtype)[0]
        ref = oracle(xs[0].double(), *case.args)
        err = (fused(xs[0], *case.args).double() - ref).abs().max().item()
        stock_err = (stock(xs[0], *case.args).double() - ref).abs().max().item()
    fns = {}
    for name in impls:
        m = {"compiled": lambda: compile_module(stock, device), "fused": lambda: fused, "stock": lambda: stock,
             "folded": lambda: fold_stock(copy.deepcopy(stock))}[name]()
        on = backend if name == "fused" else "auto"
        with backends.use_backend(on), _keeping_buffers(name == "compiled" and mode == "train bwd"):
            calls = [_bind(m, mode, x, case.args) for x in xs]  # "train bwd" runs its forward passes here
        fns[name] = _under(on, rotate(calls))
    return Prepared(fns, case.cost(elem)[mode], chosen, err, stock_err, len(xs))


def run_case(case: Case, mode: str, device: torch.device, dtype: torch.dtype, compile_stock: bool, reps: int,
             ceilings: Ceilings, backend: str = "auto") -> Result:
    """Stock eager vs fused (and torch.compile of the stock module when compile_stock; and stock with BN folded
    for the eval forward of a case with BatchNorm) for one case and mode."""
    folded = mode == "eval fwd" and has_bn(case.make_stock())
    impls = ("stock", "fused") + ("compiled",) * compile_stock + ("folded",) * folded
    p = prepare(case, mode, device, dtype, impls, backend)
    ms = {name: time_ms(fn, device, reps) for name, fn in p.fns.items()}
    r = Result(case.op, mode, case.shape, str(dtype).removeprefix("torch."), p.backend, ms["stock"], ms["fused"],
               None, ms["stock"] / ms["fused"], None, p.max_err, p.stock_err, p.cost.flops / 1e9, p.cost.bytes / 1e6,
               ceilings.bound(p.cost), ceilings.pct(p.cost, ms["fused"]), ceilings.pct(p.cost, ms["stock"]), None,
               p.input_sets)
    r.stock_peak_mib = peak_mib(p.fns["stock"], device, above_current=True)
    r.fused_peak_mib = peak_mib(p.fns["fused"], device, above_current=True)
    if compile_stock:
        _fill_compiled(r, ms["compiled"], ceilings)
    if folded:
        r.folded_ms, r.speedup_vs_folded = ms["folded"], ms["folded"] / ms["fused"]
    return r


def record_auto(device: torch.device, dtype: torch.dtype, batches: Sequence[int], ops: Sequence[str] | None,
                reps: int) -> list[str]:
    """Time each op case's fused module (eval forward) on every backend that runs it here, at each batch, and store
    the medians in the auto table (`autotable`), from which "auto" then picks. Returns a line per measurement."""
    lines = []
    for batch in batches:
        for case in cases(batch):
            if ops and case.op not in ops:
                continue
            ms = {name: time_ms(prepare(case, "eval fwd", device, dtype, ("fused",), name).fns["fused"], device, reps)
                  for name in backends.runnable(case.op, device, dtype)}
            autotable.record(case.op, device, dtype, math.prod(case.input_shape), ms, case.shape)
            lines.append(f"{case.op:10s} {case.shape:20s} " + "  ".join(f"{n} {t:.3f} ms" for n, t in ms.items()))
    backends.reset_choices()
    return lines


def add_compiled(results: Sequence[Result], case: Case, mode: str, device: torch.device, dtype: torch.dtype,
                 reps: int, ceilings: Ceilings) -> None:
    """Time torch.compile of the stock module for `case` and `mode` (the compile alone can take minutes, so the CLI
    runs this after everything else) and fill the compile columns of `results`, rows of that case and mode."""
    ms = time_ms(prepare(case, mode, device, dtype, ("compiled",)).fns["compiled"], device, reps)
    for r in results:
        _fill_compiled(r, ms, ceilings)


def _fill_compiled(r: Result, ms: float, ceilings: Ceilings) -> None:
    r.compiled_ms, r.speedup_vs_compiled = ms, ms / r.fused_ms
    r.compiled_roofline_pct = ceilings.pct(Cost(r.gflop * 1e9, r.mbytes * 1e6), ms)


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


def environment(device: torch.device) -> dict[str, object]:
    """What a result must carry to be compared: device and driver, library versions, CPU threads, date."""
    env: dict[str, object] = {"device": device.type, "python": platform.python_version(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
                              "arch": platform.machine(),
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   l2_mib=props.L2_cache_size / 2**20, memory_gib=props.total_memory / 2**30, driver=_driver())
    else:
        env["device_name"] = _cpu_name()
    return env


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def table(head: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A plain-text (or Markdown) table with columns padded to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    sep, edge = (" | ", "| ") if markdown else (" | ", "")
    lines = [edge + sep.join(str(c).ljust(w) for c, w in zip(row, widths)) + (" |" if markdown else "")
             for row in [head, *rows]]
    rule = ("|" + "|".join("-" * (w + 2) for w in widths) + "|") if markdown else "-+-".join("-" * w for w in widths)
    lines.insert(1, rule)
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_table(results: list[Result], markdown: bool = False) -> str:
    head = ["op", "mode", "shape", "dtype", "backend", "eager ms", "folded ms", "compile ms", "fused ms", "vs eager",
            "vs folded", "vs compile", "fused GB/s", "fused % roofline", "eager % roofline", "peak vs eager", "max err",
            "stock err"]
    rows = [[r.op, r.mode, r.shape, r.dtype, r.backend, f"{r.stock_ms:.3f}", fmt(r.folded_ms, ".3f"),
             fmt(r.compiled_ms, ".3f"), f"{r.fused_ms:.3f}", f"{r.speedup:.2f}x", fmt(r.speedup_vs_folded, ".2f", "x"),
             fmt(r.speedup_vs_compiled, ".2f", "x"), f"{r.fused_gbps:.1f}", f"{r.fused_roofline_pct:.1f}% ({r.bound})",
             f"{r.stock_roofline_pct:.1f}%", fmt(_ratio(r.fused_peak_mib, r.stock_peak_mib), ".2f", "x"),
             f"{r.max_err:.1e}", f"{r.stock_err:.1e}"] for r in results]
    return table(head, rows, markdown)
