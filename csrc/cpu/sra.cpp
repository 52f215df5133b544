// Fused PVT spatial-reduction attention (SRA) on the CPU, float32 / float64: reduce_fwd / reduce_bwd /
// attn_fwd / attn_bwd of shvit_kernels/reference/sra.py, same arguments, same results.
//
// Tokens are rows: x (B, N, C) and red (B, M, C) are row-major, a sample is an (N x C) matrix.
// - reduce: Conv2d(k = stride = r) is one GEMM over the batch's output tokens (rows: their r x r patches, r runs
//   of r*C contiguous values of x) against the weight reordered once per call; tiles of it gather their patches
//   from x into cache, and one pass per token adds the partial sums, the bias and runs LayerNorm (+ GELU).
//   `linear`: the 7x7 adaptive average pool gives the rows.
// - attention: kv = red Wkv^T + b per sample first (M << N rows); then per (sample, block of queries) the scores
//   of all heads (block x heads*M, cache-resident; online softmax over key blocks past kKeyBlock keys), exp and
//   row sums, P.V written straight into o, 1 / sum and the logsumexp: no (B, heads, N, M) tensor, no q / k / v
//   copies. Where cheaper (always with one head) the q projection is folded into the keys per sample:
//   S = x (scale Wq^T K^T) + scale bq K^T, which skips the N x C x C q GEMM.
// - backward: recomputes q, kv and P = exp(S - lse); dq, dk, dv per block as in flash attention.
//
// GEMMs: plain fp32 ones go to oneDNN's JIT brgemm through ATen (AVX-512; MKL takes its AVX2 path on AMD and is
// slower on these small shapes), the rest straight to the BLAS torch links (at::addmm would cost microseconds per
// call; the attention makes hundreds). Elementwise fp32 work runs in GCC vector types compiled for AVX-512 / AVX2
// where the CPU has them.
//
// Determinism: tasks are fixed by the shapes, never by the thread count; BLAS runs single-threaded in each task;
// sums across tasks add per-task partials in task order. Results are bitwise identical for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "isa.h"
#include "kernel_common.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace shvit::cpu {
namespace {

constexpr int64_t kQueryBlock = 128;  // query rows per attention task: q, scores and o rows stay in L1/L2
constexpr int64_t kKeyBlock = 256;    // keys per score buffer; beyond it the softmax goes online
constexpr int64_t kMinTasks = 16;     // backward: split samples into query chunks until the batch gives this many
constexpr int64_t kSumRows = 2048;    // weight gradients: rows of the sum per task (fixed-order split-K)
constexpr int64_t kGradCols = 512;    // ... and output columns per task
constexpr int64_t kRedRows = 256;    // reduce: conv output tokens per GEMM tile...
constexpr int64_t kRedCols = 512;    // ... and about this many patch columns (whole patch rows) per K chunk
constexpr int64_t kNormRows = 64;    // reduce: tokens per LayerNorm task

// ---- GEMM and tasks ------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out (m x n, row-major) = a^T b summed over k rows (a: k x m, b: k x n, row strides lda, ldb): a weight gradient
// over the whole batch. Tasks are fixed tiles (kSumRows rows of the sum x kGradCols columns) into per-row-chunk
// partials, added in chunk order, so every element's sum order is fixed by the shapes.
template <typename T>
void gemm_tn_sum(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* out) {
  const int64_t kc = std::max<int64_t>(1, ceil_div(k, kSumRows)), nc = ceil_div(n, kGradCols);
  const Scratch<T> part_s({kc > 1 ? kc * m * n : 0});
  T* part = kc > 1 ? part_s[0] : out;
  parallel_tasks(kc * nc, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t / nc * kSumRows, c0 = t % nc * kGradCols;
      gemm<T>(true, false, m, std::min(kGradCols, n - c0), std::min(kSumRows, k - r0), T(1), a + r0 * lda + 0, lda,
              b + r0 * ldb + c0, ldb, T(0), part + t / nc * m * n + c0, n);
    }
  });
  if (kc == 1) return;
  parallel_tasks(ceil_div(m * n, 4096), [&](int64_t t0, int64_t t1) {
    for (int64_t e = t0 * 4096; e < std::min(t1 * 4096, m * n); ++e) {
      T s = part[e];
      for (int64_t c = 1; c < kc; ++c) s += part[c * m * n + e];
      out[e] = s;
    }
  });
}

// ---- fp32 SIMD -----------------------------------------------------------------------------------------------
// GCC vector types of L floats. with_simd(f) calls f(lanes) from a function compiled for the instruction set cpu_isa()
// picks (isa.h); `flatten` inlines f's whole call tree there, so the generic code below becomes AVX-512 / AVX2 code.

template <int L>
struct Lanes {
  typedef float f __attribute__((vector_size(4 * L)));
  typedef int32_t i __attribute__((vector_size(4 * L)));
};

#if SHVIT_MULTI_ISA
template <typename F>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), flatten)) void run_avx512(const F& f) {
  f(std::integral_constant<int, 16>());
}
template <typename F>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const F& f) {
  f(std::integral_constant<int, 8>());
}
#endif

template <typename F>
void with_simd(const F& f) {
#if SHVIT_MULTI_ISA
  if (cpu_isa() == Isa::kAvx512) return run_avx512(f);
  if (cpu_isa() == Isa::kAvx2) return run_avx2(f);
#endif
  f(std::integral_constant<int, 4>());
}

template <typename V>
inline V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void vstore(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// exp(x) for x <= 0 (after max subtraction; tiny positive x from rounding are fine): Cody-Waite reduction to
// |r| <= ln2 / 2 and a degree-7 Taylor polynomial (relative error < 1e-8 before rounding); below -87 it returns
// about 2^-126 instead of 0, which no softmax sum notices.
template <int L>
inline typename Lanes<L>::f exp_le0(typename Lanes<L>::f x) {
  using V = typename Lanes<L>::f;
  const V zero = {};
  x = x < -87.0f ? zero - 87.0f : x;
  const V kf = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln2) by the 1.5 * 2^23 trick
  const V r = (x - kf * 0.693145752f) - kf * 1.42860677e-6f;  // ln2 split into a part exact in float + rest
  V p = zero + 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const typename Lanes<L>::i bits = (__builtin_convertvector(kf, typename Lanes<L>::i) + 127) << 23;
  V two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return p * two_k;
}

// Horizontal sum / max in log depth (halves of the vector), not a chain of L dependent scalar ops.
template <int L, typename Op>
inline float reduce_lanes(typename Lanes<L>::f v, Op op) {
  if constexpr (L == 4) {
    return op(op(v[0], v[2]), op(v[1], v[3]));
  } else {
    typename Lanes<L / 2>::f lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return reduce_lanes<L / 2>(op(lo, hi), op);
  }
}

template <int L, size_t... J>
constexpr typename Lanes<L>::i zip_mask(std::index_sequence<J...>, int offset) {
  return typename Lanes<L>::i{int(J / 2 + J % 2 * L + offset)...};
}

// In-register transpose of the L x L block v (rows): log2(L) rounds of interleaving rows i and i + L/2.
template <int L>
inline void transpose(typename Lanes<L>::f (&v)[L]) {
  using V = typename Lanes<L>::f;
  constexpr auto lo = zip_mask<L>(std::make_index_sequence<L>(), 0);
  constexpr auto hi = zip_mask<L>(std::make_index_sequence<L>(), L / 2);
  for (int round = 1; round < L; round *= 2) {
    V t[L];
    for (int i = 0; i < L / 2; ++i) {
      t[2 * i] = __builtin_shuffle(v[i], v[i + L / 2], lo);
      t[2 * i + 1] = __builtin_shuffle(v[i], v[i + L / 2], hi);
    }
    std::copy(t, t + L, v);
  }
}

