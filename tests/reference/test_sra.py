"""PVT's spatial-reduction attention (v1 conv reduction, v2 linear) in float64 against a per-head formula."""
import pytest
import torch
import torch.nn.functional as F

from shvit_kernels.reference import SRA

D = torch.float64


def layer_norm(t, ln):
    mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    return (t - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def sra_formula(m, x, h, w):
    b, n, c = x.shape
    img = x.transpose(1, 2).reshape(b, c, h, w)
    if m.linear:
        pooled = F.adaptive_avg_pool2d(img, 7)
        red = torch.einsum("oi,bihw->bohw", m.sr.weight.flatten(1), pooled) + m.sr.bias.view(1, -1, 1, 1)
        kv_in = F.gelu(layer_norm(red.flatten(2).transpose(1, 2), m.norm))
    elif m.sr_ratio > 1:
        r = m.sr_ratio
        patches = F.unfold(img, r, stride=r)  # (B, C*r*r, M)
        red = m.sr.weight.flatten(1) @ patches + m.sr.bias[:, None]
        kv_in = layer_norm(red.transpose(1, 2), m.norm)
    else:
        kv_in = x
    q = x @ m.q.weight.t() + (m.q.bias if m.q.bias is not None else 0)
    kv = kv_in @ m.kv.weight.t() + (m.kv.bias if m.kv.bias is not None else 0)
    k, v = kv[..., :c], kv[..., c:]
    hd = c // m.num_heads
    outs = []
    for i in range(m.num_heads):
        s = slice(i * hd, (i + 1) * hd)
        logits = q[..., s] @ k[..., s].transpose(1, 2) * m.scale
        outs.append(torch.softmax(logits, -1) @ v[..., s])
    return torch.cat(outs, -1) @ m.proj.weight.t() + m.proj.bias


@pytest.mark.parametrize("dim,heads,sr,linear,h,w,qkv_bias", [
    (32, 1, 8, False, 16, 16, True), (64, 2, 4, False, 8, 12, False), (40, 5, 2, False, 6, 6, True),
    (48, 8, 1, False, 5, 3, True), (32, 2, 1, True, 14, 14, True), (32, 4, 1, True, 9, 11, False)])
def test_sra_matches_formula(dim, heads, sr, linear, h, w, qkv_bias):
    m = SRA(dim, heads, qkv_bias=qkv_bias, sr_ratio=sr, linear=linear).to(D).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, h * w, dim, dtype=D)
    torch.testing.assert_close(m(x, h, w), sra_formula(m, x, h, w))


def test_sra_keys_follow_pvt():
    assert set(SRA(64, 2, sr_ratio=2).state_dict()) == {"q.weight", "kv.weight", "proj.weight", "proj.bias",
                                                        "sr.weight", "sr.bias", "norm.weight", "norm.bias"}
    assert set(SRA(64, 2, qkv_bias=True).state_dict()) == {"q.weight", "q.bias", "kv.weight", "kv.bias",
                                                           "proj.weight", "proj.bias"}


def test_sra_scale_and_bad_config():
    assert SRA(64, 2).scale == 32 ** -0.5 and SRA(64, 2, qk_scale=0.1).scale == 0.1
    with pytest.raises(ValueError, match="num_heads"):
        SRA(30, 4)
    with pytest.raises(ValueError, match="sr_ratio"):
        SRA(32, 4, sr_ratio=0)
