// Fused SHSA (SHViT single-head self-attention) on the CPU: eval and training forms, forward and backward,
// float32 / float64. The spec, argument lists and outputs are those of shvit_kernels/reference/shsa.py.
//
// x is NCHW-contiguous, so one sample is a row-major (C, N) matrix (N = H*W) whose first P rows are x1.
// The forward runs GroupNorm -> qkv GEMM per group of samples, then attention -> ReLU'd concat -> proj GEMM per
// span: a group of whole samples, or one block of query rows of one sample when N is large (scores then take
// O(block * N) memory, and a large N spreads over threads even at batch 1). Small samples are grouped so that
// each GEMM takes ~256 tokens as columns. Tasks run on at::parallel_for with per-thread scratch that stays in
// cache; the matmuls are ATen GEMMs (MKL) on raw buffers. What stock PyTorch spends on split / cat / contiguous
// copies, separate norm / softmax / ReLU passes and N x N temporaries is gone: softmax, biases, ReLU and the
// residual are loops over rows in cache.
//
// Training BatchNorm needs batch statistics, hence pass boundaries: forward = (1) GroupNorm + pre-BN qkv of
// every sample, then its BN, (2) attention + pre-BN proj, (3) proj BN + residual; backward = (1) recompute
// the forward (all but the pre-BN proj, the largest GEMM, when the caller had the forward keep it: proj_z),
// (2) proj BN backward + attention backward, (3) qkv BN backward + GroupNorm backward, then the weight gradients
// as one GEMM over the whole batch. The eval backward is one pass plus those GEMMs.
//
// Determinism: a task's result does not depend on the thread that runs it (BLAS runs single-threaded in every
// task, and tasks are fixed by the shapes), reductions across tasks add per-task partials in task order, and
// the weight-gradient GEMMs are split into fixed row chunks, so results are bitwise identical for any thread
// count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernel_common.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace shvit::cpu {
namespace {

constexpr int64_t kQueryBlock = 128;  // query rows per attention block once N > 2 * kQueryBlock
constexpr int64_t kGroupCols = 256;   // small samples are grouped so that GEMMs see about this many tokens...
constexpr int64_t kMinTasks = 4;      // ...while the batch still gives this many tasks

// Tokens [i0, i0 + m) of samples [b0, b1): the unit of work of a task, whose GEMMs take the (b1 - b0) * m
// tokens as columns side by side.
struct Span {
  int64_t b0, b1, i0, m;
  int64_t width() const { return (b1 - b0) * m; }
};

struct Dims {
  int64_t B, C, P, Q, O, N;  // batch, dim, pdim, qk_dim, 2 * qk_dim + pdim, H * W
  int64_t bm;                // query rows per attention block
  int64_t G;                 // samples per group (1 when a sample has several query blocks)
  double scale;              // qk_dim ** -0.5

  int64_t blocks() const { return (N + bm - 1) / bm; }
  int64_t groups() const { return (B + G - 1) / G; }
  Span group(int64_t g) const { return {g * G, std::min(B, (g + 1) * G), 0, N}; }
  // The attention + proj tasks: whole groups, or single query blocks when samples have several (then a large N
  // spreads over threads even at batch 1). These are fixed by the shapes, never by the thread count.
  int64_t spans() const { return blocks() == 1 ? groups() : B * blocks(); }
  Span span(int64_t t) const {
    if (blocks() == 1) return group(t);
    const int64_t b = t / blocks(), i0 = t % blocks() * bm;
    return {b, b + 1, i0, std::min(bm, N - i0)};
  }
  int64_t max_width() const { return blocks() == 1 ? G * N : bm; }
};

Dims make_dims(const at::Tensor& x, int64_t pdim, int64_t qk_dim) {
  Dims d{};
  d.B = x.size(0);
  d.C = x.size(1);
  d.P = pdim;
  d.Q = qk_dim;
  d.O = 2 * qk_dim + pdim;
  d.N = x.size(2) * x.size(3);
  // One block while the scores of all queries fit comfortably in L2; beyond that memory stays O(bm * N).
  d.bm = d.N <= 2 * kQueryBlock ? d.N : kQueryBlock;
  d.G = d.blocks() == 1 ? std::clamp<int64_t>(kGroupCols / d.N, 1, std::max<int64_t>(1, d.B / kMinTasks)) : 1;
  d.scale = 1.0 / std::sqrt(static_cast<double>(qk_dim));
  return d;
}

// ---- softmax -----------------------------------------------------------------------------------------------

// exp(x) for x <= 0 (softmax after max subtraction): Cody-Waite reduction to |r| <= ln2 / 2 and a degree-7
// Taylor polynomial (relative error < 1e-8 before rounding); results below 2^-126 come out as about 0.
inline vec_t<float> exp_nonpos(vec_t<float> x) {
  using V = vec_t<float>;
  using I = vec_t<int32_t>;
  const V zero = {};
  x = x < -87.0f ? zero - 87.0f : x;
  const V kf = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln2) via the 1.5 * 2^23 trick
  const V r = (x - kf * 0.693145752f) - kf * 1.42860677e-6f;  // ln2 split in a part exact in float + rest
  V p = zero + 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (__builtin_convertvector(kf, I) + 127) << 23;  // 2^k as float bits
  V two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return p * two_k;
}

// row[j] = exp(row[j] - shift); the tail goes through the same lanes (zero-padded), so every element is
// computed the same way.
inline void exp_shifted(float* row, int64_t n, float shift) {
  using V = vec_t<float>;
  constexpr int64_t L = kLanes<float>;
  int64_t j = 0;
  for (; j + L <= n; j += L) store(row + j, exp_nonpos(load<V>(row + j) - shift));
  if (j < n) {
    float tail[L] = {};
    std::copy(row + j, row + n, tail);
    store(tail, exp_nonpos(load<V>(tail) - shift));
    std::copy(tail, tail + (n - j), row + j);
  }
}

inline void exp_shifted(double* row, int64_t n, double shift) {
  for (int64_t j = 0; j < n; ++j) row[j] = std::exp(row[j] - shift);
}

inline float row_max(const float* row, int64_t n) {
  using V = vec_t<float>;
  constexpr int64_t L = kLanes<float>;
  V mx = V{} + row[0];
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V v = load<V>(row + j);
    mx = v > mx ? v : mx;
  }
  float out = row[0];
  for (int64_t l = 0; l < L; ++l) out = std::max(out, mx[l]);
  for (; j < n; ++j) out = std::max(out, row[j]);
  return out;
}

inline double row_max(const double* row, int64_t n) { return *std::max_element(row, row + n); }