// r[j] += bias[j] (when given) over [0, n); returns the row max.
template <int L>
inline float add_max(float* r, const float* bias, int64_t n) {
  using V = typename Lanes<L>::f;
  V vm = V{} - INFINITY;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    V v = vload<V>(r + j);
    if (bias) {
      v += vload<V>(bias + j);
      vstore(r + j, v);
    }
    vm = v > vm ? v : vm;
  }
  float mx = reduce_lanes<L>(vm, [](auto a, auto b) { return a > b ? a : b; });
  for (; j < n; ++j) mx = std::max(mx, bias ? r[j] += bias[j] : r[j]);
  return mx;
}

// r[j] = exp(r[j] - shift) over [0, n); returns the sum. A partial last vector is the last L elements, computed
// before the loop overwrites their front (the same values are then stored twice) and counted only in its new
// lanes, so every element goes through the vector exp.
template <int L>
inline float exp_sum(float* r, int64_t n, float shift) {
  using V = typename Lanes<L>::f;
  using I = typename Lanes<L>::i;
  const int64_t t = n % L;
  V tail = {}, acc = {};
  if (n < L) {  // a short row: through a padded copy
    float pad[L] = {};
    std::copy(r, r + n, pad);
    vstore(pad, exp_le0<L>(vload<V>(pad) - shift));
    std::copy(pad, pad + n, r);
    float sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += pad[j];
    return sum;
  }
  if (t) tail = exp_le0<L>(vload<V>(r + n - L) - shift);
  for (int64_t j = 0; j + L <= n; j += L) {
    const V e = exp_le0<L>(vload<V>(r + j) - shift);
    vstore(r + j, e);
    acc += e;
  }
  if (t) {
    I lane;
    for (int l = 0; l < L; ++l) lane[l] = l;
    vstore(r + n - L, tail);
    acc += lane >= int(L - t) ? tail : V{};
  }
  return reduce_lanes<L>(acc, [](auto a, auto b) { return a + b; });
}

// ---- softmax pieces on a score block s (rows x n, row stride ld) ---------------------------------------------

// s = exp(s + bias - new row max) in place, with the running max mx and sum: for the first key block they start
// here; later blocks (online softmax) rescale: corr = exp(old - new max), sum = sum * corr + rowsum.
template <typename T>
void softmax_block(T* s, int64_t rows, int64_t n, int64_t ld, const T* bias, bool first, T* mx, T* sum, T* corr) {
  const auto update = [&](int64_t i, T rmax, auto exp_sum_fn) {
    const T mnew = first ? rmax : std::max(mx[i], rmax);
    const T e = exp_sum_fn(mnew);
    if (first) {
      sum[i] = e;
    } else {
      corr[i] = std::exp(mx[i] - mnew);
      sum[i] = sum[i] * corr[i] + e;
    }
    mx[i] = mnew;
  };
  if constexpr (std::is_same_v<T, float>) {
    with_simd([&](auto lanes) {
      constexpr int L = decltype(lanes)::value;
      for (int64_t i = 0; i < rows; ++i) {
        float* r = s + i * ld;
        update(i, add_max<L>(r, bias, n), [&](float m) { return exp_sum<L>(r, n, m); });
      }
    });
  } else {
    for (int64_t i = 0; i < rows; ++i) {
      T* r = s + i * ld;
      if (bias)
        for (int64_t j = 0; j < n; ++j) r[j] += bias[j];
      update(i, *std::max_element(r, r + n), [&](T m) {
        T e = 0;
        for (int64_t j = 0; j < n; ++j) e += r[j] = std::exp(r[j] - m);
        return e;
      });
    }
  }
}

// Backward: s = P = exp(s + bias - lse_i), then gp = P * (gp - d_i) (the gradient of the scores); row stride ld.
template <typename T>
void softmax_grad_block(T* s, T* gp, int64_t rows, int64_t n, int64_t ld, const T* bias, const T* lse, const T* d) {
  if constexpr (std::is_same_v<T, float>) {
    with_simd([&](auto lanes) {
      constexpr int L = decltype(lanes)::value;
      for (int64_t i = 0; i < rows; ++i) {
        float *r = s + i * ld, *g = gp + i * ld;
        if (bias)
          for (int64_t j = 0; j < n; ++j) r[j] += bias[j];
        exp_sum<L>(r, n, lse[i]);
        const float di = d[i];
        for (int64_t j = 0; j < n; ++j) g[j] = r[j] * (g[j] - di);
      }
    });
  } else {
    for (int64_t i = 0; i < rows; ++i) {
      T *r = s + i * ld, *g = gp + i * ld;
      for (int64_t j = 0; j < n; ++j) {
        r[j] = std::exp(r[j] + (bias ? bias[j] : T(0)) - lse[i]);
        g[j] = r[j] * (g[j] - d[i]);
      }
    }
  }
}

template <typename T>
void add_bias_rows(T* a, int64_t rows, int64_t n, int64_t ld, const T* bias) {
  if (!bias) return;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) a[i * ld + j] += bias[j];
}

// ---- spatial reduction ---------------------------------------------------------------------------------------
// The conv is one GEMM over all B*M output tokens: rows of patches (M x K per sample) times the weight. It runs as
// fixed tiles (row groups x K chunks of whole patch rows ky), each gathering its patch tile from x into cache (no
// im2col of the batch), into per-chunk partials that the LayerNorm pass adds in chunk order: the batch forms one
// tall GEMM (~20% faster than one per sample) and small batches still split over threads.

struct RedDims {
  int64_t B, H, W, C, r, ho, wo, M, K;  // K: patch length (r * r * C; C when linear)
  bool linear;
  double eps;
  int64_t kc, nk;  // columns per K chunk (whole patch rows ky), number of chunks
  int64_t N() const { return H * W; }
  int64_t rows() const { return B * M; }
  int64_t groups() const { return ceil_div(rows(), kRedRows); }
};

RedDims red_dims(const at::Tensor& x, int64_t h, int64_t w, int64_t sr_ratio, bool linear, double eps) {
  const int64_t r = linear ? 1 : sr_ratio, c = x.size(2);
  const int64_t ho = linear ? 7 : h / r, wo = linear ? 7 : w / r;
  const int64_t kyc = std::clamp<int64_t>(kRedCols / (r * c), 1, r);  // patch rows per chunk
  return {x.size(0), h, w, c, r, ho, wo, ho * wo, r * r * c, linear, eps, kyc * r * c, ceil_div(r, kyc)};
}

// Adaptive-pool bin [start, end) of output i of n (ATen's bins).
inline std::pair<int64_t, int64_t> bin(int64_t i, int64_t in, int64_t out) {
  return {i * in / out, ((i + 1) * in + out - 1) / out};
}

// Columns [k * kc, (k + 1) * kc) of the patch rows [r0, r0 + n) (over all samples) into p (n x width, row stride
// kc): patch rows ky are r * C contiguous values of x; `linear`: the 7x7 average pool (one chunk).
template <typename T>
void patch_tile(const RedDims& d, const T* x, int64_t r0, int64_t n, int64_t k, T* p) {
  const int64_t C = d.C, run = d.r * C;
  for (int64_t row = r0; row < r0 + n; ++row) {
    const int64_t b = row / d.M, i = row % d.M / d.wo, j = row % d.M % d.wo;
    const T* xs = x + b * d.N() * C;
    T* out = p + (row - r0) * d.kc;
    if (!d.linear) {
      for (int64_t ky = k * d.kc / run; ky < std::min(d.r, (k + 1) * d.kc / run); ++ky, out += run)
        std::memcpy(out, xs + ((i * d.r + ky) * d.W + j * d.r) * C, run * sizeof(T));
      continue;
    }
    const auto [y0, y1] = bin(i, d.H, 7);
    const auto [x0, x1] = bin(j, d.W, 7);
    std::fill(out, out + C, T(0));
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t xx = x0; xx < x1; ++xx) {
        const T* src = xs + (y * d.W + xx) * C;
        for (int64_t c = 0; c < C; ++c) out[c] += src[c];
      }
    const T inv = T(1) / T((y1 - y0) * (x1 - x0));
    for (int64_t c = 0; c < C; ++c) out[c] *= inv;
  }
}

