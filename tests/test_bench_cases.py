"""The benchmark's baselines compute what the module they stand in for computes."""
import pytest
import torch

from shvit_kernels.bench import SDPASRA
from shvit_kernels.reference import SRA


@pytest.mark.parametrize("sr, heads, linear", [(1, 1, False), (4, 2, False), (2, 4, True)])
def test_sdpa_baseline_equals_stock_sra(sr, heads, linear):
    torch.manual_seed(0)
    stock = SRA(32, heads, qkv_bias=True, sr_ratio=sr, linear=linear).double()
    sdpa = SDPASRA(32, heads, qkv_bias=True, sr_ratio=sr, linear=linear).double()
    sdpa.load_state_dict(stock.state_dict())
    x = torch.randn(3, 12 * 10, 32, dtype=torch.float64)
    torch.testing.assert_close(sdpa(x, 12, 10), stock(x, 12, 10), rtol=1e-12, atol=1e-12)
