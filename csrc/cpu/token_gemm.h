// Token-major GEMMs with fused BatchNorm steps, shared by the CPU kernels of the 1x1-conv blocks (ffn.cpp,
// pw_conv_bn.cpp): an activation with ch channels is one row-major (B*H*W, ch) matrix, i.e. channels_last; a 1x1
// conv over the batch is one GEMM (oneDNN's linear for fp32, MKL in fixed blocks of tokens otherwise), and the
// elementwise work around it (bias, ReLU, BatchNorm's statistics, apply and backward) runs in fixed blocks of
// tokens, their per-block partial sums combined in block order (results independent of the thread count).
//
// An anonymous namespace as kernel_common.h's (included first), for the same reason.
#pragma once

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "kernel_common.h"

namespace shvit::cpu {
namespace {

constexpr int64_t kBlockElems = 1 << 16;  // a block's widest activation (h x tokens): 256 KB in fp32, stays in L2
constexpr int64_t kBlockAlign = 16;       // tokens per block are a multiple of this (whole SIMD rows)
constexpr int64_t kGradTasks = 8;         // weight gradients: at least this many row chunks (fixed by shapes)

// T tokens cut into n blocks of at most bm tokens each, sized for the widest activation (`hidden` channels). With
// sample_tokens > 0 (the tokens of one sample), no block straddles two samples: each sample is cut alike, into `per`
// blocks (what a per-sample operand, PatchMerging's SE gate, needs).
struct Blocks {
  int64_t T, N, bm, per, n;

  Blocks(int64_t tokens, int64_t hidden, int64_t sample_tokens = 0)
      : T(tokens), N(sample_tokens > 0 ? sample_tokens : tokens) {
    const int64_t target = std::max(kBlockAlign, kBlockElems / hidden);
    const int64_t k = (N + target - 1) / target, even = (N + k - 1) / k;  // k blocks of about equal size
    bm = std::min(N, (even + kBlockAlign - 1) / kBlockAlign * kBlockAlign);
    per = (N + bm - 1) / bm;
    n = T / N * per;
  }

  int64_t sample(int64_t t) const { return t / per; }
  int64_t i0(int64_t t) const { return sample(t) * N + t % per * bm; }
  int64_t width(int64_t t) const { return std::min(bm, N - t % per * bm); }

  // f(t, first token, tokens) over the blocks, in parallel.
  template <typename F>
  void each(const F& f) const {
    parallel_tasks(n, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) f(t, i0(t), width(t));
    });
  }
};

// ---- GEMMs over tokens ------------------------------------------------------------------------------------------

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, std::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<std::string_view>);
using LinearAddFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, std::string_view);

bool onednn(const at::Tensor& x) {
  static const bool available =
      at::hasMKLDNN() && c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""}).has_value();
  return available && x.scalar_type() == at::kFloat;
}

enum class Epilogue { kNone, kRelu, kAdd };

// One block of `linear` on MKL: o (m x n) = a (m x k) @ w^T + bias (if defined), then ReLU, or + res (m x n).
template <typename T>
void block_linear(const T* a, int64_t m, const at::Tensor& w, const at::Tensor& bias, Epilogue e, const T* res,
                  T* o) {
  const int64_t n = w.size(0), k = w.size(1);
  const T* pb = bias.defined() ? ptr<T>(bias) : nullptr;
  gemm<T>(false, true, m, n, k, 1.0, a, k, ptr<T>(w), k, 0.0, o, n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < n; ++c) {
      T& v = o[i * n + c];
      if (pb) v += pb[c];
      if (e == Epilogue::kRelu) v = std::max(v, T(0));  // (max keeps a NaN)
      if (res) v += res[i * n + c];
    }
}

