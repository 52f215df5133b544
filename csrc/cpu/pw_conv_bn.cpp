// 1x1 Conv2d_BN (+ReLU) on the CPU, float32 / float64, with an optional per-sample gate on the input channels:
// PatchMerging's pointwise convs, conv3's gate being the SqueezeExcite of the activation it reads. Spec, argument
// lists and outputs: shvit_kernels/reference/pw_conv_bn.py (fwd, bwd, train_fwd, train_bwd); the GEMM and BN
// machinery (token-major layout, blocks, determinism) is token_gemm.h's, shared with the FFN.
//
// The GEMMs are whole-tensor oneDNN calls (token_gemm.h's linear): measured faster here than MKL on blocks of
// gated tokens kept in cache (e.g. 4.9 vs 4.1 ms for 16x896x8x8 -> 336, channels_last, against a separate mul
// and oneDNN conv; ad-hoc timing), so on the CPU the gate is applied in the one pass that writes the GEMM's
// token-major input: for an NCHW x that is the transpose the GEMM needs anyway (the gate is free), for a
// channels_last x it is the pass stock's `x * gate` makes. (The Triton kernels apply it in the operand loads.)
//   eval forward: y = act(W (gate * x) + b)                   1 GEMM, bias and ReLU in its epilogue
//   training forward: z = W (gate * x); batch moments; y = act(bn(z))     z is kept for the backward
//   backward: a = grad_y through the ReLU (mask from y in eval, from bn(z) in training) with its sums (bias or
//     BN gradient), gz = bn'(a); gv = W^T gz; one pass gives grad_x = gate * gv, the gate's gradient
//     sum_tokens gv * x per block (combined in block order) and, for the weight gradient, gate * x.
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "token_gemm.h"

