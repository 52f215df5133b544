"""CPU times as a plain user script sees them: `python -m benchmarks.fresh_process` (from the repository root).

Each (case, implementation) runs in its own fresh Python process with glibc's allocator left at its defaults,
builds its module the way the CLI bench does (same seeded weights, BN statistics randomised), warms up and times a
plain loop on one input: no input rotation, no float64 check. What glibc then does is what a script running that
module alone gets: its dynamic mmap / trim thresholds adapted to the blocks the build, the compile and the warm-up
freed (different for each implementation). The CLI bench instead holds freed memory in the heap for its whole run
(`roofline.hold_freed_memory`), where stock's per-call temporaries no longer page-fault; the two differ most for
ops that allocate many large temporaries per call. Timing: roofline.time_ms (median of --reps calls, fewer once a
cell has run 2 s). Correctness is the CLI bench's and the tests' job, not this script's.

    python -m benchmarks.fresh_process --ops shsa ffn --models S4 --markdown benchmarks/results/<name>.md
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import shlex
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the children import `benchmarks` from here
OP_IMPLS = ("eager", "compile", "fused")
RATIOS = (("fused", "eager"), ("fused", "compile"), ("fused+compile", "compile"))  # (numerator's speed, vs)


def _op_call(op: str, batch: int, mode: str, impl: str):
    from shvit_kernels import bench

    case = next(c for c in bench.cases(batch) if c.op == op)
    torch.manual_seed(0)
    stock = bench.randomize_bn(case.make_stock())
    m = {"eager": lambda: stock, "fused": lambda: case.make_fused(copy.deepcopy(stock)),
         "compile": lambda: bench.compile_module(stock, torch.device("cpu"))}[impl]()
    m.train(mode != "eval fwd")
    return bench._bind(m, mode, torch.randn(case.input_shape), case.args)


def _model_call(model: str, batch: int, scenario: str, variant: str):
    from shvit_kernels import bench_models

    return bench_models.prepare_model(model, scenario, variant, torch.device("cpu"), torch.float32, batch).fn


def child(args: argparse.Namespace) -> None:
    """One measurement, printed as JSON: the median ms of `reps` calls after the warm-up."""
    from shvit_kernels.roofline import time_ms

    torch.set_num_threads(args.threads)
    kind, name, mode, impl = args.child
    fn = (_op_call if kind == "op" else _model_call)(name, args.batch if kind == "op" else args.model_batch, mode,
                                                     impl)
    for _ in range(args.warmup):
        fn()
    print(json.dumps({"ms": time_ms(fn, torch.device("cpu"), args.reps, warmup=0)}))


def _median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def measure(args: argparse.Namespace, kind: str, name: str, mode: str, impl: str) -> float | None:
    cmd = [sys.executable, "-m", "benchmarks.fresh_process", "--child", kind, name, mode, impl,
           "--threads", str(args.threads), "--batch", str(args.batch), "--model-batch", str(args.model_batch),
           "--reps", str(args.reps if kind == "op" else args.model_reps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode or not out.stdout.strip():
        print(f"  {kind} {name} {mode} {impl}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="*", default=["shsa"], choices=["dwconv_bn", "ffn", "pw_conv_bn", "shsa"])
    p.add_argument("--mode", nargs="+", default=["eval fwd"], choices=["eval fwd", "train fwd+bwd"])
    p.add_argument("--models", nargs="*", default=[], choices=["S1", "S2", "S3", "S4"])
    p.add_argument("--scenario", nargs="+", default=["infer batch"], choices=["infer batch", "train step"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="batch of the op cases")
    p.add_argument("--model-batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=100, help="timed calls per op case")
    p.add_argument("--model-reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="processes per op cell (median of their medians)")
    p.add_argument("--model-rounds", type=int, default=1, help="processes per model cell")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--child", nargs=4, metavar=("KIND", "NAME", "MODE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0

    from shvit_kernels.bench_models import VARIANTS

    jobs = [("op", op, mode, OP_IMPLS) for op in args.ops for mode in args.mode]
    jobs += [("model", m, s, tuple(VARIANTS)) for m in args.models for s in args.scenario]
    rows = []
    for kind, name, mode, impls in jobs:
        # Rounds interleave the implementations, so that a slow spell of a shared machine hits them alike.
        runs = [[measure(args, kind, name, mode, impl) for impl in impls]
                for _ in range(args.rounds if kind == "op" else args.model_rounds)]
        ms = {impl: _median([r[i] for r in runs]) for i, impl in enumerate(impls)}
        rows.append((name, mode, ms))
        print(name, mode, "  ".join(f"{i} {t:.3f}" if t else f"{i} -" for i, t in ms.items()), flush=True)

    impls = [i for i in VARIANTS if any(i in ms for _, _, ms in rows)]  # (OP_IMPLS are a subset, same order)
    ratios = [(n, d) for n, d in RATIOS if n in impls and d in impls]
    cols = ["case", "mode", *impls, *(f"{n} vs {d}" for n, d in ratios)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, mode, ms in rows:
        cells = [f"{ms[i]:.3f}" if ms.get(i) else "-" for i in impls]
        cells += [f"{ms[d] / ms[n]:.2f}x" if ms.get(n) and ms.get(d) else "-" for n, d in ratios]
        lines.append("| " + " | ".join([name, mode, *cells]) + " |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        head = (f"# Fresh-process CPU times (ms, median), {time.strftime('%Y-%m-%d')}\n\n"
                f"torch {torch.__version__}, {args.threads} threads, fp32, op batch {args.batch}, model batch "
                f"{args.model_batch}; each measurement its own process, glibc malloc defaults; a cell is the median of "
                f"{args.rounds} (ops) / {args.model_rounds} (models) such processes, implementations interleaved.\n\n"
                f"`python -m benchmarks.fresh_process {shlex.join(sys.argv[1:])}`\n\n")
        with open(args.markdown, "w") as f:
            f.write(head + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
