"""convert(model, inference=True): every BatchNorm folded for deployment, outputs equal to the stock eval model
(float64 exactly, float32 within DESIGN.md's rule), keys those of the official `replace_batchnorm` deploy model."""
import copy
import importlib.util

import pytest
import torch
from torch import nn

import shvit_kernels as sk
from shvit_kernels.models import shvit_s1
from shvit_kernels.nn import DWConv, FoldedPatchMerging, FoldedResidualSHSA
from tests.helpers import assert_close_to_oracle, randomize_bn


def replace_batchnorm(net: nn.Module) -> nn.Module:
    """The official SHViT / timm deploy step (utils.replace_batchnorm): fuse() every child that has it."""
    for name, child in net.named_children():
        if hasattr(child, "fuse"):
            fused = child.fuse()
            setattr(net, name, fused)
            replace_batchnorm(fused)
        elif isinstance(child, nn.BatchNorm2d):
            setattr(net, name, nn.Identity())
        else:
            replace_batchnorm(child)
    return net


@pytest.fixture(scope="module")
def stock64():
    torch.manual_seed(0)
    return randomize_bn(shvit_s1(num_classes=10, fused=False), seed=1).double().eval()


@pytest.fixture(scope="module")
def io64(stock64):
    """An input and the stock float64 eval output: the oracle, computed once (float64 convs are slow on CPU)."""
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        return x, stock64(x)


def test_folds_every_bn_and_equals_stock_float64(stock64, io64):
    folded = sk.convert(copy.deepcopy(stock64).train(), inference=True)
    assert not folded.training
    kinds = [type(m) for m in folded.modules()]
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert kinds.count(FoldedResidualSHSA) == 9 and kinds.count(FoldedPatchMerging) == 2
    assert kinds.count(DWConv) == 15 + 2  # residual depthwise blocks + PatchMerging's stride-2 conv2
    x, y = io64
    with torch.no_grad():
        torch.testing.assert_close(folded(x), y)


def test_float32_within_numerics_rule(stock64, io64):
    x, oracle = io64
    stock32 = copy.deepcopy(stock64).float()
    folded32 = sk.convert(copy.deepcopy(stock32), inference=True)
    with torch.no_grad():
        stock, out = stock32(x.float()), folded32(x.float())
    assert_close_to_oracle(out, stock, oracle, atol=1e-5)


def test_keys_and_values_are_the_official_deploy_models(stock64):
    folded = sk.convert(copy.deepcopy(stock64), inference=True).state_dict()
    official = replace_batchnorm(copy.deepcopy(stock64)).state_dict()
    assert list(folded) == list(official)
    for k, v in official.items():
        torch.testing.assert_close(folded[k], v, msg=k)
    # a deploy checkpoint loads strictly into the folded model
    sk.convert(shvit_s1(num_classes=10, fused=False).double(), inference=True).load_state_dict(official)


def test_idempotent_and_on_fused_models(stock64, io64):
    fused = sk.convert(copy.deepcopy(stock64))
    folded = sk.convert(fused, inference=True)
    with pytest.warns(UserWarning, match="nothing to convert"):
        again = sk.convert(folded, inference=True)
    x, y = io64
    with torch.no_grad():
        torch.testing.assert_close(again(x), y)


def test_timm_model():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    from shvit_kernels.models.timm_compat import import_timm

    stock = randomize_bn(import_timm().create_model("shvit_s1", pretrained=False, num_classes=10)).double().eval()
    folded = sk.convert(copy.deepcopy(stock), inference=True)
    assert list(folded.state_dict()) == list(replace_batchnorm(copy.deepcopy(stock)).state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), stock(x))