namespace shvit::cpu {
namespace {

// x * gate (per sample and channel) as a token-major (B*H*W, C) matrix, in one pass from x in either layout. For
// an NCHW x that pass is the transpose into token-major order that the GEMM needs anyway, so the gate costs nothing.
at::Tensor gated_tokens(const at::Tensor& x, const at::Tensor& gate) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::mul_out(out, x, gate.view({x.size(0), x.size(1), 1, 1}));
  return TokenProblem::tokens(out);  // a view
}

// From gz (tokens x O, the gradient of the conv's output): grad_x, and the weight and gate gradients (written).
template <typename T>
at::Tensor input_grads(const Blocks& g, const at::Tensor& gz, const at::Tensor& x, const at::Tensor& gate,
                       const at::Tensor& w, T* gw, T* ggate) {
  const int64_t O = w.size(0), K = w.size(1);
  at::Tensor gx = linear<T>(g, gz, w.t().contiguous(), {}, Epilogue::kNone);  // gv, gated in place below
  if (!gate.defined()) {
    weight_grad<T>(g.T, O, K, ptr<T>(gz), ptr<T>(x), gw);
    return gx;
  }
  const at::Tensor xg = at::empty_like(x);
  const T *px = ptr<T>(x), *pg = ptr<T>(gate);
  T *pv = gx.mutable_data_ptr<T>(), *pxg = xg.mutable_data_ptr<T>();
  std::vector<double> part(g.n * K, 0.0);
  g.each([&](int64_t t, int64_t r0, int64_t m) {
    const T* __restrict gs = pg + g.sample(t) * K;
    ColumnSums<T, 1> sums(K);
    T* __restrict acc = sums.row(0);
    const T* __restrict xb = px + r0 * K;
    T *__restrict vb = pv + r0 * K, *__restrict xgb = pxg + r0 * K;
    for (int64_t i = 0; i < m; ++i, sums.end_row())
      for (int64_t c = 0; c < K; ++c) {
        const int64_t j = i * K + c;
        acc[c] += vb[j] * xb[j];
        xgb[j] = xb[j] * gs[c];
        vb[j] *= gs[c];
      }
    std::copy_n(sums.total(0), K, &part[t * K]);
  });
  for (int64_t s = 0; s < g.T / g.N; ++s)  // each sample's blocks, in order
    for (int64_t c = 0; c < K; ++c) {
      double v = 0;
      for (int64_t t = s * g.per; t < (s + 1) * g.per; ++t) v += part[t * K + c];
      ggate[s * K + c] = T(v);
    }
  weight_grad<T>(g.T, O, K, ptr<T>(gz), pxg, gw);
  return gx;
}

// One block of masked_grad: a = gy through the ReLU (kMask 0: none, 1: post > 0, 2: bn(z) > 0), s1 = sum a and,
// with kStats, s2 = sum a * (z - mean) per channel. One branch-free pass that vectorises (every pointer restrict, a
// is a new tensor; ColumnSums), so the mask is a select, not a branch that mispredicts on real gradients.
template <typename T, int kMask, bool kStats>
void masked_block(const T* __restrict gy, const T* __restrict post, const T* __restrict z, const Affine<T>* bn,
                  int64_t O, int64_t m, T* __restrict a, double* s1, double* s2) {
  const T *__restrict mean = bn ? bn->mean.data() : nullptr, *__restrict is = bn ? bn->invstd.data() : nullptr;
  const T *__restrict w = bn ? bn->w.data() : nullptr, *__restrict b = bn ? bn->b.data() : nullptr;
  ColumnSums<T, 2> sums(O);
  T *__restrict t1 = sums.row(0), *__restrict t2 = sums.row(1);
  for (int64_t i = 0; i < m; ++i, sums.end_row()) {
    const int64_t r = i * O;
    for (int64_t c = 0; c < O; ++c) {
      T v = gy[r + c];
      if constexpr (kMask == 1) v = post[r + c] > T(0) ? v : T(0);
      if constexpr (kMask == 2) v = (z[r + c] - mean[c]) * is[c] * w[c] + b[c] > T(0) ? v : T(0);
      if constexpr (kMask != 0) a[r + c] = v;
      t1[c] += v;
      if constexpr (kStats) t2[c] += v * (z[r + c] - mean[c]);
    }
  }
  std::copy_n(sums.total(0), O, s1);
  if constexpr (kStats) std::copy_n(sums.total(1), O, s2);
}

// a = grad_y through the ReLU, if any: its mask is post > 0 (eval: post is the ReLU's output) or bn(z) > 0
// (training); with per-block sums of a and, given bn, of a * (z - mean). Returns a (grad_y itself without ReLU).
template <typename T>
at::Tensor masked_grad(const Blocks& g, int64_t O, const at::Tensor& gy, bool relu, const T* post, const T* z,
                       const Affine<T>* bn, std::vector<double>& s1, std::vector<double>& s2) {
  at::Tensor a = relu ? at::empty_like(gy) : gy;
  const T* pgy = ptr<T>(gy);
  T* pa = relu ? a.mutable_data_ptr<T>() : nullptr;
  s1.assign(g.n * O, 0.0);
  s2.assign(g.n * O, 0.0);
  g.each([&](int64_t t, int64_t r0, int64_t m) {
    const int64_t off = r0 * O;
    const T *gb = pgy + off, *pb = post ? post + off : nullptr, *zb = bn ? z + off : nullptr;
    T* ab = pa ? pa + off : nullptr;
    double *u1 = &s1[t * O], *u2 = &s2[t * O];
    if (!relu && !bn)
      masked_block<T, 0, false>(gb, pb, zb, bn, O, m, ab, u1, u2);
    else if (!relu)
      masked_block<T, 0, true>(gb, pb, zb, bn, O, m, ab, u1, u2);
    else if (post)
      masked_block<T, 1, false>(gb, pb, zb, bn, O, m, ab, u1, u2);
    else
      masked_block<T, 2, true>(gb, pb, zb, bn, O, m, ab, u1, u2);
  });
  return a;
}

// ---- entry points ------------------------------------------------------------------------------------------

struct Problem : TokenProblem {
  int64_t O;
  at::Tensor w, gate;  // gate: (B, C) contiguous, or undefined

  // tokenize: x as a token-major matrix too (the backward's; a gated forward reads x * gate instead).
  Problem(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& gate_in, bool train,
          bool tokenize = true)
      : TokenProblem("pw_conv_bn", x_in, train, tokenize) {
    check_float(op, w_in, "w", &x_in);
    TORCH_CHECK(w_in.dim() == 2, "shvit pw_conv_bn: w must have shape (O, ", C, "), got ", w_in.sizes());
    O = w_in.size(0);
    w = matrix(w_in, "w", O, C);
    if (gate_in.has_value()) {
      check_float(op, *gate_in, "gate", &x_in);
      TORCH_CHECK(gate_in->dim() == 2 && gate_in->size(0) == B && gate_in->size(1) == C, "shvit pw_conv_bn: gate ",
                  "must have shape (", B, ", ", C, "), got ", gate_in->sizes());
      gate = gate_in->contiguous();
    }
  }

