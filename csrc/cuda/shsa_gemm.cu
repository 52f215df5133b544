// The 1x1 convolutions of SHSA as fused tile GEMMs (tile_gemm.cuh), one Prob per use:
//   QkvProb     z = W_qkv @ GroupNorm(x1) [+ bias]          (GroupNorm applied in the B-operand load)
//   ProjProb    y = W_proj @ relu(cat[o, x2]) [+ bias] [+ x] (concat and ReLU formed in the B-operand load)
//   ProjBwdProb gu = W_proj^T @ gz, ReLU mask; rows < P -> go, the others -> grad_x [+ grad_y]
//   GnBwdProb   gn = W_qkv^T @ gz (fp32)
//   WgradProb   weight-gradient partials over a split of the B*N tokens (deterministic split-K)
// Grid = (N / 64, rows / 64, B) for the per-sample products, (cols / 64, rows / 64, splits) for the weight grads.
#include "shsa.cuh"
#include "tile_gemm.cuh"

namespace shvit::cuda::shsa {
namespace {

// relu(cat[o, x2])[j] of sample s at token n.
template <typename T>
struct ProjInput {
  const T* o;
  const T* x;
  int64_t C, P, N;
  __device__ __forceinline__ float pre(int64_t s, int64_t j, int64_t n) const {
    return j < P ? ld(o + (s * P + j) * N + n) : ld(x + (s * C + j) * N + n);
  }
  __device__ __forceinline__ float operator()(int64_t s, int64_t j, int64_t n) const {
    const float v = pre(s, j, n);
    return v < 0.f ? 0.f : v;
  }
};

template <typename T>
struct GnInput {
  const T* x;
  GroupNorm gn;
  int64_t C, N;
  __device__ __forceinline__ float operator()(int64_t s, int64_t p, int64_t n) const {
    return gn(ld(x + (s * C + p) * N + n), s, p);
  }
};

// Welford partial of row m of this block: partial index s = (sample, column tile), S = B * column tiles.
__device__ __forceinline__ void put_welford(float* part, int64_t rows, int64_t m, const Welford& w) {
  const int64_t S = int64_t{gridDim.z} * gridDim.x, s = int64_t{blockIdx.z} * gridDim.x + blockIdx.x;
  const int64_t i = s * rows + m, plane = S * rows;
  part[i] = w.n;
  part[plane + i] = w.mean;
  part[2 * plane + i] = w.m2;
}

// kStats: also the row statistics (training forward). The bias is added when there is one (eval form); the training
// forms store the pre-BN values.
template <typename T, bool kStats>
struct QkvProb {
  static constexpr bool kBKFastest = false, kRowStats = kStats;
  int64_t M, Nc, P;  // O, N, P
  const T* w;
  GnInput<T> in;
  const float* bias;
  T* z;
  float* part;
  __device__ void k_range(int, int64_t& k0, int64_t& k1) const { k0 = 0, k1 = P; }
  __device__ float a(int, int64_t m, int64_t k) const { return ld(w + m * P + k); }
  __device__ float b(int s, int64_t k, int64_t n) const { return in(s, k, n); }
  __device__ void store(int s, int64_t m, int64_t n, float v) const {
    z[(s * M + m) * Nc + n] = from_f<T>(bias != nullptr ? v + bias[m] : v);
  }
  __device__ void row_stats(int, int64_t m, const Welford& w) const { put_welford(part, M, m, w); }
};

template <typename T, bool kStats>
struct ProjProb {
  static constexpr bool kBKFastest = false, kRowStats = kStats;
  int64_t M, Nc;  // C, N
  const T* w;
  ProjInput<T> in;
  const float* bias;
  bool residual;
  T* y;
  float* part;
  __device__ void k_range(int, int64_t& k0, int64_t& k1) const { k0 = 0, k1 = M; }
  __device__ float a(int, int64_t m, int64_t k) const { return ld(w + m * M + k); }
  __device__ float b(int s, int64_t k, int64_t n) const { return in(s, k, n); }
  __device__ void store(int s, int64_t m, int64_t n, float v) const {
    const int64_t i = (s * M + m) * Nc + n;
    if (bias != nullptr) v += bias[m];
    if (residual) v += ld(in.x + i);
    y[i] = from_f<T>(v);
  }
  __device__ void row_stats(int, int64_t m, const Welford& w) const { put_welford(part, M, m, w); }
};

template <typename T>
struct ProjBwdProb {
  static constexpr bool kBKFastest = false, kRowStats = false;
  int64_t M, Nc;  // C, N
  const T* w;
  const T* gz;
  ProjInput<T> in;
  const T* gy;
  bool residual;
  T* go;
  T* gx;
  __device__ void k_range(int, int64_t& k0, int64_t& k1) const { k0 = 0, k1 = M; }
  __device__ float a(int, int64_t j, int64_t c) const { return ld(w + c * M + j); }
  __device__ float b(int s, int64_t c, int64_t n) const { return ld(gz + (s * M + c) * Nc + n); }
  __device__ void store(int s, int64_t j, int64_t n, float v) const {
    if (!(in.pre(s, j, n) > 0.f)) v = 0.f;  // ReLU mask: u > 0
    if (j < in.P) {
      go[(s * in.P + j) * Nc + n] = from_f<T>(v);
    } else {
      const int64_t i = (s * M + j) * Nc + n;
      gx[i] = from_f<T>(residual ? v + ld(gy + i) : v);
    }
  }
  __device__ void row_stats(int, int64_t, const Welford&) const {}
};

template <typename T>
struct GnBwdProb {
  static constexpr bool kBKFastest = false, kRowStats = false;
  int64_t M, Nc, O;  // P, N, O
  const T* w;
  const T* gz;
  float* gn;
  __device__ void k_range(int, int64_t& k0, int64_t& k1) const { k0 = 0, k1 = O; }
  __device__ float a(int, int64_t p, int64_t o) const { return ld(w + o * M + p); }
  __device__ float b(int s, int64_t o, int64_t n) const { return ld(gz + (s * O + o) * Nc + n); }
  __device__ void store(int s, int64_t p, int64_t n, float v) const { gn[(s * M + p) * Nc + n] = v; }
  __device__ void row_stats(int, int64_t, const Welford&) const {}
};

// part[z][m][col] = sum over tokens t of split z of gz[b, m, n] * in(b, col, n), t = b * N + n.
template <typename T, typename In>
struct WgradProb {
  static constexpr bool kBKFastest = true, kRowStats = false;
  int64_t M, Nc;  // rows of gz, channels of in
  const T* gz;
  In in;
  float* part;
  uint32_t N, tokens, chunk;  // the launcher checks B * N < 2^31: 32-bit token arithmetic
  __device__ void k_range(int z, int64_t& k0, int64_t& k1) const {
    k0 = int64_t{chunk} * z;
    k1 = k0 + chunk < tokens ? k0 + chunk : tokens;
  }
  __device__ float a(int, int64_t m, int64_t t) const {
    const uint32_t s = static_cast<uint32_t>(t) / N, n = static_cast<uint32_t>(t) - s * N;
    return ld(gz + (s * M + m) * N + n);
  }
  __device__ float b(int, int64_t t, int64_t col) const {
    const uint32_t s = static_cast<uint32_t>(t) / N, n = static_cast<uint32_t>(t) - s * N;
    return in(s, col, n);
  }
  __device__ void store(int z, int64_t m, int64_t col, float v) const { part[(z * M + m) * Nc + col] = v; }
  __device__ void row_stats(int, int64_t, const Welford&) const {}
};

template <typename T, typename In>
Status wgrad(const Dims& d, int64_t rows, int64_t cols, const void* gz, In in, float* part, int64_t splits,
             cudaStream_t stream, const char* where) {
  const int64_t tokens = d.B * d.N;
  const int64_t chunk = ceil_div(ceil_div(tokens, splits), gemm::kBK) * gemm::kBK;
  const WgradProb<T, In> pr{rows, cols, static_cast<const T*>(gz), in, part, static_cast<uint32_t>(d.N),
                            static_cast<uint32_t>(tokens), static_cast<uint32_t>(chunk)};
  return gemm::launch<T>(pr, splits, stream, where);
}

}  // namespace

int64_t gemm_col_tiles(const Dims& d) { return ceil_div(d.N, gemm::kBN); }

int64_t wgrad_splits(int64_t rows, int64_t cols, int64_t tokens) {
  // About 264 blocks (two per SM of an H100) and at least 256 tokens per split; fixed by the shape alone.
  const int64_t tiles = ceil_div(rows, gemm::kBM) * ceil_div(cols, gemm::kBN);
  const int64_t by_tokens = ceil_div(tokens, 256), by_blocks = ceil_div(264, tiles);
  const int64_t s = by_tokens < by_blocks ? by_tokens : by_blocks;
  return s < 1 ? 1 : s > 64 ? 64 : s;
}

Status qkv(DType dt, const Dims& d, const void* x, GroupNorm gn, const void* w, const float* bias, void* z,
           float* part, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const GnInput<T> in{static_cast<const T*>(x), gn, d.C, d.N};
    if (part == nullptr) {
      const QkvProb<T, false> pr{d.O, d.N, d.P, static_cast<const T*>(w), in, bias, static_cast<T*>(z), nullptr};
      return gemm::launch<T>(pr, d.B, stream, "shsa/qkv");
    }
    const QkvProb<T, true> pr{d.O, d.N, d.P, static_cast<const T*>(w), in, bias, static_cast<T*>(z), part};
    return gemm::launch<T>(pr, d.B, stream, "shsa/qkv (training)");
  });
}

