// Fused residual FFN of SHViT on the CPU, float32 / float64: y = x + BN2(W2 ReLU(BN1(W1 x))), the 1x1 convs as
// GEMMs over tokens. Spec, argument lists and outputs: shvit_kernels/reference/ffn.py (fwd, bwd, train_fwd,
// train_bwd).
//
// Layout: an activation with ch channels is a (ch x tokens) matrix. NCHW holds each sample as a row-major (ch, N)
// matrix (tokens in columns); channels_last holds the whole batch as one row-major (B*N, ch) matrix (channels in
// columns), whose blocks of tokens may span samples. Both are used as they are (no transposing copy): the GEMMs
// take either orientation, and the elementwise loops run along the contiguous dimension. Work is cut into blocks
// of tokens fixed by the shapes, sized so that a block's hidden activation (h x tokens) stays in L2.
//
// Eval forward, one pass: per block, hidden = ReLU(W1 x + b1) in per-thread scratch (never a full tensor), then
// y = W2 hidden + b2 + x, written once. Eval backward, one pass: hidden recomputed from x, gh = W2^T gy, ReLU mask,
// gx = W1^T gh + gy; then the weight gradients.
// Training: BatchNorm needs batch statistics, hence pass boundaries. Forward: (1) z1 = W1 x and its per-block
// moments, (2) h = ReLU(BN1(z1)) in scratch, z2 = W2 h and its moments, (3) y = BN2(z2) + x; z1 and z2 are
// outputs, kept for the backward (h is not: it is recomputed from z1 elementwise). Backward: (1) BN2's gradient
// sums, (2) gz2 = BN2'(gy), h, gh = W2^T gz2, ReLU mask and BN1's gradient sums, (3) gz1 = BN1'(gh),
// gx = W1^T gz1 + gy; then the weight gradients as GEMMs over all tokens.
//
// Determinism: blocks and weight-gradient row chunks are fixed by the shapes, BLAS runs single-threaded in every
// task, and per-block partial sums are combined in block order, so results are bitwise identical for any thread
// count (as in shsa.cpp).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "kernel_common.h"

namespace shvit::cpu {
namespace {

constexpr int64_t kBlockElems = 1 << 16;  // a block's hidden (h x tokens): 256 KB in fp32, stays in L2
constexpr int64_t kBlockAlign = 16;       // tokens per block are a multiple of this (whole SIMD rows)
constexpr int64_t kGradTasks = 8;         // weight gradients: at least this many row chunks (fixed by shapes)

// Where the tokens are (see the file comment): S sequences of N tokens (NCHW: the samples; channels_last: one
// sequence of B*N tokens), cut into `per` blocks of at most bm tokens each. In an activation with ch channels,
// element (c, i) of a view with leading dimension ld sits at at(c, i, ld).
template <bool CL>
struct Geom {
  int64_t S, N, bm, per;

  Geom(int64_t B, int64_t HW, int64_t hidden) : S(CL ? 1 : B), N(CL ? B * HW : HW) {
    const int64_t target = std::max(kBlockAlign, kBlockElems / hidden);
    const int64_t n = (N + target - 1) / target, even = (N + n - 1) / n;  // n blocks of about equal size
    bm = std::min(N, (even + kBlockAlign - 1) / kBlockAlign * kBlockAlign);
    per = (N + bm - 1) / bm;
  }

  static int64_t at(int64_t c, int64_t i, int64_t ld) { return CL ? i * ld + c : c * ld + i; }
  int64_t blocks() const { return S * per; }
  int64_t tokens() const { return S * N; }
  int64_t i0(int64_t t) const { return t % per * bm; }
  int64_t width(int64_t t) const { return std::min(bm, N - i0(t)); }
  // Offset of block t's first token in an activation with ch channels, and that activation's leading dimension.
  int64_t off(int64_t t, int64_t ch) const { return CL ? i0(t) * ch : t / per * ch * N + i0(t); }
  int64_t ld(int64_t ch) const { return CL ? ch : N; }
  // Leading dimension of a ch-channel block in per-thread scratch.
  int64_t scratch_ld(int64_t ch) const { return CL ? ch : bm; }
};

// f(c, i) over a ch x m block, the contiguous dimension innermost so that the loops vectorise.
template <bool CL, typename F>
inline void each(int64_t ch, int64_t m, const F& f) {
  if constexpr (CL) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < ch; ++c) f(c, i);
  } else {
    for (int64_t c = 0; c < ch; ++c)
      for (int64_t i = 0; i < m; ++i) f(c, i);
  }
}

