"""The options the per-case GPU scripts (gpu_profile, gpu_tune) share: device, dtype, batch, ops, modes."""
from __future__ import annotations

import argparse

import torch

from shvit_kernels.roofline import MODES


def case_parser(description: str, ops: list[str], modes: list[str]) -> argparse.ArgumentParser:
    """A parser with --device, --dtype, --batch (of the bench's op cases), --ops (among `ops`) and --mode (default
    `modes`); the script adds its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ops", nargs="*", choices=ops)
    parser.add_argument("--mode", nargs="+", default=modes, choices=MODES)
    return parser
