// Fused residual FFN of SHViT on the CPU, float32 / float64: y = x + BN2(W2 ReLU(BN1(W1 x))), the 1x1 convs as
// GEMMs over tokens. Spec, argument lists and outputs: shvit_kernels/reference/ffn.py (fwd, bwd, train_fwd,
// train_bwd).
//
// Layout: the kernels work token-major, an activation with ch channels being one row-major (B*N, ch) matrix: the
// channels_last layout, in which a GEMM over the whole batch is one oneDNN call. channels_last tensors are used as
// they are; NCHW ones are transposed on the way in and the results on the way out (0.3-0.8 ms each at
// 16x224x16x16, against ~8 ms of GEMMs per direction). z1 and z2, kept for the training backward, stay
// channels_last whatever x's layout (reference/ffn.py), which spares an NCHW x four of those transposes.
//
// GEMMs over tokens: fp32 runs each as one call of ATen's oneDNN linear (what stock's mkldnn 1x1 convolution and
// inductor use), bias, ReLU or the residual add fused as its post-ops; one whole-tensor call beats blocks of tokens
// (e.g. 9.8 vs 8.3 ms in 256-token blocks) and MKL's addmm (~140 GFLOP/s on these tall-skinny shapes). float64
// (oneDNN has none; gradcheck's dtype) and torches without oneDNN run MKL in fixed blocks of tokens instead, the
// epilogue applied per block. Either way the activations between GEMMs (the hidden included) are full tensors;
// the elementwise work around them runs in fixed blocks of tokens, fused into as few passes as the batch
// statistics allow.
//
// Eval forward: h = ReLU(W1 x + b1), y = W2 h + b2 + x (two GEMMs). Eval backward: h again, gh = W2^T gy, ReLU
// mask and the bias-gradient sums in one pass, gx = W1^T gh + gy; then the weight gradients.
// Training forward: z1 = W1 x; its moments; h = ReLU(BN1(z1)); z2 = W2 h; its moments; y = BN2(z2) + x. z1 and z2
// are outputs, kept for the backward (h is not: it is recomputed from z1 elementwise). Backward: (1) BN2's
// gradient sums and h, (2) gz2 = BN2'(gy), gh = W2^T gz2, ReLU mask and BN1's gradient sums, (3) gz1 = BN1'(gh),
// gx = W1^T gz1 + gy; then the weight gradients.
//
// Determinism: token blocks and weight-gradient row chunks are fixed by the shapes, MKL runs single-threaded in
// every task, and per-block partial sums are combined in block order. oneDNN's linear splits no reduction across
// threads on these shapes (measured: bitwise equal for 1 to 8 threads, tokens 1 to 8192, channels 6 to 896;
// tests/reliability/test_determinism.py checks 1 vs 2). So results are bitwise identical for any thread count.
// The weight gradients reduce over all tokens: they stay on MKL in fixed row chunks.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "kernel_common.h"

namespace shvit::cpu {
namespace {

constexpr int64_t kBlockElems = 1 << 16;  // a block's widest activation (h x tokens): 256 KB in fp32, stays in L2
constexpr int64_t kBlockAlign = 16;       // tokens per block are a multiple of this (whole SIMD rows)
constexpr int64_t kGradTasks = 8;         // weight gradients: at least this many row chunks (fixed by shapes)

// T tokens cut into n blocks of at most bm tokens each, sized for the widest activation (`hidden` channels).
struct Blocks {
  int64_t T, bm, n;

  Blocks(int64_t tokens, int64_t hidden) : T(tokens) {
    const int64_t target = std::max(kBlockAlign, kBlockElems / hidden);
    const int64_t k = (T + target - 1) / target, even = (T + k - 1) / k;  // k blocks of about equal size
    bm = std::min(T, (even + kBlockAlign - 1) / kBlockAlign * kBlockAlign);
    n = (T + bm - 1) / bm;
  }