// out (co x m, leading dim ldo) = op(w) @ in (ci x m, leading dim ldi) + beta * out, where op(w) is co x ci and w
// is row-major co x ci, or ci x co (transposed) when tw. channels_last computes out^T = in^T op(w)^T.
template <bool CL, typename T>
void mm(bool tw, int64_t co, int64_t ci, int64_t m, const T* w, const T* in, int64_t ldi, T* out, int64_t ldo,
        double beta = 0.0) {
  const int64_t ldw = tw ? co : ci;
  if constexpr (CL)
    gemm<T>(false, !tw, m, co, ci, 1.0, in, ldi, w, ldw, beta, out, ldo);
  else
    gemm<T>(tw, false, co, m, ci, 1.0, w, ldw, in, ldi, beta, out, ldo);
}

// Per-channel mean and M2 (sum of squared deviations) of a ch x m block: row_moments on NCHW rows; on
// channels_last rows the same two-pass update with per-channel accumulators.
template <bool CL, typename T>
void block_moments(const T* z, int64_t ld, int64_t ch, int64_t m, double* mean, double* m2) {
  if constexpr (!CL) {
    row_moments(z, ld, ch, m, mean, m2);
  } else {
    std::vector<double> sum(ch, 0.0), dev(ch, 0.0), sq(ch, 0.0);
    std::vector<T> mt(ch);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < ch; ++c) sum[c] += z[i * ld + c];
    for (int64_t c = 0; c < ch; ++c) mt[c] = T(sum[c] / m);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < ch; ++c) {
        const T t = z[i * ld + c] - mt[c];
        dev[c] += t;
        sq[c] += t * t;
      }
    for (int64_t c = 0; c < ch; ++c) {
      mean[c] = corrected_mean(mt[c], dev[c], m);
      m2[c] = sq[c] - dev[c] * dev[c] / m;
    }
  }
}

// Per-channel sums over a ch x m block: s1[c] = sum g, and s2[c] = sum g * (z - mean[c]) when z is given (the
// BatchNorm backward's sums, before the invstd factor).
template <bool CL, typename T>
void grad_sums(const T* g, int64_t ldg, const T* z, int64_t ldz, const T* mean, int64_t ch, int64_t m, double* s1,
               double* s2) {
  if constexpr (!CL) {
    for (int64_t c = 0; c < ch; ++c) {
      const T* gr = g + c * ldg;
      if (z) {
        const T* zr = z + c * ldz;
        const T mc = mean[c];
        const auto [sg, sgz] = sums_of<T, 2>(m, [&](int64_t i, auto v) {
          using V = decltype(v);
          const V gv = load<V>(gr + i);
          return std::array<V, 2>{gv, gv * (load<V>(zr + i) - mc)};
        });
        s1[c] = sg;
        s2[c] = sgz;
      } else {
        s1[c] = sum_of<T>(m, [&](int64_t i, auto v) { return load<decltype(v)>(gr + i); });
      }
    }
  } else {
    std::fill(s1, s1 + ch, 0.0);
    if (z) std::fill(s2, s2 + ch, 0.0);
    for (int64_t i = 0; i < m; ++i) {
      const T* gr = g + i * ldg;
      for (int64_t c = 0; c < ch; ++c) s1[c] += gr[c];
      if (z) {
        const T* zr = z + i * ldz;
        for (int64_t c = 0; c < ch; ++c) s2[c] += gr[c] * (zr[c] - mean[c]);
      }
    }
  }
}