// Row-wise softmax in place of m rows of length n (row stride n).
template <typename T>
void softmax_rows(T* s, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    T* row = s + i * n;
    exp_shifted(row, n, row_max(row, n));
    const T inv = T(1) / T(sum_of<T>(n, [&](int64_t t, auto z) { return load<decltype(z)>(row + t); }));
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
}

// ---- stages ------------------------------------------------------------------------------------------------

// GroupNorm(1) over x1 (P x N, contiguous): n = (x1 - mean) * rstd * gn_w + gn_b (row stride ldn).
// Returns {mean, rstd} as applied.
template <typename T>
std::pair<T, T> group_norm(const Dims& d, const T* x1, const T* w, const T* b, double eps, T* n, int64_t ldn) {
  const int64_t cnt = d.P * d.N;
  const T mean = T(sum_of<T>(cnt, [&](int64_t i, auto z) { return load<decltype(z)>(x1 + i); }) / cnt);
  const double var = sum_of<T>(cnt, [&](int64_t i, auto z) {
                       const auto t = load<decltype(z)>(x1 + i) - mean;
                       return t * t;
                     }) / cnt;
  const T rstd = T(1.0 / std::sqrt(var + eps));
  for (int64_t c = 0; c < d.P; ++c) {
    const T s = rstd * w[c], t = b[c];
    const T* xr = x1 + c * d.N;
    T* nr = n + c * ldn;
    for (int64_t i = 0; i < d.N; ++i) nr[i] = (xr[i] - mean) * s + t;
  }
  return {mean, rstd};
}

// GroupNorm of samples [sp.b0, sp.b1) into n (P rows, row stride ldn, sample j of the group at column j * N),
// then z (O rows, row stride ldz) = qkv_w @ n in one GEMM. Records each sample's GroupNorm mean / rstd when
// asked (mean, rstd indexed by sample).
template <typename T>
void group_norm_qkv(const Dims& d, const T* x, const T* gn_w, const T* gn_b, double gn_eps, const T* qkv_w,
                    const Span& sp, T* n, int64_t ldn, T* z, int64_t ldz, T* mean = nullptr, T* rstd = nullptr) {
  for (int64_t b = sp.b0; b < sp.b1; ++b) {
    const auto [mu, rs] = group_norm(d, x + b * d.C * d.N, gn_w, gn_b, gn_eps, n + (b - sp.b0) * d.N, ldn);
    if (mean) {
      mean[b] = mu;
      rstd[b] = rs;
    }
  }
  gemm<T>(false, false, d.O, sp.width(), d.P, 1.0, qkv_w, d.P, n, ldn, 0.0, z, ldz);
}

// Scores of query rows [i0, i0 + m) -> softmax probabilities in s (m x N). q, k: Q x N, row stride lda.
template <typename T>
void attention_probs(const Dims& d, const T* q, const T* k, int64_t lda, int64_t i0, int64_t m, T* s) {
  gemm<T>(true, false, m, d.N, d.Q, d.scale, q + i0, lda, k, lda, 0.0, s, d.N);
  softmax_rows(s, m, d.N);
}

// Tokens [i0, i0 + m) of u = ReLU(cat[v attn^T, x2]) for one sample, into u_blk (C x m, row stride ldu), with
// the block's probabilities left in s (m x N). a holds q, k, v (rows [0, Q), [Q, 2Q), [2Q, O); row stride lda);
// x2 is the sample's last C - P channels (row stride N).
template <typename T>
void attention_block(const Dims& d, const T* a, int64_t lda, const T* x2, int64_t i0, int64_t m, T* s, T* u_blk,
                     int64_t ldu) {
  const T *q = a, *k = a + d.Q * lda, *v = a + 2 * d.Q * lda;
  attention_probs(d, q, k, lda, i0, m, s);
  gemm<T>(false, true, d.P, m, d.N, 1.0, v, lda, s, d.N, 0.0, u_blk, ldu);
  for (int64_t c = 0; c < d.P; ++c) {
    T* ur = u_blk + c * ldu;
    for (int64_t i = 0; i < m; ++i) ur[i] = std::max(ur[i], T(0));
  }
  for (int64_t c = 0; c < d.C - d.P; ++c) {
    const T* xr = x2 + c * d.N + i0;
    T* ur = u_blk + (d.P + c) * ldu;
    for (int64_t i = 0; i < m; ++i) ur[i] = std::max(xr[i], T(0));
  }
}

// Gradients of q, k, v (rows of ga as in a; row stride ldga) from go (P x N, row stride ldgo: the ReLU-masked
// gradient of the attention output), recomputing the probabilities per query block unless s already holds
// the only block. Uses rowsum(gP * P)_i = sum_c go_ci o_ci = sum_c go_ci u_ci (go is 0 where u != o).
template <typename T>
void attention_backward(const Dims& d, const T* a, int64_t lda, const T* go, int64_t ldgo, const T* u,
                        int64_t ldu, T* ga, int64_t ldga, T* s, T* gs, T* dvec, bool s_ready) {
  const T *q = a, *k = a + d.Q * lda, *v = a + 2 * d.Q * lda;
  T *gq = ga, *gk = ga + d.Q * ldga, *gv = ga + 2 * d.Q * ldga;
  std::fill(dvec, dvec + d.N, T(0));
  for (int64_t c = 0; c < d.P; ++c) {
    const T *gr = go + c * ldgo, *ur = u + c * ldu;
    for (int64_t i = 0; i < d.N; ++i) dvec[i] += gr[i] * ur[i];
  }
  for (int64_t i0 = 0; i0 < d.N; i0 += d.bm) {
    const int64_t m = std::min(d.bm, d.N - i0);
    const double beta = i0 == 0 ? 0.0 : 1.0;  // gv and gk sum over the query blocks
    if (!s_ready) attention_probs(d, q, k, lda, i0, m, s);
    gemm<T>(false, false, d.P, d.N, m, 1.0, go + i0, ldgo, s, d.N, beta, gv, ldga);  // gv += go_blk P_blk
    gemm<T>(true, false, m, d.N, d.P, 1.0, go + i0, ldgo, v, lda, 0.0, gs, d.N);     // gP = go_blk^T v
    for (int64_t i = 0; i < m; ++i) {
      const T di = dvec[i0 + i];
      const T* pr = s + i * d.N;
      T* gr = gs + i * d.N;
      for (int64_t j = 0; j < d.N; ++j) gr[j] = pr[j] * (gr[j] - di);  // gS = P * (gP - D_i)
    }
    gemm<T>(false, true, d.Q, m, d.N, d.scale, k, lda, gs, d.N, 0.0, gq + i0, ldga);    // gq_blk = c k gS^T
    gemm<T>(false, false, d.Q, d.N, m, d.scale, q + i0, lda, gs, d.N, beta, gk, ldga);  // gk += c q_blk gS
  }
}

