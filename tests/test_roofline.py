"""The benchmarks' method (shvit_kernels/roofline.py): counted FLOPs agree with torch's FlopCounterMode where it is
right, input rotation, and the roofline arithmetic."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from shvit_kernels import bench, roofline


# The "sdpa" rows do the same work as their plain twins; FlopCounterMode does not count the CPU SDPA kernel.
@pytest.mark.parametrize("case", [c for c in bench.cases(2) if not c.shape.endswith("sdpa")],
                         ids=lambda c: f"{c.op}-{c.shape.replace(' ', '-')}")
def test_counted_forward_flops_cover_the_gemms_and_convs(case):
    m = bench.randomize_bn(case.make_stock()).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.randn(case.input_shape), *case.args)
    counted = case.cost(4)
    # FlopCounterMode counts convolutions and matrix products only; the hand count adds the elementwise work.
    assert 1.0 <= counted["eval fwd"].flops / counter.get_total_flops() <= 1.2
    assert counted["train fwd+bwd"].flops == pytest.approx(3 * counted["eval fwd"].flops)
    assert counted["train bwd"].bytes > counted["train fwd"].bytes


def test_roofline_percent_and_bound():
    c = roofline.Ceilings("cpu", bytes_per_s=1e10, flops_per_s=1e11, copy_mib=64, matmul="float32 1024^3", threads=1)
    memory_bound = roofline.Cost(flops=1e8, bytes=1e8)  # 1 ms of FLOPs, 10 ms of bytes
    assert c.bound(memory_bound) == "memory" and c.floor_ms(memory_bound) == pytest.approx(10)
    assert c.pct(memory_bound, 20.0) == pytest.approx(50)
    assert c.bound(roofline.Cost(flops=1e10, bytes=1e6)) == "compute"


def test_rotation_exceeds_the_cache_within_bounds():
    cpu = torch.device("cpu")
    small = roofline.rotation_sets(1 << 20, cpu, max_sets=1000)
    assert small * (1 << 20) > 2 * roofline.cache_bytes(cpu)
    assert roofline.rotation_sets(1 << 10, cpu) <= 32
    assert roofline.rotation_sets(1 << 40, cpu) == 1
    calls = []
    fn = roofline.rotate([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(4):
        fn()
    assert calls == [0, 1, 2, 0]


_FAULTS = """
import ctypes, resource, sys
from shvit_kernels.roofline import hold_freed_memory
if sys.argv[1] == "held":
    print(hold_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def loop():  # three 4 MiB blocks written and freed: what an op's temporaries do on every call
    ps = [libc.malloc(4 << 20) for _ in range(3)]
    for p in ps:
        ctypes.memset(p, 1, 4 << 20)
    for p in ps:
        libc.free(p)
loop(); loop()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    loop()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_held_freed_memory_stops_per_call_page_faults():
    """The CLI's `--malloc held` takes effect: freed blocks stay in the heap, so repeated calls stop page-faulting
    them in (glibc's defaults hand the 12 MiB back on every free here). Through torch's allocator the count varies
    from process to process (heap fragmentation), so the check is on malloc itself."""
    import subprocess
    import sys

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return out.stdout.split()

    *_, default = faults("default")
    said, *_, held = faults("held")
    assert said == "held"
    assert int(default) > 2000 and int(held) < int(default) // 10, (default, held)
