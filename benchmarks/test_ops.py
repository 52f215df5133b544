"""Stock eager, stock with BN folded (eval forward), torch.compile of stock and fused, per op case (dwconv_bn,
ffn, shsa, sra at two stages) and mode (eval forward; training forward, backward, forward + backward), on the
device at hand, per dtype. Cases and counted costs: shvit_kernels/bench.py."""
import pytest

from shvit_kernels import bench
from shvit_kernels.roofline import MODES

from .settings import DEVICE, SIZE, dtypes

CASES = {f"{c.op} {c.shape}": c for c in bench.cases(SIZE.op_batch)}


@pytest.mark.parametrize("impl", bench.IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", dtypes(("bfloat16", "float32")), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", [DEVICE], ids=str)
def test_op(measure, benchmark, device, dtype, case, mode, impl):
    c = CASES[case]
    if impl == "compiled" and not SIZE.compile:
        pytest.skip("compile variants are off (SHVIT_BENCH_COMPILE=1 to include them)")
    if impl == "folded" and (mode != "eval fwd" or not bench.has_bn(c.make_stock())):
        pytest.skip("BN folds only for the eval forward of a case with BatchNorm")
    p = bench.prepare(c, mode, device, dtype, (impl,))
    benchmark.group = f"{c.op} {mode} {c.shape} {str(dtype).removeprefix('torch.')}"
    ms = measure(p.fns[impl], dtype, p.cost, op=c.op, mode=mode, shape=c.shape, impl=impl,
                 backend=p.backend if impl == "fused" else "stock", max_err=p.max_err, stock_err=p.stock_err,
                 input_sets=p.input_sets)
    if ms:
        benchmark.extra_info["gbps"] = p.cost.bytes / 1e6 / ms  # achieved: the fewest bytes over the time
