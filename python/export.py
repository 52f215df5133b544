"""Export a fused SHViT with torch.export (the shvit ops appear as custom ops in the graph) and check it;
optionally fold its BatchNorms for deployment and export an ONNX file that onnxruntime runs.

    python python/export.py --model shvit_s1 --size 224 --out shvit_s1.pt2 --onnx shvit_s1.onnx
"""
import argparse
import importlib.util

import torch

import shvit_kernels as sk
from shvit_kernels import models


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: str, custom_ops: bool) -> None:
    folded = sk.convert(model, inference=True)  # BN folded into plain convs: the deployment form
    sk.export_onnx(folded, x, path, custom_ops=custom_ops, dynamic_batch=True)
    print(f"saved {path} ({'shvit custom-domain nodes' if custom_ops else 'standard ONNX ops only'})")
    if custom_ops or importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    xb = torch.cat([x, x[:1]])  # another batch size: the batch dim is dynamic
    (y,) = session.run(None, {session.get_inputs()[0].name: xb.numpy()})
    with torch.no_grad():
        err = (torch.from_numpy(y) - folded(xb)).abs().max().item()
    print(f"max |onnxruntime - eager| = {err:.2e}")
    assert err <= 1e-4, "the ONNX file disagrees with PyTorch"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shvit_s1", choices=["shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default=None, help="save the ExportedProgram here (torch.export.save)")
    p.add_argument("--onnx", default=None, help="also fold the BNs and export ONNX here (needs onnx, onnxscript)")
    p.add_argument("--custom-ops", action="store_true", help="ONNX: keep the fused ops as `shvit` domain nodes")
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
    if args.onnx:
        export_onnx(model, x, args.onnx, args.custom_ops)


if __name__ == "__main__":
    main()
