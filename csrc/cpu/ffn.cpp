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
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "token_gemm.h"

namespace shvit::cpu {
namespace {

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
  g.each([&](int64_t, int64_t r0, int64_t m) { bn_act(bn1, pz1 + r0 * Hd, Hd, m, ph + r0 * Hd); });
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
    bn_act(bn1, pz1 + r0 * Hd, Hd, m, ph + r0 * Hd);
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

// ---- entry points ------------------------------------------------------------------------------------------

// The problem: x's layout and sizes, with the weights checked against them.
struct Problem : TokenProblem {
  int64_t Hd;
  at::Tensor w1, w2;  // contiguous

  Problem(const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& w2_in, bool train)
      : TokenProblem("ffn", x_in, train) {
    check_float(op, w1_in, "w1", &x_in);
    TORCH_CHECK(w1_in.dim() == 2, "shvit ffn: w1 must have shape (h, ", C, "), got ", w1_in.sizes());
    Hd = w1_in.size(0);
    w1 = matrix(w1_in, "w1", Hd, C);
    w2 = matrix(w2_in, "w2", C, Hd);
  }

  Blocks blocks() const { return Blocks(B * H * W, Hd); }
};

at::Tensor ffn_fwd_cpu(const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& b1_in,
                       const at::Tensor& w2_in, const at::Tensor& b2_in) {
  const Problem p(x_in, w1_in, w2_in, false);
  const at::Tensor b1 = p.vec(b1_in, "b1", p.Hd), b2 = p.vec(b2_in, "b2", p.C);
  if (p.B == 0) return p.empty_result(p.C);
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
    return {p.empty_result(p.C), gw1, gb1.to(b1_in.scalar_type()), gw2,
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
