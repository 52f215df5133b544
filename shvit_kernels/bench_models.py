"""Model benchmarks behind `python -m shvit_kernels bench --models` and `benchmarks/test_models.py`: SHViT S1-S4
as stock eager, torch.compile of the stock model, timm's `shvit_s*`, fused, and fused + torch.compile.

Scenarios (default sizes: `default_batch`; 224 px, S4 256 px as in the paper):
- "infer b1": batch-1 latency. On CUDA the eager models are captured in a CUDA graph and its replays are timed
  (launch gaps would otherwise dominate); compiled ones use inductor's own CUDA graphs (mode="max-autotune").
- "infer batch": throughput at a large batch, the model cast to the run's dtype.
- "train step": forward + cross-entropy + backward + SGD step, under autocast when the dtype is fp16/bf16.
Layout: NCHW, or with `channels_last` every variant's model and input in channels_last (stock and fused alike, so
that a layout gain is not credited to fusion; on the CPU oneDNN's convolutions are much faster in channels_last).
With an NCHW input the fused model, as `convert` makes it, still runs channels_last inside on the CPU.
% of peak: the FLOPs torch's FlopCounterMode counts for the stock forward (x3 for a training step) over the time,
against the matrix-product ceiling measured in the same run. Peak memory: torch.cuda.max_memory_allocated over one
warm call.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .bench import compile_module, randomize_bn
from .roofline import Ceilings, peak_mib, time_ms

MODELS = {"S1": "shvit_s1", "S2": "shvit_s2", "S3": "shvit_s3", "S4": "shvit_s4"}
SCENARIOS = ("infer b1", "infer batch", "train step")
# variant -> (model it builds, compiled)
VARIANTS = {"eager": ("stock", False), "compile": ("stock", True), "timm": ("timm", False), "fused": ("fused", False),
            "fused+compile": ("fused", True)}


def default_resolution(model: str) -> int:
    return 256 if model == "S4" else 224


def default_batch(scenario: str, device: torch.device) -> int:
    gpu = device.type == "cuda"
    return {"infer b1": 1, "infer batch": 256 if gpu else 8, "train step": 128 if gpu else 4}[scenario]


@dataclasses.dataclass
class ModelResult:
    model: str
    scenario: str
    variant: str
    batch: int
    resolution: int
    dtype: str
    layout: str                 # "nchw" or "channels_last"
    ms: float | None            # median per call; None when skipped or failed (see note)
    images_per_s: float | None
    gflop: float                # counted work of one call
    flops_pct: float | None     # achieved FLOP/s over the measured matrix-product ceiling
    peak_mib: float | None      # CUDA only
    note: str


class Unavailable(Exception):
    """The variant cannot run here (the message says why); recorded as skipped, not as a failure."""


@functools.cache
def forward_gflop(model: str, resolution: int) -> float:
    """FLOPs of one image through the stock model, counted on the meta device (no arithmetic is done)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = getattr(models, MODELS[model])(fused=False).eval()
        x = torch.empty(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(x)
    return counter.get_total_flops() / 1e9


def build(model: str, kind: str, device: torch.device) -> nn.Module:
    """The uncompiled "stock", "fused" or "timm" model, with the same seeded weights for stock and fused."""
    name = MODELS[model]
    torch.manual_seed(0)
    if kind == "timm":
        from .models.timm_compat import import_timm

        try:
            m = import_timm().create_model(name, pretrained=False)
        except ImportError as e:
            raise Unavailable(str(e)) from e
    else:
        m = getattr(models, name)(fused=kind == "fused")
    return randomize_bn(m).to(device)


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured once in a CUDA graph (its inputs are static); the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_call(m: nn.Module, scenario: str, device: torch.device, dtype: torch.dtype, batch: int, resolution: int,
              compiled: bool, channels_last: bool = False) -> tuple[Callable[[], object], str]:
    """(one timed call, a note on how it runs) for model m in `scenario`."""
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if scenario == "train step":
        half = dtype in (torch.float16, torch.bfloat16)
        m.train()
        run = compile_module(m, device) if compiled else m
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
        target = torch.randint(0, 1000, (batch,), device=device)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=half):
                out = run(x)
                loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, f"autocast {str(dtype).removeprefix('torch.')}" if half else ""
    m.eval().to(dtype)
    run = compile_module(m, device) if compiled else m
    x = x.to(dtype)
    fn = torch.no_grad()(lambda: run(x))
    if device.type != "cuda" or scenario != "infer b1":
        return fn, ""
    if compiled:
        return fn, "inductor CUDA graphs"
    try:
        return cuda_graph(fn), "CUDA graph"
    except RuntimeError as e:  # a kernel that cannot be captured: time it launched one by one, and say so
        return fn, f"no CUDA graph ({type(e).__name__}: {str(e).splitlines()[0][:80]})"


