"""The CUDA sources (csrc/cuda) stay torch-free and compile, without a GPU: nvcc -c for sm_90 (skipped without nvcc)."""
import concurrent.futures
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)
TORCH_HEADER = re.compile(r"^(torch|ATen|c10|caffe2|pybind11)/|^Python\.h$")
# What torch's CUDAExtension passes to nvcc: the kernels must not rely on implicit half / bfloat16 conversions.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def _includes(path: Path, seen: set[Path]) -> list[str]:
    """Every header included by `path` and, recursively, by the csrc/cuda headers it includes."""
    found = []
    for name in INCLUDE.findall(path.read_text()):
        found.append(name)
        local = CUDA_DIR / name
        if local.is_file() and local not in seen:
            seen.add(local)
            found += _includes(local, seen)
    return found


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files in {CUDA_DIR}"


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_files_include_no_torch_header(cu):
    bad = [h for h in _includes(cu, set()) if TORCH_HEADER.search(h)]
    assert not bad, f"{cu.name} includes torch / ATen / Python headers (directly or through a local header): {bad}"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """nvcc -c of every .cu once, in parallel: {file name: (return code, compiler output)}."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    out = tmp_path_factory.mktemp("nvcc")

    def build(cu: Path):
        cmd = [nvcc, "-c", "-std=c++17", "-O3", "-Xcompiler", "-Wall", "-gencode", "arch=compute_90,code=sm_90",
               *TORCH_NVCC_FLAGS, "-o", str(out / f"{cu.stem}.o"), str(cu)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return cu.name, (proc.returncode, proc.stdout + proc.stderr)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(pool.map(build, CU_FILES))


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_for_sm90(compiled, cu):
    rc, log = compiled[cu.name]
    assert rc == 0, f"nvcc failed on {cu.name}:\n{log}"
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, f"nvcc warnings in {cu.name}:\n" + "\n".join(warnings)
