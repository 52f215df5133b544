"""SHViT S1-S4: official configs pinned by parameter and multiply-accumulate counts; official key layout;
fused models equal to stock ones in eval and training (running statistics included)."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from shvit_kernels import models
from shvit_kernels.nn import ResidualDWConvBN, ResidualSHSA
from tests.helpers import bn_states, randomize_bn

PARAMS = {"shvit_s1": 6_330_808, "shvit_s2": 11_483_072, "shvit_s3": 14_245_273, "shvit_s4": 16_588_484}
MACS = {"shvit_s1": (224, 241.3), "shvit_s2": (224, 365.4), "shvit_s3": (224, 600.6), "shvit_s4": (256, 986.2)}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_and_mac_counts(name):
    model = getattr(models, name)(fused=False).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    res, macs = MACS[name]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, res, res))
    assert round(counter.get_total_flops() / 2 / 1e6, 1) == macs


def test_official_key_layout():
    keys = set(models.shvit_s1(fused=False).state_dict())
    for k in ["patch_embed.0.c.weight", "patch_embed.6.bn.running_var", "blocks1.0.conv.m.c.weight",
              "blocks1.1.ffn.m.pw2.bn.weight", "blocks2.0.0.m.c.weight", "blocks2.0.1.m.pw1.c.weight",
              "blocks2.1.conv1.c.weight", "blocks2.1.se.fc1.bias", "blocks2.1.conv3.bn.bias",
              "blocks2.2.0.m.bn.weight", "blocks2.3.mixer.m.pre_norm.weight", "blocks2.3.mixer.m.qkv.c.weight",
              "blocks2.3.mixer.m.proj.1.c.weight", "blocks3.7.mixer.m.qkv.bn.num_batches_tracked",
              "head.bn.weight", "head.l.bias"]:
        assert k in keys, k
    assert not any(k.startswith("blocks1.") and ".mixer." in k for k in keys)  # stage 1 is type "i"
    assert "blocks3.8.conv.m.c.weight" not in keys


def test_distillation_head_averages_in_eval():
    m = models.shvit_s1(num_classes=5, fused=False, distillation=True)
    randomize_bn(m)
    x = torch.randn(2, 3, 64, 64)
    out = m.train()(x)
    assert isinstance(out, tuple) and len(out) == 2
    m.eval()
    with torch.no_grad():
        feats = torch.nn.functional.adaptive_avg_pool2d(m.forward_features(x), 1).flatten(1)
        torch.testing.assert_close(m(x), (m.head(feats) + m.head_dist(feats)) / 2)


def test_no_head():
    m = models.shvit_s1(num_classes=0, fused=False).eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 320)


def test_fused_model_is_converted_and_keeps_keys():
    fused, stock = models.shvit_s2(fused=True), models.shvit_s2(fused=False)
    assert list(fused.state_dict()) == list(stock.state_dict())
    assert isinstance(fused.blocks2[3].mixer, ResidualSHSA) and isinstance(fused.blocks1[0].conv, ResidualDWConvBN)
    stock.load_state_dict(fused.state_dict(), strict=True)


@pytest.mark.parametrize("train", [False, True])
def test_fused_equals_stock_float64(train):
    stock = randomize_bn(models.shvit_s1(num_classes=10, fused=False)).double()
    fused = models.shvit_s1(num_classes=10, fused=True).double()
    fused.load_state_dict(stock.state_dict(), strict=True)
    stock.train(train)
    fused.train(train)
    x = torch.randn(2, 3, 96, 80, dtype=torch.float64)
    torch.testing.assert_close(fused(x), stock(x))
    if train:
        fused(x), stock(x)  # a second step: running stats must keep agreeing
        for (k, a), b in zip(bn_states(fused).items(), bn_states(stock).values()):
            torch.testing.assert_close(a, b, msg=k)


def test_fused_model_backward_matches_stock():
    stock = randomize_bn(models.shvit_s1(num_classes=10, fused=False)).double().train()
    fused = copy.deepcopy(stock)
    from shvit_kernels import convert
    convert(fused)
    # 128 px, batch 4: 16 values per channel in stage 3's BatchNorms (fewer makes the check ill-conditioned)
    x = torch.randn(4, 3, 128, 128, dtype=torch.float64)
    stock(x).square().sum().backward()
    fused(x).square().sum().backward()
    for (name, a), b in zip(fused.named_parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9 * b.grad.abs().max().item() + 1e-12, rtol=1e-7, msg=name)
