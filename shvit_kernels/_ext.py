"""Loads the compiled extension (`shvit_kernels._C`) once, and remembers why it failed if it did.

The package must import without it: the CPU/CUDA backends are then unavailable and ops fall back
to the reference, with one warning.
"""
from __future__ import annotations

import importlib
import warnings

_loaded: bool | None = None
_error: str = ""


def load() -> bool:
    """Import the extension (registers the `shvit::*_cpu` / `*_cuda` kernels); True on success."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("shvit_kernels._C")
            _loaded = True
        except ImportError as exc:  # not built, or built against another torch
            _loaded = False
            _error = f"C++ extension shvit_kernels._C not importable ({exc})"
            warnings.warn(
                f"{_error}; the 'cpu' and 'cuda' backends are unavailable and ops fall back to "
                "'reference'. Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _loaded


def error() -> str:
    load()
    return _error


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with the CUDA sources."""
    import torch

    return load() and hasattr(torch.ops.shvit, "cuda_build_info")
