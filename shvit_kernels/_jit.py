"""Just-in-time build of the CUDA kernels, for an install made without them (CPU-only build of the extension, or
no extension at all) on a machine with a CUDA torch and a CUDA toolkit:

    import shvit_kernels
    from shvit_kernels._jit import build_cuda
    build_cuda()                                   # compiles once; later calls and processes reuse torch's cache
    with shvit_kernels.use_backend("cuda"):
        y = shvit_kernels.ops.dwconv_bn(x, w, b)

The sources are csrc/cuda (and csrc/cpu when the compiled extension is absent, since the C++ schemas of the
`shvit` namespace live there) from a source checkout; they are compiled by `torch.utils.cpp_extension.load` into
`shvit_kernels_jit` under torch's extension cache (TORCH_EXTENSIONS_DIR), for the architectures in
TORCH_CUDA_ARCH_LIST (default: those of the visible GPUs). Loading the library registers the `shvit::*_cuda` ops;
the backend registry is then refreshed so that "cuda" shows up in `available_backends()`.
"""
from __future__ import annotations

import sys
from pathlib import Path

_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def build_cuda(verbose: bool = False) -> None:
    """Compile and load the CUDA kernels (and the CPU ones when the extension is not importable).

    Does nothing when the loaded extension already has them. Raises RuntimeError when torch has no CUDA, no CUDA
    toolkit is found, or the sources are not there (an install from a wheel ships no csrc/).
    """
    import torch
    from torch.utils import cpp_extension

    from . import _ext, backends

    if torch.version.cuda is None:
        raise RuntimeError(f"build_cuda: torch {torch.__version__} was built without CUDA; "
                           "install a CUDA build of torch")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("build_cuda: no CUDA toolkit found (set CUDA_HOME to the directory that holds bin/nvcc)")
    if not (_CSRC / "cuda").is_dir():
        raise RuntimeError(f"build_cuda: CUDA sources not found in {_CSRC / 'cuda'} (build from a source checkout)")
    with_cpu = not _ext.load()
    if not with_cpu and _ext.has_cuda_kernels():
        return
    # The compiled extension already registers the CPU kernels and the schemas they define: build them only when it
    # is absent (a second TORCH_LIBRARY(shvit) in the process would be an error).
    sources = sorted(str(p) for p in (_CSRC / "cuda").glob("*.cu")) + sorted(
        str(p) for p in (_CSRC / "cuda").glob("*.cpp"))
    cflags, ldflags = ["-O3"], []
    if with_cpu:
        sources = sorted(str(p) for p in (_CSRC / "cpu").glob("*.cpp")) + sources
        cflags.append("-Wno-psabi")  # the CPU kernels' 64-byte vector types, as in setup.py
        if sys.platform.startswith("linux"):  # at::parallel_for runs in parallel only with OpenMP
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
    cpp_extension.load(name="shvit_kernels_jit", sources=sources, extra_cflags=cflags,
                       extra_cuda_cflags=["-O3", "-lineinfo"], extra_ldflags=ldflags, with_cuda=True,
                       is_python_module=False, verbose=verbose)
    # The ops are registered now: let the loader and the registry see them (both cache what they found at first use).
    _ext._loaded, _ext._error = True, ""
    backends.availability.cache_clear()
    backends._chosen.clear()
