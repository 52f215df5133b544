"""The Triton kernels compiled ahead of time for an H100 (sm_90), on a machine without a GPU.

Every launch the launchers would make on a GPU, over SHViT's and PVT's shapes, the dtypes and both layouts, is
recorded (the kernels replaced by recorders, meta tensors: nothing runs, the launch arguments are exact), keyed as
Triton's JIT keys its cache, and each distinct key is compiled by Triton's CUDA backend down to a cubin (ptxas).
The CPU interpreter lets through what a GPU build refuses (dot operands under 16, casts and layouts the backend
does not lower, more shared memory than a Hopper SM has); this finds it here, and reports each kernel's registers,
spills and shared memory. Asserted by tests/triton/test_sm90_compile.py.

    TRITON_INTERPRET=0 python -m tests.triton.sm90 [--dtypes float16 ...] [--every-int-class] [--json PATH]

One configuration per meta-parameter tuple over all four dtypes is about 1600 compiles (~0.7 s of one core each);
--every-int-class about 4100.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100 (227 KiB, the opt-in maximum)
META = torch.device("meta")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = (torch.contiguous_format, torch.channels_last)
# SHViT S1-S4 stage shapes (dim, pdim, H, W at 224 / 256 px) and the PatchMerging transitions between them, with
# the issues' extra cases: odd pdims and maps, one token, 4x8 (the one-kernel eval at 32 padded tokens, 4 warps),
# detection's 42x25, SHSA's large N (64x64, 128x128 tokens).
SHSA = [(128, 32, 14, 14), (224, 48, 7, 7), (320, 68, 4, 4), (308, 66, 7, 7), (352, 75, 7, 7), (336, 72, 8, 8),
        (448, 96, 4, 4), (448, 96, 1, 1), (224, 48, 4, 8), (64, 17, 3, 3), (64, 17, 33, 31), (336, 72, 42, 25),
        (336, 72, 64, 64), (256, 64, 128, 128)]
CHANNELS = [(128, 14), (192, 14), (224, 16), (308, 7), (336, 8), (448, 4), (75, 9)]
MERGES = [(128, 224, 14), (224, 336, 16), (336, 448, 8)]
# PVT: (H = W, C, heads, sr_ratio, linear); v1/v2 stages at 224 px, v2-li's pooled keys
SRA = [(56, 64, 1, 8, False), (28, 128, 2, 4, False), (14, 320, 5, 2, False), (7, 512, 8, 1, False),
       (56, 64, 1, 1, True), (14, 320, 5, 1, True)]
BATCHES = (8, 256)


def _empty(*shape, dtype=torch.float32, fmt=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=META)
    return t.contiguous(memory_format=fmt) if t.dim() == 4 else t


def _shsa(b, dim, pdim, h, w, dt, fmt):
    from shvit_kernels.triton import shsa as T

    qk, o = 16, 32 + pdim
    x, p, f = _empty(b, dim, h, w, dtype=dt, fmt=fmt), lambda *s: _empty(*s, dtype=dt), lambda n: _empty(n)
    T.fwd(x, f(pdim), f(pdim), 1e-5, p(o, pdim), f(o), p(dim, dim), f(dim), qk, True)
    T.bwd(x, x, f(pdim), f(pdim), 1e-5, p(o, pdim), f(o), p(dim, dim), f(dim), qk, False)
    _, *stats = T.train_fwd(x, f(pdim), f(pdim), 1e-5, p(o, pdim), f(o), f(o), 1e-5, p(dim, dim), f(dim), f(dim),
                            1e-5, qk, False)
    T.train_bwd(x, x, f(pdim), f(pdim), 1e-5, p(o, pdim), f(o), f(o), 1e-5, p(dim, dim), f(dim), f(dim), 1e-5,
                *stats, qk, True)


def _ffn(b, d, hw, dt, fmt):
    from shvit_kernels.triton import ffn as T

    x, p, f = _empty(b, d, hw, hw, dtype=dt, fmt=fmt), lambda *s: _empty(*s, dtype=dt), lambda n: _empty(n)
    T.fwd(x, p(2 * d, d), f(2 * d), p(d, 2 * d), f(d))
    T.bwd(x, x, p(2 * d, d), f(2 * d), p(d, 2 * d), f(d))
    _, *saved = T.train_fwd(x, p(2 * d, d), f(2 * d), f(2 * d), 1e-5, p(d, 2 * d), f(d), f(d), 1e-5)
    T.train_bwd(x, x, p(2 * d, d), f(2 * d), f(2 * d), 1e-5, p(d, 2 * d), f(d), f(d), 1e-5, *saved)


def _dwconv(b, c, hw, stride, dt, fmt):
    from shvit_kernels.triton import dwconv_bn as T

    x, wt, v = _empty(b, c, hw, hw, dtype=dt, fmt=fmt), _empty(c, 1, 3, 3, dtype=dt), _empty(c)
    residual = stride == 1
    T.fwd(x, wt, v, stride, not residual)
    y, mean, var = T.train_fwd(x, wt, v, v, 1e-5, stride, residual, not residual)
    T.train_bwd(y, x, wt, v, mean, var, y, 1e-5, stride, residual, not residual)


def _pw_conv(b, k, o, hw, dt, fmt):
    from shvit_kernels.triton import pw_conv_bn as T

    x, wt, v = _empty(b, k, hw, hw, dtype=dt, fmt=fmt), _empty(o, k, dtype=dt), _empty(o)
    for gate, relu in ((None, True), (_empty(b, k, dtype=dt), False)):
        y = T.fwd(x, wt, v, gate, relu)
        T.bwd(y, x, wt, v, gate, relu, y)
        y, mean, var, z = T.train_fwd(x, wt, v, v, 1e-5, gate, relu)
        T.train_bwd(y, x, wt, v, v, 1e-5, gate, relu, mean, var, z)


def _sra(b, hw, c, heads, sr, linear, dt):
    from shvit_kernels.triton import sra as T

    x, vec, k = _empty(b, hw * hw, c, dtype=dt), _empty(c, dtype=dt), 1 if linear else sr
    sr_w, q_w, kv_w = _empty(c, c, k, k, dtype=dt), _empty(c, c, dtype=dt), _empty(2 * c, c, dtype=dt)
    red = x
    if linear or sr > 1:
        red = T.reduce_fwd(x, hw, hw, sr_w, vec, vec, vec, 1e-5, sr, linear)
        T.reduce_bwd(red, x, hw, hw, sr_w, vec, vec, vec, 1e-5, sr, linear)
    o, lse = T.attn_fwd(x, red, q_w, vec, kv_w, None, heads, (c // heads) ** -0.5)
    T.attn_bwd(o, x, red, q_w, vec, kv_w, None, o, lse, heads, (c // heads) ** -0.5)


def cases():
    """(label, dtype, call) of every launcher call recorded: the forward and backward, eval and training, of each op."""
    P = functools.partial
    for b in BATCHES:
        for dt in DTYPES:
            name = str(dt).removeprefix("torch.")
            for fmt in LAYOUTS:
                tag = f"b{b} {name} {'nhwc' if fmt == torch.channels_last else 'nchw'}"
                for dim, pdim, h, w in SHSA:
                    yield f"shsa {dim}/{pdim} {h}x{w} {tag}", dt, P(_shsa, b, dim, pdim, h, w, dt, fmt)
                for d, hw in CHANNELS:
                    yield f"ffn {d} {hw}x{hw} {tag}", dt, P(_ffn, b, d, hw, dt, fmt)
                    yield f"dwconv {d} {hw}x{hw} {tag}", dt, P(_dwconv, b, d, hw, 1, dt, fmt)
                for k, o, hw in MERGES:
                    yield f"dwconv/2 {4 * k} {hw}x{hw} {tag}", dt, P(_dwconv, b, 4 * k, hw, 2, dt, fmt)
                    yield f"pw_conv {k}->{4 * k} {hw}x{hw} {tag}", dt, P(_pw_conv, b, k, 4 * k, hw, dt, fmt)
                    half = (hw + 1) // 2
                    yield f"pw_conv {4 * k}->{o} {half}x{half} {tag}", dt, P(_pw_conv, b, 4 * k, o, half, dt, fmt)
            for hw, c, heads, sr, linear in SRA:
                yield (f"sra {hw}x{hw} C{c} h{heads} sr{sr}{' linear' if linear else ''} b{b} {name}", dt,
                       P(_sra, b, hw, c, heads, sr, linear, dt))


def record(only: str | None = None) -> list[dict]:
    """Every distinct compile key over the cases (or the case labelled `only`), as on a GPU: {"module", "kernel",
    "spec", "options", "case" (the first case that launched it), "dtype" (its activations'), "grid" (that launch's)}."""
    import pytest
    import triton.language as tl

    from tests.helpers import (
        replace_triton_kernels,
        size_launchers_for_gpu,
        triton_compile_key,
    )

    binders, keys, case = {}, {}, [None]

    def rec(name, kernel, grid, args, kwargs):
        spec, options, _ = triton_compile_key(binders, kernel, args, kwargs)
        keys.setdefault((kernel.fn.__module__, name, spec, options), (*case[0], list(grid)))

    with pytest.MonkeyPatch.context() as mp:
        replace_triton_kernels(mp, rec)
        size_launchers_for_gpu(mp)
        for label, dtype, call in cases():
            if only in (None, label):
                case[0] = (label, str(dtype).removeprefix("torch."))  # --dtypes' spelling
                call()

    def plain(value):  # a tl.dtype constexpr (the accumulator's) by name, to cross a process
        return str(value) if isinstance(value, tl.dtype) else value

    return [{"module": k[0], "kernel": k[1], "spec": [[ty, plain(v)] for ty, v in k[2]], "options": dict(k[3]),
             "case": label, "dtype": dtype, "grid": grid} for k, (label, dtype, grid) in keys.items()]


def one_per_meta(launches: list[dict]) -> list[dict]:
    """The first launch of each meta-parameter tuple (kernel, constexprs, pointer types, options): what decides the
    code, less the int arguments' divisibility classes (which only let loads vectorise)."""
    seen = {}
    for launch in launches:
        spec = tuple((ty, repr(v)) if ty == "constexpr" else ty for ty, v in launch["spec"])
        seen.setdefault((launch["module"], launch["kernel"], spec, repr(sorted(launch["options"].items()))), launch)
    return list(seen.values())