// BatchNorm backward per channel (rows x n blocks with their own row strides; out may alias ga or zhat):
// out = (ga - (gb + zhat * gw) / count) * invstd * w, with batch sums gb, gw (the BN parameter gradients).
template <typename T>
void batch_norm_backward(const T* ga, int64_t ldga, const T* zhat, int64_t ldz, T* out, int64_t ldo, int64_t rows,
                         int64_t n, const Affine<T>& norm, const std::vector<double>& gb,
                         const std::vector<double>& gw, double count) {
  for (int64_t c = 0; c < rows; ++c) {
    const T k = norm.invstd[c] * norm.w[c], mb = T(gb[c] / count), mw = T(gw[c] / count);
    const T *gr = ga + c * ldga, *zr = zhat + c * ldz;
    T* orow = out + c * ldo;
    for (int64_t i = 0; i < n; ++i) orow[i] = (gr[i] - (mb + zr[i] * mw)) * k;
  }
}

// Per-channel sums over one sample's row block: s1[c] = sum g, and s2[c] = sum g * zhat when zhat is given.
template <typename T>
void grad_moments(const T* g, int64_t ldg, const T* zhat, int64_t ldz, int64_t rows, int64_t n, double* s1,
                  double* s2) {
  for (int64_t c = 0; c < rows; ++c) {
    const T* gr = g + c * ldg;
    if (zhat) {
      const T* zr = zhat + c * ldz;
      const auto [sg, sgz] = sums_of<T, 2>(n, [&](int64_t i, auto z) {
        using V = decltype(z);
        const V gv = load<V>(gr + i);
        return std::array<V, 2>{gv, gv * load<V>(zr + i)};
      });
      s1[c] = sg;
      s2[c] = sgz;
    } else {
      s1[c] = sum_of<T>(n, [&](int64_t i, auto z) { return load<decltype(z)>(gr + i); });
    }
  }
}

// ---- argument checks ------------------------------------------------------------------------------------

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "shvit shsa (CPU kernel): ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "shvit shsa (CPU kernel): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "shvit shsa (CPU kernel): ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// Checks x, the weight matrices and qk_dim; returns the dimensions.
Dims check_main(const at::Tensor& x, const at::Tensor& gn_w, const at::Tensor& qkv_w, const at::Tensor& proj_w,
                int64_t qk_dim) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 4, "shvit shsa: x must be 4-D (B, dim, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0,
              "shvit shsa: x must have non-empty channel and spatial dims, got shape ", x.sizes());
  TORCH_CHECK(qk_dim > 0, "shvit shsa: qk_dim must be positive, got ", qk_dim);
  check_float(gn_w, "gn_w");
  TORCH_CHECK(gn_w.dim() == 1 && gn_w.size(0) > 0 && gn_w.size(0) <= x.size(1), "shvit shsa: gn_w must have shape ",
              "(pdim,) with 0 < pdim <= dim = ", x.size(1), ", got ", gn_w.sizes());
  const int64_t p = gn_w.size(0), c = x.size(1);
  for (const auto& [t, name, rows, cols] : {std::make_tuple(&qkv_w, "qkv_w", 2 * qk_dim + p, p),
                                            std::make_tuple(&proj_w, "proj_w", c, c)}) {
    check_float(*t, name);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == cols, "shvit shsa: ", name,
                " must have shape (", rows, ", ", cols, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "shvit shsa: ", name, " dtype ", t->scalar_type(),
                " does not match x dtype ", x.scalar_type());
  }
  return make_dims(x, p, qk_dim);
}

// A per-channel vector of length n, as a contiguous tensor of x's dtype.
at::Tensor vec(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& x) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "shvit shsa: ", name, " must have shape (", n, ",), got ", t.sizes());
  return t.to(x.scalar_type()).contiguous();
}

void check_eps(double eps, const char* name) {
  TORCH_CHECK(eps >= 0, "shvit shsa: ", name, " must be non-negative, got ", eps);
}

at::Tensor grad_like_x(const at::Tensor& gy, const at::Tensor& x) {
  check_float(gy, "gy");
  TORCH_CHECK(gy.sizes() == x.sizes(), "shvit shsa: gy must have x's shape ", x.sizes(), ", got ", gy.sizes());
  return gy.to(x.scalar_type()).contiguous();
}

// The pre-BN proj that the training forward keeps for the backward (optional): a contiguous tensor like x.
const at::Tensor* kept_proj(const std::optional<at::Tensor>& z, const at::Tensor& x) {
  if (!z) return nullptr;
  check_float(*z, "proj_z");
  TORCH_CHECK(z->sizes() == x.sizes() && z->scalar_type() == x.scalar_type() && z->is_contiguous(),
              "shvit shsa: proj_z must be a contiguous tensor of x's shape ", x.sizes(), " and dtype ",
              x.scalar_type(), ", got ", z->sizes(), " ", z->scalar_type());
  return &*z;
}

void check_batch_stats(const Dims& d) {
  TORCH_CHECK(d.B * d.N > 1, "shvit shsa: BatchNorm training needs more than 1 value per channel, got B = ", d.B,
              " and H * W = ", d.N);
}

// ---- eval forward -----------------------------------------------------------------------------------------

// u = ReLU(cat[o, x2]) of span sp into u (C x sp.width(), row stride ldu); a holds q, k, v of every sample in
// (O, B * N) layout (row stride d.B * d.N). s: bm x N scratch for the probabilities.
template <typename T>
void attention_span(const Dims& d, const T* a, const T* x, const Span& sp, T* s, T* u, int64_t ldu) {
  for (int64_t b = sp.b0; b < sp.b1; ++b)
    attention_block(d, a + b * d.N, d.B * d.N, x + (b * d.C + d.P) * d.N, sp.i0, sp.m, s, u + (b - sp.b0) * sp.m,
                    ldu);
}

