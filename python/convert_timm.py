"""Convert a timm SHViT to fused kernels and compare its outputs with the stock model.

    python python/convert_timm.py --model shvit_s1 --batch 2 --size 224
"""
import argparse
import copy

import torch

import shvit_kernels as sk
from shvit_kernels.models.timm_compat import import_timm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shvit_s1", choices=["shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()

    stock = import_timm().create_model(args.model, pretrained=False).eval()
    fused = sk.convert(copy.deepcopy(stock))
    assert list(fused.state_dict()) == list(stock.state_dict()), "state_dict keys must not change"
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        a, b = stock(x), fused(x)
    err = (a - b).abs().max().item()
    print(f"{args.model}: max |stock - fused| = {err:.2e} over logits of scale {a.abs().max().item():.2e}")
    assert err <= 1e-4 * max(1.0, a.abs().max().item()), "fused model disagrees with timm's"


if __name__ == "__main__":
    main()