// out (co x ci) = sum over all tokens of a(:, i) b(:, i)^T (a: co channels, b: ci channels): a weight gradient.
// Tasks are fixed chunks of output rows; each sums the sequences in order, so no result depends on the thread
// count.
template <bool CL, typename T>
void weight_grad(const Geom<CL>& g, int64_t co, int64_t ci, const T* a, const T* b, T* out) {
  const int64_t chunks = std::max((co + kGradRows - 1) / kGradRows, std::min(kGradTasks, (co + 31) / 32));
  const int64_t per = (co + chunks - 1) / chunks;
  parallel_tasks(chunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * per, rows = std::min(per, co - r0);
      if (rows <= 0) continue;
      for (int64_t s = 0; s < g.S; ++s) {
        const double beta = s == 0 ? 0.0 : 1.0;
        if constexpr (CL)
          gemm<T>(true, false, rows, ci, g.N, 1.0, a + r0, co, b, ci, beta, out + r0 * ci, ci);
        else
          gemm<T>(false, true, rows, ci, g.N, 1.0, a + (s * co + r0) * g.N, g.N, b + s * ci * g.N, g.N, beta,
                  out + r0 * ci, ci);
      }
    }
  });
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

// ---- kernels ----------------------------------------------------------------------------------------------------

template <bool CL, typename T>
void eval_forward(const Geom<CL>& g, int64_t C, int64_t Hd, const T* x, const T* w1, const T* b1, const T* w2,
                  const T* b2, T* y) {
  using G = Geom<CL>;
  const int64_t ld = g.ld(C), lh = g.scratch_ld(Hd), lz = g.scratch_ld(C);
  parallel_tasks(g.blocks(), [&](int64_t t0, int64_t t1) {
    const Scratch<T> s({Hd * g.bm, C * g.bm});
    T *hid = s[0], *z = s[1];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t off = g.off(t, C), m = g.width(t);
      mm<CL>(false, Hd, C, m, w1, x + off, ld, hid, lh);
      each<CL>(Hd, m, [&](int64_t c, int64_t i) {
        T& v = hid[G::at(c, i, lh)];
        v = std::max(v + b1[c], T(0));  // (max keeps a NaN)
      });
      mm<CL>(false, C, Hd, m, w2, hid, lh, z, lz);
      each<CL>(C, m, [&](int64_t c, int64_t i) {
        const int64_t k = off + G::at(c, i, ld);
        y[k] = (z[G::at(c, i, lz)] + b2[c]) + x[k];
      });
    }
  });
}

template <bool CL, typename T>
void eval_backward(const Geom<CL>& g, int64_t C, int64_t Hd, const T* gy, const T* x, const T* w1, const T* b1,
                   const T* w2, T* gx, T* gw1, T* gb1, T* gw2, T* gb2) {
  using G = Geom<CL>;
  const int64_t nb = g.blocks(), ld = g.ld(C), ldh = g.ld(Hd), lh = g.scratch_ld(Hd);
  // The hidden activation and its gradient over all tokens: operands of the weight-gradient GEMMs.
  const at::Tensor store = buffer<T>(2 * g.tokens() * Hd);
  T *hid = store.mutable_data_ptr<T>(), *ga = hid + g.tokens() * Hd;
  std::vector<double> s1(nb * Hd), s2(nb * C);
  parallel_tasks(nb, [&](int64_t t0, int64_t t1) {
    const Scratch<T> s({Hd * g.bm});
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t off = g.off(t, C), offh = g.off(t, Hd), m = g.width(t);
      T *h = hid + offh, *a = ga + offh;
      mm<CL>(false, Hd, C, m, w1, x + off, ld, h, ldh);
      each<CL>(Hd, m, [&](int64_t c, int64_t i) {
        T& v = h[G::at(c, i, ldh)];
        v = std::max(v + b1[c], T(0));
      });
      mm<CL>(true, Hd, C, m, w2, gy + off, ld, s[0], lh);
      each<CL>(Hd, m, [&](int64_t c, int64_t i) {
        a[G::at(c, i, ldh)] = h[G::at(c, i, ldh)] > T(0) ? s[0][G::at(c, i, lh)] : T(0);
      });
      grad_sums<CL, T>(a, ldh, nullptr, 0, nullptr, Hd, m, &s1[t * Hd], nullptr);
      grad_sums<CL, T>(gy + off, ld, nullptr, 0, nullptr, C, m, &s2[t * C], nullptr);
      mm<CL>(true, C, Hd, m, w1, a, ldh, gx + off, ld);
      each<CL>(C, m, [&](int64_t c, int64_t i) { gx[off + G::at(c, i, ld)] += gy[off + G::at(c, i, ld)]; });
    }
  });
  const std::vector<double> sb1 = block_sums<T>(s1, nb, Hd), sb2 = block_sums<T>(s2, nb, C);
  std::copy(sb1.begin(), sb1.end(), gb1);
  std::copy(sb2.begin(), sb2.end(), gb2);
  weight_grad<CL>(g, C, Hd, gy, hid, gw2);
  weight_grad<CL>(g, Hd, C, ga, x, gw1);
}