int64_t chunk_width(const RedDims& d, int64_t k) { return std::min(d.kc, d.K - k * d.kc); }

// Conv weight (C, C, r, r) as the (K x C) GEMM operand: rows in the patches' (ky, kx, c_in) order, plain (not
// transposed) so that the conv runs on the JIT GEMM. It is the transpose of w seen as (C) x (C * rr) columns
// (c_in, k), each column stored as row k * C + c_in: L x L tiles transposed in registers (element loops either
// read or write with a stride of C * rr floats, every access in the same L1 set: 10x slower).
template <typename T>
at::Tensor conv_matrix(const RedDims& d, const T* w) {
  at::Tensor wt = buffer<T>(d.K * d.C);
  T* out = wt.mutable_data_ptr<T>();
  const int64_t C = d.C, rr = d.r * d.r, cols = C * rr;
  const auto row_of = [&](int64_t j) { return out + (j % rr * C + j / rr) * C; };  // column j = (c_in, k)
  const auto scalar = [&](int64_t co0, int64_t co1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t co = co0; co < co1; ++co) row_of(j)[co] = w[co * cols + j];
  };
  parallel_tasks(ceil_div(cols, 64), [&](int64_t t0, int64_t t1) {
    const int64_t j0 = t0 * 64, j1 = std::min(t1 * 64, cols);
    if constexpr (std::is_same_v<T, float>) {
      with_simd([&](auto lanes) {
        constexpr int L = decltype(lanes)::value;
        using V = typename Lanes<L>::f;
        const int64_t cf = C / L * L, jf = j0 + (j1 - j0) / L * L;
        for (int64_t co = 0; co < cf; co += L)
          for (int64_t j = j0; j < jf; j += L) {
            V v[L];
            for (int i = 0; i < L; ++i) v[i] = vload<V>(w + (co + i) * cols + j);
            transpose<L>(v);
            for (int i = 0; i < L; ++i) vstore(row_of(j + i) + co, v[i]);
          }
        scalar(0, cf, jf, j1);
        scalar(cf, C, j0, j1);
      });
    } else {
      scalar(0, C, j0, j1);
    }
  });
  return wt;
}

// Pre-bias conv output of every token as nk partials (nk x rows x C; summed by the caller). With keep (linear),
// the pooled rows stay there too (rows x C) for the weight gradient.
template <typename T>
void conv_partials(const RedDims& d, const T* x, const T* wt, T* part, T* keep) {
  const int64_t rows = d.rows();
  parallel_tasks(d.groups() * d.nk, [&](int64_t t0, int64_t t1) {
    const Scratch<T> s({keep ? 0 : kRedRows * d.kc});
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / d.nk, k = t % d.nk, r0 = g * kRedRows, n = std::min(kRedRows, rows - r0);
      T* p = keep ? keep + r0 * d.C : s[0];
      patch_tile(d, x, r0, n, k, p);
      gemm<T>(false, false, n, d.C, chunk_width(d, k), T(1), p, d.kc, wt + k * d.kc * d.C, d.C, T(0),
              part + (k * rows + r0) * d.C, d.C);
    }
  });
}

// z (C values) = sum of the partials + bias, then z = (z - mean) * rstd (zhat, the reference's biased variance);
// returns rstd.
template <typename T>
T normalize(const RedDims& d, const T* part, int64_t row, const T* bias, T* z) {
  const int64_t C = d.C;
  for (int64_t c = 0; c < C; ++c) z[c] = part[row * C + c];
  for (int64_t k = 1; k < d.nk; ++k)
    for (int64_t c = 0; c < C; ++c) z[c] += part[(k * d.rows() + row) * C + c];
  double s = 0;
  for (int64_t c = 0; c < C; ++c) s += z[c] += bias[c];
  const T mean = T(s / C);
  double v = 0;
  for (int64_t c = 0; c < C; ++c) v += double(z[c] - mean) * double(z[c] - mean);
  const T rstd = T(1.0 / std::sqrt(v / C + d.eps));
  for (int64_t c = 0; c < C; ++c) z[c] = (z[c] - mean) * rstd;
  return rstd;
}

template <typename T>
T gelu(T t) {
  return T(0.5) * t * (T(1) + std::erf(t * T(M_SQRT1_2)));
}

template <typename T>
T gelu_grad(T t) {  // Phi(t) + t phi(t)
  return T(0.5) * (T(1) + std::erf(t * T(M_SQRT1_2))) + t * std::exp(T(-0.5) * t * t) * T(0.3989422804014327);
}

template <typename T>
void reduce_forward(const RedDims& d, const T* x, const T* wt, const T* sr_b, const T* ln_w, const T* ln_b, T* red) {
  const Scratch<T> part_s({d.nk * d.rows() * d.C});
  T* part = part_s[0];
  conv_partials<T>(d, x, wt, part, nullptr);
  parallel_tasks(ceil_div(d.rows(), kNormRows), [&](int64_t t0, int64_t t1) {
    std::vector<T> z(d.C);
    for (int64_t row = t0 * kNormRows; row < std::min(t1 * kNormRows, d.rows()); ++row) {
      normalize(d, part, row, sr_b, z.data());
      T* out = red + row * d.C;
      for (int64_t c = 0; c < d.C; ++c) {
        const T t = z[c] * ln_w[c] + ln_b[c];
        out[c] = d.linear ? gelu(t) : t;
      }
    }
  });
}