  int64_t i0(int64_t t) const { return t * bm; }
  int64_t width(int64_t t) const { return std::min(bm, T - i0(t)); }

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
  const T *pa = ptr<T>(a), *pw = ptr<T>(w), *pb = bias.defined() ? ptr<T>(bias) : nullptr;
  const T* pr = e == Epilogue::kAdd ? ptr<T>(res) : nullptr;
  T* po = out.mutable_data_ptr<T>();
  g.each([&](int64_t, int64_t r0, int64_t m) {
    T* o = po + r0 * n;
    gemm<T>(false, true, m, n, k, 1.0, pa + r0 * k, k, pw, k, 0.0, o, n);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < n; ++c) {
        T& v = o[i * n + c];
        if (pb) v += pb[c];
        if (e == Epilogue::kRelu) v = std::max(v, T(0));  // (max keeps a NaN)
        if (pr) v += pr[(r0 + i) * n + c];
      }
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

// Per-channel mean and M2 (sum of squared deviations): two passes with per-channel accumulators, the first
// pass's rounded mean corrected by the sum of the deviations (as row_moments).
template <typename T>
void block_moments(const T* z, int64_t ch, int64_t m, double* mean, double* m2) {
  std::vector<double> sum(ch, 0.0), dev(ch, 0.0), sq(ch, 0.0);
  std::vector<T> mt(ch);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < ch; ++c) sum[c] += z[i * ch + c];
  for (int64_t c = 0; c < ch; ++c) mt[c] = T(sum[c] / m);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < ch; ++c) {
      const T t = z[i * ch + c] - mt[c];
      dev[c] += t;
      sq[c] += t * t;
    }
  for (int64_t c = 0; c < ch; ++c) {
    mean[c] = corrected_mean(mt[c], dev[c], m);
    m2[c] = sq[c] - dev[c] * dev[c] / m;
  }
}

// Per-channel sums: s1[c] = sum g, and s2[c] = sum g * (z - mean[c]) when z is given (the BatchNorm backward's
// sums, before the invstd factor).
template <typename T>
void grad_sums(const T* g, const T* z, const T* mean, int64_t ch, int64_t m, double* s1, double* s2) {
  std::fill(s1, s1 + ch, 0.0);
  if (z) std::fill(s2, s2 + ch, 0.0);
  for (int64_t i = 0; i < m; ++i) {
    const T* gr = g + i * ch;
    for (int64_t c = 0; c < ch; ++c) s1[c] += gr[c];
    if (z) {
      const T* zr = z + i * ch;
      for (int64_t c = 0; c < ch; ++c) s2[c] += gr[c] * (zr[c] - mean[c]);
    }
  }
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

  // gz (m x ch block; may be g) from the block's g and z.
  void apply(const Affine<T>& bn, const T* z, const T* g, int64_t ch, int64_t m, T* gz) const {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < ch; ++c) {
        const int64_t j = i * ch + c;
        const T zhat = (z[j] - bn.mean[c]) * bn.invstd[c];
        gz[j] = (g[j] - (mb[c] + zhat * mw[c])) * k[c];
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

// h = ReLU(bn(z)).
template <typename T>
void bn_relu(const Affine<T>& bn, const T* z, int64_t ch, int64_t m, T* h) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < ch; ++c)
      h[i * ch + c] = std::max((z[i * ch + c] - bn.mean[c]) * bn.invstd[c] * bn.w[c] + bn.b[c], T(0));
}

// The ReLU's backward in place: a = h > 0 ? a : 0.
template <typename T>
void relu_mask(const T* h, int64_t n, T* a) {
  for (int64_t k = 0; k < n; ++k) a[k] = h[k] > T(0) ? a[k] : T(0);
}

// ---- kernels (activations: token-major, tokens x channels) -------------------------------------------------------

template <typename T>
at::Tensor eval_forward(const Blocks& g, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2) {
  const at::Tensor h = linear<T>(g, x, w1, b1, Epilogue::kRelu);
  return linear<T>(g, h, w2, b2, Epilogue::kAdd, x);
}

// Returns gx; writes the parameter gradients.
template <typename T>
at::Tensor eval_backward(const Blocks& g, int64_t C, int64_t Hd, const at::Tensor& gy, const at::Tensor& x,
                         const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, T* gw1, T* gb1, T* gw2,
                         T* gb2) {
  const at::Tensor h = linear<T>(g, x, w1, b1, Epilogue::kRelu);
  const at::Tensor ga = linear<T>(g, gy, w2.t().contiguous(), {}, Epilogue::kNone);  // gh; masked below
  const T *ph = ptr<T>(h), *pgy = ptr<T>(gy);
  T* pa = ga.mutable_data_ptr<T>();
  std::vector<double> s1(g.n * Hd), s2(g.n * C);
  g.each([&](int64_t t, int64_t r0, int64_t m) {
    T* a = pa + r0 * Hd;
    relu_mask(ph + r0 * Hd, m * Hd, a);
    grad_sums<T>(a, nullptr, nullptr, Hd, m, &s1[t * Hd], nullptr);
    grad_sums<T>(pgy + r0 * C, nullptr, nullptr, C, m, &s2[t * C], nullptr);
  });
  const std::vector<double> sb1 = block_sums<T>(s1, g.n, Hd), sb2 = block_sums<T>(s2, g.n, C);
  std::copy(sb1.begin(), sb1.end(), gb1);
  std::copy(sb2.begin(), sb2.end(), gb2);
  weight_grad<T>(g.T, C, Hd, pgy, ph, gw2);
  weight_grad<T>(g.T, Hd, C, pa, ptr<T>(x), gw1);
  return linear<T>(g, ga, w1.t().contiguous(), {}, Epilogue::kAdd, gy);
}

// Returns y, z1, z2; writes the batch statistics.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_forward(const Blocks& g, int64_t C, int64_t Hd,
                                                             const at::Tensor& x, const at::Tensor& w1,
                                                             const T* bn1_w, const T* bn1_b, double eps1,
                                                             const at::Tensor& w2, const T* bn2_w, const T* bn2_b,
                                                             double eps2, T* mean1, T* var1, T* mean2, T* var2) {
  const at::Tensor z1 = linear<T>(g, x, w1, {}, Epilogue::kNone);
  batch_moments(g, ptr<T>(z1), Hd, mean1, var1);
  const Affine<T> bn1 = Affine<T>::batch_norm(mean1, var1, bn1_w, bn1_b, eps1, Hd);
  const at::Tensor h = at::empty_like(z1);
  const T* pz1 = ptr<T>(z1);
  T* ph = h.mutable_data_ptr<T>();
  g.each([&](int64_t, int64_t r0, int64_t m) { bn_relu(bn1, pz1 + r0 * Hd, Hd, m, ph + r0 * Hd); });
  const at::Tensor z2 = linear<T>(g, h, w2, {}, Epilogue::kNone);
  const T *pz2 = ptr<T>(z2), *px = ptr<T>(x);
  batch_moments(g, pz2, C, mean2, var2);
  const Affine<T> bn2 = Affine<T>::batch_norm(mean2, var2, bn2_w, bn2_b, eps2, C);
  at::Tensor y = at::empty_like(z2);
  T* py = y.mutable_data_ptr<T>();
  g.each([&](int64_t, int64_t r0, int64_t m) {
    for (int64_t i = r0; i < r0 + m; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = i * C + c;
        py[k] = ((pz2[k] - bn2.mean[c]) * bn2.invstd[c] * bn2.w[c] + bn2.b[c]) + px[k];
      }
  });
  return {y, z1, z2};
}

// Returns gx; writes the parameter gradients.
template <typename T>
at::Tensor train_backward(const Blocks& g, int64_t C, int64_t Hd, const at::Tensor& gy, const at::Tensor& x,
                          const at::Tensor& w1, const Affine<T>& bn1, const at::Tensor& w2, const Affine<T>& bn2,
                          const at::Tensor& z1, const at::Tensor& z2, T* gw1, T* g1w, T* g1b, T* gw2, T* g2w,
                          T* g2b) {
  const double count = static_cast<double>(g.T);
  const T *pgy = ptr<T>(gy), *pz1 = ptr<T>(z1), *pz2 = ptr<T>(z2);
  const at::Tensor h = at::empty_like(z1), gz2 = at::empty_like(z2);
  T *ph = h.mutable_data_ptr<T>(), *pgz2 = gz2.mutable_data_ptr<T>();
  // (1) BN2's gradient sums, and h = ReLU(BN1(z1)).
  std::vector<double> s1(g.n * C), s2(g.n * C);
  g.each([&](int64_t t, int64_t r0, int64_t m) {
    grad_sums<T>(pgy + r0 * C, pz2 + r0 * C, bn2.mean.data(), C, m, &s1[t * C], &s2[t * C]);
    bn_relu(bn1, pz1 + r0 * Hd, Hd, m, ph + r0 * Hd);
  });
  const std::vector<double> sb2 = block_sums<T>(s1, g.n, C), sw2 = block_sums<T>(s2, g.n, C, &bn2.invstd);
  const NormGrad<T> n2(bn2, sb2, sw2, count);
  // (2) gz2 = BN2'(gy), gh = W2^T gz2 through the ReLU, and BN1's gradient sums.
  g.each([&](int64_t, int64_t r0, int64_t m) {
    n2.apply(bn2, pz2 + r0 * C, pgy + r0 * C, C, m, pgz2 + r0 * C);
  });
  const at::Tensor ga = linear<T>(g, gz2, w2.t().contiguous(), {}, Epilogue::kNone);  // gh, then gz1 in place
  T* pa = ga.mutable_data_ptr<T>();
  s1.assign(g.n * Hd, 0.0);
  s2.assign(g.n * Hd, 0.0);
  g.each([&](int64_t t, int64_t r0, int64_t m) {
    T* a = pa + r0 * Hd;
    relu_mask(ph + r0 * Hd, m * Hd, a);
    grad_sums<T>(a, pz1 + r0 * Hd, bn1.mean.data(), Hd, m, &s1[t * Hd], &s2[t * Hd]);
  });
  const std::vector<double> sb1 = block_sums<T>(s1, g.n, Hd), sw1 = block_sums<T>(s2, g.n, Hd, &bn1.invstd);
  const NormGrad<T> n1(bn1, sb1, sw1, count);
  // (3) gz1 = BN1'(gh) in place, gx = W1^T gz1 + gy.
  g.each([&](int64_t, int64_t r0, int64_t m) {
    n1.apply(bn1, pz1 + r0 * Hd, pa + r0 * Hd, Hd, m, pa + r0 * Hd);
  });
  weight_grad<T>(g.T, C, Hd, pgz2, ph, gw2);
  weight_grad<T>(g.T, Hd, C, pa, ptr<T>(x), gw1);
  for (int64_t c = 0; c < Hd; ++c) g1b[c] = T(sb1[c]), g1w[c] = T(sw1[c]);
  for (int64_t c = 0; c < C; ++c) g2b[c] = T(sb2[c]), g2w[c] = T(sw2[c]);
  return linear<T>(g, ga, w1.t().contiguous(), {}, Epilogue::kAdd, gy);
}

// ---- argument checks and entry points ----------------------------------------------------------------------

void check_float(const at::Tensor& t, const char* name, const at::Tensor* like = nullptr) {
  TORCH_CHECK(t.defined(), "shvit ffn (CPU kernel): ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "shvit ffn (CPU kernel): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "shvit ffn (CPU kernel): ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(!like || t.scalar_type() == like->scalar_type(), "shvit ffn: ", name, " dtype ", t.scalar_type(),
              " does not match x dtype ", like->scalar_type());
}

// The problem: x's layout and sizes, with the weights checked against them.
struct Problem {
  at::MemoryFormat fmt;  // x's layout: that of the results
  int64_t B, C, Hd, H, W;
  at::Tensor x, w1, w2;  // x token-major (B*H*W, C); weights contiguous

