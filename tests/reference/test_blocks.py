"""Every reference block in float64 against an independent formula written here with plain tensor algebra."""
import pytest
import torch
import torch.nn.functional as F

from shvit_kernels import reference as R
from tests.helpers import rand_bn_

D = torch.float64


def bn_eval(z, bn):
    shape = (1, -1) + (1,) * (z.dim() - 2)
    return (z - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) \
        * bn.weight.view(shape) + bn.bias.view(shape)


def conv1x1(x, w):  # (B, I, H, W) x (O, I, 1, 1) by einsum, not conv2d
    return torch.einsum("oi,bihw->bohw", w.flatten(1), x)


def test_conv2d_bn_eval_and_fuse():
    m = R.Conv2d_BN(6, 10, 3, 2, 1, groups=2).to(D).eval()
    rand_bn_(m.bn)
    x = torch.randn(3, 6, 9, 7, dtype=D)
    ref = bn_eval(F.conv2d(x, m.c.weight, None, 2, 1, 1, 2), m.bn)
    torch.testing.assert_close(m(x), ref)
    torch.testing.assert_close(m.fuse()(x), ref)
    assert m.c.bias is None and list(m.state_dict())[:2] == ["c.weight", "bn.weight"]


def test_conv2d_bn_train_uses_batch_stats():
    m = R.Conv2d_BN(4, 5).to(D).train()
    rand_bn_(m.bn)
    x = torch.randn(2, 4, 3, 3, dtype=D)
    z = conv1x1(x, m.c.weight)
    mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    ref = (z - mean) / torch.sqrt(var + 1e-5) * m.bn.weight.view(1, -1, 1, 1) + m.bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), ref)


def test_bn_weight_init():
    assert torch.all(R.Conv2d_BN(3, 4, bn_weight_init=0).bn.weight == 0)
    assert torch.all(R.Conv2d_BN(3, 4).bn.weight == 1)


def test_bn_linear_eval_and_fuse():
    m = R.BN_Linear(12, 7).to(D).eval()
    rand_bn_(m.bn)
    with torch.no_grad():
        m.l.bias.normal_()
    x = torch.randn(5, 12, dtype=D)
    ref = bn_eval(x, m.bn) @ m.l.weight.t() + m.l.bias
    torch.testing.assert_close(m(x), ref)
    torch.testing.assert_close(m.fuse()(x), ref)


def test_groupnorm1_is_per_sample_over_chw():
    m = R.GroupNorm1(6).to(D)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(3, 6, 4, 5, dtype=D) * 3 + 1
    mean = x.mean((1, 2, 3), keepdim=True)
    var = x.var((1, 2, 3), unbiased=False, keepdim=True)
    ref = (x - mean) / torch.sqrt(var + 1e-5) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), ref)


