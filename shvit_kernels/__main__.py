"""`python -m shvit_kernels info | bench`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys

import torch


def _info() -> int:
    from . import __version__, backends

    print(f"shvit_kernels {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print(f"cpu threads {torch.get_num_threads()}")
    for i in range(torch.cuda.device_count()):
        print(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    print(f"backend setting: {backends.current_backend()} (${backends.ENV_VAR} or use_backend())")
    print("backends:")
    for name, (ok, why) in backends.availability().items():
        print(f"  {name:10s} {'available  ' if ok else 'unavailable'}  {why}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("auto picks:")
    for op in backends.registered_ops():
        for dev in devices:
            for dtype in (torch.float32, torch.float16):
                try:
                    name, why = backends.choose(op, torch.device(dev), dtype)
                except backends.BackendUnavailableError as exc:
                    name, why = "none", str(exc)
                print(f"  {op:10s} {dev:4s} {str(dtype).removeprefix('torch.'):8s} -> {name}: {why}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"device {device}  dtype {args.dtype}  torch {torch.__version__}  cpu threads {torch.get_num_threads()}  "
          f"batch {args.batch}  (times: median ms, same run)")
    results = []
    modes = ["eval fwd", "train fwd+bwd"] if args.mode == "all" else [args.mode]
    for case in bench.cases(args.batch):
        if args.ops and case.op not in args.ops:
            continue
        for mode in modes:
            results.append(bench.run_case(case, mode, device, dtype, args.compile, args.reps))
    print(bench.format_table(results))
    overhead = bench.dispatch_overhead_us(device)
    print("dispatch overhead per call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in overhead.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "results": [dataclasses.asdict(r) for r in results], "dispatch_overhead_us": overhead},
                      f, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shvit_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, backends (and why any is unavailable), auto's choices")
    b = sub.add_parser("bench", help="stock vs fused microbenchmarks on the device at hand")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--ops", nargs="*", help="only these ops (dwconv_bn, shsa)")
    b.add_argument("--mode", default="all", choices=["all", "eval fwd", "train fwd+bwd"])
    b.add_argument("--compile", action="store_true", help="add a torch.compile(stock, max-autotune) column")
    b.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    b.add_argument("--reps", type=int, default=20)
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    return _info() if args.cmd == "info" else _bench(args)


if __name__ == "__main__":
    sys.exit(main())