  Blocks blocks() const { return Blocks(B * H * W, std::max(O, C), gate.defined() ? H * W : 0); }

  at::Tensor gate_grad() const {
    return gate.defined() ? at::empty({B, C}, input.options()) : at::empty({0}, input.options());
  }

  // The GEMM's input: x, or x * gate, token-major.
  at::Tensor operand() const { return gate.defined() ? gated_tokens(input, gate) : x; }

  template <typename T>
  T* gate_out(const at::Tensor& ggate) const {
    return gate.defined() ? ggate.mutable_data_ptr<T>() : nullptr;
  }
};

at::Tensor pw_conv_bn_fwd_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in,
                              const std::optional<at::Tensor>& gate_in, bool relu) {
  const Problem p(x_in, w_in, gate_in, false, !gate_in.has_value());
  const at::Tensor b = p.vec(b_in, "b", p.O);
  if (p.B == 0) return p.empty_result(p.O);
  at::Tensor y;
  p.run([&](auto t) {
    y = linear<decltype(t)>(p.blocks(), p.operand(), p.w, b, relu ? Epilogue::kRelu : Epilogue::kNone);
  });
  return p.result(y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_conv_bn_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in,
    const std::optional<at::Tensor>& gate_in, bool relu, const std::optional<at::Tensor>& y_in) {
  const Problem p(x_in, w_in, gate_in, false);
  p.vec(b_in, "b", p.O);
  TORCH_CHECK(!relu || y_in.has_value(), "shvit pw_conv_bn: the backward of relu=True needs y");
  const at::Tensor gy = p.act(gy_in, "gy", p.O), y = relu ? p.act(*y_in, "y", p.O) : at::Tensor();
  const auto opt = p.x.options();
  at::Tensor gw = at::zeros({p.O, p.C}, opt), gb = at::zeros({p.O}, opt), ggate = p.gate_grad();
  if (p.B == 0) return {p.empty_result(p.C), gw, gb.to(b_in.scalar_type()), ggate};
  at::Tensor gx;
  p.run([&](auto t) {
    using T = decltype(t);
    const Blocks g = p.blocks();
    std::vector<double> s1, s2;
    const at::Tensor a = masked_grad<T>(g, p.O, gy, relu, relu ? ptr<T>(y) : nullptr, nullptr, nullptr, s1, s2);
    const std::vector<double> sb = block_sums<T>(s1, g.n, p.O);
    std::copy(sb.begin(), sb.end(), out<T>(gb));
    gx = input_grads<T>(g, a, p.x, p.gate, p.w, out<T>(gw), p.gate_out<T>(ggate));
  });
  return {p.result(gx), gw, gb.to(b_in.scalar_type()), ggate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_conv_bn_train_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& bn_w_in, const at::Tensor& bn_b_in, double eps,
    const std::optional<at::Tensor>& gate_in, bool relu) {
  const Problem p(x_in, w_in, gate_in, true, !gate_in.has_value());
  const at::Tensor bn_w = p.vec(bn_w_in, "bn_w", p.O), bn_b = p.vec(bn_b_in, "bn_b", p.O);
  TORCH_CHECK(eps >= 0, "shvit pw_conv_bn: eps must be non-negative, got ", eps);
  const auto opt = p.input.options();
  at::Tensor mean = at::empty({p.O}, opt), var = at::empty({p.O}, opt), y, z;
  p.run([&](auto t) {
    using T = decltype(t);
    const Blocks g = p.blocks();
    z = linear<T>(g, p.operand(), p.w, {}, Epilogue::kNone);
    batch_moments(g, ptr<T>(z), p.O, out<T>(mean), out<T>(var));
    const auto bn = Affine<T>::batch_norm(ptr<T>(mean), ptr<T>(var), ptr<T>(bn_w), ptr<T>(bn_b), eps, p.O);
    y = at::empty_like(z);
    const T* pz = ptr<T>(z);
    T* py = out<T>(y);
    g.each([&](int64_t, int64_t r0, int64_t m) { bn_act(bn, pz + r0 * p.O, p.O, m, py + r0 * p.O, relu); });
  });
  return {p.result(y), mean, var, p.channels_last(z)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_conv_bn_train_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& bn_w_in,
    const at::Tensor& bn_b_in, double eps, const std::optional<at::Tensor>& gate_in, bool relu,
    const at::Tensor& mean_in, const at::Tensor& var_in, const at::Tensor& z_in) {
  const Problem p(x_in, w_in, gate_in, true);
  const at::Tensor bn_w = p.vec(bn_w_in, "bn_w", p.O), bn_b = p.vec(bn_b_in, "bn_b", p.O);
  const at::Tensor mean = p.vec(mean_in, "mean", p.O), var = p.vec(var_in, "var", p.O);
  const at::Tensor gy = p.act(gy_in, "gy", p.O), z = p.act(z_in, "z", p.O);
  TORCH_CHECK(eps >= 0, "shvit pw_conv_bn: eps must be non-negative, got ", eps);
  const auto opt = p.x.options();
  at::Tensor gw = at::empty({p.O, p.C}, opt), gbw = at::empty({p.O}, opt), gbb = at::empty({p.O}, opt);
  at::Tensor ggate = p.gate_grad(), gx;
  p.run([&](auto t) {
    using T = decltype(t);
    const Blocks g = p.blocks();
    const auto bn = Affine<T>::batch_norm(ptr<T>(mean), ptr<T>(var), ptr<T>(bn_w), ptr<T>(bn_b), eps, p.O);
    const T* pz = ptr<T>(z);
    std::vector<double> s1, s2;
    const at::Tensor a = masked_grad<T>(g, p.O, gy, relu, nullptr, pz, &bn, s1, s2);
    const std::vector<double> sb = block_sums<T>(s1, g.n, p.O), sw = block_sums<T>(s2, g.n, p.O, &bn.invstd);
    const NormGrad<T> ng(bn, sb, sw, static_cast<double>(g.T));
    const at::Tensor gz = at::empty_like(a);
    const T* pa = ptr<T>(a);
    T* pgz = out<T>(gz);
    g.each([&](int64_t, int64_t r0, int64_t m) {
      ng.apply(bn, pz + r0 * p.O, pa + r0 * p.O, p.O, m, pgz + r0 * p.O);
    });
    for (int64_t c = 0; c < p.O; ++c) out<T>(gbb)[c] = T(sb[c]), out<T>(gbw)[c] = T(sw[c]);
    gx = input_grads<T>(g, gz, p.x, p.gate, p.w, out<T>(gw), p.gate_out<T>(ggate));
  });
  return {p.result(gx), gw, gbw.to(bn_w_in.scalar_type()), gbb.to(bn_b_in.scalar_type()), ggate};
}

}  // namespace
}  // namespace shvit::cpu

TORCH_LIBRARY_FRAGMENT(shvit, m) {
  m.def("pw_conv_bn_fwd_cpu(Tensor x, Tensor w, Tensor b, Tensor? gate, bool relu) -> Tensor");
  m.def(
      "pw_conv_bn_bwd_cpu(Tensor gy, Tensor x, Tensor w, Tensor b, Tensor? gate, bool relu, Tensor? y) -> "
      "(Tensor gx, Tensor gw, Tensor gb, Tensor ggate)");
  m.def(
      "pw_conv_bn_train_fwd_cpu(Tensor x, Tensor w, Tensor bn_w, Tensor bn_b, float eps, Tensor? gate, bool relu) "
      "-> (Tensor y, Tensor mean, Tensor var, Tensor z)");
  m.def(
      "pw_conv_bn_train_bwd_cpu(Tensor gy, Tensor x, Tensor w, Tensor bn_w, Tensor bn_b, float eps, Tensor? gate, "
      "bool relu, Tensor mean, Tensor var, Tensor z) -> (Tensor gx, Tensor gw, Tensor g_bn_w, Tensor g_bn_b, "
      "Tensor ggate)");
}

TORCH_LIBRARY_IMPL(shvit, CPU, m) {
  m.impl("pw_conv_bn_fwd_cpu", &shvit::cpu::pw_conv_bn_fwd_cpu);
  m.impl("pw_conv_bn_bwd_cpu", &shvit::cpu::pw_conv_bn_bwd_cpu);
  m.impl("pw_conv_bn_train_fwd_cpu", &shvit::cpu::pw_conv_bn_train_fwd_cpu);
  m.impl("pw_conv_bn_train_bwd_cpu", &shvit::cpu::pw_conv_bn_train_bwd_cpu);
}
