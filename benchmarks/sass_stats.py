"""Static SASS statistics of the Triton kernels one sm_90 case launches, without a GPU:

    TRITON_INTERPRET=0 python -m benchmarks.sass_stats "dwconv 224 16x16 b256 float16 nchw" [--kernel _fwd_eval]

The case is a label of tests/triton/sm90.py's `cases()` (e.g. "shsa 336/72 8x8 b256 float16 nchw"). Every launch it
makes on a GPU is recorded (kernels replaced by recorders), compiled for sm_90 (Triton's CUDA backend, ptxas) and
disassembled (cuobjdump). Per kernel: grid, registers, bytes of local memory (spills) and of shared memory, static
instruction count (with its tensor-core HGMMA / HMMA instructions), and each loop's body (instructions,
global loads, barriers): a loop runs once per image, key block or K step, so its body is what a thread issues per
iteration. Instruction counts are not times: they locate index / mask overhead and barriers, a GPU run says what they
cost.
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile

from tests.triton import sm90

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


def stats(launch: dict) -> dict:
    """Compile one launch (sm90.compile_one) and read its SASS: instructions (address, opcode, operands) and loops."""
    out = sm90.compile_one(launch | {"keep_cubin": True})
    if not out["ok"]:
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(out.pop("cubin"))
        f.flush()
        sass = subprocess.run([sm90.nvidia_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ins = [(int(a, 16), op, rest) for a, _, op, rest in _INSTR.findall(sass)]
    loops = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:  # a backward branch closes a loop
            body = [o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
            loops.append({"instructions": len(body), "LDG": sum(o.startswith("LDG") for o in body),
                          "BAR": sum(o.startswith("BAR") for o in body)})
    mix = collections.Counter(op.split(".")[0] for _, op, _ in ins)
    return out | {"instructions": len(ins), "loops": loops, "mix": dict(mix.most_common(10)), "all": dict(mix)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", help="a label of tests/triton/sm90.py's cases()")
    p.add_argument("--kernel", help="only kernels whose name contains this")
    args = p.parse_args(argv)
    launches = sm90.record(args.case)
    if not launches:
        raise SystemExit(f"no case {args.case!r} in tests/triton/sm90.py")
    for launch in launches:
        if args.kernel and args.kernel not in launch["kernel"]:
            continue
        s = stats(launch)
        if not s["ok"]:
            print(f"{launch['kernel']}: failed to compile: {s['error'][-300:]}")
            continue
        loops = "; ".join(f"{lp['instructions']} instr, {lp['LDG']} LDG, {lp['BAR']} BAR" for lp in s["loops"])
        mma = ", ".join(f"{s['all'][op]} {op}" for op in ("HGMMA", "HMMA") if s["all"].get(op))  # tensor cores
        print(f"{s['kernel']} grid {s['grid']} {s['options']}: {s['regs']} regs, {s['local']} B spilled, "
              f"{s['shared']} B shared, {s['instructions']} instructions ({mma or 'no MMA'}); "
              f"loops: {loops or 'none'}\n    {s['mix']}")


if __name__ == "__main__":
    main()