template <bool CL, typename T>
void train_forward(const Geom<CL>& g, int64_t C, int64_t Hd, const T* x, const T* w1, const T* bn1_w,
                   const T* bn1_b, double eps1, const T* w2, const T* bn2_w, const T* bn2_b, double eps2, T* y,
                   T* mean1, T* var1, T* mean2, T* var2, T* z1, T* z2) {
  using G = Geom<CL>;
  const int64_t nb = g.blocks(), ld = g.ld(C), ldh = g.ld(Hd), lh = g.scratch_ld(Hd);
  std::vector<int64_t> count(nb);
  for (int64_t t = 0; t < nb; ++t) count[t] = g.width(t);
  std::vector<double> mu(nb * Hd), m2(nb * Hd);
  // (1) z1 = W1 x and its moments.
  parallel_tasks(nb, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* z = z1 + g.off(t, Hd);
      mm<CL>(false, Hd, C, count[t], w1, x + g.off(t, C), ld, z, ldh);
      block_moments<CL>(z, ldh, Hd, count[t], &mu[t * Hd], &m2[t * Hd]);
    }
  });
  combine_moments(mu, m2, count, Hd, mean1, var1);
  const Affine<T> bn1 = Affine<T>::batch_norm(mean1, var1, bn1_w, bn1_b, eps1, Hd);
  // (2) h = ReLU(BN1(z1)) in scratch, z2 = W2 h and its moments.
  mu.assign(nb * C, 0.0);
  m2.assign(nb * C, 0.0);
  parallel_tasks(nb, [&](int64_t t0, int64_t t1) {
    const Scratch<T> s({Hd * g.bm});
    for (int64_t t = t0; t < t1; ++t) {
      const T* z = z1 + g.off(t, Hd);
      each<CL>(Hd, count[t], [&](int64_t c, int64_t i) {
        const T a = (z[G::at(c, i, ldh)] - bn1.mean[c]) * bn1.invstd[c] * bn1.w[c] + bn1.b[c];
        s[0][G::at(c, i, lh)] = std::max(a, T(0));
      });
      T* zo = z2 + g.off(t, C);
      mm<CL>(false, C, Hd, count[t], w2, s[0], lh, zo, ld);
      block_moments<CL>(zo, ld, C, count[t], &mu[t * C], &m2[t * C]);
    }
  });
  combine_moments(mu, m2, count, C, mean2, var2);
  const Affine<T> bn2 = Affine<T>::batch_norm(mean2, var2, bn2_w, bn2_b, eps2, C);
  // (3) y = BN2(z2) + x.
  parallel_tasks(nb, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t off = g.off(t, C);
      each<CL>(C, count[t], [&](int64_t c, int64_t i) {
        const int64_t k = off + G::at(c, i, ld);
        y[k] = ((z2[k] - bn2.mean[c]) * bn2.invstd[c] * bn2.w[c] + bn2.b[c]) + x[k];
      });
    }
  });
}

