"""Measured backend choices for "auto": a small JSON table of each backend's time per (device, op, dtype, size).

`python -m shvit_kernels bench --record-auto` times the fused ops on every backend that runs them here and stores
the medians; `backends.choose` then picks, per op and input size, the backend measured fastest (the nearest
measured size within a factor of 4, else auto's fixed order). Sizes are bucketed by the input's element count
(its power of two), so a lookup is one dict access and a model uses a handful of buckets.

The table lives at $SHVIT_KERNELS_AUTO_TABLE, else $XDG_CACHE_HOME/shvit_kernels/auto_table.json (~/.cache by
default). Devices are keyed by name (the GPU's name; "cpu-<threads>t" on the CPU, where the thread count decides
the ranking), so one table serves several machines.
"""
from __future__ import annotations

import datetime
import json
import os
import threading
from pathlib import Path

import torch

SCHEMA = 1
NEAREST = 2  # look up to 2 buckets away (a factor of 4 in size) before falling back to the fixed order
_lock = threading.Lock()
_cache: dict[str, tuple[float, dict]] = {}  # path -> (mtime, entries)


def path() -> Path:
    explicit = os.environ.get("SHVIT_KERNELS_AUTO_TABLE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shvit_kernels" / "auto_table.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-{torch.get_num_threads()}t"


def bucket(numel: int) -> int:
    """The power of two of the element count: sizes within a factor of 2 share a measurement."""
    return max(int(numel), 1).bit_length() - 1


def _key(device: str, op: str, dtype: torch.dtype, b: int) -> str:
    return f"{device}|{op}|{str(dtype).removeprefix('torch.')}|{b}"


def entries() -> dict:
    """The table's entries (re-read when the file changes; {} when there is none)."""
    p = path()
    try:
        mtime = p.stat().st_mtime
    except OSError:
        return {}
    with _lock:
        hit = _cache.get(str(p))
        if hit is None or hit[0] != mtime:
            data = json.loads(p.read_text())
            if data.get("schema") != SCHEMA:
                raise ValueError(f"{p}: auto table schema {data.get('schema')!r}, expected {SCHEMA}; re-record it "
                                 "with `python -m shvit_kernels bench --record-auto`")
            hit = _cache[str(p)] = (mtime, data["entries"])
    return hit[1]


def lookup(op: str, device: torch.device, dtype: torch.dtype, numel: int) -> tuple[dict[str, float], int] | None:
    """(backend -> ms, bucket measured) for the nearest measured size of `op`, or None."""
    table = entries()
    if not table:
        return None
    name, b = device_name(device), bucket(numel)
    for d in sorted(range(-NEAREST, NEAREST + 1), key=abs):
        hit = table.get(_key(name, op, dtype, b + d))
        if hit:
            return hit["ms"], b + d
    return None


def record(op: str, device: torch.device, dtype: torch.dtype, numel: int, ms: dict[str, float], shape: str) -> None:
    """Store the measured times of `op`'s backends at this size (atomically: readers never see half a file)."""
    p = path()
    p.parent.mkdir(parents=True, exist_ok=True)
    table = dict(entries())
    table[_key(device_name(device), op, dtype, bucket(numel))] = {
        "ms": ms, "shape": shape, "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA, "entries": table}, indent=1, sort_keys=True))
    os.replace(tmp, p)
