"""`python -m shvit_kernels info | bench`."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import platform
import shlex
import sys
import time
import traceback
from typing import Callable, Iterator

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
    _info_measured(devices)
    return 0


def _info_measured(devices: list[str]) -> None:
    """auto's per-size choices from the measured table, for this machine's devices."""
    from . import autotable, backends

    table = autotable.entries()
    print(f"auto table {autotable.path()}: {len(table)} measurement(s)"
          + ("" if table else " (record with `python -m shvit_kernels bench --record-auto`)"))
    for dev in devices:
        device = torch.device(dev)
        prefix = autotable.device_name(device) + "|"
        for key in sorted(k for k in table if k.startswith(prefix)):
            _, op, dtype, b = key.split("|")
            name, why = backends.choose(op, device, getattr(torch, dtype), 1 << int(b))
            print(f"  {op:10s} {dev:4s} {dtype:8s} {table[key]['shape']:20s} -> {name}: {why}")


Job = tuple[str, Callable[[], object]]


def _progress(jobs: list[Job], enabled: bool) -> Iterator[Job]:
    """The jobs, with a progress bar on stderr (stdout keeps the tables): tqdm when installed, else a plain one."""
    if not enabled:
        yield from jobs
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(jobs, file=sys.stderr, unit="job", dynamic_ncols=True)
        for job in bar:
            bar.set_postfix_str(job[0])
            yield job
        return
    width, n = 30, len(jobs)
    for i, job in enumerate(jobs):
        done = width * i // n
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {job[0][:48]:48s}")
        sys.stderr.flush()
        yield job
    sys.stderr.write(f"\r[{'#' * width}] {n}/{n} {'':48s}\n")


def _kept(rows: list, result):
    rows.append(result)
    return result


def _plot(path: str, results: list, model_results: list) -> None:
    """Bar charts of the fused speedups (vs stock eager, and vs torch.compile when measured)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from .bench_models import by_row

    panels = []
    if results:
        panels.append(("ops: fused speedup", [f"{r.op} {r.mode}" for r in results],
                       {"vs eager": [r.speedup for r in results],
                        "vs torch.compile": [r.speedup_vs_compiled for r in results]}))
    rows = by_row(model_results)
    if rows:
        def speedup(got, num, den):
            return got[num].ms / got[den].ms if num in got and den in got and got[num].ms and got[den].ms else None
        panels.append(("models: fused speedup", [f"{k[0]} {k[1]} b{k[2]}" for k in rows],
                       {"vs eager": [speedup(g, "eager", "fused") for g in rows.values()],
                        "vs torch.compile": [speedup(g, "compile", "fused") for g in rows.values()]}))
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(8, 1 + sum(0.35 * len(labels) + 0.8 for _, labels, _ in panels)))
    for ax, (title, labels, series) in zip(axes[:, 0], panels):
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        height = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            ax.barh([j + i * height for j in range(len(labels))], [v or 0 for v in values], height, label=name)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks([j + height * (len(series) - 1) / 2 for j in range(len(labels))], labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel("speedup (x, same run)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(data: dict, ops_table: str, models_table: str) -> str:
    env, c = data["env"], data["ceilings"]
    lines = [f"# shvit_kernels bench: {env['device_name']} ({data['date']})", "",
             "| | |", "|---|---|"]
    for key in ("device_name", "driver", "sm", "multiprocessors", "torch", "triton", "cuda", "python", "arch",
                "threads", "malloc"):
        if env.get(key) is not None:
            lines.append(f"| {key} | {env[key]} |")
    lines += [f"| dtype | {data['dtype']} |", f"| op batch | {data['batch']} |",
              f"| ceilings (measured in this run) | copy {c['bytes_per_s'] / 1e9:.1f} GB/s ({c['copy_mib']} MiB), "
              f"matmul {c['flops_per_s'] / 1e9:.0f} GFLOP/s ({c['matmul']}) |",
              f"| command | `{data['command']}` |", ""]
    for title, text in (("Ops", ops_table), ("Models", models_table)):
        if text:
            lines += [f"## {title}", "", text, ""]
    for what in ("skipped", "errors"):
        if data[what]:
            lines += [f"## {what.capitalize()}", ""] + [f"- {json.dumps(x)}" for x in data[what]] + [""]
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    from . import bench, bench_models, roofline

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before any benchmark runs, not after)
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'shvit_kernels[plot]' (or pip install matplotlib)",
                  file=sys.stderr)
            return 2
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    malloc = None
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        malloc = roofline.hold_freed_memory() if args.malloc == "held" else "process defaults (--malloc default)"
    if args.record_auto:
        from . import autotable
        print(f"recording auto's table ({autotable.path()}) for {autotable.device_name(device)}: eval forward, "
              f"medians of {args.reps} calls")
        for line in bench.record_auto(device, dtype, sorted({1, args.batch}), args.ops, args.reps):
            print(line, flush=True)
        return 0
    env = bench.environment(device)
    if malloc:
        env["malloc"] = malloc
    run_ops = args.ops is not None or args.models is None
    modes = list(roofline.MODES) if "all" in args.mode else args.mode
    models = (args.models or list(bench_models.MODELS)) if args.models is not None else []
    variants = [v for v, (_, compiled) in bench_models.VARIANTS.items() if args.compile or not compiled]

    # Jobs run in this order: ops, every model's uncompiled variants, then everything compiled (a compile with
    # max-autotune costs minutes), so that a --budget-s that runs out costs compile columns rather than whole rows.
    # The closures read `ceilings` when they run, after it is measured below.
    ceilings = None
    jobs: list[Job] = []
    compile_jobs: list[Job] = []
    for case in bench.cases(args.batch) if run_ops else []:
        if args.ops and case.op not in args.ops:
            continue
        for mode in modes:
            rows: list = []  # this case and mode's results, one per backend: the compile job fills their column
            for backend in bench.backends_of(case.op, args.backends):
                jobs.append((f"{case.op} {mode} {backend}",
                             lambda c=case, m=mode, b=backend, rows=rows: _kept(rows, bench.run_case(
                                 c, m, device, dtype, False, args.reps, ceilings, b))))
            if args.compile:
                compile_jobs.append((f"{case.op} {mode} compile",
                                     lambda c=case, m=mode, rows=rows: bench.add_compiled(
                                         rows, c, m, device, dtype, args.reps, ceilings) if rows else None))
    for model, layout, scenario, variant in itertools.product(models, args.layout, bench_models.SCENARIOS, variants):
        job = (f"{model} {scenario} {variant}" + f" {layout}" * (len(args.layout) > 1),
               lambda mo=model, s=scenario, v=variant, cl=layout == "channels_last": bench_models.run_model(
                   mo, s, v, device, dtype, ceilings, None if s == "infer b1" else args.model_batch,
                   args.resolution, args.model_reps, cl))
        (compile_jobs if bench_models.VARIANTS[variant][1] else jobs).append(job)
    jobs += compile_jobs

    print(f"device {device} ({env['device_name']})  dtype {args.dtype}  torch {env['torch']}  triton {env['triton']}  "
          f"cpu threads {torch.get_num_threads()} (torch.set_num_threads)" + (f"  op batch {args.batch}" * run_ops)
          + (f"  malloc {malloc}" if malloc else ""))
    ceilings = roofline.measure_ceilings(device, dtype)
    print(f"ceilings measured now: copy {ceilings.bytes_per_s / 1e9:.1f} GB/s ({ceilings.copy_mib} MiB, read + write), "
          f"matmul {ceilings.flops_per_s / 1e9:.0f} GFLOP/s ({ceilings.matmul})")
    print("times: median ms after warm-up, same run (CUDA: triton do_bench); ratios from the same run; "
          "% roofline = counted FLOPs/bytes floor on those ceilings / time", flush=True)

    overhead = bench.dispatch_overhead_us(device) if run_ops else None
    results, model_results, skipped, errors = [], [], [], []

    def save() -> None:
        """Write --json / --markdown; called after every job too, so a run killed by a time limit keeps its rows."""
        data = {"schema": 2, "date": env["date"], "command": args.command, "env": env, "device": str(device),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
                "batch": args.batch, "ceilings": dataclasses.asdict(ceilings),
                "results": [dataclasses.asdict(r) for r in results],
                "models": [dataclasses.asdict(r) for r in model_results], "skipped": skipped, "errors": errors,
                "dispatch_overhead_us": overhead}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=2)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(_markdown(data, bench.format_table(results, markdown=True) if results else "",
                                  bench_models.format_table(model_results, markdown=True) if model_results else ""))

    deadline = time.monotonic() + args.budget_s if args.budget_s else math.inf
    show = sys.stderr.isatty() if args.progress is None else args.progress
    for label, job in _progress(jobs, show):
        if time.monotonic() > deadline:
            skipped.append({"job": label, "why": f"--budget-s {args.budget_s:g} spent"})
            continue
        try:
            out = job()
        except Exception as e:  # one failing case must not lose the others' figures; reported and exit code 1
            traceback.print_exc()
            errors.append({"job": label, "error": f"{type(e).__name__}: {e}"})
            out = None
        if isinstance(out, bench.Result):
            results.append(out)
        elif out is not None:  # None: add_compiled filled its rows in place, or the job failed
            model_results.append(out)
        save()
    save()

    for text in (bench.format_table(results) if results else "",
                 bench_models.format_table(model_results) if model_results else ""):
        if text:
            print(text)
    if overhead:
        print("dispatch overhead per call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in overhead.items()))
    for s in skipped:
        print(f"skipped {s['job']}: {s['why']}")
    for e in errors:
        print(f"FAILED {e['job']}: {e['error']}")
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    if args.plot:
        _plot(args.plot, results, model_results)
        print(f"wrote {args.plot}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    from .bench_models import MODELS
    from .roofline import MODES

    parser = argparse.ArgumentParser(prog="python -m shvit_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, backends (and why any is unavailable), auto's choices")
    b = sub.add_parser("bench", help="stock vs fused benchmarks on the device at hand (ops; models with --models)")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    b.add_argument("--batch", type=int, default=16, help="batch of the op cases")
    b.add_argument("--ops", nargs="*", choices=["dwconv_bn", "ffn", "pw_conv_bn", "shsa", "sra"],
                   help="op cases (all when given bare; run by default unless --models is given)")
    b.add_argument("--mode", nargs="+", default=["eval fwd", "train fwd+bwd"], choices=[*MODES, "all"],
                   help="op modes (default: eval fwd, train fwd+bwd; all: the four)")
    b.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "reference", "cpu", "triton", "cuda"],
                   help="backends the fused op runs on (one row each)")
    b.add_argument("--compile", action="store_true",
                   help="add torch.compile of the stock module/model (max-autotune on CUDA) and fused+compile")
    b.add_argument("--models", nargs="*", choices=list(MODELS),
                   help="SHViT model suite (all four when given bare): eager, timm, fused [, compile, fused+compile]")
    b.add_argument("--resolution", type=int, help="model input size (default 224; S4 256)")
    b.add_argument("--model-batch", type=int,
                   help="batch of the models' throughput and training scenarios (default GPU 256 / 128, CPU 8 / 4)")
    b.add_argument("--layout", nargs="+", default=["nchw"], choices=["nchw", "channels_last"],
                   help="memory format of every model variant and its input (stock and fused alike); both: one row "
                        "each")
    b.add_argument("--model-reps", type=int, default=5, help="timed calls per model case on the CPU")
    b.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    b.add_argument("--malloc", choices=["held", "default"], default="held",
                   help="CPU: held = glibc keeps freed memory in the heap for the whole run, so freed blocks up to 32 MiB "
                        "are reused, not page-faulted in again, whatever ran before (default); default = the "
                        "process's own malloc settings (see roofline.py)")
    b.add_argument("--reps", type=int, default=20, help="timed calls per op case on the CPU")
    b.add_argument("--budget-s", type=float, help="start no case after this many seconds (listed as skipped)")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    b.add_argument("--record-auto", action="store_true",
                   help="time every backend on the op cases (batch 1 and --batch) and store the medians in the table "
                        "\"auto\" picks from (shvit_kernels/autotable.py); runs nothing else")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--markdown", metavar="PATH", help="also write a Markdown report")
    b.add_argument("--plot", metavar="PNG", help="also plot the speedups (needs matplotlib: the 'plot' extra)")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "shvit_kernels", *(sys.argv[1:] if argv is None else argv)])
    return _info() if args.cmd == "info" else _bench(args)


if __name__ == "__main__":
    sys.exit(main())
