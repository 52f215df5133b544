// Helpers shared by the C++ CPU kernels (shsa.cpp, ffn.cpp, pw_conv_bn.cpp, sra.cpp): GEMMs on raw buffers, deterministic
// parallel tasks, SIMD sums, per-channel moments and their fixed-order combination, per-thread scratch.
//
// Everything sits in an anonymous namespace on purpose: each kernel file gets its own copy, compiled with its own
// flags (the SIMD width below follows them), so no definition is shared across files with different code.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/from_blob.h>

#include "scratch_arena.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

// Fortran BLAS of the library torch links (MKL in the x86 wheels), weak: where torch exports none, at::addmm_out.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace shvit::cpu {
namespace {


constexpr int64_t kGradRows = 192;    // at most this many output rows per task of the weight-gradient GEMMs
constexpr int64_t kAlign = 16;        // scratch pieces start on 64-byte boundaries (same BLAS paths everywhere)

// c (m x n, row stride ldc) = alpha * op(a) @ op(b) + beta * c on row-major buffers; beta == 0 never reads c.
// op(a) is m x k: a holds it with row stride lda, or holds its transpose (k x m) when ta; b likewise (k x n).
// Not at::addmm: the kernels make hundreds of small calls per op, where wrapping the buffers in tensors and
// dispatching costs microseconds each. Plain fp32 products go to oneDNN's JIT brgemm (single-threaded; AVX-512,
// ~30% faster than MKL's AVX2 path on AMD on these shapes), the rest to the BLAS torch links (single-threaded
// inside a parallel task), or to at::addmm where torch exports none (and for k = 0). Callers run their GEMMs inside
// tasks.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, double beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr bool f32 = std::is_same_v<T, float>;
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (f32 && !ta && !tb && alpha == 1.0 && (beta == 0.0 || beta == 1.0) && k > 0) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, beta == 1.0, reinterpret_cast<const float*>(a),
                                reinterpret_cast<const float*>(b), reinterpret_cast<float*>(c));
    return;
  }
#endif
  const bool blas = f32 ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (blas && k > 0 && std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
    const int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
    const T al = T(alpha), be = T(beta);
    if constexpr (f32)
      sgemm_(&tA, &tB, &M, &N, &K, &al, b, &LDA, a, &LDB, &be, c, &LDC);
    else
      dgemm_(&tA, &tB, &M, &N, &K, &al, b, &LDA, a, &LDB, &be, c, &LDC);
    return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const std::array<int64_t, 2> sa = ta ? std::array<int64_t, 2>{1, lda} : std::array<int64_t, 2>{lda, 1};
  const std::array<int64_t, 2> sb = tb ? std::array<int64_t, 2>{1, ldb} : std::array<int64_t, 2>{ldb, 1};
  const at::Tensor at_ = at::from_blob(const_cast<T*>(a), {m, k}, sa, opt);
  const at::Tensor bt = at::from_blob(const_cast<T*>(b), {k, n}, sb, opt);
  at::Tensor ct = at::from_blob(c, {m, n}, {ldc, 1}, opt);
  at::addmm_out(ct, ct, at_, bt, beta, alpha);
}

// f(t0, t1) over ranges of n independent tasks with at::parallel_for, always as a parallel region of at least
// get_num_threads() tasks (surplus ones idle): BLAS called from a task then runs single-threaded, as with one
// thread, so no result depends on the thread count (a multi-threaded GEMM may split and sum differently).
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  at::parallel_for(0, std::max<int64_t>(n, at::get_num_threads()), 1, [&](int64_t t0, int64_t t1) {
    if (t0 >= n) return;
    at::AutoDispatchBelowADInplaceOrView guard;  // plain kernels below: skip autograd bookkeeping on workers
    f(t0, std::min(t1, n));
  });
}

// One weight gradient of gemm_nt_batches: out (m x n) = a (m x k) @ b^T (b: n x k), a and b with row stride ld.
template <typename T>
struct NtProduct {
  int64_t m, n;
  const T *a, *b;
  T* out;
};

