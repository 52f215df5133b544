// Column reductions of per-block partials (see reduce.cuh). Block (32, 16): 32 columns, 16 threads walk the S
// partials of a column with a stride of 16, then a fixed tree combines the 16 running values.
#include "reduce.cuh"

namespace shvit::cuda {
namespace {

constexpr int kCols = 32, kRows = 16;

template <typename V, typename Load>
__device__ V reduce_column(int64_t S, V init, Load load) {
  __shared__ V red[kRows][kCols + 1];
  V v = init;
  for (int64_t s = threadIdx.y; s < S; s += kRows) v = merge_any(v, load(s));
  red[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  for (int half = kRows / 2; half > 0; half /= 2) {
    if (threadIdx.y < half)
      red[threadIdx.y][threadIdx.x] = merge_any(red[threadIdx.y][threadIdx.x], red[threadIdx.y + half][threadIdx.x]);
    __syncthreads();
  }
  return red[0][threadIdx.x];
}

__global__ void __launch_bounds__(kCols * kRows) sum_kernel(const float* __restrict__ part, int64_t S, int64_t R,
                                                            float* __restrict__ out) {
  const int64_t r = int64_t{blockIdx.x} * kCols + threadIdx.x;
  const float v = reduce_column(S, 0.f, [&](int64_t s) { return r < R ? part[s * R + r] : 0.f; });
  if (threadIdx.y == 0 && r < R) out[r] = v;
}

__global__ void __launch_bounds__(kCols * kRows) welford_kernel(const float* __restrict__ part, int64_t S,
                                                                int64_t R, float* __restrict__ mean,
                                                                float* __restrict__ var) {
  const int64_t r = int64_t{blockIdx.x} * kCols + threadIdx.x;
  const int64_t plane = S * R;
  const Welford w = reduce_column(S, Welford{0.f, 0.f, 0.f}, [&](int64_t s) {
    const int64_t i = s * R + r;
    return r < R ? Welford{part[i], part[plane + i], part[2 * plane + i]} : Welford{0.f, 0.f, 0.f};
  });
  if (threadIdx.y == 0 && r < R) {
    mean[r] = w.mean;
    var[r] = w.m2 / w.n;
  }
}

}  // namespace

Status sum_partials(const float* part, int64_t S, int64_t R, float* out, cudaStream_t stream, const char* where) {
  sum_kernel<<<ceil_div(R, kCols), dim3(kCols, kRows), 0, stream>>>(part, S, R, out);
  SHVIT_CHECK_LAUNCH(where);
  return kOk;
}

Status welford_partials(const float* part, int64_t S, int64_t R, float* mean, float* var, cudaStream_t stream,
                        const char* where) {
  welford_kernel<<<ceil_div(R, kCols), dim3(kCols, kRows), 0, stream>>>(part, S, R, mean, var);
  SHVIT_CHECK_LAUNCH(where);
  return kOk;
}

}  // namespace shvit::cuda
