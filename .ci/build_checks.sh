#!/usr/bin/env bash
# Build checks that need no GPU:
#  1. the CPU kernels built with CMake against the installed torch's libtorch, and their C++ tests (ctest);
#  2. every CUDA source in csrc/cuda/*.cu compiled (not run) with nvcc for sm_80 and sm_90, when nvcc exists.
#     The .cu files are torch-free, so this needs only the CUDA toolkit.
# Exits non-zero on the first failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs="${MAX_JOBS:-$(nproc)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== CMake build + ctest of the CPU kernels"
prefix="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S "$root" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release
cmake --build "$work/cmake" -j "$jobs"
ctest --test-dir "$work/cmake" --output-on-failure

echo "== nvcc compile of csrc/cuda/*.cu"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: skipping the CUDA compile check"
  exit 0
fi
shopt -s nullglob
cu_files=("$root"/csrc/cuda/*.cu)
if [ ${#cu_files[@]} -eq 0 ]; then
  echo "no .cu files in csrc/cuda: nothing to compile"
  exit 0
fi
nvcc --version | tail -n 1
for f in "${cu_files[@]}"; do
  echo "nvcc -c $(basename "$f")"
  nvcc -c -std=c++17 -O3 -Xcompiler -Wall \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -o "$work/$(basename "$f" .cu).o" "$f"
done
echo "compiled ${#cu_files[@]} CUDA source(s)"