// Gradients of reduce_forward: (1) the conv output again; (2) per token the LayerNorm (+ GELU) backward into gz,
// with per-row-chunk sums for the LayerNorm / conv-bias gradients; (3) per K chunk (looping over the row groups,
// so that the chunk's weight-gradient columns sum in a fixed order) g_wp += gz^T P and the patches' gradient
// gz Wp, copied back to their pixels (patches do not overlap). `linear`: the pool's gradient per sample instead
// (bins may overlap), and g_w = gz^T pooled over the batch.
template <typename T>
void reduce_backward(const RedDims& d, const T* g_red, const T* x, const T* wt, const T* sr_b, const T* ln_w,
                     const T* ln_b, T* gx, T* g_wp, std::vector<double>& sums) {
  const int64_t C = d.C, N = d.N(), rows = d.rows(), chunks = ceil_div(rows, kNormRows);
  const Scratch<T> s({d.nk * rows * C, rows * C, d.linear ? rows * C : 0});
  T *part = s[0], *GZ = s[1];
  T* pooled = d.linear ? s[2] : nullptr;
  conv_partials<T>(d, x, wt, part, pooled);
  sums.assign(3 * chunks * C, 0.0);  // per row chunk: sum g * zhat, sum g (LayerNorm), sum gz (conv bias)
  parallel_tasks(chunks, [&](int64_t t0, int64_t t1) {
    std::vector<T> zh(C), gzh(C);
    for (int64_t t = t0; t < t1; ++t) {
      double* sw = sums.data() + 3 * t * C;
      for (int64_t row = t * kNormRows; row < std::min((t + 1) * kNormRows, rows); ++row) {
        const T rstd = normalize(d, part, row, sr_b, zh.data());
        const T* g_in = g_red + row * C;
        T* gz = GZ + row * C;
        double m1 = 0, m2 = 0;
        for (int64_t c = 0; c < C; ++c) {
          T g = g_in[c];
          if (d.linear) g *= gelu_grad(zh[c] * ln_w[c] + ln_b[c]);
          sw[c] += double(g) * zh[c];
          sw[C + c] += g;
          gzh[c] = g * ln_w[c];
          m1 += gzh[c];
          m2 += double(gzh[c]) * zh[c];
        }
        const T mean1 = T(m1 / C), mean2 = T(m2 / C);
        for (int64_t c = 0; c < C; ++c) {
          gz[c] = rstd * (gzh[c] - mean1 - zh[c] * mean2);
          sw[2 * C + c] += gz[c];
        }
      }
    }
  });
  if (d.linear) {
    parallel_tasks(d.B, [&](int64_t b0, int64_t b1) {
      std::vector<T> gp(d.M * C);
      for (int64_t b = b0; b < b1; ++b) {
        gemm<T>(false, true, d.M, C, C, T(1), GZ + b * d.M * C, C, wt, C, T(0), gp.data(), C);
        T* gxs = gx + b * N * C;
        std::fill(gxs, gxs + N * C, T(0));
        for (int64_t m = 0; m < d.M; ++m) {
          const auto [y0, y1] = bin(m / 7, d.H, 7);
          const auto [x0, x1] = bin(m % 7, d.W, 7);
          const T inv = T(1) / T((y1 - y0) * (x1 - x0));
          for (int64_t y = y0; y < y1; ++y)
            for (int64_t xx = x0; xx < x1; ++xx) {
              T* dst = gxs + (y * d.W + xx) * C;
              for (int64_t c = 0; c < C; ++c) dst[c] += gp[m * C + c] * inv;
            }
        }
      }
    });
    gemm_tn_sum<T>(C, C, rows, GZ, C, pooled, C, g_wp);
    return;
  }
  if (d.ho * d.r != d.H || d.wo * d.r != d.W)  // pixels no patch covers (the conv drops them)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t y = 0; y < d.H; ++y) {
        const int64_t x0 = y < d.ho * d.r ? d.wo * d.r : 0;
        std::fill(gx + ((b * d.H + y) * d.W + x0) * C, gx + ((b * d.H + y) * d.W + d.W) * C, T(0));
      }
  parallel_tasks(d.nk, [&](int64_t k0, int64_t k1) {
    const Scratch<T> s({kRedRows * d.kc, kRedRows * d.kc});
    const int64_t run = d.r * C;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t width = chunk_width(d, k);
      for (int64_t g = 0; g < d.groups(); ++g) {
        const int64_t r0 = g * kRedRows, n = std::min(kRedRows, rows - r0);
        patch_tile(d, x, r0, n, k, s[0]);
        gemm<T>(true, false, C, width, n, T(1), GZ + r0 * C, C, s[0], d.kc, T(g ? 1 : 0), g_wp + k * d.kc, d.K);
        gemm<T>(false, true, n, width, C, T(1), GZ + r0 * C, C, wt + k * d.kc * C, C, T(0), s[1], d.kc);
        for (int64_t row = r0; row < r0 + n; ++row) {
          const int64_t b = row / d.M, i = row % d.M / d.wo, j = row % d.M % d.wo;
          const T* src = s[1] + (row - r0) * d.kc;
          for (int64_t ky = k * d.kc / run; ky < std::min(d.r, (k + 1) * d.kc / run); ++ky, src += run)
            std::memcpy(gx + ((b * d.H + i * d.r + ky) * d.W + j * d.r) * C, src, run * sizeof(T));
        }
      }
    }
  });
}

// ---- attention -----------------------------------------------------------------------------------------------

struct AttnDims {
  int64_t B, N, M, C, heads, hd, bq, mb;  // mb: keys per score buffer
  double scale;
  int64_t blocks() const { return ceil_div(N, bq); }
  // Forward scores as S = x (scale Wq_h^T k_h^T) + scale bq_h k_h^T: the q projection folded into a (C x heads*M)
  // matrix per sample. N C heads M multiply-adds instead of N C (C + M): fewer when (heads - 1) M < C (always with
  // one head); needs the scores of all keys at once (one key block).
  bool fold() const { return M <= mb && (heads - 1) * M < C; }
  // Columns of the folded matrix: heads * M rounded up to 16 with zero columns, which JIT GEMMs run much faster
  // than odd widths such as 49.
  int64_t hmp() const { return ceil_div(heads * M, 16) * 16; }
};

// Per sample: kv (M x 2C) = red kv_w^T + kv_b, and when asked (fold()): a (C x hmp) = scale Wq_h^T k_h^T (head h
// in columns [h M, (h + 1) M), zero columns after heads * M), its transpose at (hmp x C), v^T vt (C x M) and, with
// q_b, ab (heads*M) = scale bq_h k_h^T. All plain GEMMs (the JIT path): against kv_w^T transposed once, and as
// k_h Wq_h, transposed afterwards.
template <typename T>
struct KV {
  T *kv, *a = nullptr, *ab = nullptr, *at = nullptr, *vt = nullptr;
};

template <typename T>
void kv_projection(const AttnDims& d, const T* red, const T* kv_w, const T* kv_b, const T* q_w, const T* q_b,
                   const KV<T>& o) {
  const int64_t C = d.C, C2 = 2 * d.C, HM = d.heads * d.M, HMp = d.hmp();
  std::vector<T> kv_wt(C * C2);
  for (int64_t r = 0; r < C2; ++r)
    for (int64_t c = 0; c < C; ++c) kv_wt[c * C2 + r] = kv_w[r * C + c];
  parallel_tasks(d.B, [&](int64_t b0, int64_t b1) {
    std::vector<T> kw(o.a ? HMp * C : 0);  // rows j = (h, key): scale k_h Wq_h, then zero rows
    for (int64_t b = b0; b < b1; ++b) {
      T* kv = o.kv + b * d.M * C2;
      gemm<T>(false, false, d.M, C2, C, T(1), red + b * d.M * C, C, kv_wt.data(), C2, T(0), kv, C2);
      add_bias_rows(kv, d.M, C2, C2, kv_b);
      if (!o.a) continue;
      for (int64_t h = 0; h < d.heads; ++h)
        gemm<T>(false, false, d.M, C, d.hd, T(1), kv + h * d.hd, C2, q_w + h * d.hd * C, C, T(0),
                kw.data() + h * d.M * C, C);
      for (int64_t e = 0; e < HM * C; ++e) kw[e] *= T(d.scale);
      std::fill(kw.begin() + HM * C, kw.end(), T(0));
      T* a = o.a + b * C * HMp;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < HMp; ++j) a[c * HMp + j] = kw[j * C + c];
      if (o.at) std::copy(kw.begin(), kw.end(), o.at + b * HMp * C);
      for (int64_t c = 0; o.vt && c < C; ++c)
        for (int64_t j = 0; j < d.M; ++j) o.vt[(b * C + c) * d.M + j] = kv[j * C2 + C + c];
      for (int64_t j = 0; o.ab && j < HM; ++j) {
        const int64_t h = j / d.M;
        const T* kj = kv + j % d.M * C2 + h * d.hd;
        T acc = 0;
        for (int64_t c = 0; c < d.hd; ++c) acc += q_b[h * d.hd + c] * kj[c];
        o.ab[b * HM + j] = acc * T(d.scale);
      }
    }
  });
}