// out (tokens x n) = a (tokens x k) @ w^T (w: n x k) + bias (if defined), then ReLU, or + res (tokens x n). All
// row-major and contiguous.
template <typename T>
at::Tensor linear(const Blocks& g, const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias, Epilogue e,
                  const at::Tensor& res = {}) {
  if (onednn(a)) {
    const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
    if (e == Epilogue::kAdd) {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
                                 .typed<LinearAddFn>();
      return op.call(a, res, w, b, "add");
    }
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "").typed<LinearFn>();
    return op.call(a, w, b, e == Epilogue::kRelu ? "relu" : "none", c10::List<std::optional<at::Scalar>>(),
                   std::nullopt);
  }
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor out = at::empty({g.T, n}, a.options());
  const T *pa = ptr<T>(a), *pr = e == Epilogue::kAdd ? ptr<T>(res) : nullptr;
  T* po = out.mutable_data_ptr<T>();
  g.each([&](int64_t, int64_t r0, int64_t m) {
    block_linear<T>(pa + r0 * k, m, w, bias, e, pr ? pr + r0 * n : nullptr, po + r0 * n);
  });
  return out;
}

// out (co x ci) = a^T b, a (tokens x co), b (tokens x ci): a weight gradient, summed over all tokens. Tasks are
// fixed chunks of output rows, so no result depends on the thread count.
template <typename T>
void weight_grad(int64_t tokens, int64_t co, int64_t ci, const T* a, const T* b, T* out) {
  const int64_t chunks = std::max((co + kGradRows - 1) / kGradRows, std::min(kGradTasks, (co + 31) / 32));
  const int64_t per = (co + chunks - 1) / chunks;
  parallel_tasks(chunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * per, rows = std::min(per, co - r0);
      if (rows > 0) gemm<T>(true, false, rows, ci, tokens, 1.0, a + r0, co, b, ci, 0.0, out + r0 * ci, ci);
    }
  });
}

// ---- per-block statistics (a block: m tokens x ch channels, row-major) -------------------------------------------

// K per-channel sums over the rows of a block (row-major, ch channels) that vectorise: each row adds into K rows of
// T accumulators (row(k)), which add up in double every kSumStretch rows and at the end (fixed order; as
// kernel_common's sums_of). A double accumulator per element would leave the loops scalar (cvtss2sd per add).
constexpr int64_t kSumStretch = 64;

template <typename T, int K>
class ColumnSums {
 public:
  explicit ColumnSums(int64_t ch) : ch_(ch), t_(K * ch, T(0)), d_(K * ch, 0.0) {}
  T* row(int k) { return t_.data() + k * ch_; }
  void end_row() {
    if (++rows_ % kSumStretch == 0) flush();
  }
  // The totals of sum k (after the last row).
  const double* total(int k) {
    flush();
    return d_.data() + k * ch_;
  }

 private:
  void flush() {
    for (size_t i = 0; i < t_.size(); ++i) d_[i] += t_[i], t_[i] = T(0);
  }
  int64_t ch_, rows_ = 0;
  std::vector<T> t_;
  std::vector<double> d_;
};

// Per-channel mean and M2 (sum of squared deviations): two passes with per-channel accumulators, the first
// pass's rounded mean corrected by the sum of the deviations (as row_moments).
template <typename T>
void block_moments(const T* z, int64_t ch, int64_t m, double* mean, double* m2) {
  ColumnSums<T, 1> sum(ch);
  T* __restrict s = sum.row(0);
  for (int64_t i = 0; i < m; ++i, sum.end_row())
    for (int64_t c = 0; c < ch; ++c) s[c] += z[i * ch + c];
  const double* total = sum.total(0);
  std::vector<T> mt_v(ch);
  for (int64_t c = 0; c < ch; ++c) mt_v[c] = T(total[c] / m);
  ColumnSums<T, 2> dev_sq(ch);
  const T* __restrict mt = mt_v.data();
  T *__restrict dev = dev_sq.row(0), *__restrict sq = dev_sq.row(1);
  for (int64_t i = 0; i < m; ++i, dev_sq.end_row())
    for (int64_t c = 0; c < ch; ++c) {
      const T t = z[i * ch + c] - mt[c];
      dev[c] += t;
      sq[c] += t * t;
    }
  const double *d = dev_sq.total(0), *q = dev_sq.total(1);
  for (int64_t c = 0; c < ch; ++c) {
    mean[c] = corrected_mean(mt[c], d[c], m);
    m2[c] = q[c] - d[c] * d[c] / m;
  }
}

