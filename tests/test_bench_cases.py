"""The benchmark's baselines compute what the module they stand in for computes."""
import copy
import dataclasses

import pytest
import torch

from shvit_kernels.bench import SDPASRA, cases, fold_stock, prepare, randomize_bn, run_case
from shvit_kernels.models import shvit_s1
from shvit_kernels.reference import FFN, SRA, Residual


@pytest.mark.parametrize("sr, heads, linear", [(1, 1, False), (4, 2, False), (2, 4, True)])
def test_sdpa_baseline_equals_stock_sra(sr, heads, linear):
    torch.manual_seed(0)
    stock = SRA(32, heads, qkv_bias=True, sr_ratio=sr, linear=linear).double()
    sdpa = SDPASRA(32, heads, qkv_bias=True, sr_ratio=sr, linear=linear).double()
    sdpa.load_state_dict(stock.state_dict())
    x = torch.randn(3, 12 * 10, 32, dtype=torch.float64)
    torch.testing.assert_close(sdpa(x, 12, 10), stock(x, 12, 10), rtol=1e-12, atol=1e-12)


def _bn_count(m):
    return sum(isinstance(c, torch.nn.modules.batchnorm._BatchNorm) for c in m.modules())


@pytest.mark.parametrize("op", ["dwconv_bn", "ffn", "shsa"])
def test_folded_baseline_equals_stock(op):
    """The "eager, BN folded" baseline: no BatchNorm left, same eval outputs (float64, random BN statistics)."""
    case = next(c for c in cases(2) if c.op == op)
    stock = randomize_bn(case.make_stock(), seed=int(torch.randint(0, 2**31, ()))).double().eval()
    folded = fold_stock(copy.deepcopy(stock))
    assert _bn_count(stock) > 0 and _bn_count(folded) == 0
    x = torch.randn(case.input_shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), stock(x), rtol=1e-10, atol=1e-10)


def test_folded_baseline_whole_model():
    """fold_stock on a stock SHViT (PatchMerging convs, the classifier's BN_Linear) keeps its eval logits."""
    stock = randomize_bn(shvit_s1(fused=False), seed=int(torch.randint(0, 2**31, ()))).double().eval()
    folded = fold_stock(copy.deepcopy(stock))
    assert _bn_count(folded) == 0
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), stock(x), rtol=1e-9, atol=1e-9)


def test_run_case_reports_folded_and_bandwidth():
    """Eval rows carry the folded baseline and the achieved GB/s; training rows and BN-free cases have no folded
    column (nothing to fold)."""
    from shvit_kernels.roofline import Ceilings
    ceil = Ceilings("cpu", 1e10, 1e11, 1, "test", 1)
    ffn = next(c for c in cases(1) if c.op == "ffn")
    small = dataclasses.replace(ffn, make_stock=lambda: Residual(FFN(16, 32)), input_shape=(1, 16, 5, 3))
    r = run_case(small, "eval fwd", torch.device("cpu"), torch.float32, False, 3, ceil)
    assert r.folded_ms > 0 and r.speedup_vs_folded == pytest.approx(r.folded_ms / r.fused_ms)
    assert r.fused_gbps == pytest.approx(r.mbytes / r.fused_ms)
    assert run_case(small, "train fwd", torch.device("cpu"), torch.float32, False, 3, ceil).folded_ms is None
    with pytest.raises(ValueError, match="folded"):
        prepare(small, "train fwd", torch.device("cpu"), torch.float32, ("folded",))