// (1) per group: GroupNorm + qkv (+ bias); (2) per span: attention, ReLU'd concat and proj, + bias (+ x), into y.
template <typename T>
void eval_forward(const Dims& d, const T* x, const T* gn_w, const T* gn_b, double gn_eps, const T* qkv_w,
                  const T* qkv_b, const T* proj_w, const T* proj_b, bool residual, T* y) {
  const int64_t N = d.N, ld = d.B * N;
  const Scratch<T> a_s({d.O * ld});
  T* a = a_s[0];
  parallel_tasks(d.groups(), [&](int64_t g0, int64_t g1) {
    const Scratch<T> s({d.P * d.G * N});
    for (int64_t g = g0; g < g1; ++g) {
      const Span sp = d.group(g);
      const int64_t w = sp.width();
      T* ag = a + sp.b0 * N;
      group_norm_qkv(d, x, gn_w, gn_b, gn_eps, qkv_w, sp, s[0], w, ag, ld);
      for (int64_t c = 0; c < d.O; ++c)
        for (int64_t i = 0; i < w; ++i) ag[c * ld + i] += qkv_b[c];
    }
  });
  parallel_tasks(d.spans(), [&](int64_t t0, int64_t t1) {
    const Scratch<T> s({d.bm * N, d.C * d.max_width(), d.C * d.max_width()});
    for (int64_t t = t0; t < t1; ++t) {
      const Span sp = d.span(t);
      const int64_t w = sp.width();
      attention_span(d, a, x, sp, s[0], s[1], w);
      gemm<T>(false, false, d.C, w, d.C, 1.0, proj_w, d.C, s[1], w, 0.0, s[2], w);
      for (int64_t b = sp.b0; b < sp.b1; ++b) {
        const int64_t off = b * d.C * N + sp.i0;
        for (int64_t c = 0; c < d.C; ++c) {
          const T bc = proj_b[c];
          const T* zr = s[2] + c * w + (b - sp.b0) * sp.m;
          const T* xr = x + off + c * N;
          T* yr = y + off + c * N;
          if (residual) {
            for (int64_t i = 0; i < sp.m; ++i) yr[i] = (zr[i] + bc) + xr[i];
          } else {
            for (int64_t i = 0; i < sp.m; ++i) yr[i] = zr[i] + bc;
          }
        }
      }
    }
  });
}

// ---- training forward -------------------------------------------------------------------------------------

template <typename T>
void train_forward(const Dims& d, const T* x, const T* gn_w, const T* gn_b, double gn_eps, const T* qkv_w,
                   const T* qkv_bn_w, const T* qkv_bn_b, double qkv_eps, const T* proj_w, const T* proj_bn_w,
                   const T* proj_bn_b, double proj_eps, bool residual, T* y, T* qkv_mean, T* qkv_var,
                   T* proj_mean, T* proj_var, T* zp) {
  const int64_t B = d.B, N = d.N, ld = B * N;
  T* z = zp ? zp : y;  // the pre-BN proj (NCHW): kept in zp for the backward when given, else BN'd in place
  // (1) GroupNorm + pre-BN qkv of every sample, kept in (O, B * N) layout, and its per-sample moments.
  const Scratch<T> zq_s({d.O * ld});
  T* zq = zq_s[0];
  std::vector<double> mq(B * d.O), m2q(B * d.O);
  parallel_tasks(d.groups(), [&](int64_t g0, int64_t g1) {
    const Scratch<T> s({d.P * d.G * N});
    for (int64_t g = g0; g < g1; ++g) {
      const Span sp = d.group(g);
      group_norm_qkv(d, x, gn_w, gn_b, gn_eps, qkv_w, sp, s[0], sp.width(), zq + sp.b0 * N, ld);
      for (int64_t b = sp.b0; b < sp.b1; ++b) row_moments(zq + b * N, ld, d.O, N, &mq[b * d.O], &m2q[b * d.O]);
    }
  });
  combine_moments(mq, m2q, std::vector<int64_t>(B, N), d.O, qkv_mean, qkv_var);
  const Affine<T> qn = Affine<T>::batch_norm(qkv_mean, qkv_var, qkv_bn_w, qkv_bn_b, qkv_eps, d.O);
  parallel_tasks(d.groups(), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const Span sp = d.group(g);
      qn.apply(zq + sp.b0 * N, ld, d.O, sp.width(), zq + sp.b0 * N, ld);
    }
  });

  // (2) per span: attention + ReLU'd concat + pre-BN proj, written to z, and the span's moments.
  std::vector<double> mp(d.spans() * d.C), m2p(d.spans() * d.C);
  std::vector<int64_t> count(d.spans());
  parallel_tasks(d.spans(), [&](int64_t t0, int64_t t1) {
    const Scratch<T> s({d.bm * N, d.C * d.max_width(), d.C * d.max_width()});
    for (int64_t t = t0; t < t1; ++t) {
      const Span sp = d.span(t);
      const int64_t w = sp.width();
      attention_span(d, zq, x, sp, s[0], s[1], w);
      gemm<T>(false, false, d.C, w, d.C, 1.0, proj_w, d.C, s[1], w, 0.0, s[2], w);
      row_moments(s[2], w, d.C, w, &mp[t * d.C], &m2p[t * d.C]);
      count[t] = w;
      for (int64_t b = sp.b0; b < sp.b1; ++b)
        for (int64_t c = 0; c < d.C; ++c)
          std::copy_n(s[2] + c * w + (b - sp.b0) * sp.m, sp.m, z + (b * d.C + c) * N + sp.i0);
    }
  });
  combine_moments(mp, m2p, count, d.C, proj_mean, proj_var);
  const Affine<T> pn = Affine<T>::batch_norm(proj_mean, proj_var, proj_bn_w, proj_bn_b, proj_eps, d.C);

  // (3) y = proj BN(z) (+ residual).
  parallel_tasks(B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* ys = y + b * d.C * N;
      pn.apply(z + b * d.C * N, N, d.C, N, ys, N);
      if (residual) {
        const T* xs = x + b * d.C * N;
        for (int64_t i = 0; i < d.C * N; ++i) ys[i] += xs[i];
      }
    }
  });
}

// ---- backward (eval and training) -------------------------------------------------------------------------