// Per-channel sums: s1[c] = sum g, and s2[c] = sum g * (z - mean[c]) when z is given (the BatchNorm backward's
// sums, before the invstd factor).
template <typename T>
void grad_sums(const T* g, const T* z, const T* mean_in, int64_t ch, int64_t m, double* s1, double* s2) {
  const T* __restrict mean = mean_in;
  ColumnSums<T, 2> sums(ch);
  T *__restrict t1 = sums.row(0), *__restrict t2 = sums.row(1);
  for (int64_t i = 0; i < m; ++i, sums.end_row()) {
    const T* gr = g + i * ch;
    for (int64_t c = 0; c < ch; ++c) t1[c] += gr[c];
    if (z) {
      const T* zr = z + i * ch;
      for (int64_t c = 0; c < ch; ++c) t2[c] += gr[c] * (zr[c] - mean[c]);
    }
  }
  std::copy_n(sums.total(0), ch, s1);
  if (z) std::copy_n(sums.total(1), ch, s2);
}

// Batch mean and biased variance per channel of z (tokens x ch), from per-block moments combined in block order.
template <typename T>
void batch_moments(const Blocks& g, const T* z, int64_t ch, T* mean, T* var) {
  std::vector<double> mu(g.n * ch), m2(g.n * ch);
  std::vector<int64_t> count(g.n);
  g.each([&](int64_t t, int64_t r0, int64_t m) {
    count[t] = m;
    block_moments(z + r0 * ch, ch, m, &mu[t * ch], &m2[t * ch]);
  });
  combine_moments(mu, m2, count, ch, mean, var);
}

// BatchNorm backward with its batch sums gb = sum g, gw = sum g * zhat (over count values per channel):
// gz = (g - (gb + zhat * gw) / count) * invstd * w, as per-channel coefficients.
template <typename T>
struct NormGrad {
  std::vector<T> mb, mw, k;

  NormGrad(const Affine<T>& bn, const std::vector<double>& gb, const std::vector<double>& gw, double count) {
    for (size_t c = 0; c < gb.size(); ++c) {
      mb.push_back(T(gb[c] / count));
      mw.push_back(T(gw[c] / count));
      k.push_back(bn.invstd[c] * bn.w[c]);
    }
  }

  // gz (m x ch block; may be g) from the block's g and z. (The per-channel vectors through restrict pointers: the
  // stores into gz cannot change them, so the loop vectorises.)
  void apply(const Affine<T>& bn, const T* z, const T* g, int64_t ch, int64_t m, T* gz) const {
    const T *__restrict mean = bn.mean.data(), *__restrict is = bn.invstd.data();
    const T *__restrict b = mb.data(), *__restrict w = mw.data(), *__restrict kk = k.data();
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < ch; ++c) {
        const int64_t j = i * ch + c;
        const T zhat = (z[j] - mean[c]) * is[c];
        gz[j] = (g[j] - (b[c] + zhat * w[c])) * kk[c];
      }
  }
};

// Sums of per-block partials ([block * ch + c]) in block order; with invstd, the BN weight gradient's
// sum g * zhat from the sums of g * (z - mean).
template <typename T>
std::vector<double> block_sums(const std::vector<double>& part, int64_t blocks, int64_t ch,
                               const std::vector<T>* invstd = nullptr) {
  std::vector<double> out = sum_samples(part, blocks, ch);
  if (invstd)
    for (int64_t c = 0; c < ch; ++c) out[c] *= (*invstd)[c];
  return out;
}

// ---- elementwise steps on a block of m tokens (row-major, ch channels) -----------------------------------------

// h = bn(z), then ReLU if relu.
template <typename T>
void bn_act(const Affine<T>& bn, const T* z, int64_t ch, int64_t m, T* h, bool relu = true) {
  const T *__restrict mean = bn.mean.data(), *__restrict is = bn.invstd.data();
  const T *__restrict w = bn.w.data(), *__restrict b = bn.b.data();
  for (int64_t i = 0; i < m; ++i) {
    const T* zr = z + i * ch;
    T* hr = h + i * ch;
    if (relu)
      for (int64_t c = 0; c < ch; ++c) hr[c] = std::max((zr[c] - mean[c]) * is[c] * w[c] + b[c], T(0));
    else
      for (int64_t c = 0; c < ch; ++c) hr[c] = (zr[c] - mean[c]) * is[c] * w[c] + b[c];
  }
}