// q rows [i0, i0 + m) of sample b into q (m x C).
template <typename T>
void q_projection(const AttnDims& d, const T* x, const T* q_w, const T* q_b, int64_t b, int64_t i0, int64_t m, T* q) {
  gemm<T>(false, true, m, d.C, d.C, T(1), x + (b * d.N + i0) * d.C, d.C, q_w, d.C, T(0), q, d.C);
  add_bias_rows(q, m, d.C, d.C, q_b);
}

template <typename T>
void attn_forward(const AttnDims& d, const T* x, const T* q_w, const T* q_b, const KV<T>& p, T* o, T* lse) {
  const int64_t nb = d.blocks(), C = d.C, C2 = 2 * d.C, HM = d.heads * d.M, HMp = d.hmp();
  const T scale = T(d.scale);
  const bool fold = d.fold();
  parallel_tasks(d.B * nb, [&](int64_t t0, int64_t t1) {
    const Scratch<T> sc({fold ? 0 : d.bq * C, d.bq * (fold ? HMp : d.mb), d.bq, d.bq, d.bq});
    T *q = sc[0], *s = sc[1], *mx = sc[2], *sum = sc[3], *corr = sc[4];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nb, i0 = t % nb * d.bq, m = std::min(d.bq, d.N - i0);
      const T* kvb = p.kv + b * d.M * C2;
      T* ob = o + (b * d.N + i0) * C;
      if (fold) {  // the scores of all heads in one GEMM
        gemm<T>(false, false, m, HMp, C, T(1), x + (b * d.N + i0) * C, C, p.a + b * C * HMp, HMp, T(0), s, HMp);
      } else {
        q_projection(d, x, q_w, q_b, b, i0, m, q);
      }
      for (int64_t h = 0; h < d.heads; ++h) {
        T* oh = ob + h * d.hd;
        for (int64_t j0 = 0; j0 < d.M; j0 += d.mb) {
          const int64_t n = std::min(d.mb, d.M - j0), ld = fold ? HMp : n;
          const bool first = j0 == 0;
          const T* kh = kvb + j0 * C2 + h * d.hd;
          T* sh = fold ? s + h * d.M : s;
          if (!fold) gemm<T>(false, true, m, n, d.hd, scale, q + h * d.hd, C, kh, C2, T(0), sh, n);
          softmax_block(sh, m, n, ld, p.ab ? p.ab + b * HM + h * d.M : nullptr, first, mx, sum, corr);
          if (!first)
            for (int64_t i = 0; i < m; ++i)
              for (int64_t c = 0; c < d.hd; ++c) oh[i * C + c] *= corr[i];
          gemm<T>(false, false, m, d.hd, n, T(1), sh, ld, kh + C, C2, T(first ? 0 : 1), oh, C);
        }
        T* lh = lse + (b * d.heads + h) * d.N + i0;
        for (int64_t i = 0; i < m; ++i) {
          const T inv = T(1) / sum[i];
          for (int64_t c = 0; c < d.hd; ++c) oh[i * C + c] *= inv;
          lh[i] = mx[i] + std::log(sum[i]);
        }
      }
    }
  });
}

// Backward of the folded forward (fold()): S = x a + ab per sample, so with dS the scores' gradient (all heads,
// m x hmp per block): gx = dS a^T, da = x^T dS, dab = colsum(dS), and dk, dWq, dbq follow per sample from da and
// dab (attn_grad_fold_sample). No q, dq: N C (C + heads M) fewer multiply-adds than the explicit backward's
// 3 N C C + 5 N C M, for heads M < 2 C. Tasks are (sample, chunk of query blocks); each writes gx rows of its blocks
// and its own partials: dv (in the dkv layout, M x 2C), da (C x hmp) and dab (heads*M), added in task order later.
template <typename T>
void attn_backward_fold(const AttnDims& d, int64_t chunks, const T* go, const T* x, const T* o, const T* lse,
                        const KV<T>& p, T* gx, T* dkv_part, T* da_part, double* dab_part) {
  const int64_t nb = d.blocks(), per = ceil_div(nb, chunks), C = d.C, C2 = 2 * d.C, HM = d.heads * d.M;
  const int64_t HMp = d.hmp();
  parallel_tasks(d.B * chunks, [&](int64_t t0, int64_t t1) {
    const Scratch<T> sc({d.bq * HMp, d.bq * HMp, d.bq});
    T *s = sc[0], *gp = sc[1], *dd = sc[2];
    for (int64_t i = 0; i < d.bq; ++i) std::fill(gp + i * HMp + HM, gp + (i + 1) * HMp, T(0));  // zero columns
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, blk0 = t % chunks * per, blk1 = std::min(nb, blk0 + per);
      T *dkv = dkv_part + t * d.M * C2, *da = da_part + t * C * HMp;
      double* dab = dab_part + t * HM;
      std::fill(dkv, dkv + d.M * C2, T(0));
      std::fill(dab, dab + HM, 0.0);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t i0 = blk * d.bq, m = std::min(d.bq, d.N - i0), row = (b * d.N + i0) * C;
        const T *gob = go + row, *ob = o + row, *xb = x + row;
        gemm<T>(false, false, m, HMp, C, T(1), xb, C, p.a + b * C * HMp, HMp, T(0), s, HMp);  // S - ab
        for (int64_t h = 0; h < d.heads; ++h) {
          const int64_t hc = h * d.hd;
          for (int64_t i = 0; i < m; ++i) {  // rowsum(dP * P) == rowsum(dO * O)
            T acc = 0;
            for (int64_t c = 0; c < d.hd; ++c) acc += gob[i * C + hc + c] * ob[i * C + hc + c];
            dd[i] = acc;
          }
          T *sh = s + h * d.M, *gh = gp + h * d.M;
          gemm<T>(false, false, m, d.M, d.hd, T(1), gob + hc, C, p.vt + (b * C + hc) * d.M, d.M, T(0), gh, HMp);
          softmax_grad_block(sh, gh, m, d.M, HMp, p.ab ? p.ab + b * HM + h * d.M : nullptr,
                             lse + (b * d.heads + h) * d.N + i0, dd);
          gemm<T>(true, false, d.M, d.hd, m, T(1), sh, HMp, gob + hc, C, T(1), dkv + C + hc, C2);  // dv
        }
        gemm<T>(false, false, m, C, HMp, T(1), gp, HMp, p.at + b * HMp * C, C, T(0), gx + row, C);
        gemm<T>(true, false, C, HMp, m, T(1), xb, C, gp, HMp, T(blk > blk0 ? 1 : 0), da, HMp);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < HM; ++j) dab[j] += gp[i * HMp + j];
      }
      if (blk0 >= blk1) std::fill(da, da + C * HMp, T(0));
    }
  });
}

// From sample b's da (C x hmp) and dab (heads*M): with a_h = scale Wq_h^T k_h^T and ab_h = scale k_h bq_h,
// dk_h = scale (da_h^T Wq_h^T + dab_h bq_h^T) into dkv's dk columns, and the sample's dWq (C x C, rows of head h)
// = scale k_h^T da_h^T and dbq (C) = scale k_h^T dab_h.
template <typename T>
void attn_grad_fold_sample(const AttnDims& d, int64_t b, const T* q_w, const T* q_b, const T* kv, const T* da,
                           const double* dab, T* dkv, T* dwq, double* dbq) {
  const int64_t C = d.C, C2 = 2 * d.C, HMp = d.hmp();
  const T scale = T(d.scale);
  for (int64_t h = 0; h < d.heads; ++h) {
    const int64_t hc = h * d.hd;
    const T *dah = da + h * d.M, *kh = kv + b * d.M * C2 + hc;
    gemm<T>(true, true, d.M, d.hd, C, scale, dah, HMp, q_w + hc * C, C, T(0), dkv + hc, C2);
    gemm<T>(true, true, d.hd, C, d.M, scale, kh, C2, dah, HMp, T(0), dwq + hc * C, C);
    for (int64_t c = 0; c < d.hd; ++c) {
      double acc = 0;
      for (int64_t j = 0; j < d.M; ++j) {
        acc += double(kh[j * C2 + c]) * dab[h * d.M + j];
        if (q_b) dkv[j * C2 + hc + c] += scale * T(dab[h * d.M + j]) * q_b[hc + c];
      }
      dbq[hc + c] = double(scale) * acc;
    }
  }
}