def nvidia_tool(name: str) -> pathlib.Path:
    """A binary Triton's CUDA backend ships (ptxas, cuobjdump)."""
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def compile_one(launch: dict) -> dict:
    """Compile one recorded launch for sm_90: {"ok", "error", "shared", "regs", "local"} added to the launch (and
    "cubin", its bytes, when the launch has "keep_cubin": benchmarks/sass_stats.py)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    jit = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (ty, value)) in enumerate(zip(jit.params, launch["spec"], strict=True)):
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = tl.dtype(value) if isinstance(value, str) else value
        elif isinstance(value, str):
            attrs[(i,)] = backend.parse_attr(value)
    out = dict(launch)
    try:
        kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                options=launch["options"])
    except Exception as e:  # noqa: BLE001  (reported, and failed by the test)
        return out | {"ok": False, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(kv.split(":", 1) for line in usage.splitlines() if "REG:" in line for kv in line.split())
    spill = int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))  # bytes of local memory per thread
    if out.pop("keep_cubin", False):
        out["cubin"] = kernel.asm["cubin"]
    return out | {"ok": True, "error": "", "shared": kernel.metadata.shared + int(fields.get("SHARED", 0)),
                  "regs": int(fields.get("REG", -1)), "local": spill}


def compile_all(dtypes=None, every_int_class: bool = False, jobs: int | None = None) -> list[dict]:
    """Record the launches (activations of `dtypes`, all by default), keep one per meta-parameter tuple unless
    every_int_class, and compile them in `jobs` processes. Needs TRITON_INTERPRET unset or 0."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run with TRITON_INTERPRET=0: the kernels must be Triton JIT functions, not interpreted")
    launches = [x for x in record() if dtypes is None or x["dtype"] in dtypes]
    if not every_int_class:
        launches = one_per_meta(launches)
    with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count()) as pool:
        return list(pool.map(compile_one, launches, chunksize=4))