// The ReLU's backward in place: a = h > 0 ? a : 0.
template <typename T>
void relu_mask(const T* h, int64_t n, T* a) {
  for (int64_t k = 0; k < n; ++k) a[k] = h[k] > T(0) ? a[k] : T(0);
}

// ---- arguments -------------------------------------------------------------------------------------------------

void check_float(const char* op, const at::Tensor& t, const char* name, const at::Tensor* like = nullptr) {
  TORCH_CHECK(t.defined(), "shvit ", op, " (CPU kernel): ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "shvit ", op, " (CPU kernel): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "shvit ", op, " (CPU kernel): ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(!like || t.scalar_type() == like->scalar_type(), "shvit ", op, ": ", name, " dtype ", t.scalar_type(),
              " does not match x dtype ", like->scalar_type());
}

// A (B, C, H, W) input x as a token-major (B*H*W, C) matrix (unless tokenize is false: then only `input`), with its
// layout (that of the results).
struct TokenProblem {
  const char* op;
  at::MemoryFormat fmt;
  int64_t B, C, H, W;
  at::Tensor input, x;

  TokenProblem(const char* op_name, const at::Tensor& x_in, bool train, bool tokenize = true)
      : op(op_name), input(x_in) {
    check_float(op, x_in, "x");
    TORCH_CHECK(x_in.dim() == 4, "shvit ", op, ": x must be 4-D (B, C, H, W), got shape ", x_in.sizes());
    TORCH_CHECK(x_in.size(1) > 0 && x_in.size(2) > 0 && x_in.size(3) > 0, "shvit ", op,
                ": x must have non-empty channel and spatial dims, got shape ", x_in.sizes());
    B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
    TORCH_CHECK(!train || B * H * W > 1, "shvit ", op,
                ": BatchNorm training needs more than 1 value per channel, got shape ", x_in.sizes());
    const bool cl = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
    fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    if (tokenize) x = tokens(x_in);
  }

  // A (B, ch, H, W) tensor as a token-major (B*H*W, ch) matrix (a view when it is channels_last).
  static at::Tensor tokens(const at::Tensor& t) {
    return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}).contiguous();
  }

  // A weight matrix of shape (rows, cols), contiguous, of x's dtype.
  at::Tensor matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) const {
    check_float(op, t, name, &input);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && rows > 0, "shvit ", op, ": ", name,
                " must have shape (", rows, ", ", cols, "), got ", t.sizes());
    return t.contiguous();
  }

  // A per-channel vector of length n as a contiguous tensor of x's dtype.
  at::Tensor vec(const at::Tensor& t, const char* name, int64_t n) const {
    check_float(op, t, name);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "shvit ", op, ": ", name, " must have shape (", n, ",), got ",
                t.sizes());
    return t.to(input.scalar_type()).contiguous();
  }

  // An activation input with ch channels, checked against x, as a token-major matrix.
  at::Tensor act(const at::Tensor& t, const char* name, int64_t ch) const {
    check_float(op, t, name, &input);
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == ch && t.size(2) == H && t.size(3) == W, "shvit ", op,
                ": ", name, " must have shape (", B, ", ", ch, ", ", H, ", ", W, "), got ", t.sizes());
    return tokens(t);
  }

  // A token-major matrix as a (B, ch, H, W) channels_last tensor (a view), or as one in x's layout.
  at::Tensor channels_last(const at::Tensor& t) const { return t.view({B, H, W, t.size(1)}).permute({0, 3, 1, 2}); }
  at::Tensor result(const at::Tensor& t) const { return channels_last(t).contiguous(fmt); }
  at::Tensor empty_result(int64_t ch) const {
    return at::empty({B, ch, H, W}, input.options().memory_format(fmt));
  }

  // f(T()) for x's dtype.
  template <typename F>
  void run(const F& f) const {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "shvit_token_gemm_cpu", [&] { f(scalar_t()); });
  }
};

template <typename T>
T* out(const at::Tensor& t) {
  return t.mutable_data_ptr<T>();
}

}  // namespace
}  // namespace shvit::cpu
