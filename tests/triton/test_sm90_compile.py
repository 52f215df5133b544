"""Every Triton kernel compiles for an H100 (sm_90), at every meta-parameter tuple its launchers pick for a GPU over
SHViT's and PVT's shapes, in float16 and float32 (tests/triton/sm90.py; its CLI runs all four dtypes and every
int class). No GPU is needed: Triton's CUDA backend and ptxas run on the CPU. A few minutes on two cores; Triton's
cache makes a rerun of unchanged kernels instant."""
import importlib
import json
import os
import pathlib
import pkgutil
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _has_cuda_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def _all_kernels() -> set[str]:
    import shvit_kernels.triton as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        mod = importlib.import_module(f"{package.__name__}.{info.name}")
        names |= {f"{mod.__name__}.{n}" for n, o in vars(mod).items() if n.endswith("_kernel") and hasattr(o, "fn")}
    return names


@pytest.mark.skipif(not _has_cuda_backend(), reason="this triton has no CUDA backend / ptxas")
def test_triton_kernels_compile_for_sm90(tmp_path):
    from tests.triton.sm90 import SMEM_LIMIT, summary

    out = tmp_path / "sm90.json"
    proc = subprocess.run([sys.executable, "-m", "tests.triton.sm90", "--dtypes", "float16", "float32", "--json",
                           str(out)], cwd=ROOT, env=os.environ | {"TRITON_INTERPRET": "0"}, capture_output=True,
                          text=True, timeout=3600, check=False)
    assert out.exists(), proc.stderr[-3000:]
    results = json.loads(out.read_text())
    report = summary(results)
    assert all(r["ok"] for r in results), report
    assert {f"{r['module']}.{r['kernel']}" for r in results} == _all_kernels(), "a kernel was never launched"
    assert len(results) >= 700, report  # both dtypes' launch configurations, not a truncated recording
    assert max(r["shared"] for r in results) <= SMEM_LIMIT, report
    assert all(0 < r["regs"] <= 255 for r in results), report
    assert proc.returncode == 0, proc.stderr[-3000:]
