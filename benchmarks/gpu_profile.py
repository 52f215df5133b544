"""Where an op case's time goes, kernel by kernel: stock eager against the fused module on each backend.

    python -m benchmarks.gpu_profile [--device cuda] [--dtype float16] [--batch 256] [--ops shsa ...]
        [--mode "eval fwd" "train fwd+bwd"] [--backends triton cuda] [--calls 20] [--top 8] [--markdown PATH]

For each of the bench's op cases (shvit_kernels.bench.cases), mode and implementation, after warm-up, it profiles
`--calls` calls with torch.profiler. Per call it prints the wall time and the device time, the kernel launches,
and the kernels that take the most device time. Wall time far above device time means host-bound: dispatch and
launch overhead, or gaps between small kernels. Many launches, or a few kernels far from the roofline, point
at the next thing to fuse or tune. On the CPU it reports the ATen ops that take the most self time. The bench
(`python -m shvit_kernels bench`) gives the figures; this explains them.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks._args import case_parser
from shvit_kernels import bench


@dataclasses.dataclass
class Profile:
    op: str
    shape: str
    mode: str
    impl: str          # "stock" or "fused <backend>"
    gpu: bool
    wall_ms: float     # per call, synchronised
    device_ms: float   # per call: the kernels' summed time (CPU: the ops' self time)
    launches: float    # kernels per call (CPU: ATen ops per call)
    top: list[tuple[str, float, float]]  # (name, ms per call, count per call), largest first


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_call(fn, device: torch.device, calls: int, top: int) -> tuple[float, float, float, list]:
    """(wall ms, device ms, launches, top kernels) per call of fn, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    _sync(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        wall = (time.perf_counter() - start) * 1e3 / calls
    rows = []
    for e in prof.key_averages():
        # kernels on a GPU; on the CPU the ATen ops with time of their own (self time: no double counting)
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0 and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((e.key, us / 1e3 / calls, e.count / calls))
    rows.sort(key=lambda r: -r[1])
    return wall, sum(r[1] for r in rows), sum(r[2] for r in rows), rows[:top]


def run(device: torch.device, dtype: torch.dtype, batch: int, ops, modes, backend_names, calls: int,
        top: int) -> list[Profile]:
    out = []
    for case in bench.cases(batch):
        if ops and case.op not in ops:
            continue
        for mode in modes:
            impls = [("stock", "stock", "auto")] + [(f"fused {b}", "fused", b)
                                                    for b in bench.backends_of(case.op, backend_names)]
            for label, impl, backend in impls:
                fn = bench.prepare(case, mode, device, dtype, (impl,), backend).fns[impl]
                wall, dev, launches, rows = profile_call(fn, device, calls, top)
                out.append(Profile(case.op, case.shape, mode, label, device.type == "cuda", wall, dev, launches, rows))
                print(format_profile(out[-1]), flush=True)
    return out


def format_profile(p: Profile) -> str:
    what = "kernels" if p.gpu else "ops' self time"
    head = (f"{p.op} {p.shape} | {p.mode} | {p.impl}: wall {p.wall_ms:.3f} ms, {what} {p.device_ms:.3f} ms, "
            f"{p.launches:.1f} {'launches' if p.gpu else 'ops'} per call")
    lines = [head]
    lines += [f"    {ms:8.4f} ms  x{n:5.1f}  {name[:110]}" for name, ms, n in p.top]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = case_parser(__doc__.split("\n\n")[0], ["dwconv_bn", "ffn", "pw_conv_bn", "shsa", "sra"],
                         ["eval fwd", "train fwd+bwd"])
    parser.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "reference", "cpu", "triton",
                                                                            "cuda"])
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per row (after 3 warm-up calls)")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per row")
    parser.add_argument("--markdown", metavar="PATH", help="also write the report there")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    profiles = run(device, dtype, args.batch, args.ops, args.mode, args.backends, args.calls, args.top)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# Kernel profile: {bench.environment(device).get('device_name')}, {args.dtype}, batch "
                    f"{args.batch}\n\n```\n" + "\n".join(format_profile(p) for p in profiles) + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
