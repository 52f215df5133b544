"""The C++ kernels compiled per instruction set (csrc/cpu/isa.h): each copy this CPU can run passes the SHSA and
SRA kernel tests. A process picks its copy once (the best the CPU has, capped by ATEN_CPU_CAPABILITY), so the other
copies run in subprocesses; the dwconv_bn copies run under ctest (CMakeLists.txt)."""
import os
import subprocess
import sys

import pytest
import torch

import shvit_kernels

pytestmark = pytest.mark.skipif("cpu" not in shvit_kernels.available_backends(),
                                reason="C++ extension shvit_kernels._C not built")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORDER = ("default", "avx2", "avx512")


def _picked(cap: str) -> str:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    code = "import torch, shvit_kernels; print(torch.ops.shvit.cpu_kernel_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip()


def test_capability_caps_the_choice():
    best = torch.ops.shvit.cpu_kernel_isa()
    assert best in ORDER
    for cap in ORDER:
        # the asked-for set, or the best this CPU has when it lacks that one
        assert _picked(cap) == min(cap, best, key=ORDER.index)


@pytest.mark.parametrize("cap", ORDER)
def test_cpu_kernels_under_each_instruction_set(cap):
    own = torch.ops.shvit.cpu_kernel_isa()
    if ORDER.index(cap) > ORDER.index(own):
        pytest.skip(f"this CPU has no {cap}")
    if cap == own:
        pytest.skip("this process's own copy: the test files run it")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    tests = [os.path.join(ROOT, "tests", "ops", name) for name in ("test_shsa_cpu.py", "test_sra.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k",
                          "not test_sra.py or cpu"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