// Gradients of all inputs. In training, qn / pn are the BatchNorms with the forward's batch statistics, and zp,
// when not null, is the forward's pre-BN proj (NCHW); in eval they are the folded biases. Tasks are the groups of
// samples.
template <typename T>
class Backward {
 public:
  Backward(const Dims& d, const T* gy, const T* x, const T* gn_w, const T* gn_b, double gn_eps, const T* qkv_w,
           const T* proj_w, Affine<T> qn, Affine<T> pn, bool train, bool residual, T* gx, const T* zp = nullptr)
      : d(d), gy(gy), x(x), gn_w(gn_w), gn_b(gn_b), gn_eps(gn_eps), qkv_w(qkv_w), proj_w(proj_w), qn(std::move(qn)),
        pn(std::move(pn)), train(train), residual(residual), gx(gx), zp(zp), ld(d.B * d.N),
        store({store_size(d, train)}) {
    T* p = store[0];
    for (T** buf : {&U, &GP}) *buf = p, p += d.C * ld;
    NB = p, p += d.P * ld;
    for (T** buf : {&A, &GA}) *buf = p, p += d.O * ld;
    ZH = train ? p : nullptr;
    p += train ? d.O * ld : 0;
    PR = keeps_probs(d, train) ? p : nullptr;
    p += keeps_probs(d, train) ? d.B * d.N * d.N : 0;
    // proj_w^T and qkv_w^T: the input-gradient GEMMs then take plain operands (oneDNN's brgemm for fp32).
    for (auto [w, rows, cols, wt] : {std::tuple{proj_w, d.C, d.C, &proj_wt}, std::tuple{qkv_w, d.O, d.P, &qkv_wt}}) {
      *wt = p, p += rows * cols;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) (*wt)[c * rows + r] = w[r * cols + c];
    }
    gn_mean.resize(d.B);
    gn_rstd.resize(d.B);
    for (auto* v : {&proj_s1, &proj_s2}) v->assign(d.B * d.C, 0.0);
    for (auto* v : {&qkv_s1, &qkv_s2}) v->assign(d.B * d.O, 0.0);
    for (auto* v : {&gn_s1, &gn_s2}) v->assign(d.B * d.P, 0.0);
  }

  // Runs the passes; then the per-sample GroupNorm sums (gn_s1 / gn_s2) and the BN / bias gradients
  // (qkv_gb, qkv_gw, proj_gb, proj_gw; the *_gw only in training) are ready.
  void run() {
    if (train) {
      per_group([&](const Span& sp, const Scratch<T>& s) { forward(sp, s); });
      proj_gb = sum_samples(proj_s1, d.B, d.C);
      proj_gw = sum_samples(proj_s2, d.B, d.C);
      per_group([&](const Span& sp, const Scratch<T>& s) { attention(sp, s, d.blocks() == 1); });
      qkv_gb = sum_samples(qkv_s1, d.B, d.O);
      qkv_gw = sum_samples(qkv_s2, d.B, d.O);
      per_group([&](const Span& sp, const Scratch<T>& s) { group_norm_backward(sp, s); });
    } else {
      per_group([&](const Span& sp, const Scratch<T>& s) {
        forward(sp, s);
        attention(sp, s, d.blocks() == 1);
        group_norm_backward(sp, s);
      });
      proj_gb = sum_samples(proj_s1, d.B, d.C);
      qkv_gb = sum_samples(qkv_s1, d.B, d.O);
    }
  }

  // Weight gradients: one GEMM each over the whole batch, in one parallel region.
  void weight_grads(T* g_qkv_w, T* g_proj_w) const {
    gemm_nt_batches<T>({{d.C, d.C, GP, U, g_proj_w}, {d.O, d.P, GA, NB, g_qkv_w}}, ld, ld);
  }

  std::vector<double> gn_s1, gn_s2;                      // per-sample sums of gn and gn * xhat per channel
  std::vector<double> proj_gb, proj_gw, qkv_gb, qkv_gw;  // batch sums of the BN input grads (and * zhat)

 private:
  const Dims& d;
  const T *gy, *x, *gn_w, *gn_b;
  double gn_eps;
  const T *qkv_w, *proj_w;
  const Affine<T> qn, pn;
  const bool train, residual;
  T* gx;
  const T* zp;

  // Batch-wide buffers, (rows, B * N) with sample b in columns [b * N, (b + 1) * N): a group's GEMMs take its
  // columns at once, and the weight gradients are single GEMMs over the batch.
  const int64_t ld;
  const Scratch<T> store;  // the buffers below
  T *U, *GP, *NB, *A, *GA, *ZH;  // relu'd concat, proj grad (train: zhat first), GN out, qkv, qkv grad, qkv zhat
  T* PR;                         // training with one query block per sample: sample b's probabilities at b * N * N
  T *proj_wt, *qkv_wt;           // proj_w^T (C x C), qkv_w^T (P x O)
  std::vector<T> gn_mean, gn_rstd;
  std::vector<double> proj_s1, proj_s2, qkv_s1, qkv_s2;  // per-sample partial sums

  // With one query block per sample, training keeps all probabilities (B * N * N, small then) for pass (2).
  static bool keeps_probs(const Dims& d, bool train) { return train && d.blocks() == 1; }
  static int64_t store_size(const Dims& d, bool train) {
    const int64_t rows = 2 * d.C + d.P + (train ? 3 : 2) * d.O;
    return rows * d.B * d.N + (keeps_probs(d, train) ? d.B * d.N * d.N : 0) + d.C * d.C + d.O * d.P;
  }

  template <typename F>
  void per_group(F f) {
    parallel_tasks(d.groups(), [&](int64_t g0, int64_t g1) {
      // gu / gn of the group; each sample's probabilities (one query block at a time when there are several);
      // the score gradients of a block; D.
      const Scratch<T> s({d.C * d.G * d.N, d.G * d.bm * d.N, d.bm * d.N, d.N});
      for (int64_t g = g0; g < g1; ++g) f(d.group(g), s);
    });
  }

  // Where sample b (of group sp) keeps its probabilities: PR, or a slot of s per sample of the group while each
  // sample has a single query block (else one block at a time).
  T* probs(const Span& sp, const Scratch<T>& s, int64_t b) const {
    return PR ? PR + b * d.N * d.N : s[1] + (b - sp.b0) * d.bm * d.N;
  }

  // (1) Forward of group sp up to u (and, in training, proj's zhat, from zp or recomputed, and the proj BN
  // partial sums).
  void forward(const Span& sp, const Scratch<T>& s) {
    const int64_t N = d.N, col = sp.b0 * N, w = sp.width();
    T* z = train ? ZH + col : A + col;
    group_norm_qkv(d, x, gn_w, gn_b, gn_eps, qkv_w, sp, NB + col, ld, z, ld, gn_mean.data(), gn_rstd.data());
    if (train) {
      for (int64_t c = 0; c < d.O; ++c) {  // zhat is kept for the qkv BN backward
        const T m = qn.mean[c], is = qn.invstd[c], wc = qn.w[c], bc = qn.b[c];
        T *zr = z + c * ld, *ar = A + col + c * ld;
        for (int64_t i = 0; i < w; ++i) zr[i] = (zr[i] - m) * is;
        for (int64_t i = 0; i < w; ++i) ar[i] = zr[i] * wc + bc;
      }
    } else {
      qn.apply(z, ld, d.O, w, z, ld);
    }
    for (int64_t b = sp.b0; b < sp.b1; ++b)
      for (int64_t i0 = 0; i0 < N; i0 += d.bm)
        attention_block(d, A + b * N, ld, x + (b * d.C + d.P) * N, i0, std::min(d.bm, N - i0), probs(sp, s, b),
                        U + b * N + i0, ld);
    if (train) {
      T* zh = GP + col;
      if (!zp) gemm<T>(false, false, d.C, w, d.C, 1.0, proj_w, d.C, U + col, ld, 0.0, zh, ld);
      for (int64_t b = sp.b0; b < sp.b1; ++b)
        for (int64_t c = 0; c < d.C; ++c) {  // -> zhat
          const T m = pn.mean[c], is = pn.invstd[c];
          const T* zr = zp ? zp + (b * d.C + c) * N : zh + c * ld + (b - sp.b0) * N;
          T* hr = zh + c * ld + (b - sp.b0) * N;
          for (int64_t i = 0; i < N; ++i) hr[i] = (zr[i] - m) * is;
        }
      for (int64_t b = sp.b0; b < sp.b1; ++b)
        grad_moments(gy + b * d.C * N, N, GP + b * N, ld, d.C, N, &proj_s1[b * d.C], &proj_s2[b * d.C]);
    } else {
      for (int64_t b = sp.b0; b < sp.b1; ++b) {
        const T* g = gy + b * d.C * N;
        for (int64_t c = 0; c < d.C; ++c) std::copy_n(g + c * N, N, GP + c * ld + b * N);
        grad_moments<T>(g, N, nullptr, 0, d.C, N, &proj_s1[b * d.C], nullptr);
      }
    }
  }

  // (2) proj (BN) backward, the ReLU and the attention backward of group sp: gx's x2 rows and ga. With s_ready,
  // probs() holds each sample's probabilities from forward().
  void attention(const Span& sp, const Scratch<T>& s, bool s_ready) {
    const int64_t N = d.N, col = sp.b0 * N, w = sp.width();
    if (train)
      for (int64_t b = sp.b0; b < sp.b1; ++b)
        batch_norm_backward(gy + b * d.C * N, N, GP + b * N, ld, GP + b * N, ld, d.C, N, pn, proj_gb, proj_gw,
                            d.B * N);
    T* gu = s[0];
    gemm<T>(false, false, d.C, w, d.C, 1.0, proj_wt, d.C, GP + col, ld, 0.0, gu, w);
    for (int64_t b = sp.b0; b < sp.b1; ++b) {
      // ReLU backward: go (rows < P) stays in gu; the x2 rows are gx's (+ gy).
      T* gus = gu + (b - sp.b0) * N;
      const T* us = U + b * N;
      T* gxs = gx + b * d.C * N;
      const T* gys = gy + b * d.C * N;
      // Unconditional loads, so that the selects vectorise instead of branching on the data.
      for (int64_t c = 0; c < d.C; ++c) {
        const T* ur = us + c * ld;
        T* gr = gus + c * w;
        T* out = c < d.P ? gr : gxs + c * N;
        const T* add = residual && c >= d.P ? gys + c * N : nullptr;
        for (int64_t i = 0; i < N; ++i) {
          const T g = gr[i];
          out[i] = ur[i] > T(0) ? g : T(0);
        }
        if (add)
          for (int64_t i = 0; i < N; ++i) out[i] += add[i];
      }
      attention_backward(d, A + b * N, ld, gus, w, us, ld, GA + b * N, ld, probs(sp, s, b), s[2], s[3], s_ready);
      grad_moments(GA + b * N, ld, train ? ZH + b * N : nullptr, ld, d.O, N, &qkv_s1[b * d.O], &qkv_s2[b * d.O]);
    }
  }

  // (3) qkv (BN) backward and GroupNorm backward of group sp: gx's x1 rows and the GroupNorm partial sums.
  void group_norm_backward(const Span& sp, const Scratch<T>& s) {
    const int64_t N = d.N, col = sp.b0 * N, w = sp.width();
    T* gz = GA + col;
    if (train) batch_norm_backward(gz, ld, ZH + col, ld, gz, ld, d.O, w, qn, qkv_gb, qkv_gw, d.B * N);
    T* gn = s[0];  // gradient of GroupNorm's output
    gemm<T>(false, false, d.P, w, d.O, 1.0, qkv_wt, d.O, gz, ld, 0.0, gn, w);
    for (int64_t b = sp.b0; b < sp.b1; ++b) {
      const T* gns = gn + (b - sp.b0) * N;
      const T* x1 = x + b * d.C * N;
      const T mean = gn_mean[b], rstd = gn_rstd[b];
      // Per-channel sums of gn and gn * xhat (xhat recomputed from x) give the affine gradients and, weighted by
      // gn_w, the two means of the GroupNorm backward.
      double m1 = 0, m2 = 0;
      for (int64_t c = 0; c < d.P; ++c) {
        const T *gr = gns + c * w, *xr = x1 + c * N;
        const auto [sg, sgx] = sums_of<T, 2>(N, [&](int64_t i, auto z) {
          using V = decltype(z);
          const V gv = load<V>(gr + i);
          return std::array<V, 2>{gv, gv * ((load<V>(xr + i) - mean) * rstd)};
        });
        gn_s1[b * d.P + c] = sg;
        gn_s2[b * d.P + c] = sgx;
        m1 += gn_w[c] * sg;
        m2 += gn_w[c] * sgx;
      }
      const T mg = T(m1 / (d.P * N)), mgx = T(m2 / (d.P * N));
      T* gxs = gx + b * d.C * N;
      const T* gys = gy + b * d.C * N;
      for (int64_t c = 0; c < d.P; ++c) {
        const T wc = gn_w[c];
        const T *gr = gns + c * w, *xr = x1 + c * N;
        T* gxr = gxs + c * N;
        for (int64_t i = 0; i < N; ++i) {
          const T g = rstd * (gr[i] * wc - mg - (xr[i] - mean) * rstd * mgx);
          gxr[i] = residual ? g + gys[c * N + i] : g;
        }
      }
    }
  }
};