  Problem(const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& w2_in, bool train) {
    check_float(x_in, "x");
    TORCH_CHECK(x_in.dim() == 4, "shvit ffn: x must be 4-D (B, C, H, W), got shape ", x_in.sizes());
    TORCH_CHECK(x_in.size(1) > 0 && x_in.size(2) > 0 && x_in.size(3) > 0,
                "shvit ffn: x must have non-empty channel and spatial dims, got shape ", x_in.sizes());
    B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
    check_float(w1_in, "w1", &x_in);
    check_float(w2_in, "w2", &x_in);
    TORCH_CHECK(w1_in.dim() == 2 && w1_in.size(1) == C && w1_in.size(0) > 0, "shvit ffn: w1 must have shape (h, ", C,
                "), got ", w1_in.sizes());
    Hd = w1_in.size(0);
    TORCH_CHECK(w2_in.dim() == 2 && w2_in.size(0) == C && w2_in.size(1) == Hd, "shvit ffn: w2 must have shape (", C,
                ", ", Hd, "), got ", w2_in.sizes());
    TORCH_CHECK(!train || B * H * W > 1,
                "shvit ffn: BatchNorm training needs more than 1 value per channel, got shape ", x_in.sizes());
    const bool cl = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
    fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    x = tokens(x_in), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  }

