"""Every Triton kernel compiles for an H100 (sm_90), at every meta-parameter tuple its launchers pick for a GPU over
SHViT's and PVT's shapes, in float16 and float32 (tests/triton/sm90.py; its CLI runs all four dtypes and every
int class). No GPU is needed: Triton's CUDA backend and ptxas run on the CPU. A few minutes on two cores; Triton's
cache makes a rerun of unchanged kernels instant."""
import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import triton_kernels
from tests.triton.sm90 import SMEM_LIMIT, nvidia_tool, summary

triton = pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _has_cuda_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return nvidia_tool("ptxas").exists() and nvidia_tool("cuobjdump").exists()


def _params(launch: dict) -> list[str]:
    """The kernel's parameter names (a JITFunction, or an InterpretedFunction in this process: both wrap .fn)."""
    return list(inspect.signature(getattr(importlib.import_module(launch["module"]), launch["kernel"]).fn).parameters)


@pytest.mark.skipif(not _has_cuda_backend(), reason="this triton has no CUDA backend / ptxas")
def test_triton_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "sm90.json"
    proc = subprocess.run([sys.executable, "-m", "tests.triton.sm90", "--dtypes", "float16", "float32", "--json",
                           str(out)], cwd=ROOT, env=os.environ | {"TRITON_INTERPRET": "0"}, capture_output=True,
                          text=True, timeout=3600, check=False)
    assert out.exists(), proc.stderr[-3000:]
    results = json.loads(out.read_text())
    report = summary(results)
    assert all(r["ok"] for r in results), report
    every = {f"{mod.__name__}.{name}" for mod, name, _ in triton_kernels()}
    assert {f"{r['module']}.{r['kernel']}" for r in results} == every, "a kernel was never launched"
    assert len(results) >= 700, report  # both dtypes' launch configurations, not a truncated recording
    # A float argument not annotated `tl.float64` reaches a compiled kernel as fp32 (the interpreter keeps a Python
    # float): an fp64 kernel's eps or scale would be rounded to fp32
    fp32_scalars = {f"{r['kernel']}.{p}" for r in results for p, (ty, _) in zip(_params(r), r["spec"]) if ty == "fp32"}
    assert not fp32_scalars, f"float arguments typed fp32 (annotate them tl.float64): {sorted(fp32_scalars)}"
    assert max(r["shared"] for r in results) <= SMEM_LIMIT, report
    assert all(0 < r["regs"] <= 255 for r in results), report
    assert proc.returncode == 0, proc.stderr[-3000:]



@pytest.mark.skipif(not _has_cuda_backend(), reason="this triton has no CUDA backend / ptxas")
def test_sass_stats_reads_loops():
    """benchmarks/sass_stats.py on one case: the dwconv eval kernel compiles, its image loop is found (a body with the
    9 taps' loads of each of a thread's 4 elements) and the loop has no barrier."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sass_stats", "dwconv 224 16x16 b256 float16 nchw",
                           "--kernel", "_fwd_eval"], cwd=ROOT, env=os.environ | {"TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("_fwd_eval_kernel"))
    body = int(line.split("loops: ")[1].split(" instr")[0])
    ldg = int(line.split("instr, ")[1].split(" LDG")[0])
    assert 100 < body < 1000 and ldg >= 36 and ", 0 BAR" in line, line