// Tasks are (sample, chunk of query blocks). Each task writes the dq rows and gx rows of its blocks and its own
// dkv partial (M x 2C: dk | dv) and dq column sums; the caller adds partials in task order.
template <typename T>
void attn_backward(const AttnDims& d, int64_t chunks, const T* go, const T* x, const T* q_w, const T* q_b,
                   const T* kv, const T* o, const T* lse, T* gx, T* dq_all, T* dkv_part, double* dqb_part) {
  const int64_t nb = d.blocks(), per = ceil_div(nb, chunks), C = d.C, C2 = 2 * d.C;
  const T scale = T(d.scale);
  parallel_tasks(d.B * chunks, [&](int64_t t0, int64_t t1) {
    const Scratch<T> sc({d.bq * C, d.bq * d.mb, d.bq * d.mb, d.bq});
    T *q = sc[0], *s = sc[1], *gp = sc[2], *dd = sc[3];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, blk0 = t % chunks * per, blk1 = std::min(nb, blk0 + per);
      const T* kvb = kv + b * d.M * C2;
      T* dkv = dkv_part + t * d.M * C2;
      double* dqb = dqb_part + t * C;
      std::fill(dkv, dkv + d.M * C2, T(0));
      std::fill(dqb, dqb + C, 0.0);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t i0 = blk * d.bq, m = std::min(d.bq, d.N - i0), row = (b * d.N + i0) * C;
        const T *gob = go + row, *ob = o + row;
        T* dq = dq_all + row;
        q_projection(d, x, q_w, q_b, b, i0, m, q);
        for (int64_t h = 0; h < d.heads; ++h) {
          const int64_t hc = h * d.hd;
          for (int64_t i = 0; i < m; ++i) {  // rowsum(dP * P) == rowsum(dO * O)
            T acc = 0;
            for (int64_t c = 0; c < d.hd; ++c) acc += gob[i * C + hc + c] * ob[i * C + hc + c];
            dd[i] = acc;
          }
          const T* lh = lse + (b * d.heads + h) * d.N + i0;
          for (int64_t j0 = 0; j0 < d.M; j0 += d.mb) {
            const int64_t n = std::min(d.mb, d.M - j0);
            const T *kh = kvb + j0 * C2 + hc, *vh = kh + C;
            T* dkh = dkv + j0 * C2 + hc;
            gemm<T>(false, true, m, n, d.hd, scale, q + hc, C, kh, C2, T(0), s, n);      // S
            gemm<T>(false, true, m, n, d.hd, T(1), gob + hc, C, vh, C2, T(0), gp, n);    // dP = dO V^T
            softmax_grad_block(s, gp, m, n, n, static_cast<const T*>(nullptr), lh, dd);  // P, dS / scale
            gemm<T>(false, false, m, d.hd, n, scale, gp, n, kh, C2, T(j0 ? 1 : 0), dq + hc, C);  // dq
            gemm<T>(true, false, n, d.hd, m, scale, gp, n, q + hc, C, T(1), dkh, C2);             // dk
            gemm<T>(true, false, n, d.hd, m, T(1), s, n, gob + hc, C, T(1), dkh + C, C2);         // dv
          }
        }
        gemm<T>(false, false, m, C, C, T(1), dq, C, q_w, C, T(0), gx + row, C);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t c = 0; c < C; ++c) dqb[c] += dq[i * C + c];
      }
    }
  });
}

// ---- argument checks ------------------------------------------------------------------------------------------

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "shvit sra (CPU kernel): ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "shvit sra (CPU kernel): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "shvit sra (CPU kernel): ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// t (of shape `shape`) as a contiguous tensor of x's dtype.
at::Tensor like_x(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& x) {
  check_float(t, name);
  TORCH_CHECK(t.sizes() == shape, "shvit sra: ", name, " must have shape ", shape, ", got ", t.sizes());
  return t.to(x.scalar_type()).contiguous();
}

RedDims check_reduce(const at::Tensor& x, int64_t h, int64_t w, const at::Tensor& sr_w, int64_t sr_ratio,
                     bool linear, double eps) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 3 && h > 0 && w > 0 && x.size(1) == h * w && x.size(2) > 0,
              "shvit sra_reduce: x must have shape (B, H*W, C > 0) with H, W = ", h, ", ", w, ", got ", x.sizes());
  TORCH_CHECK(linear || (sr_ratio >= 1 && sr_ratio <= std::min(h, w)),
              "shvit sra_reduce: sr_ratio must be in 1..min(H, W), got ", sr_ratio);
  TORCH_CHECK(eps >= 0, "shvit sra_reduce: eps must be non-negative, got ", eps);
  check_float(sr_w, "sr_w");
  TORCH_CHECK(sr_w.scalar_type() == x.scalar_type(), "shvit sra_reduce: sr_w dtype ", sr_w.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  const RedDims d = red_dims(x, h, w, sr_ratio, linear, eps);
  TORCH_CHECK(sr_w.sizes() == at::IntArrayRef({d.C, d.C, d.r, d.r}), "shvit sra_reduce: sr_w must have shape (",
              d.C, ", ", d.C, ", ", d.r, ", ", d.r, "), got ", sr_w.sizes());
  return d;
}

AttnDims check_attn(const at::Tensor& x, const at::Tensor& red, const at::Tensor& q_w, const at::Tensor& kv_w,
                    int64_t heads, double scale) {
  check_float(x, "x");
  check_float(red, "red");
  TORCH_CHECK(x.dim() == 3 && x.size(2) > 0, "shvit sra_attention: x must have shape (B, N, C > 0), got ",
              x.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(red.dim() == 3 && red.size(0) == B && red.size(1) > 0 && red.size(2) == C,
              "shvit sra_attention: red must have shape (", B, ", M > 0, ", C, "), got ", red.sizes());
  TORCH_CHECK(heads > 0 && C % heads == 0, "shvit sra_attention: num_heads must divide C = ", C, ", got ", heads);
  for (const auto& [t, name, rows] : {std::make_tuple(&q_w, "q_w", C), std::make_tuple(&kv_w, "kv_w", 2 * C)}) {
    check_float(*t, name);
    TORCH_CHECK(t->sizes() == at::IntArrayRef({rows, C}), "shvit sra_attention: ", name, " must have shape (", rows,
                ", ", C, "), got ", t->sizes());
  }
  for (const auto& [t, name] : {std::make_pair(&red, "red"), std::make_pair(&q_w, "q_w"),
                                std::make_pair(&kv_w, "kv_w")})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "shvit sra_attention: ", name, " dtype ", t->scalar_type(),
                " does not match x dtype ", x.scalar_type());
  const int64_t M = red.size(1);
  return {B, N, M, C, heads, C / heads, std::min(kQueryBlock, std::max<int64_t>(N, 1)), std::min(kKeyBlock, M),
          scale};
}

std::optional<at::Tensor> opt_like_x(const std::optional<at::Tensor>& t, const char* name, int64_t n,
                                     const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return like_x(*t, name, {n}, x);
}