  Blocks blocks() const { return Blocks(B * H * W, Hd); }

  // A (B, ch, H, W) tensor as a token-major (B*H*W, ch) matrix (a view when it is channels_last).
  static at::Tensor tokens(const at::Tensor& t) {
    return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}).contiguous();
  }

  // A per-channel vector of length n as a contiguous tensor of x's dtype.
  at::Tensor vec(const at::Tensor& t, const char* name, int64_t n) const {
    check_float(t, name);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "shvit ffn: ", name, " must have shape (", n, ",), got ", t.sizes());
    return t.to(x.scalar_type()).contiguous();
  }

  // An activation input with ch channels, checked against x, as a token-major matrix.
  at::Tensor act(const at::Tensor& t, const char* name, int64_t ch) const {
    check_float(t, name, &x);
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == ch && t.size(2) == H && t.size(3) == W,
                "shvit ffn: ", name, " must have shape (", B, ", ", ch, ", ", H, ", ", W, "), got ", t.sizes());
    return tokens(t);
  }

  // A token-major matrix as a (B, ch, H, W) channels_last tensor (a view), or as one in x's layout.
  at::Tensor channels_last(const at::Tensor& t) const { return t.view({B, H, W, t.size(1)}).permute({0, 3, 1, 2}); }
  at::Tensor result(const at::Tensor& t) const { return channels_last(t).contiguous(fmt); }

  // f(T()) for x's dtype.
  template <typename F>
  void run(const F& f) const {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shvit_ffn_cpu", [&] { f(scalar_t()); });
  }
};

