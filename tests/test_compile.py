"""torch.compile(fullgraph=True) over fused modules (no graph breaks), eval and training, and torch.export."""
import copy

import torch

import shvit_kernels as sk
from shvit_kernels import reference as R
from tests.helpers import bn_states, randomize_bn


def _models():
    stock = torch.nn.Sequential(R.residual_dwconv(16), R.Residual(R.SHSA(16, 4, 6)), R.PatchMerging(16, 24))
    randomize_bn(stock)
    # The fused cumulative-average path (momentum=None) must compile without a graph break too (stock
    # nn.BatchNorm2d with momentum=None does not compile with fullgraph=True, so only fused BNs get it).
    for bn in (stock[0].m.bn, stock[1].m.qkv.bn, stock[1].m.proj[1].bn):
        bn.momentum = None
    return stock, sk.convert(copy.deepcopy(stock))


def test_compile_fullgraph_eval_and_train():
    torch._dynamo.reset()
    stock, fused = _models()
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), stock.eval()(x), atol=1e-5, rtol=1e-4)
    stock.train(), fused.train()
    xg = x.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    y, ys = compiled(xg), stock(xs)
    torch.testing.assert_close(y, ys, atol=1e-5, rtol=1e-4)
    y.square().sum().backward()
    ys.square().sum().backward()
    torch.testing.assert_close(xg.grad, xs.grad, atol=1e-4, rtol=1e-3)
    for (k, a), b in zip(bn_states(fused).items(), bn_states(stock).values()):
        torch.testing.assert_close(a, b, msg=k)


def test_export_keeps_custom_ops():
    _, fused = _models()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        program = torch.export.export(fused.eval(), (x,))
        targets = {str(n.target) for n in program.graph.nodes}
        assert {"shvit.dwconv_bn.default", "shvit.shsa.default"} <= targets
        torch.testing.assert_close(program.module()(x), fused(x))