template <typename T>
const T* ptr(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

// ---- op entry points ------------------------------------------------------------------------------------------

at::Tensor sra_reduce_fwd_cpu(const at::Tensor& x_in, int64_t h, int64_t w, const at::Tensor& sr_w_in,
                              const at::Tensor& sr_b_in, const at::Tensor& ln_w_in, const at::Tensor& ln_b_in,
                              double eps, int64_t sr_ratio, bool linear) {
  const RedDims d = check_reduce(x_in, h, w, sr_w_in, sr_ratio, linear, eps);
  const at::Tensor x = x_in.contiguous(), sr_w = sr_w_in.contiguous();
  const at::Tensor sr_b = like_x(sr_b_in, "sr_b", {d.C}, x), ln_w = like_x(ln_w_in, "ln_w", {d.C}, x);
  const at::Tensor ln_b = like_x(ln_b_in, "ln_b", {d.C}, x);
  at::Tensor red = at::empty({d.B, d.M, d.C}, x.options());
  if (d.B == 0) return red;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sra_reduce_fwd_cpu", [&] {
    using T = scalar_t;
    const at::Tensor wt = conv_matrix(d, ptr<T>(sr_w));
    reduce_forward<T>(d, ptr<T>(x), ptr<T>(wt), ptr<T>(sr_b), ptr<T>(ln_w), ptr<T>(ln_b), red.mutable_data_ptr<T>());
  });
  return red;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sra_reduce_bwd_cpu(
    const at::Tensor& g_red_in, const at::Tensor& x_in, int64_t h, int64_t w, const at::Tensor& sr_w_in,
    const at::Tensor& sr_b_in, const at::Tensor& ln_w_in, const at::Tensor& ln_b_in, double eps, int64_t sr_ratio,
    bool linear) {
  const RedDims d = check_reduce(x_in, h, w, sr_w_in, sr_ratio, linear, eps);
  const at::Tensor x = x_in.contiguous(), sr_w = sr_w_in.contiguous();
  const at::Tensor g_red = like_x(g_red_in, "g_red", {d.B, d.M, d.C}, x);
  const at::Tensor sr_b = like_x(sr_b_in, "sr_b", {d.C}, x), ln_w = like_x(ln_w_in, "ln_w", {d.C}, x);
  const at::Tensor ln_b = like_x(ln_b_in, "ln_b", {d.C}, x);
  const auto opt = x.options();
  at::Tensor gx = at::empty(x.sizes(), opt), g_sr_w = at::zeros(sr_w.sizes(), opt);
  at::Tensor g_sr_b = at::zeros({d.C}, opt), g_ln_w = at::zeros({d.C}, opt), g_ln_b = at::zeros({d.C}, opt);
  if (d.B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sra_reduce_bwd_cpu", [&] {
      using T = scalar_t;
      const at::Tensor wt = conv_matrix(d, ptr<T>(sr_w));
      const at::Tensor g_wp = d.linear ? g_sr_w : at::empty({d.C, d.K}, opt);
      std::vector<double> sums;
      reduce_backward<T>(d, ptr<T>(g_red), ptr<T>(x), ptr<T>(wt), ptr<T>(sr_b), ptr<T>(ln_w), ptr<T>(ln_b),
                         gx.mutable_data_ptr<T>(), g_wp.mutable_data_ptr<T>(), sums);
      if (!d.linear) {  // back from (C_out, ky, kx, C_in) to (C_out, C_in, ky, kx)
        const T* src = ptr<T>(g_wp);
        T* dst = g_sr_w.mutable_data_ptr<T>();
        const int64_t rr = d.r * d.r;
        for (int64_t co = 0; co < d.C; ++co)
          for (int64_t ci = 0; ci < d.C; ++ci)
            for (int64_t k = 0; k < rr; ++k) dst[(co * d.C + ci) * rr + k] = src[co * d.K + k * d.C + ci];
      }
      T *gw = g_ln_w.mutable_data_ptr<T>(), *gb = g_ln_b.mutable_data_ptr<T>(), *gs = g_sr_b.mutable_data_ptr<T>();
      for (int64_t c = 0; c < d.C; ++c) {  // per-chunk sums, in chunk order
        double a = 0, bb = 0, cc = 0;
        for (size_t b = 0; b < sums.size() / (3 * d.C); ++b) {
          a += sums[3 * b * d.C + c];
          bb += sums[(3 * b + 1) * d.C + c];
          cc += sums[(3 * b + 2) * d.C + c];
        }
        gw[c] = T(a);
        gb[c] = T(bb);
        gs[c] = T(cc);
      }
    });
  } else {
    gx.zero_();
  }
  return {gx, g_sr_w, g_sr_b.to(sr_b_in.scalar_type()), g_ln_w.to(ln_w_in.scalar_type()),
          g_ln_b.to(ln_b_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> sra_attn_fwd_cpu(const at::Tensor& x_in, const at::Tensor& red_in,
                                                    const at::Tensor& q_w_in, const std::optional<at::Tensor>& q_b_in,
                                                    const at::Tensor& kv_w_in,
                                                    const std::optional<at::Tensor>& kv_b_in, int64_t num_heads,
                                                    double scale) {
  const AttnDims d = check_attn(x_in, red_in, q_w_in, kv_w_in, num_heads, scale);
  const at::Tensor x = x_in.contiguous(), red = red_in.contiguous();
  const at::Tensor q_w = q_w_in.contiguous(), kv_w = kv_w_in.contiguous();
  const auto q_b = opt_like_x(q_b_in, "q_b", d.C, x), kv_b = opt_like_x(kv_b_in, "kv_b", 2 * d.C, x);
  at::Tensor o = at::empty(x.sizes(), x.options()), lse = at::empty({d.B, d.heads, d.N}, x.options());
  if (d.B == 0 || d.N == 0) return {o, lse};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sra_attn_fwd_cpu", [&] {
    using T = scalar_t;
    const int64_t HMp = d.fold() ? d.hmp() : 0;
    const Scratch<T> buf({d.B * (d.M * 2 * d.C + (d.C + 1) * HMp)});
    KV<T> p{buf[0]};
    if (HMp) {
      p.a = p.kv + d.B * d.M * 2 * d.C;
      p.ab = q_b ? p.a + d.B * d.C * HMp : nullptr;
    }
    kv_projection<T>(d, ptr<T>(red), ptr<T>(kv_w), ptr<T>(kv_b), ptr<T>(q_w), ptr<T>(q_b), p);
    attn_forward<T>(d, ptr<T>(x), ptr<T>(q_w), ptr<T>(q_b), p, o.mutable_data_ptr<T>(), lse.mutable_data_ptr<T>());
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sra_attn_bwd_cpu(
    const at::Tensor& g_o_in, const at::Tensor& x_in, const at::Tensor& red_in, const at::Tensor& q_w_in,
    const std::optional<at::Tensor>& q_b_in, const at::Tensor& kv_w_in, const std::optional<at::Tensor>& kv_b_in,
    const at::Tensor& o_in, const at::Tensor& lse_in, int64_t num_heads, double scale) {
  const AttnDims d = check_attn(x_in, red_in, q_w_in, kv_w_in, num_heads, scale);
  const at::Tensor x = x_in.contiguous(), red = red_in.contiguous();
  const at::Tensor q_w = q_w_in.contiguous(), kv_w = kv_w_in.contiguous();
  const auto q_b = opt_like_x(q_b_in, "q_b", d.C, x), kv_b = opt_like_x(kv_b_in, "kv_b", 2 * d.C, x);
  const at::Tensor g_o = like_x(g_o_in, "g_o", x.sizes(), x), o = like_x(o_in, "o", x.sizes(), x);
  const at::Tensor lse = like_x(lse_in, "lse", {d.B, d.heads, d.N}, x);
  const auto opt = x.options();
  const int64_t C = d.C, C2 = 2 * d.C;
  at::Tensor gx = at::empty(x.sizes(), opt), g_red = at::zeros(red.sizes(), opt);
  at::Tensor g_q_w = at::zeros({C, C}, opt), g_q_b = at::zeros({C}, opt);
  at::Tensor g_kv_w = at::zeros({C2, C}, opt), g_kv_b = at::zeros({C2}, opt);
  if (d.B > 0 && d.N > 0) {
    // Query chunks per sample: enough tasks for small batches, but the dkv partials stay within twice x's size.
    const int64_t chunks = std::clamp<int64_t>(std::min({d.blocks(), ceil_div(kMinTasks, d.B), d.N / d.M}), 1,
                                               d.blocks());
    const bool fold = d.fold();
    const int64_t HM = d.heads * d.M, HMp = fold ? d.hmp() : 0;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sra_attn_bwd_cpu", [&] {
      using T = scalar_t;
      const int64_t tasks = d.B * chunks;
      const Scratch<T> pre({d.B * (d.M * C2 + (2 * C + 1) * HMp + C * d.M)});
      KV<T> p{pre[0]};
      if (fold) {
        p.a = p.kv + d.B * d.M * C2;
        p.at = p.a + d.B * C * HMp;
        p.vt = p.at + d.B * HMp * C;
        p.ab = q_b ? p.vt + d.B * C * d.M : nullptr;
      }
      kv_projection<T>(d, ptr<T>(red), ptr<T>(kv_w), ptr<T>(kv_b), ptr<T>(q_w), ptr<T>(q_b), p);
      // dkv per task, summed per sample into dkv (the same buffer with one chunk per sample); explicit: dq of
      // every token (for dWq) and dq column sums per task; folded: da, dab per task and dWq, dbq per sample.
      const Scratch<T> grads({tasks * d.M * C2, chunks == 1 ? 0 : d.B * d.M * C2,
                              fold ? d.B * C * C + tasks * C * HMp : d.B * d.N * C});
      std::vector<double> qb_part(fold ? d.B * C : tasks * C), dab_part(fold ? tasks * HM : 0);
      T *dkv_part = grads[0], *dkv_p = chunks == 1 ? dkv_part : grads[1], *dq_p = grads[2];
      T* da_part = fold ? dq_p + d.B * C * C : nullptr;
      if (fold)
        attn_backward_fold<T>(d, chunks, ptr<T>(g_o), ptr<T>(x), ptr<T>(o), ptr<T>(lse), p, gx.mutable_data_ptr<T>(),
                              dkv_part, da_part, dab_part.data());
      else
        attn_backward<T>(d, chunks, ptr<T>(g_o), ptr<T>(x), ptr<T>(q_w), ptr<T>(q_b), p.kv, ptr<T>(o), ptr<T>(lse),
                         gx.mutable_data_ptr<T>(), dq_p, dkv_part, qb_part.data());
      // Per sample: partials of its chunks in order; g_red = dkv kv_w.
      parallel_tasks(d.B, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          T* out = dkv_p + b * d.M * C2;
          const auto sum_chunks = [&](const T* part, int64_t n, T* to) {
            if (part + b * chunks * n != to) std::copy(part + b * chunks * n, part + (b * chunks + 1) * n, to);
            for (int64_t c = 1; c < chunks; ++c)
              for (int64_t e = 0; e < n; ++e) to[e] += part[(b * chunks + c) * n + e];
          };
          sum_chunks(dkv_part, d.M * C2, out);
          if (fold) {
            T* da = da_part + b * chunks * C * HMp;  // summed into the sample's first chunk
            for (int64_t c = 1; c < chunks; ++c)
              for (int64_t e = 0; e < C * HMp; ++e) da[e] += da[c * C * HMp + e];
            std::vector<double> dab(HM, 0.0);
            for (int64_t c = 0; c < chunks; ++c)
              for (int64_t j = 0; j < HM; ++j) dab[j] += dab_part[(b * chunks + c) * HM + j];
            attn_grad_fold_sample<T>(d, b, ptr<T>(q_w), ptr<T>(q_b), p.kv, da, dab.data(), out, dq_p + b * C * C,
                                     qb_part.data() + b * C);
          }
          gemm<T>(false, false, d.M, C, C2, T(1), out, C2, ptr<T>(kv_w), C, T(0),
                  g_red.mutable_data_ptr<T>() + b * d.M * C, C);
        }
      });
      gemm_tn_sum<T>(C2, C, d.B * d.M, dkv_p, C2, ptr<T>(red), C, g_kv_w.mutable_data_ptr<T>());
      T* gqw = g_q_w.mutable_data_ptr<T>();
      if (fold) {
        for (int64_t b = 0; b < d.B; ++b)
          for (int64_t e = 0; e < C * C; ++e) gqw[e] = b ? gqw[e] + dq_p[b * C * C + e] : dq_p[e];
      } else {
        gemm_tn_sum<T>(C, C, d.B * d.N, dq_p, C, ptr<T>(x), C, gqw);
      }
      std::vector<double> kvb(C2, 0.0), qb(C, 0.0);
      for (int64_t r = 0; r < d.B * d.M; ++r)
        for (int64_t c = 0; c < C2; ++c) kvb[c] += dkv_p[r * C2 + c];
      for (size_t t = 0; t < qb_part.size() / C; ++t)
        for (int64_t c = 0; c < C; ++c) qb[c] += qb_part[t * C + c];
      T *gkb = g_kv_b.mutable_data_ptr<T>(), *gqb = g_q_b.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C2; ++c) gkb[c] = T(kvb[c]);
      for (int64_t c = 0; c < C; ++c) gqb[c] = T(qb[c]);
    });
  } else {
    gx.zero_();
  }
  return {gx, g_red, g_q_w, g_q_b, g_kv_w, g_kv_b};
}

}  // namespace
}  // namespace shvit::cpu