@pytest.mark.parametrize("k", [3, 5])
def test_residual_depthwise_fold(k):
    r = R.Residual(R.Conv2d_BN(8, 8, k, 1, k // 2, groups=8)).to(D).eval()
    rand_bn_(r.m.bn)
    x = torch.randn(2, 8, 7, 6, dtype=D)
    ref = x + bn_eval(F.conv2d(x, r.m.c.weight, None, 1, k // 2, 1, 8), r.m.bn)
    torch.testing.assert_close(r(x), ref)
    torch.testing.assert_close(r.fuse()(x), ref)


def test_residual_fold_rejects_non_depthwise_and_passes_through_others():
    with pytest.raises(ValueError, match="depthwise"):
        R.Residual(R.Conv2d_BN(8, 8, 3, 2, 1, groups=8)).fuse()
    ffn = R.Residual(R.FFN(4, 8))
    assert ffn.fuse() is ffn


def test_residual_stochastic_depth_in_training_only():
    r = R.Residual(torch.nn.Identity(), drop=0.5).train()
    x = torch.ones(64, 1, 1, 1, dtype=D)
    out = r(x).flatten()
    assert set(out.tolist()) <= {1.0, 3.0} and 1.0 in out and 3.0 in out
    torch.testing.assert_close(r.eval()(x), 2 * x)


def test_ffn():
    m = R.FFN(6, 12).to(D).eval()
    rand_bn_(m.pw1.bn)
    rand_bn_(m.pw2.bn)
    x = torch.randn(2, 6, 5, 3, dtype=D)
    ref = bn_eval(conv1x1(bn_eval(conv1x1(x, m.pw1.c.weight), m.pw1.bn).clamp_min(0), m.pw2.c.weight), m.pw2.bn)
    torch.testing.assert_close(m(x), ref)
    assert torch.all(R.FFN(6, 12).pw2.bn.weight == 0)


@pytest.mark.parametrize("channels,expected", [(512, 128), (896, 224), (1344, 336), (44, 8), (20, 8)])
def test_squeeze_excite_width(channels, expected):
    # round(0.25 * C) to a multiple of 8, at least 8, never bumped up (timm's round_limit=0)
    se = R.SqueezeExcite(channels, 0.25)
    assert se.fc1.out_channels == expected and se.fc2.in_channels == expected


def test_squeeze_excite_and_patch_merging():
    pm = R.PatchMerging(8, 12).to(D).eval()
    for bn in (pm.conv1.bn, pm.conv2.bn, pm.conv3.bn):
        rand_bn_(bn)
    x = torch.randn(2, 8, 9, 7, dtype=D)
    h = bn_eval(conv1x1(x, pm.conv1.c.weight), pm.conv1.bn).clamp_min(0)
    h = bn_eval(F.conv2d(h, pm.conv2.c.weight, None, 2, 1, 1, 32), pm.conv2.bn).clamp_min(0)
    s = h.mean((2, 3))
    gate = torch.sigmoid((s @ pm.se.fc1.weight.flatten(1).t() + pm.se.fc1.bias).clamp_min(0)
                         @ pm.se.fc2.weight.flatten(1).t() + pm.se.fc2.bias)
    ref = bn_eval(conv1x1(h * gate[:, :, None, None], pm.conv3.c.weight), pm.conv3.bn)
    out = pm(x)
    assert out.shape == (2, 12, 5, 4)
    torch.testing.assert_close(out, ref)


def shsa_formula(m, x):
    """SHSA written token by token with explicit softmax, from the paper's equations."""
    b, c, h, w = x.shape
    p, qk = m.pdim, m.qk_dim
    x1 = x[:, :p]
    mean = x1.mean((1, 2, 3), keepdim=True)
    var = x1.var((1, 2, 3), unbiased=False, keepdim=True)
    x1 = (x1 - mean) / torch.sqrt(var + 1e-5) * m.pre_norm.weight.view(1, -1, 1, 1) + m.pre_norm.bias.view(1, -1, 1, 1)
    qkv = bn_eval(conv1x1(x1, m.qkv.c.weight), m.qkv.bn).reshape(b, -1, h * w)
    q, k, v = qkv[:, :qk], qkv[:, qk:2 * qk], qkv[:, 2 * qk:]
    logits = torch.einsum("bdi,bdj->bij", q, k) / qk ** 0.5
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    attn = e / e.sum(-1, keepdim=True)
    o = torch.einsum("bcj,bij->bci", v, attn).reshape(b, p, h, w)
    u = torch.cat([o, x[:, p:]], 1).clamp_min(0)
    return bn_eval(conv1x1(u, m.proj[1].c.weight), m.proj[1].bn)


@pytest.mark.parametrize("dim,pdim,h,w", [(24, 8, 4, 4), (20, 20, 3, 5), (30, 7, 1, 1), (16, 5, 7, 9)])
def test_shsa(dim, pdim, h, w):
    m = R.SHSA(dim, 4, pdim).to(D).eval()
    rand_bn_(m.qkv.bn)
    rand_bn_(m.proj[1].bn)
    with torch.no_grad():
        m.pre_norm.weight.normal_()
        m.pre_norm.bias.normal_()
    x = torch.randn(2, dim, h, w, dtype=D)
    torch.testing.assert_close(m(x), shsa_formula(m, x))
    keys = [k for k in m.state_dict() if "running" not in k and "num_batches" not in k]
    assert keys == ["pre_norm.weight", "pre_norm.bias", "qkv.c.weight", "qkv.bn.weight", "qkv.bn.bias",
                    "proj.1.c.weight", "proj.1.bn.weight", "proj.1.bn.bias"]


@pytest.mark.parametrize("args,match", [((8, 4, 9), "pdim"), ((8, 0, 4), "qk_dim"), ((8, 4, 0), "pdim")])
def test_shsa_bad_config(args, match):
    with pytest.raises(ValueError, match=match):
        R.SHSA(*args)


def test_basic_block_types():
    s, i = R.BasicBlock(16, 4, 8, "s"), R.BasicBlock(16, 4, 8, "i")
    assert isinstance(s.mixer.m, R.SHSA) and isinstance(i.mixer, torch.nn.Identity)
    assert torch.all(s.conv.m.bn.weight == 0)  # the block's depthwise BN starts at 0 (identity at init)
    with pytest.raises(ValueError, match="type"):
        R.BasicBlock(16, 4, 8, "x")
    blk = s.to(D).eval()
    for mod in blk.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            rand_bn_(mod)
    x = torch.randn(2, 16, 5, 5, dtype=D)
    y = x + bn_eval(F.conv2d(x, blk.conv.m.c.weight, None, 1, 1, 1, 16), blk.conv.m.bn)
    y = y + shsa_formula(blk.mixer.m, y)
    y = y + blk.ffn.m(y)
    torch.testing.assert_close(blk(x), y)