template <typename T>
void fill(const at::Tensor& t, const std::vector<double>& v) {
  T* p = t.mutable_data_ptr<T>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = T(v[i]);
}

// ---- op entry points ----------------------------------------------------------------------------------------

at::Tensor shsa_fwd_cpu(const at::Tensor& x_in, const at::Tensor& gn_w_in, const at::Tensor& gn_b_in, double gn_eps,
                        const at::Tensor& qkv_w_in, const at::Tensor& qkv_b_in, const at::Tensor& proj_w_in,
                        const at::Tensor& proj_b_in, int64_t qk_dim, bool residual) {
  const Dims d = check_main(x_in, gn_w_in, qkv_w_in, proj_w_in, qk_dim);
  check_eps(gn_eps, "gn_eps");
  const at::Tensor x = x_in.contiguous(), qkv_w = qkv_w_in.contiguous(), proj_w = proj_w_in.contiguous();
  const at::Tensor gn_w = vec(gn_w_in, "gn_w", d.P, x), gn_b = vec(gn_b_in, "gn_b", d.P, x);
  const at::Tensor qkv_b = vec(qkv_b_in, "qkv_b", d.O, x), proj_b = vec(proj_b_in, "proj_b", d.C, x);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (d.B == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shsa_fwd_cpu", [&] {
    using T = scalar_t;
    eval_forward<T>(d, ptr<T>(x), ptr<T>(gn_w), ptr<T>(gn_b), gn_eps, ptr<T>(qkv_w), ptr<T>(qkv_b), ptr<T>(proj_w),
                    ptr<T>(proj_b), residual, y.mutable_data_ptr<T>());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shsa_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& gn_w_in, const at::Tensor& gn_b_in,
    double gn_eps, const at::Tensor& qkv_w_in, const at::Tensor& qkv_b_in, const at::Tensor& proj_w_in,
    const at::Tensor& proj_b_in, int64_t qk_dim, bool residual) {
  const Dims d = check_main(x_in, gn_w_in, qkv_w_in, proj_w_in, qk_dim);
  check_eps(gn_eps, "gn_eps");
  const at::Tensor x = x_in.contiguous(), qkv_w = qkv_w_in.contiguous(), proj_w = proj_w_in.contiguous();
  const at::Tensor gy = grad_like_x(gy_in, x);
  const at::Tensor gn_w = vec(gn_w_in, "gn_w", d.P, x), gn_b = vec(gn_b_in, "gn_b", d.P, x);
  const at::Tensor qkv_b = vec(qkv_b_in, "qkv_b", d.O, x), proj_b = vec(proj_b_in, "proj_b", d.C, x);
  const auto opt = x.options();
  at::Tensor gx = at::empty(x.sizes(), opt), g_gn_w = at::zeros({d.P}, opt), g_gn_b = at::zeros({d.P}, opt);
  at::Tensor g_qkv_w = at::zeros({d.O, d.P}, opt), g_qkv_b = at::zeros({d.O}, opt);
  at::Tensor g_proj_w = at::zeros({d.C, d.C}, opt), g_proj_b = at::zeros({d.C}, opt);
  if (d.B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shsa_bwd_cpu", [&] {
      using T = scalar_t;
      Backward<T> bw(d, ptr<T>(gy), ptr<T>(x), ptr<T>(gn_w), ptr<T>(gn_b), gn_eps, ptr<T>(qkv_w), ptr<T>(proj_w),
                     Affine<T>::bias(ptr<T>(qkv_b), d.O), Affine<T>::bias(ptr<T>(proj_b), d.C), false, residual,
                     gx.mutable_data_ptr<T>());
      bw.run();
      bw.weight_grads(g_qkv_w.mutable_data_ptr<T>(), g_proj_w.mutable_data_ptr<T>());
      fill<T>(g_gn_w, sum_samples(bw.gn_s2, d.B, d.P));
      fill<T>(g_gn_b, sum_samples(bw.gn_s1, d.B, d.P));
      fill<T>(g_qkv_b, bw.qkv_gb);
      fill<T>(g_proj_b, bw.proj_gb);
    });
  } else if (residual) {
    gx.copy_(gy);
  }
  return {gx,
          g_gn_w.to(gn_w_in.scalar_type()),
          g_gn_b.to(gn_b_in.scalar_type()),
          g_qkv_w,
          g_qkv_b.to(qkv_b_in.scalar_type()),
          g_proj_w,
          g_proj_b.to(proj_b_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shsa_train_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& gn_w_in, const at::Tensor& gn_b_in, double gn_eps,
    const at::Tensor& qkv_w_in, const at::Tensor& qkv_bn_w_in, const at::Tensor& qkv_bn_b_in, double qkv_eps,
    const at::Tensor& proj_w_in, const at::Tensor& proj_bn_w_in, const at::Tensor& proj_bn_b_in, double proj_eps,
    int64_t qk_dim, bool residual, const std::optional<at::Tensor>& proj_z) {
  const Dims d = check_main(x_in, gn_w_in, qkv_w_in, proj_w_in, qk_dim);
  const at::Tensor* zp = kept_proj(proj_z, x_in);
  check_batch_stats(d);
  check_eps(gn_eps, "gn_eps");
  check_eps(qkv_eps, "qkv_eps");
  check_eps(proj_eps, "proj_eps");
  const at::Tensor x = x_in.contiguous(), qkv_w = qkv_w_in.contiguous(), proj_w = proj_w_in.contiguous();
  const at::Tensor gn_w = vec(gn_w_in, "gn_w", d.P, x), gn_b = vec(gn_b_in, "gn_b", d.P, x);
  const at::Tensor qkv_bn_w = vec(qkv_bn_w_in, "qkv_bn_w", d.O, x), qkv_bn_b = vec(qkv_bn_b_in, "qkv_bn_b", d.O, x);
  const at::Tensor proj_bn_w = vec(proj_bn_w_in, "proj_bn_w", d.C, x);
  const at::Tensor proj_bn_b = vec(proj_bn_b_in, "proj_bn_b", d.C, x);
  const auto opt = x.options();
  at::Tensor y = at::empty(x.sizes(), opt);
  at::Tensor qkv_mean = at::empty({d.O}, opt), qkv_var = at::empty({d.O}, opt);
  at::Tensor proj_mean = at::empty({d.C}, opt), proj_var = at::empty({d.C}, opt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shsa_train_fwd_cpu", [&] {
    using T = scalar_t;
    train_forward<T>(d, ptr<T>(x), ptr<T>(gn_w), ptr<T>(gn_b), gn_eps, ptr<T>(qkv_w), ptr<T>(qkv_bn_w),
                     ptr<T>(qkv_bn_b), qkv_eps, ptr<T>(proj_w), ptr<T>(proj_bn_w), ptr<T>(proj_bn_b), proj_eps,
                     residual, y.mutable_data_ptr<T>(), qkv_mean.mutable_data_ptr<T>(),
                     qkv_var.mutable_data_ptr<T>(), proj_mean.mutable_data_ptr<T>(), proj_var.mutable_data_ptr<T>(),
                     zp ? zp->mutable_data_ptr<T>() : nullptr);
  });
  return {y, qkv_mean, qkv_var, proj_mean, proj_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
shsa_train_bwd_cpu(const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& gn_w_in,
                   const at::Tensor& gn_b_in, double gn_eps, const at::Tensor& qkv_w_in, const at::Tensor& qkv_bn_w_in,
                   const at::Tensor& qkv_bn_b_in, double qkv_eps, const at::Tensor& proj_w_in,
                   const at::Tensor& proj_bn_w_in, const at::Tensor& proj_bn_b_in, double proj_eps,
                   const at::Tensor& qkv_mean_in, const at::Tensor& qkv_var_in, const at::Tensor& proj_mean_in,
                   const at::Tensor& proj_var_in, int64_t qk_dim, bool residual,
                   const std::optional<at::Tensor>& proj_z) {
  const Dims d = check_main(x_in, gn_w_in, qkv_w_in, proj_w_in, qk_dim);
  const at::Tensor* zp = kept_proj(proj_z, x_in);
  check_batch_stats(d);
  check_eps(gn_eps, "gn_eps");
  check_eps(qkv_eps, "qkv_eps");
  check_eps(proj_eps, "proj_eps");
  const at::Tensor x = x_in.contiguous(), qkv_w = qkv_w_in.contiguous(), proj_w = proj_w_in.contiguous();
  const at::Tensor gy = grad_like_x(gy_in, x);
  const at::Tensor gn_w = vec(gn_w_in, "gn_w", d.P, x), gn_b = vec(gn_b_in, "gn_b", d.P, x);
  const at::Tensor qkv_bn_w = vec(qkv_bn_w_in, "qkv_bn_w", d.O, x), qkv_bn_b = vec(qkv_bn_b_in, "qkv_bn_b", d.O, x);
  const at::Tensor proj_bn_w = vec(proj_bn_w_in, "proj_bn_w", d.C, x);
  const at::Tensor proj_bn_b = vec(proj_bn_b_in, "proj_bn_b", d.C, x);
  const at::Tensor qkv_mean = vec(qkv_mean_in, "qkv_mean", d.O, x), qkv_var = vec(qkv_var_in, "qkv_var", d.O, x);
  const at::Tensor proj_mean = vec(proj_mean_in, "proj_mean", d.C, x);
  const at::Tensor proj_var = vec(proj_var_in, "proj_var", d.C, x);
  const auto opt = x.options();
  at::Tensor gx = at::empty(x.sizes(), opt), g_gn_w = at::empty({d.P}, opt), g_gn_b = at::empty({d.P}, opt);
  at::Tensor g_qkv_w = at::empty({d.O, d.P}, opt), g_qkv_bn_w = at::empty({d.O}, opt);
  at::Tensor g_qkv_bn_b = at::empty({d.O}, opt), g_proj_w = at::empty({d.C, d.C}, opt);
  at::Tensor g_proj_bn_w = at::empty({d.C}, opt), g_proj_bn_b = at::empty({d.C}, opt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shsa_train_bwd_cpu", [&] {
    using T = scalar_t;
    Backward<T> bw(d, ptr<T>(gy), ptr<T>(x), ptr<T>(gn_w), ptr<T>(gn_b), gn_eps, ptr<T>(qkv_w), ptr<T>(proj_w),
                   Affine<T>::batch_norm(ptr<T>(qkv_mean), ptr<T>(qkv_var), ptr<T>(qkv_bn_w), ptr<T>(qkv_bn_b),
                                         qkv_eps, d.O),
                   Affine<T>::batch_norm(ptr<T>(proj_mean), ptr<T>(proj_var), ptr<T>(proj_bn_w),
                                         ptr<T>(proj_bn_b), proj_eps, d.C),
                   true, residual, gx.mutable_data_ptr<T>(), zp ? ptr<T>(*zp) : nullptr);
    bw.run();
    bw.weight_grads(g_qkv_w.mutable_data_ptr<T>(), g_proj_w.mutable_data_ptr<T>());
    fill<T>(g_gn_w, sum_samples(bw.gn_s2, d.B, d.P));
    fill<T>(g_gn_b, sum_samples(bw.gn_s1, d.B, d.P));
    fill<T>(g_qkv_bn_w, bw.qkv_gw);
    fill<T>(g_qkv_bn_b, bw.qkv_gb);
    fill<T>(g_proj_bn_w, bw.proj_gw);
    fill<T>(g_proj_bn_b, bw.proj_gb);
  });
  return {gx,
          g_gn_w.to(gn_w_in.scalar_type()),
          g_gn_b.to(gn_b_in.scalar_type()),
          g_qkv_w,
          g_qkv_bn_w.to(qkv_bn_w_in.scalar_type()),
          g_qkv_bn_b.to(qkv_bn_b_in.scalar_type()),
          g_proj_w,
          g_proj_bn_w.to(proj_bn_w_in.scalar_type()),
          g_proj_bn_b.to(proj_bn_b_in.scalar_type())};
}

}  // namespace
}  // namespace shvit::cpu