template <bool CL, typename T>
void train_backward(const Geom<CL>& g, int64_t C, int64_t Hd, const T* gy, const T* x, const T* w1,
                    const Affine<T>& bn1, const T* w2, const Affine<T>& bn2, const T* z1, const T* z2, T* gx, T* gw1,
                    T* g1w, T* g1b, T* gw2, T* g2w, T* g2b) {
  using G = Geom<CL>;
  const int64_t nb = g.blocks(), ld = g.ld(C), ldh = g.ld(Hd), lh = g.scratch_ld(Hd);
  const double count = static_cast<double>(g.tokens());
  // gz2, the hidden activation and its gradient (gz1 in the end) over all tokens: the weight gradients' operands.
  const at::Tensor store = buffer<T>(g.tokens() * (C + 2 * Hd));
  T *gz2 = store.mutable_data_ptr<T>(), *hid = gz2 + g.tokens() * C, *ga = hid + g.tokens() * Hd;
  // (1) BN2's gradient sums.
  std::vector<double> s1(nb * C), s2(nb * C);
  parallel_tasks(nb, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t off = g.off(t, C);
      grad_sums<CL>(gy + off, ld, z2 + off, ld, bn2.mean.data(), C, g.width(t), &s1[t * C], &s2[t * C]);
    }
  });
  const std::vector<double> sb2 = block_sums<T>(s1, nb, C), sw2 = block_sums<T>(s2, nb, C, &bn2.invstd);
  const NormGrad<T> n2(bn2, sb2, sw2, count);
  // (2) gz2, h, gh = W2^T gz2 through the ReLU, and BN1's gradient sums.
  s1.assign(nb * Hd, 0.0);
  s2.assign(nb * Hd, 0.0);
  parallel_tasks(nb, [&](int64_t t0, int64_t t1) {
    const Scratch<T> s({Hd * g.bm});
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t off = g.off(t, C), offh = g.off(t, Hd), m = g.width(t);
      each<CL>(C, m, [&](int64_t c, int64_t i) {
        const int64_t k = off + G::at(c, i, ld);
        const T zhat = (z2[k] - bn2.mean[c]) * bn2.invstd[c];
        gz2[k] = (gy[k] - (n2.mb[c] + zhat * n2.mw[c])) * n2.k[c];
      });
      const T* z = z1 + offh;
      T *h = hid + offh, *a = ga + offh;
      each<CL>(Hd, m, [&](int64_t c, int64_t i) {
        const int64_t k = G::at(c, i, ldh);
        h[k] = std::max((z[k] - bn1.mean[c]) * bn1.invstd[c] * bn1.w[c] + bn1.b[c], T(0));
      });
      mm<CL>(true, Hd, C, m, w2, gz2 + off, ld, s[0], lh);
      each<CL>(Hd, m, [&](int64_t c, int64_t i) {
        a[G::at(c, i, ldh)] = h[G::at(c, i, ldh)] > T(0) ? s[0][G::at(c, i, lh)] : T(0);
      });
      grad_sums<CL>(a, ldh, z, ldh, bn1.mean.data(), Hd, m, &s1[t * Hd], &s2[t * Hd]);
    }
  });
  const std::vector<double> sb1 = block_sums<T>(s1, nb, Hd), sw1 = block_sums<T>(s2, nb, Hd, &bn1.invstd);
  const NormGrad<T> n1(bn1, sb1, sw1, count);
  // (3) gz1 = BN1'(gh) in place, gx = W1^T gz1 + gy.
  parallel_tasks(nb, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t off = g.off(t, C), offh = g.off(t, Hd), m = g.width(t);
      const T* z = z1 + offh;
      T* a = ga + offh;
      each<CL>(Hd, m, [&](int64_t c, int64_t i) {
        const int64_t k = G::at(c, i, ldh);
        const T zhat = (z[k] - bn1.mean[c]) * bn1.invstd[c];
        a[k] = (a[k] - (n1.mb[c] + zhat * n1.mw[c])) * n1.k[c];
      });
      mm<CL>(true, C, Hd, m, w1, a, ldh, gx + off, ld);
      each<CL>(C, m, [&](int64_t c, int64_t i) { gx[off + G::at(c, i, ld)] += gy[off + G::at(c, i, ld)]; });
    }
  });
  weight_grad<CL>(g, C, Hd, gz2, hid, gw2);
  weight_grad<CL>(g, Hd, C, ga, x, gw1);
  for (int64_t c = 0; c < Hd; ++c) g1b[c] = T(sb1[c]), g1w[c] = T(sw1[c]);
  for (int64_t c = 0; c < C; ++c) g2b[c] = T(sb2[c]), g2w[c] = T(sw2[c]);
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
  bool cl;
  at::MemoryFormat fmt;
  int64_t B, C, Hd, HW;
  at::Tensor x, w1, w2;  // contiguous (x: in its own layout)

  Problem(const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& w2_in, bool train) {
    check_float(x_in, "x");
    TORCH_CHECK(x_in.dim() == 4, "shvit ffn: x must be 4-D (B, C, H, W), got shape ", x_in.sizes());
    TORCH_CHECK(x_in.size(1) > 0 && x_in.size(2) > 0 && x_in.size(3) > 0,
                "shvit ffn: x must have non-empty channel and spatial dims, got shape ", x_in.sizes());
    B = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
    check_float(w1_in, "w1", &x_in);
    check_float(w2_in, "w2", &x_in);
    TORCH_CHECK(w1_in.dim() == 2 && w1_in.size(1) == C && w1_in.size(0) > 0, "shvit ffn: w1 must have shape (h, ", C,
                "), got ", w1_in.sizes());
    Hd = w1_in.size(0);
    TORCH_CHECK(w2_in.dim() == 2 && w2_in.size(0) == C && w2_in.size(1) == Hd, "shvit ffn: w2 must have shape (", C,
                ", ", Hd, "), got ", w2_in.sizes());
    TORCH_CHECK(!train || B * HW > 1, "shvit ffn: BatchNorm training needs more than 1 value per channel, got shape ",
                x_in.sizes());
    cl = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
    fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    x = x_in.contiguous(fmt), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  }

  // A per-channel vector of length n as a contiguous tensor of x's dtype.
  at::Tensor vec(const at::Tensor& t, const char* name, int64_t n) const {
    check_float(t, name);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "shvit ffn: ", name, " must have shape (", n, ",), got ", t.sizes());
    return t.to(x.scalar_type()).contiguous();
  }

  // An activation of x's shape (ch channels), dtype and layout: new, or `t` checked and made dense like x.
  at::Tensor act(int64_t ch) const { return at::empty({B, ch, x.size(2), x.size(3)}, x.options().memory_format(fmt)); }
  at::Tensor act(const at::Tensor& t, const char* name, int64_t ch) const {
    check_float(t, name, &x);
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == ch && t.size(2) == x.size(2) &&
                    t.size(3) == x.size(3),
                "shvit ffn: ", name, " must have shape (", B, ", ", ch, ", ", x.size(2), ", ", x.size(3), "), got ",
                t.sizes());
    return t.contiguous(fmt);
  }

  // f(T(), Geom<CL>) for x's dtype and layout.
  template <typename F>
  void run(const F& f) const {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shvit_ffn_cpu", [&] {
      if (cl)
        f(scalar_t(), Geom<true>(B, HW, Hd));
      else
        f(scalar_t(), Geom<false>(B, HW, Hd));
    });
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
  at::Tensor y = p.act(p.C);
  if (p.B == 0) return y;
  p.run([&](auto t, const auto& g) {
    using T = decltype(t);
    eval_forward(g, p.C, p.Hd, ptr<T>(p.x), ptr<T>(p.w1), ptr<T>(b1), ptr<T>(p.w2), ptr<T>(b2), out<T>(y));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& b1_in,
    const at::Tensor& w2_in, const at::Tensor& b2_in) {
  const Problem p(x_in, w1_in, w2_in, false);
  const at::Tensor b1 = p.vec(b1_in, "b1", p.Hd), b2 = p.vec(b2_in, "b2", p.C), gy = p.act(gy_in, "gy", p.C);
  const auto opt = p.x.options();
  at::Tensor gx = p.act(p.C), gw1 = at::zeros({p.Hd, p.C}, opt), gb1 = at::zeros({p.Hd}, opt);
  at::Tensor gw2 = at::zeros({p.C, p.Hd}, opt), gb2 = at::zeros({p.C}, opt);
  if (p.B == 0) return {gx, gw1, gb1.to(b1_in.scalar_type()), gw2, gb2.to(b2_in.scalar_type())};
  p.run([&](auto t, const auto& g) {
    using T = decltype(t);
    eval_backward(g, p.C, p.Hd, ptr<T>(gy), ptr<T>(p.x), ptr<T>(p.w1), ptr<T>(b1), ptr<T>(p.w2), out<T>(gx),
                  out<T>(gw1), out<T>(gb1), out<T>(gw2), out<T>(gb2));
  });
  return {gx, gw1, gb1.to(b1_in.scalar_type()), gw2, gb2.to(b2_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_train_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& bn1_w_in, const at::Tensor& bn1_b_in,
    double eps1, const at::Tensor& w2_in, const at::Tensor& bn2_w_in, const at::Tensor& bn2_b_in, double eps2) {
  const Problem p(x_in, w1_in, w2_in, true);
  const at::Tensor bn1_w = p.vec(bn1_w_in, "bn1_w", p.Hd), bn1_b = p.vec(bn1_b_in, "bn1_b", p.Hd);
  const at::Tensor bn2_w = p.vec(bn2_w_in, "bn2_w", p.C), bn2_b = p.vec(bn2_b_in, "bn2_b", p.C);
  TORCH_CHECK(eps1 >= 0 && eps2 >= 0, "shvit ffn: eps1 and eps2 must be non-negative, got ", eps1, ", ", eps2);
  const auto opt = p.x.options();
  at::Tensor y = p.act(p.C), z1 = p.act(p.Hd), z2 = p.act(p.C);
  at::Tensor mean1 = at::empty({p.Hd}, opt), var1 = at::empty({p.Hd}, opt);
  at::Tensor mean2 = at::empty({p.C}, opt), var2 = at::empty({p.C}, opt);
  p.run([&](auto t, const auto& g) {
    using T = decltype(t);
    train_forward(g, p.C, p.Hd, ptr<T>(p.x), ptr<T>(p.w1), ptr<T>(bn1_w), ptr<T>(bn1_b), eps1, ptr<T>(p.w2),
                  ptr<T>(bn2_w), ptr<T>(bn2_b), eps2, out<T>(y), out<T>(mean1), out<T>(var1), out<T>(mean2),
                  out<T>(var2), out<T>(z1), out<T>(z2));
  });
  return {y, mean1, var1, mean2, var2, z1, z2};
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
  at::Tensor gx = p.act(p.C), gw1 = at::empty({p.Hd, p.C}, opt), gw2 = at::empty({p.C, p.Hd}, opt);
  at::Tensor g1w = at::empty({p.Hd}, opt), g1b = at::empty({p.Hd}, opt);
  at::Tensor g2w = at::empty({p.C}, opt), g2b = at::empty({p.C}, opt);
  p.run([&](auto t, const auto& g) {
    using T = decltype(t);
    const auto bn1 = Affine<T>::batch_norm(ptr<T>(mean1), ptr<T>(var1), ptr<T>(bn1_w), ptr<T>(bn1_b), eps1, p.Hd);
    const auto bn2 = Affine<T>::batch_norm(ptr<T>(mean2), ptr<T>(var2), ptr<T>(bn2_w), ptr<T>(bn2_b), eps2, p.C);
    train_backward(g, p.C, p.Hd, ptr<T>(gy), ptr<T>(p.x), ptr<T>(p.w1), bn1, ptr<T>(p.w2), bn2, ptr<T>(z1),
                   ptr<T>(z2), out<T>(gx), out<T>(gw1), out<T>(g1w), out<T>(g1b), out<T>(gw2), out<T>(g2w),
                   out<T>(g2b));
  });
  return {gx, gw1, g1w.to(bn1_w_in.scalar_type()), g1b.to(bn1_b_in.scalar_type()), gw2,
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
