#!/usr/bin/env bash
# compute-sanitizer over every registered CUDA kernel on tiny shapes (tests/gpu/sanitize_driver.py): memcheck
# (out-of-bounds and misaligned accesses) and racecheck (shared-memory hazards). Needs a GPU and a build with the
# CUDA kernels. Exits non-zero on any reported error.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
driver="$root/tests/gpu/sanitize_driver.py"
sanitizer="${COMPUTE_SANITIZER:-compute-sanitizer}"
command -v "$sanitizer" >/dev/null 2>&1 || { echo "compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 2; }

# Without the caching allocator every tensor is its own allocation, so memcheck sees accesses past its end.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
cd "$root"
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 20 python "$driver"
done
echo "sanitize: no errors"