def summary(results: list[dict]) -> str:
    """A markdown table per kernel: configurations, failures, and the largest registers, spills, shared memory."""
    import triton

    rows = {}
    for r in results:
        row = rows.setdefault(f"{r['module'].rsplit('.', 1)[-1]}.{r['kernel']}", [0, 0, 0, 0, 0, 0])
        row[0] += 1
        row[1] += not r["ok"]
        if r["ok"]:
            row[2:] = [max(row[2], r["regs"]), row[3] + (r["local"] > 0), max(row[4], r["local"]),
                       max(row[5], r["shared"])]
    lines = ["| kernel | configs | failed | max regs | configs spilling | max spill B | max shared B |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {' | '.join(map(str, v))} |" for k, v in sorted(rows.items())]
    failed = [r for r in results if not r["ok"]]
    largest = max((r.get("shared", 0) for r in results), default=0)
    total = (f"triton {triton.__version__}: {len(results)} launch configurations, {len(failed)} failed to compile for "
             f"sm_90; largest shared memory {largest} B of {SMEM_LIMIT}.")
    lines += ["", total]
    lines += [f"- FAILED {r['kernel']} ({r['case']}): {r['error'].splitlines()[-1][:200]}" for r in failed]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", choices=[str(d).removeprefix("torch.") for d in DTYPES])
    p.add_argument("--every-int-class", action="store_true",
                   help="compile every compile key (int divisibility classes too), not one per meta-parameter tuple")
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--json", type=pathlib.Path, help="every compiled launch with its resources")
    args = p.parse_args()
    results = compile_all(args.dtypes, args.every_int_class, args.jobs)
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any(not r["ok"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
