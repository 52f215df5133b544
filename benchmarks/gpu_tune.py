"""Tile sweeps of the Triton launchers on the bench's op cases: how each op's time moves with the module-level tile
constants of shvit_kernels.triton, and the fastest setting on this device.

    python -m benchmarks.gpu_tune [--device cuda] [--dtype float16] [--batch 256] [--ops dwconv_bn ...]
        [--mode "eval fwd" "train fwd+bwd"] [--markdown PATH]

Every combination of an op's knobs (KNOBS) is set in each Triton module that binds the name (the launchers import
the constants by name), the fused module is checked against the float64 oracle by `bench.prepare` (a setting whose
error is over DESIGN.md's 2x-stock rule, or that fails to compile, is reported, not timed), and timed with the
bench's timer beside stock eager in the same run. The defaults are restored after each op. A faster setting found
here becomes the new default only with its figure committed beside it; `gpu_profile` says which kernel to sweep.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import math
import pkgutil

import torch

import shvit_kernels.triton as triton_pkg
from benchmarks._args import case_parser
from shvit_kernels import bench
from shvit_kernels.roofline import measure_ceilings, time_ms
from shvit_kernels.triton import shsa

# op (or "op mode" where a mode runs other kernels) -> {constant: values}, swept as a grid; the module's current value
# (the default) is always in it
KNOBS: dict[str, dict[str, list[int]]] = {
    "dwconv_bn": {"_TILE": [1024, 2048], "_WARPS": [4, 8], "_IMAGES": [1, 4, 8], "_ROW_PX": [128, 256]},
    # the token GEMMs (training): tiles over the flattened B*N tokens (FLAT_TOKENS 16: where N % 16 == 0, all the
    # bench's cases) or per sample (0: the FFN's 4x4 case then takes 16-token tiles), and their sizes
    "pw_conv_bn": {"FLAT_TOKENS": [0, 16], "_BLOCK_R": [64, 128], "_BLOCK_K": [32, 64]},
    "ffn": {"FLAT_TOKENS": [0, 16], "_BLOCK_T": [64, 128], "_GEMM_WARPS": [4, 8]},
    "ffn eval fwd": {"RESIDENT_X": [0, 32768], "RESIDENT_TOKENS": [32, 64, 128], "FUSED_HIDDEN": [16, 32]},
    "pw_conv_bn eval fwd": {"RESIDENT_X": [0, 32768], "RESIDENT_TOKENS": [64, 128], "RESIDENT_W": [8192, 16384]},
    "shsa": {"_ATTN_TILE": [4096, 8192, 16384], "_BLOCK_R": [32, 64, 128], "_GEMM_WARPS": [4, 8]},
    "shsa eval fwd": {"_EVAL_BLOCK_V": [16, 32, 64], "_EVAL_BLOCK_C": [32, 64, 128], "_GEMM_WARPS": [4, 8]},
    "sra": {"_ATTN_TILE": [8192, 16384, 32768], "_LN_TILE": [4096, 8192], "_GEMM_WARPS": [4, 8]},
}


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    mode: str
    setting: dict[str, int]
    default: bool
    ms: float | None      # None: not timed (see note)
    stock_ms: float
    pct_roofline: float | None
    note: str = ""


def _modules() -> list:
    return [importlib.import_module(f"{triton_pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(triton_pkg.__path__)]


@contextlib.contextmanager
def setting(values: dict[str, int]):
    """Set each constant in every Triton module that binds it; restore the defaults on exit."""
    saved = [(m, k, getattr(m, k)) for m in _modules() for k in values if hasattr(m, k)]
    missing = set(values) - {k for _, k, _ in saved}
    if missing:
        raise KeyError(f"no Triton module binds {sorted(missing)}")
    try:
        for m, k, _ in saved:
            setattr(m, k, values[k])
        yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def knobs(op: str, mode: str, input_shape: tuple[int, ...] | None = None) -> dict[str, list[int]]:
    """The grid for `op` in `mode`. "shsa eval fwd" applies only to inputs that take the one-kernel eval (up to 64
    tokens); larger ones run the launches that KNOBS["shsa"] tunes."""
    key = f"{op} {mode}"
    if key == "shsa eval fwd" and input_shape is not None and not shsa._fits_one_launch(math.prod(input_shape[2:])):
        return KNOBS[op]
    return KNOBS.get(key, KNOBS[op])


def defaults(op: str, mode: str, input_shape: tuple[int, ...] | None = None) -> dict[str, int]:
    mods = _modules()
    return {k: next(getattr(m, k) for m in mods if hasattr(m, k)) for k in knobs(op, mode, input_shape)}


def sweep(case: bench.Case, mode: str, device: torch.device, dtype: torch.dtype, ceilings) -> list[Row]:
    base, space = defaults(case.op, mode, case.input_shape), knobs(case.op, mode, case.input_shape)
    grid = [dict(zip(space, vals, strict=True)) for vals in itertools.product(*space.values())]
    if base not in grid:
        grid.insert(0, base)
    stock = bench.prepare(case, mode, device, dtype, ("stock",), "triton")
    stock_ms = time_ms(stock.fns["stock"], device)
    rows = []
    for values in grid:
        row = Row(case.op, case.shape, mode, values, values == base, None, stock_ms, None)
        try:
            with setting(values):
                p = bench.prepare(case, mode, device, dtype, ("fused",), "triton")
                if p.max_err > 2 * p.stock_err + 1e-6:
                    row.note = f"error {p.max_err:.1e} > 2 x stock's {p.stock_err:.1e}"
                else:
                    row.ms = time_ms(p.fns["fused"], device)
                    row.pct_roofline = ceilings.pct(p.cost, row.ms)
        except Exception as e:  # noqa: BLE001  (a setting that does not compile or run is reported)
            row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: Row) -> str:
    knobs = " ".join(f"{k}={v}" for k, v in r.setting.items())
    head = f"{r.op} {r.shape} | {r.mode} | {knobs}{' (default)' if r.default else ''}"
    if r.ms is None:
        return f"{head}: not timed, {r.note}"
    return (f"{head}: {r.ms:.4f} ms, {r.stock_ms / r.ms:.2f}x stock eager ({r.stock_ms:.4f} ms), "
            f"{r.pct_roofline:.1f}% roofline")


def best(rows: list[Row]) -> str:
    """One line per (op, shape, mode): the fastest setting against the default."""
    out = []
    for key, group in itertools.groupby(rows, key=lambda r: (r.op, r.shape, r.mode)):
        timed = [r for r in group if r.ms is not None]
        if not timed:
            continue
        fastest = min(timed, key=lambda r: r.ms)
        default = next((r for r in timed if r.default), None)
        gain = f", {default.ms / fastest.ms:.2f}x the default's" if default else ""
        knobs = " ".join(f"{k}={v}" for k, v in fastest.setting.items())
        out.append(f"{' | '.join(key)}: best {knobs} at {fastest.ms:.4f} ms{gain}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = case_parser(__doc__.split("\n\n")[0], sorted(k for k in KNOBS if " " not in k), ["eval fwd"])
    parser.add_argument("--markdown", metavar="PATH", help="also write the rows there")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ceilings = measure_ceilings(device, dtype)
    rows = []
    for case in bench.cases(args.batch):
        if case.op in KNOBS and (not args.ops or case.op in args.ops):
            for mode in args.mode:
                rows += sweep(case, mode, device, dtype, ceilings)
    print(best(rows))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# Tile sweep: {bench.environment(device).get('device_name')}, {args.dtype}, batch {args.batch}"
                    f"\n\n```\n" + "\n".join(format_row(r) for r in rows) + "\n\n" + best(rows) + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
