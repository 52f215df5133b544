"""Sizes, dtypes and device of the benchmark suites, read from the environment (see conftest.py)."""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

from shvit_kernels.bench_models import MODELS
from shvit_kernels.roofline import Ceilings, hold_freed_memory, measure_ceilings

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
if os.environ.get("SHVIT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SHVIT_BENCH_THREADS"]))
MALLOC = None if GPU else hold_freed_memory()  # as the CLI bench does (roofline.py: CPU allocator)


@dataclasses.dataclass(frozen=True)
class Size:
    tiny: bool
    op_batch: int
    models: tuple[str, ...]
    resolution: int | None      # None: the model's own (224, S4 256)
    model_batch: int | None     # None: bench_models.default_batch
    compile: bool
    rounds: int


def _size() -> Size:
    tiny = os.environ.get("SHVIT_BENCH_SIZE", "full" if GPU else "tiny") == "tiny"
    models = os.environ.get("SHVIT_BENCH_MODELS")
    compile_default = "1" if GPU and not tiny else "0"
    return Size(tiny, 2 if tiny else 256 if GPU else 16,
                tuple(models.split(",")) if models else ("S1",) if tiny else tuple(MODELS),
                64 if tiny else None, 2 if tiny else None,
                os.environ.get("SHVIT_BENCH_COMPILE", compile_default) == "1", 3 if tiny else 20 if GPU else 5)


SIZE = _size()


def dtypes(default_gpu: tuple[str, ...]) -> list[torch.dtype]:
    names = os.environ.get("SHVIT_BENCH_DTYPES")
    names = names.split(",") if names else default_gpu if GPU else ("float32",)
    return [getattr(torch, n.strip()) for n in names]


@functools.cache
def ceilings(dtype: torch.dtype) -> Ceilings:
    """Measured once per session and dtype (the matrix product runs in the benchmark's dtype)."""
    return measure_ceilings(DEVICE, dtype)