TORCH_LIBRARY_FRAGMENT(shvit, m) {
  m.def(
      "shsa_fwd_cpu(Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, Tensor qkv_b, Tensor proj_w, "
      "Tensor proj_b, int qk_dim, bool residual) -> Tensor");
  m.def(
      "shsa_bwd_cpu(Tensor gy, Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, Tensor qkv_b, "
      "Tensor proj_w, Tensor proj_b, int qk_dim, bool residual) -> (Tensor gx, Tensor g_gn_w, Tensor g_gn_b, "
      "Tensor g_qkv_w, Tensor g_qkv_b, Tensor g_proj_w, Tensor g_proj_b)");
  m.def(
      "shsa_train_fwd_cpu(Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, Tensor qkv_bn_w, "
      "Tensor qkv_bn_b, float qkv_eps, Tensor proj_w, Tensor proj_bn_w, Tensor proj_bn_b, float proj_eps, "
      "int qk_dim, bool residual, Tensor(a!)? proj_z=None) -> (Tensor y, Tensor qkv_mean, Tensor qkv_var, "
      "Tensor proj_mean, Tensor proj_var)");
  m.def(
      "shsa_train_bwd_cpu(Tensor gy, Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, "
      "Tensor qkv_bn_w, Tensor qkv_bn_b, float qkv_eps, Tensor proj_w, Tensor proj_bn_w, Tensor proj_bn_b, "
      "float proj_eps, Tensor qkv_mean, Tensor qkv_var, Tensor proj_mean, Tensor proj_var, int qk_dim, "
      "bool residual, Tensor? proj_z=None) -> (Tensor gx, Tensor g_gn_w, Tensor g_gn_b, Tensor g_qkv_w, "
      "Tensor g_qkv_bn_w, Tensor g_qkv_bn_b, Tensor g_proj_w, Tensor g_proj_bn_w, Tensor g_proj_bn_b)");
}

TORCH_LIBRARY_IMPL(shvit, CPU, m) {
  m.impl("shsa_fwd_cpu", &shvit::cpu::shsa_fwd_cpu);
  m.impl("shsa_bwd_cpu", &shvit::cpu::shsa_bwd_cpu);
  m.impl("shsa_train_fwd_cpu", &shvit::cpu::shsa_train_fwd_cpu);
  m.impl("shsa_train_bwd_cpu", &shvit::cpu::shsa_train_bwd_cpu);
}