Status proj(DType dt, const Dims& d, const void* o, const void* x, const void* w, const float* bias, bool residual,
            void* y, float* part, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const ProjInput<T> in{static_cast<const T*>(o), static_cast<const T*>(x), d.C, d.P, d.N};
    if (part == nullptr) {
      const ProjProb<T, false> pr{d.C, d.N, static_cast<const T*>(w), in, bias, residual, static_cast<T*>(y), nullptr};
      return gemm::launch<T>(pr, d.B, stream, "shsa/proj");
    }
    const ProjProb<T, true> pr{d.C, d.N, static_cast<const T*>(w), in, bias, residual, static_cast<T*>(y), part};
    return gemm::launch<T>(pr, d.B, stream, "shsa/proj (training)");
  });
}

Status wgrad_proj(DType dt, const Dims& d, const void* gz, const void* o, const void* x, float* part, int64_t splits,
                  cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const ProjInput<T> in{static_cast<const T*>(o), static_cast<const T*>(x), d.C, d.P, d.N};
    return wgrad<T>(d, d.C, d.C, gz, in, part, splits, stream, "shsa/proj weight grad");
  });
}

Status wgrad_qkv(DType dt, const Dims& d, const void* gz, const void* x, GroupNorm gn, float* part, int64_t splits,
                 cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const GnInput<T> in{static_cast<const T*>(x), gn, d.C, d.N};
    return wgrad<T>(d, d.O, d.P, gz, in, part, splits, stream, "shsa/qkv weight grad");
  });
}

Status proj_bwd(DType dt, const Dims& d, const void* w, const void* gz, const void* o, const void* x, const void* gy,
                bool residual, void* go, void* gx, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const ProjInput<T> in{static_cast<const T*>(o), static_cast<const T*>(x), d.C, d.P, d.N};
    const ProjBwdProb<T> pr{d.C, d.N, static_cast<const T*>(w), static_cast<const T*>(gz), in,
                            static_cast<const T*>(gy), residual, static_cast<T*>(go), static_cast<T*>(gx)};
    return gemm::launch<T>(pr, d.B, stream, "shsa/proj backward");
  });
}

Status gn_bwd(DType dt, const Dims& d, const void* w, const void* gz, float* gn, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const GnBwdProb<T> pr{d.P, d.N, d.O, static_cast<const T*>(w), static_cast<const T*>(gz), gn};
    return gemm::launch<T>(pr, d.B, stream, "shsa/qkv backward");
  });
}

}  // namespace shvit::cuda::shsa
