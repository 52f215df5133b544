"""Builds the C++/CUDA extension `shvit_kernels._C` (metadata is in pyproject.toml).

    pip install --no-build-isolation -e .          # torch comes from the environment

CPU kernels (csrc/cpu) are always built. The CUDA sources (csrc/cuda) join only when the installed torch has
CUDA and a CUDA toolkit is found; TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0").
SHVIT_KERNELS_NO_EXT=1 installs the pure-Python package without the extension. MAX_JOBS limits ninja's jobs.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools refuses absolute source paths for in-tree (editable) builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("SHVIT_KERNELS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = _sources("csrc/cpu/*.cpp") + ["csrc/module.cpp"]
    cxx = ["-O3", "-Wno-psabi"]  # psabi: the 64-byte vector types warn about an ABI they never cross
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline template: it runs in parallel only when compiled with OpenMP; the
        # runtime (libgomp) is the one torch already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "shvit_kernels._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension("shvit_kernels._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
