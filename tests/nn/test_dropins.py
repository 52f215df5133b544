"""Fused drop-ins: same keys and outputs as the stock modules in eval and training, running stats updated
exactly as nn.BatchNorm2d, eval folds cached and refreshed when weights change; convert()."""
import copy
import warnings

import pytest
import torch
from torch.nn.utils import parametrize, prune

import shvit_kernels as sk
from shvit_kernels import nn as fnn
from shvit_kernels import reference as R
from tests.helpers import bn_states, randomize_bn

D = torch.float64


def _pair(stock):
    stock = randomize_bn(stock).to(D)
    holder = torch.nn.Sequential(copy.deepcopy(stock))
    return stock, sk.convert(holder)[0]


STOCKS = {
    "residual_dwconv": (lambda: R.residual_dwconv(13), (3, 13, 7, 9)),
    "residual_dwconv_k5": (lambda: R.Residual(R.Conv2d_BN(8, 8, 5, 1, 2, groups=8)), (2, 8, 5, 6)),
    "patch_merging": (lambda: R.PatchMerging(6, 10), (2, 6, 9, 7)),
    "residual_shsa": (lambda: R.Residual(R.SHSA(20, 4, 7)), (3, 20, 5, 3)),
    "shsa": (lambda: R.SHSA(12, 16, 12), (2, 12, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(STOCKS))
def test_eval_and_train_match_stock(name):
    make, shape = STOCKS[name]
    stock, fused = _pair(make())
    assert type(fused) is not type(stock)
    assert list(fused.state_dict()) == list(stock.state_dict())
    x = torch.randn(shape, dtype=D)
    stock.eval(), fused.eval()
    torch.testing.assert_close(fused(x), stock(x))
    stock.train(), fused.train()
    for step in range(3):
        x = torch.randn(shape, dtype=D)
        torch.testing.assert_close(fused(x), stock(x))
        for (k, a), b in zip(bn_states(fused).items(), bn_states(stock).values()):
            torch.testing.assert_close(a, b, msg=f"{k} after step {step}")


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("name", sorted(STOCKS))
def test_pruned_and_parametrized_weights_fold_like_plain_ones(name):
    """A pruned conv weight (weight_orig * mask, no longer a parameter) and a parametrized one (a property) reach
    the eval fold as the stock forward sees them."""
    make, shape = STOCKS[name]
    stock = make()
    convs = [m for m in stock.modules() if isinstance(m, torch.nn.Conv2d)]
    torch.manual_seed(0)
    with torch.no_grad():  # a grad-tracking pruned weight is a non-leaf, which deepcopy (in _pair) refuses
        prune.random_unstructured(convs[0], "weight", amount=0.5)
    if len(convs) > 1:
        parametrize.register_parametrization(convs[-1], "weight", _Double())
    stock, fused = _pair(stock)
    x = torch.randn(shape, dtype=D)
    stock.eval(), fused.eval()
    torch.testing.assert_close(fused(x), stock(x))


def test_momentum_none_is_cumulative_average():
    stock, fused = _pair(R.residual_dwconv(5))
    for m in (stock, fused):
        m.m.bn.momentum = None
        m.train()
    for _ in range(3):
        x = torch.randn(2, 5, 4, 4, dtype=D)
        stock(x), fused(x)
    torch.testing.assert_close(fused.m.bn.running_var, stock.m.bn.running_var)
    assert int(fused.m.bn.num_batches_tracked) == 3


def test_eval_fold_is_cached_and_refreshed_on_change():
    stock, fused = _pair(R.residual_dwconv(6))
    stock.eval(), fused.eval()
    x = torch.randn(2, 6, 5, 5, dtype=D)
    with torch.no_grad():
        fused(x)
        key = fused._fold._key
        fused(x)
        assert fused._fold._key is key  # nothing changed: no re-fold
        for m in (stock, fused):
            m.m.c.weight.mul_(1.5)
            m.m.bn.running_var.add_(0.25)
        torch.testing.assert_close(fused(x), stock(x))
        assert fused._fold._key != key
    sd = {k: v + 0.1 if v.is_floating_point() else v for k, v in stock.state_dict().items()}
    stock.load_state_dict(sd), fused.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x))


def test_eval_mode_gradients_flow_through_the_fold():
    stock, fused = _pair(R.residual_dwconv(4))
    stock.eval(), fused.eval()
    x = torch.randn(2, 4, 5, 5, dtype=D)
    stock(x).sum().backward()
    fused(x).sum().backward()
    for (k, a), b in zip(fused.named_parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=k)


def test_shsa_public_constructor_matches_stock():
    fused, stock = sk.SHSA(64, 16, 24), R.SHSA(64, 16, 24)
    assert list(fused.state_dict()) == list(stock.state_dict())
    fused.load_state_dict(stock.state_dict())
    assert fused.qk_dim == 16 and fused.pdim == 24 and fused.scale == 0.25


def test_from_module_rejects_wrong_modules():
    with pytest.raises(TypeError, match="not an SHSA"):
        fnn.SHSA.from_module(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="stride-1 depthwise"):
        fnn.ResidualDWConvBN.from_module(R.Residual(R.FFN(4, 8)))


def test_convert_is_idempotent_and_warns_when_nothing_to_do():
    model = torch.nn.Sequential(R.residual_dwconv(4), R.Residual(R.SHSA(8, 4, 4)))
    sk.convert(model)
    first = [type(m) for m in model]
    with pytest.warns(UserWarning, match="nothing to convert"):
        sk.convert(model)
    assert [type(m) for m in model] == first
    with pytest.warns(UserWarning, match="nothing to convert"):
        sk.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="holds the block"):
            sk.convert(R.residual_dwconv(4))
