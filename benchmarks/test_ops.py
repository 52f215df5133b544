"""Stock eager vs fused, per op (dwconv_bn, ffn, shsa, sra) and mode (eval forward; training forward, backward,
forward + backward), on the device at hand, per dtype. Cases and counted costs: shvit_kernels/bench.py."""
import pytest

from shvit_kernels import bench
from shvit_kernels.roofline import MODES

from .settings import DEVICE, SIZE, dtypes

CASES = {c.op: c for c in bench.cases(SIZE.op_batch)}


@pytest.mark.parametrize("impl", ["stock", "fused"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("dtype", dtypes(("bfloat16", "float32")), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", [DEVICE], ids=str)
def test_op(measure, benchmark, device, dtype, op, mode, impl):
    case = CASES[op]
    p = bench.prepare(case, mode, device, dtype, (impl,))
    benchmark.group = f"{op} {mode} {case.shape} {str(dtype).removeprefix('torch.')}"
    measure(p.fns[impl], dtype, p.cost, op=op, mode=mode, shape=case.shape, impl=impl,
            backend=p.backend if impl == "fused" else "stock", max_err=p.max_err, stock_err=p.stock_err,
            input_sets=p.input_sets)
