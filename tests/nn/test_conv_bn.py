"""ConvBN: the stem's / PatchMerging's conv-BN (+ReLU) with BN folded in eval (oneDNN's fused ReLU on the CPU):
same keys and outputs as the stock pair in eval and training, fold refreshed on change, and convert() taking the
ReLU after a stem conv in (and giving it back when folding for inference)."""
import copy

import pytest
import torch

import shvit_kernels as sk
from shvit_kernels import reference as R
from shvit_kernels.models import shvit_s1
from shvit_kernels.nn import ConvBN, FusedReLU
from tests.helpers import assert_close_to_oracle, bn_states, randomize_bn

CONFIGS = {"stem 3x3 s2": (5, 12, 3, 2, 1), "1x1": (7, 9, 1, 1, 0)}


def _pair(cfg, relu):
    stock = randomize_bn(R.Conv2d_BN(*cfg))
    fused = ConvBN.from_module(copy.deepcopy(stock), relu=relu)
    stock = torch.nn.Sequential(stock, torch.nn.ReLU()) if relu else stock
    return stock, fused


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eval_matches_stock_fp32_and_fp64(name, channels_last, relu):
    stock, fused = _pair(CONFIGS[name], relu)
    stock.eval(), fused.eval()
    x = torch.randn(3, CONFIGS[name][0], 11, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, ref = fused(x), stock(x)  # float32 on the CPU: oneDNN's conv with the ReLU as a post-op
        oracle = copy.deepcopy(stock).double()(x.double())
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.shape == ref.shape and out.is_contiguous(memory_format=fmt)
        assert_close_to_oracle(out, ref, oracle)
        if relu:
            assert (out >= 0).all() and (out == 0).any()
        torch.testing.assert_close(fused.double()(x.double()), oracle, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("relu", [False, True])
def test_train_matches_stock_and_updates_running_stats(relu):
    stock, fused = _pair(CONFIGS["stem 3x3 s2"], relu)
    stock.double().train(), fused.double().train()
    for step in range(3):
        x = torch.randn(4, 5, 9, 8, dtype=torch.float64, requires_grad=True)
        out, ref = fused(x), stock(x)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
        for (k, a), b in zip(bn_states(fused).items(), bn_states(stock).values()):
            torch.testing.assert_close(a, b, msg=f"{k} after step {step}")


def test_eval_gradients_flow_through_the_fold_and_fold_refreshes():
    stock, fused = _pair(CONFIGS["1x1"], True)
    stock.double().eval(), fused.double().eval()
    x = torch.randn(2, 7, 6, 5, dtype=torch.float64)
    fused(x).square().sum().backward()
    stock(x).square().sum().backward()
    for (k, a), b in zip(fused.named_parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=k)
    with torch.no_grad():
        fused(x)
        key = fused._fold._key
        fused.c.weight.mul_(1.5), stock[0].c.weight.mul_(1.5)
        fused.bn.running_var.add_(0.25), stock[0].bn.running_var.add_(0.25)
        torch.testing.assert_close(fused(x), stock(x))
        assert fused._fold._key != key


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="ConvBN.from_module needs"):
        ConvBN.from_module(torch.nn.Conv2d(3, 3, 1))


def test_convert_takes_the_stem_relus_in_and_inference_gives_them_back():
    stock = randomize_bn(shvit_s1(num_classes=10, fused=False)).double().eval()
    fused = sk.convert(copy.deepcopy(stock))
    kinds = [type(m) for m in fused.patch_embed]
    assert kinds == [ConvBN, FusedReLU] * 3 + [ConvBN], kinds
    assert [m.relu for m in fused.patch_embed[::2]] == [True, True, True, False]
    pm = fused.blocks2[1]
    assert isinstance(pm.conv1, ConvBN) and pm.conv1.relu and isinstance(pm.conv3, ConvBN) and not pm.conv3.relu
    assert list(fused.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x))
        folded = sk.convert(copy.deepcopy(fused), inference=True)
        assert [type(m) for m in folded.patch_embed] == [torch.nn.Conv2d, torch.nn.ReLU] * 3 + [torch.nn.Conv2d]
        torch.testing.assert_close(folded(x), stock(x))
