"""convert() on timm's SHViT: every SHSA, residual depthwise block and PatchMerging swapped, keys and values
unchanged, outputs and running statistics equal to timm's own model in eval and training."""
import copy
import importlib.util

import pytest
import torch

import shvit_kernels as sk
from shvit_kernels.models.timm_compat import import_timm
from shvit_kernels.nn import FusedPatchMerging, ResidualDWConvBN, ResidualFFN, ResidualSHSA
from tests.helpers import bn_states, randomize_bn

if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def timm_s1():
    model = import_timm().create_model("shvit_s1", pretrained=False, num_classes=10)
    return randomize_bn(model).double()


def test_convert_timm_swaps_every_fusable_block(timm_s1):
    fused = sk.convert(copy.deepcopy(timm_s1))
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(ResidualSHSA) == 9  # stage 2 (4) + stage 3 (5) blocks
    assert kinds.count(FusedPatchMerging) == 2
    assert kinds.count(ResidualDWConvBN) == 2 + 4 + 5 + 4  # one per block + two around each PatchMerging
    assert kinds.count(ResidualFFN) == 2 + 4 + 5 + 4  # likewise
    assert list(fused.state_dict()) == list(timm_s1.state_dict())
    for (k, a), b in zip(fused.state_dict().items(), timm_s1.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("train", [False, True])
def test_convert_timm_outputs_equal(timm_s1, train):
    stock = copy.deepcopy(timm_s1).train(train)
    fused = sk.convert(copy.deepcopy(timm_s1)).train(train)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    torch.testing.assert_close(fused(x), stock(x))
    if train:
        for (k, a), b in zip(bn_states(fused).items(), bn_states(stock).values()):
            torch.testing.assert_close(a, b, msg=k)