// Weight gradients summed over the whole batch (k = its tokens), in one parallel region. Each product is cut into
// equal chunks of output rows, fixed by m (at least two, at most kGradRows rows each: tall GEMMs run faster, 168
// rows ~10% over 64), so each element's sum order is the same for any thread count. The chunks are dealt
// round-robin across the products, so that a small product's chunks share the threads with a large one's instead
// of leaving all but one thread waiting.
template <typename T>
void gemm_nt_batches(std::initializer_list<NtProduct<T>> products, int64_t k, int64_t ld) {
  struct Chunk {
    const NtProduct<T>* p;
    int64_t r0, rows;
  };
  const auto rows_per_chunk = [](int64_t m) {
    const int64_t chunks = std::max<int64_t>(2, (m + kGradRows - 1) / kGradRows);
    return (m + chunks - 1) / chunks;
  };
  std::vector<Chunk> tasks;  // chunk i of every product, then chunk i + 1, ...
  for (int64_t i = 0, more = 1; more; ++i) {
    more = 0;
    for (const NtProduct<T>& p : products) {
      const int64_t per = rows_per_chunk(p.m), r0 = i * per;
      if (r0 < p.m) tasks.push_back({&p, r0, std::min(per, p.m - r0)}), more = 1;
    }
  }
  parallel_tasks(int64_t(tasks.size()), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Chunk& c = tasks[t];
      gemm<T>(false, true, c.rows, c.p->n, k, 1.0, c.p->a + c.r0 * ld, ld, c.p->b, ld, 0.0, c.p->out + c.r0 * c.p->n,
              c.p->n);
    }
  });
}

// Explicit SIMD for the reductions and the exp: GCC / Clang vector types as wide as the build's SIMD (SSE
// unless built with -mavx / -mavx512f). The auto-vectoriser leaves such loops scalar or keeps the partial sums
// in memory (reductions need reassociation, and compare-and-select counts as control flow without
// -ffast-math), which on rows of 64 tokens costs more than the arithmetic.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
template <typename T>
struct Simd {
  typedef T type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using vec_t = typename Simd<T>::type;
template <typename T>
constexpr int64_t kLanes = kVecBytes / sizeof(T);

// Loads a vector, or a scalar when V is the element type (the tails of the loops below).
template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// K sums at once over [0, n) in one pass: f(i, V()) returns the K terms of elements [i, i + lanes of V) as
// vectors V (or of element i as scalars when V is T, for the tail); write f with load<V>. Four independent
// vector accumulators per sum hide the add latency. Fixed order; lanes accumulate in T over stretches of
// kStretch elements, and the stretches add up in double.
template <typename T, size_t K, typename F>
std::array<double, K> sums_of(int64_t n, F f) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>, kStretch = 1024;
  std::array<double, K> total{};
  for (int64_t i0 = 0; i0 < n; i0 += kStretch) {
    const int64_t i1 = std::min(n, i0 + kStretch);
    V acc[4][K] = {};
    int64_t i = i0;
    for (; i + 4 * L <= i1; i += 4 * L)
      for (int u = 0; u < 4; ++u) {
        const std::array<V, K> v = f(i + u * L, V());
        for (size_t k = 0; k < K; ++k) acc[u][k] += v[k];
      }
    for (; i + L <= i1; i += L) {
      const std::array<V, K> v = f(i, V());
      for (size_t k = 0; k < K; ++k) acc[0][k] += v[k];
    }
    std::array<T, K> tail{};
    for (; i < i1; ++i) {
      const std::array<T, K> v = f(i, T());
      for (size_t k = 0; k < K; ++k) tail[k] += v[k];
    }
    for (size_t k = 0; k < K; ++k) {
      const V v = (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]);
      T lanes[L];
      store(lanes, v);
      for (int64_t h = L / 2; h > 0; h /= 2)  // pairwise: short dependency chains
        for (int64_t j = 0; j < h; ++j) lanes[j] += lanes[j + h];
      total[k] += static_cast<double>(lanes[0]) + tail[k];
    }
  }
  return total;
}

// sums_of for one sum: f(i, V()) returns one V.
template <typename T, typename F>
double sum_of(int64_t n, F f) {
  return sums_of<T, 1>(n, [&](int64_t i, auto z) { return std::array<decltype(z), 1>{f(i, z)}; })[0];
}

// Per-channel map a = (z - mean) * invstd * w + b, in the reference's order: training BatchNorm with known
// statistics, or a bias in eval (mean 0, invstd 1, w 1: exactly z + b).
template <typename T>
struct Affine {
  std::vector<T> mean, invstd, w, b;

  static Affine bias(const T* bias, int64_t n) {
    return Affine{std::vector<T>(n, T(0)), std::vector<T>(n, T(1)), std::vector<T>(n, T(1)),
                  std::vector<T>(bias, bias + n)};
  }

  static Affine batch_norm(const T* mean, const T* var, const T* w, const T* b, double eps, int64_t n) {
    Affine f{std::vector<T>(mean, mean + n), std::vector<T>(n), std::vector<T>(w, w + n), std::vector<T>(b, b + n)};
    for (int64_t c = 0; c < n; ++c) f.invstd[c] = T(1) / std::sqrt(var[c] + T(eps));
    return f;
  }

