// Second level of the deterministic reductions: kernels write per-block partials to a [S][R] fp32 buffer and these
// launchers reduce each of the R columns over S in a fixed order (no atomics, so results are reproducible).
#pragma once

#include "common.cuh"

namespace shvit::cuda {

// out[r] = sum over s of part[s * R + r].
Status sum_partials(const float* part, int64_t S, int64_t R, float* out, cudaStream_t stream, const char* where);

// Welford partials stored as three [S][R] planes (count, mean, m2) one after the other; writes the mean and the
// biased variance (m2 / count) of each column.
Status welford_partials(const float* part, int64_t S, int64_t R, float* mean, float* var, cudaStream_t stream,
                        const char* where);

}  // namespace shvit::cuda