template <typename T>
T* out(const at::Tensor& t) {
  return t.mutable_data_ptr<T>();
}

at::Tensor ffn_fwd_cpu(const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& b1_in,
                       const at::Tensor& w2_in, const at::Tensor& b2_in) {
  const Problem p(x_in, w1_in, w2_in, false);
  const at::Tensor b1 = p.vec(b1_in, "b1", p.Hd), b2 = p.vec(b2_in, "b2", p.C);
  if (p.B == 0) return at::empty(x_in.sizes(), p.x.options().memory_format(p.fmt));
  at::Tensor y;
  p.run([&](auto t) { y = eval_forward<decltype(t)>(p.blocks(), p.x, p.w1, b1, p.w2, b2); });
  return p.result(y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& b1_in,
    const at::Tensor& w2_in, const at::Tensor& b2_in) {
  const Problem p(x_in, w1_in, w2_in, false);
  const at::Tensor b1 = p.vec(b1_in, "b1", p.Hd), b2 = p.vec(b2_in, "b2", p.C), gy = p.act(gy_in, "gy", p.C);
  const auto opt = p.x.options();
  at::Tensor gw1 = at::zeros({p.Hd, p.C}, opt), gb1 = at::zeros({p.Hd}, opt);
  at::Tensor gw2 = at::zeros({p.C, p.Hd}, opt), gb2 = at::zeros({p.C}, opt);
  if (p.B == 0)
    return {at::empty(x_in.sizes(), p.x.options().memory_format(p.fmt)), gw1, gb1.to(b1_in.scalar_type()), gw2,
            gb2.to(b2_in.scalar_type())};
  at::Tensor gx;
  p.run([&](auto t) {
    using T = decltype(t);
    gx = eval_backward<T>(p.blocks(), p.C, p.Hd, gy, p.x, p.w1, b1, p.w2, out<T>(gw1), out<T>(gb1), out<T>(gw2),
                          out<T>(gb2));
  });
  return {p.result(gx), gw1, gb1.to(b1_in.scalar_type()), gw2, gb2.to(b2_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_train_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& bn1_w_in, const at::Tensor& bn1_b_in,
    double eps1, const at::Tensor& w2_in, const at::Tensor& bn2_w_in, const at::Tensor& bn2_b_in, double eps2) {
  const Problem p(x_in, w1_in, w2_in, true);
  const at::Tensor bn1_w = p.vec(bn1_w_in, "bn1_w", p.Hd), bn1_b = p.vec(bn1_b_in, "bn1_b", p.Hd);
  const at::Tensor bn2_w = p.vec(bn2_w_in, "bn2_w", p.C), bn2_b = p.vec(bn2_b_in, "bn2_b", p.C);
  TORCH_CHECK(eps1 >= 0 && eps2 >= 0, "shvit ffn: eps1 and eps2 must be non-negative, got ", eps1, ", ", eps2);
  const auto opt = p.x.options();
  at::Tensor mean1 = at::empty({p.Hd}, opt), var1 = at::empty({p.Hd}, opt);
  at::Tensor mean2 = at::empty({p.C}, opt), var2 = at::empty({p.C}, opt);
  at::Tensor y, z1, z2;
  p.run([&](auto t) {
    using T = decltype(t);
    std::tie(y, z1, z2) = train_forward<T>(p.blocks(), p.C, p.Hd, p.x, p.w1, ptr<T>(bn1_w), ptr<T>(bn1_b), eps1,
                                           p.w2, ptr<T>(bn2_w), ptr<T>(bn2_b), eps2, out<T>(mean1), out<T>(var1),
                                           out<T>(mean2), out<T>(var2));
  });
  return {p.result(y), mean1, var1, mean2, var2, p.channels_last(z1), p.channels_last(z2)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_train_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& bn1_w_in,
    const at::Tensor& bn1_b_in, double eps1, const at::Tensor& w2_in, const at::Tensor& bn2_w_in,
    const at::Tensor& bn2_b_in, double eps2, const at::Tensor& mean1_in, const at::Tensor& var1_in,
    const at::Tensor& mean2_in, const at::Tensor& var2_in, const at::Tensor& z1_in, const at::Tensor& z2_in) {
  const Problem p(x_in, w1_in, w2_in, true);
  const at::Tensor bn1_w = p.vec(bn1_w_in, "bn1_w", p.Hd), bn1_b = p.vec(bn1_b_in, "bn1_b", p.Hd);
  const at::Tensor bn2_w = p.vec(bn2_w_in, "bn2_w", p.C), bn2_b = p.vec(bn2_b_in, "bn2_b", p.C);
  const at::Tensor mean1 = p.vec(mean1_in, "mean1", p.Hd), var1 = p.vec(var1_in, "var1", p.Hd);
  const at::Tensor mean2 = p.vec(mean2_in, "mean2", p.C), var2 = p.vec(var2_in, "var2", p.C);
  const at::Tensor gy = p.act(gy_in, "gy", p.C), z1 = p.act(z1_in, "z1", p.Hd), z2 = p.act(z2_in, "z2", p.C);
  TORCH_CHECK(eps1 >= 0 && eps2 >= 0, "shvit ffn: eps1 and eps2 must be non-negative, got ", eps1, ", ", eps2);
  const auto opt = p.x.options();
  at::Tensor gw1 = at::empty({p.Hd, p.C}, opt), gw2 = at::empty({p.C, p.Hd}, opt);
  at::Tensor g1w = at::empty({p.Hd}, opt), g1b = at::empty({p.Hd}, opt);
  at::Tensor g2w = at::empty({p.C}, opt), g2b = at::empty({p.C}, opt);
  at::Tensor gx;
  p.run([&](auto t) {
    using T = decltype(t);
    const auto bn1 = Affine<T>::batch_norm(ptr<T>(mean1), ptr<T>(var1), ptr<T>(bn1_w), ptr<T>(bn1_b), eps1, p.Hd);
    const auto bn2 = Affine<T>::batch_norm(ptr<T>(mean2), ptr<T>(var2), ptr<T>(bn2_w), ptr<T>(bn2_b), eps2, p.C);
    gx = train_backward<T>(p.blocks(), p.C, p.Hd, gy, p.x, p.w1, bn1, p.w2, bn2, z1, z2, out<T>(gw1), out<T>(g1w),
                           out<T>(g1b), out<T>(gw2), out<T>(g2w), out<T>(g2b));
  });
  return {p.result(gx), gw1, g1w.to(bn1_w_in.scalar_type()), g1b.to(bn1_b_in.scalar_type()), gw2,
          g2w.to(bn2_w_in.scalar_type()), g2b.to(bn2_b_in.scalar_type())};
}

}  // namespace
}  // namespace shvit::cpu

TORCH_LIBRARY_FRAGMENT(shvit, m) {
  m.def("ffn_fwd_cpu(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  m.def(
      "ffn_bwd_cpu(Tensor gy, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> (Tensor gx, Tensor gw1, "
      "Tensor gb1, Tensor gw2, Tensor gb2)");
  m.def(
      "ffn_train_fwd_cpu(Tensor x, Tensor w1, Tensor bn1_w, Tensor bn1_b, float eps1, Tensor w2, Tensor bn2_w, "
      "Tensor bn2_b, float eps2) -> (Tensor y, Tensor mean1, Tensor var1, Tensor mean2, Tensor var2, Tensor z1, "
      "Tensor z2)");
  m.def(
      "ffn_train_bwd_cpu(Tensor gy, Tensor x, Tensor w1, Tensor bn1_w, Tensor bn1_b, float eps1, Tensor w2, "
      "Tensor bn2_w, Tensor bn2_b, float eps2, Tensor mean1, Tensor var1, Tensor mean2, Tensor var2, Tensor z1, "
      "Tensor z2) -> (Tensor gx, Tensor gw1, Tensor g_bn1_w, Tensor g_bn1_b, Tensor gw2, Tensor g_bn2_w, "
      "Tensor g_bn2_b)");
}

TORCH_LIBRARY_IMPL(shvit, CPU, m) {
  m.impl("ffn_fwd_cpu", &shvit::cpu::ffn_fwd_cpu);
  m.impl("ffn_bwd_cpu", &shvit::cpu::ffn_bwd_cpu);
  m.impl("ffn_train_fwd_cpu", &shvit::cpu::ffn_train_fwd_cpu);
  m.impl("ffn_train_bwd_cpu", &shvit::cpu::ffn_train_bwd_cpu);
}