  // rows x n block of z (row stride ldz) -> a (row stride lda); may be in place.
  void apply(const T* z, int64_t ldz, int64_t rows, int64_t n, T* a, int64_t lda) const {
    for (int64_t c = 0; c < rows; ++c) {
      const T m = mean[c], is = invstd[c], wc = w[c], bc = b[c];
      const T* zr = z + c * ldz;
      T* ar = a + c * lda;
      for (int64_t i = 0; i < n; ++i) ar[i] = (zr[i] - m) * is * wc + bc;
    }
  }
};

// The mean from a rounded mean mt and the sum of the n deviations from it. An infinite mt (an Inf among finite
// values) stays infinite, as in ATen's BatchNorm (sum / count), where the deviations' Inf - Inf would give NaN.
inline double corrected_mean(double mt, double dev, int64_t n) { return std::isinf(mt) ? mt : mt + dev / n; }

// Per-channel mean and M2 (sum of squared deviations from that mean) of a rows x n block, two-pass.
template <typename T>
void row_moments(const T* z, int64_t ld, int64_t rows, int64_t n, double* mean, double* m2) {
  for (int64_t c = 0; c < rows; ++c) {
    const T* zr = z + c * ld;
    const T mt = T(sum_of<T>(n, [&](int64_t i, auto z) { return load<decltype(z)>(zr + i); }) / n);
    // Deviations from the rounded mean; their sum corrects mean and M2 (exact two-pass update).
    const auto [dev, sq] = sums_of<T, 2>(n, [&](int64_t i, auto z) {
      const auto t = load<decltype(z)>(zr + i) - mt;
      return std::array<decltype(z), 2>{t, t * t};
    });
    mean[c] = corrected_mean(mt, dev, n);
    m2[c] = sq - dev * dev / n;
  }
}

// Batch mean and biased variance per channel from the moments of disjoint parts ([p * ch + c], count[p] values
// each): mean = sum_p count_p mean_p / total, M2 = sum_p M2_p + count_p (mean_p - mean)^2, in part order.
template <typename T>
void combine_moments(const std::vector<double>& mean_p, const std::vector<double>& m2_p,
                     const std::vector<int64_t>& count, int64_t ch, T* mean, T* var) {
  const int64_t parts = static_cast<int64_t>(count.size());
  double total = 0;
  for (int64_t n : count) total += n;
  for (int64_t c = 0; c < ch; ++c) {
    double mu = 0;
    for (int64_t p = 0; p < parts; ++p) mu += count[p] * mean_p[p * ch + c];
    mu /= total;
    double m2 = 0;
    for (int64_t p = 0; p < parts; ++p) {
      const double dm = mean_p[p * ch + c] - mu;
      m2 += m2_p[p * ch + c] + count[p] * dm * dm;
    }
    mean[c] = T(mu);
    var[c] = T(std::max(m2, 0.0) / total);
  }
}

// out[c] = sum over samples, in sample order, of part[b * ch + c].
std::vector<double> sum_samples(const std::vector<double>& part, int64_t B, int64_t ch) {
  std::vector<double> out(ch, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < ch; ++c) out[c] += part[b * ch + c];
  return out;
}

template <typename T>
at::Tensor buffer(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Scratch: pieces of the given sizes (elements), each on a 64-byte boundary, from this thread's arena
// (scratch_arena.h) when it can serve them, else from one allocation of their own. Create and destroy in stack
// order on one thread (a local variable).
template <typename T>
class Scratch {
  static_assert(kAlign * sizeof(T) % 64 == 0, "pieces must stay on 64-byte boundaries");

 public:
  explicit Scratch(std::initializer_list<int64_t> sizes) {
    int64_t total = 0;
    for (int64_t s : sizes) total += round_up(s);
    pieces_.reserve(sizes.size());  // (nothing below throws once the arena piece is taken)
    bytes_ = static_cast<size_t>(total) * sizeof(T);
    T* p = bytes_ ? static_cast<T*>(arena_acquire(bytes_)) : nullptr;
    if (!p && bytes_) {
      own_ = buffer<T>(total);
      p = own_.mutable_data_ptr<T>();
    }
    for (int64_t s : sizes) {
      pieces_.push_back(p);
      if (p) p += round_up(s);
    }
  }
  ~Scratch() {
    if (bytes_ && !own_.defined()) arena_release(bytes_);  // the piece came from the arena
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* operator[](size_t i) const { return pieces_[i]; }

 private:
  static int64_t round_up(int64_t s) { return (s + kAlign - 1) / kAlign * kAlign; }
  size_t bytes_;
  at::Tensor own_;
  std::vector<T*> pieces_;
};

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.const_data_ptr<T>();
}

}  // namespace
}  // namespace shvit::cpu
