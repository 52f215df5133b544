"""convert()'s channels_last entry on the CPU: an NCHW image batch enters the converted model channels_last (a
forward pre-hook), outputs and gradients equal stock's, and channels_last=False leaves the layout alone."""
import copy
import io

import pytest
import torch

import shvit_kernels as sk
from shvit_kernels.convert import _to_channels_last
from shvit_kernels.models.shvit import SHViT
from shvit_kernels.nn import ResidualFFN
from tests.helpers import randomize_bn


def _stock():
    model = SHViT(num_classes=5, embed_dim=(16, 24, 32), partial_dim=(8, 10, 12), qk_dim=(4, 4, 4), depth=(1, 1, 1),
                  types=("i", "s", "s"))
    return randomize_bn(model).double()


def _ffn_input_layouts(model, x):
    """Whether each fused FFN block of model saw a channels_last input when model ran on x."""
    seen = []

    def record(m, args):
        x = args[0]
        if x.shape[2] * x.shape[3] > 1:  # a 1x1 map is in both layouts
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, ResidualFFN)]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def _hooks(model):
    return [h for h in model._forward_pre_hooks.values() if h is _to_channels_last]


def _input_grad(model, x, g=None):
    x = x.clone().requires_grad_()
    y = model(x)
    g = torch.randn_like(y) if g is None else g
    y.backward(g)
    return y, x.grad, g


@pytest.mark.parametrize("train", [False, True])
def test_nchw_input_runs_channels_last_with_stock_outputs(train):
    stock = _stock().train(train)
    fused = sk.convert(copy.deepcopy(stock)).train(train)
    stock_cl = copy.deepcopy(stock)
    x = torch.randn(4, 3, 64, 48, dtype=torch.float64)  # the head's BatchNorm1d on 2 images is degenerate
    assert x.is_contiguous()
    ys, gs, g = _input_grad(stock, x)
    yf, gf, _ = _input_grad(fused, x, g)
    torch.testing.assert_close(yf, ys, rtol=1e-10, atol=1e-10)
    # Training-mode BatchNorms on small maps amplify rounding in the input gradient (stock itself, run channels_last,
    # differs from stock NCHW; on 2 images by up to 5e-8 of the gradient's scale). That difference is the rounding
    # floor; the fused model must stay within a few times it. On 4 images the floor stays near 1e-12 of the scale,
    # where one float32 rounding of the output gradient alone lands >50x outside the tolerance.
    floor = (_input_grad(stock_cl, x.contiguous(memory_format=torch.channels_last), g)[1] - gs).abs().max().item()
    scale = gs.abs().max().item()
    assert floor <= 1e-10 * scale, (floor, scale)  # the floor is rounding, not a broken stock run
    torch.testing.assert_close(gf, gs, rtol=0, atol=1e-10 * scale + 4 * floor)
    assert gf.is_contiguous()  # the input's gradient keeps the input's layout
    with torch.no_grad():
        seen = _ffn_input_layouts(copy.deepcopy(fused), x)
    assert seen and all(seen)


def test_channels_last_false_keeps_nchw_and_toggles():
    fused = sk.convert(_stock(), channels_last=False).eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert not any(_ffn_input_layouts(fused, x))
    with pytest.warns(UserWarning, match="nothing to convert"):
        sk.convert(fused)  # already converted: only the entry is switched on
    assert len(_hooks(fused)) == 1
    with pytest.warns(UserWarning):
        sk.convert(fused)
    assert len(_hooks(fused)) == 1  # idempotent
    with pytest.warns(UserWarning):
        sk.convert(fused, channels_last=False)
    assert _hooks(fused) == []


def test_entry_survives_deepcopy_and_pickle():
    fused = sk.convert(_stock()).eval()
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for m in (copy.deepcopy(fused), torch.load(buf, weights_only=False)):
        assert len(_hooks(m)) == 1
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(m(x), fused(x), rtol=0, atol=0)


def test_no_channels_last_entry_under_autocast():
    """Under CPU autocast the fused ops run their fp16 / bf16 reference kernels: the input keeps its layout."""
    fused = sk.convert(_stock().float()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(_ffn_input_layouts(fused, x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not any(_ffn_input_layouts(fused, x))