TORCH_LIBRARY_FRAGMENT(shvit, m) {
  m.def(
      "sra_reduce_fwd_cpu(Tensor x, int h, int w, Tensor sr_w, Tensor sr_b, Tensor ln_w, Tensor ln_b, float eps, "
      "int sr_ratio, bool linear) -> Tensor");
  m.def(
      "sra_reduce_bwd_cpu(Tensor g_red, Tensor x, int h, int w, Tensor sr_w, Tensor sr_b, Tensor ln_w, Tensor ln_b, "
      "float eps, int sr_ratio, bool linear) -> (Tensor gx, Tensor g_sr_w, Tensor g_sr_b, Tensor g_ln_w, "
      "Tensor g_ln_b)");
  m.def(
      "sra_attn_fwd_cpu(Tensor x, Tensor red, Tensor q_w, Tensor? q_b, Tensor kv_w, Tensor? kv_b, int num_heads, "
      "float scale) -> (Tensor o, Tensor lse)");
  m.def(
      "sra_attn_bwd_cpu(Tensor g_o, Tensor x, Tensor red, Tensor q_w, Tensor? q_b, Tensor kv_w, Tensor? kv_b, "
      "Tensor o, Tensor lse, int num_heads, float scale) -> (Tensor gx, Tensor g_red, Tensor g_q_w, Tensor g_q_b, "
      "Tensor g_kv_w, Tensor g_kv_b)");
}

TORCH_LIBRARY_IMPL(shvit, CPU, m) {
  m.impl("sra_reduce_fwd_cpu", &shvit::cpu::sra_reduce_fwd_cpu);
  m.impl("sra_reduce_bwd_cpu", &shvit::cpu::sra_reduce_bwd_cpu);
  m.impl("sra_attn_fwd_cpu", &shvit::cpu::sra_attn_fwd_cpu);
  m.impl("sra_attn_bwd_cpu", &shvit::cpu::sra_attn_bwd_cpu);
}