@dataclasses.dataclass
class PreparedModel:
    fn: Callable[[], object]   # one warm call
    note: str
    batch: int
    resolution: int
    gflop: float               # counted work of one call


def prepare_model(model: str, scenario: str, variant: str, device: torch.device, dtype: torch.dtype,
                  batch: int | None = None, resolution: int | None = None,
                  channels_last: bool = False) -> PreparedModel:
    """Build and warm one (model, scenario, variant); raises Unavailable when the variant cannot run here."""
    if variant not in VARIANTS or scenario not in SCENARIOS:
        raise ValueError(f"variant in {tuple(VARIANTS)}, scenario in {SCENARIOS}; got {variant!r}, {scenario!r}")
    batch = batch or default_batch(scenario, device)
    resolution = resolution or default_resolution(model)
    kind, compiled = VARIANTS[variant]
    fn, note = make_call(build(model, kind, device), scenario, device, dtype, batch, resolution, compiled,
                         channels_last)
    fn()  # a compiled model compiles here (seconds to minutes), before anything is timed
    gflop = forward_gflop(model, resolution) * batch * (3 if scenario == "train step" else 1)
    return PreparedModel(fn, note, batch, resolution, gflop)


def run_model(model: str, scenario: str, variant: str, device: torch.device, dtype: torch.dtype, ceilings: Ceilings,
              batch: int | None = None, resolution: int | None = None, reps: int = 5,
              channels_last: bool = False) -> ModelResult:
    """Time one (model, scenario, variant); a variant that cannot run here comes back with ms None and a note."""
    dt = str(dtype).removeprefix("torch.")
    layout = "channels_last" if channels_last else "nchw"
    try:
        p = prepare_model(model, scenario, variant, device, dtype, batch, resolution, channels_last)
    except Unavailable as e:
        return ModelResult(model, scenario, variant, batch or default_batch(scenario, device),
                           resolution or default_resolution(model), dt, layout, None, None, 0.0, None, None,
                           f"skipped: {e}")
    ms = time_ms(p.fn, device, reps, warmup=1, rep_ms=1000)
    pct = 100 * p.gflop * 1e9 / (ms * 1e-3) / ceilings.flops_per_s
    result = ModelResult(model, scenario, variant, p.batch, p.resolution, dt, layout, ms, p.batch / (ms * 1e-3),
                         p.gflop, pct, peak_mib(p.fn, device), p.note)
    del p
    release(device)
    return result


def release(device: torch.device) -> None:
    """Free the GPU memory the previous variant held (graphs, compiled code's buffers), so that peaks don't mix.
    (Not on the CPU, where nothing is measured and a full collection costs a quarter second.)"""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def by_row(results: list[ModelResult]) -> dict[tuple, dict[str, ModelResult]]:
    """(model, scenario, batch, resolution, layout) -> variant -> result."""
    rows: dict[tuple, dict[str, ModelResult]] = {}
    for r in results:
        rows.setdefault((r.model, r.scenario, r.batch, r.resolution, r.layout), {})[r.variant] = r
    return rows


def format_table(results: list[ModelResult], markdown: bool = False) -> str:
    from .bench import fmt, table

    head = ["model", "scenario", "batch", "px", "layout", *(f"{v} ms" for v in VARIANTS), "fused vs eager",
            "fused vs compile", "fused+compile vs compile", "fused img/s", "fused % peak", "eager MiB", "fused MiB",
            "notes"]
    rows = []
    for (model, scenario, batch, res, layout), got in by_row(results).items():
        ms = {v: got[v].ms if v in got else None for v in VARIANTS}
        ratios = [fmt(ms[num] / ms[den] if ms[num] and ms[den] else None, ".2f", "x")
                  for num, den in (("eager", "fused"), ("compile", "fused"), ("compile", "fused+compile"))]
        fused = got.get("fused")
        notes = sorted({f"{v}: {r.note}" for v, r in got.items() if r.note})
        rows.append([model, scenario, str(batch), str(res), layout, *(fmt(ms[v], ".2f") for v in VARIANTS),
                     *ratios,
                     fmt(fused and fused.images_per_s, ".0f"), fmt(fused and fused.flops_pct, ".1f", "%"),
                     fmt(got["eager"].peak_mib if "eager" in got else None, ".0f"),
                     fmt(fused and fused.peak_mib, ".0f"), "; ".join(notes)])
    return table(head, rows, markdown)
