"""Export a fused SHViT with torch.export (the shvit ops appear as custom ops in the graph) and check it.

    python python/export.py --model shvit_s1 --size 224 --out shvit_s1.pt2
"""
import argparse

import torch

from shvit_kernels import models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shvit_s1", choices=["shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default=None, help="save the ExportedProgram here (torch.export.save)")
    args = p.parse_args()

    model = getattr(models, args.model)(fused=True).eval()
    x = torch.randn(2, 3, args.size, args.size)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        ours = sorted({str(n.target) for n in program.graph.nodes if "shvit" in str(n.target)})
        print(f"exported {args.model}; custom ops in the graph: {', '.join(ours)}")
        err = (program.module()(x) - model(x)).abs().max().item()
    print(f"max |exported - eager| = {err:.2e}")
    assert ours and err <= 1e-5, "export lost the fused ops or changed the result"
    if args.out:
        torch.export.save(program, args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
