// Internal interface between the depthwise conv + BN launchers (dwconv_bn.cu) and the two kernel families, NCHW
// (dwconv_bn_nchw.cu: shared-memory halo tiles of one channel plane) and channels_last (dwconv_bn_cl.cu: each
// thread owns a 16-byte vector of channels of a pixel).
//
// Every kernel that needs z = dwconv(x, w) recomputes it (z is never stored), in one of four modes:
//   kForward  y = [relu]((z - mean) * scale + shift [+ x]) with the per-channel affine of Affine below
//   kStats    Welford partials of z per (block, channel)  -> welford_partials -> batch mean / var
//   kGradSums partials of sum(g) and sum(g * zhat), g = grad_y [* (y > 0)]  -> sum_partials
//   kGradZ    dz = (g - (sum_g + zhat * sum_gz) / count) * invstd * bn_w, stored fp32 in the layout of y
// then grad_x is the transposed conv of dz (+ g for the residual) and grad_w comes from dz and x as partials.
#pragma once

#include "common.cuh"
#include "reduce.cuh"

namespace shvit::cuda::dw {

enum class Mode : int { kForward, kStats, kGradSums, kGradZ };

struct Args {
  DwShape s;
  int64_t Ho, Wo;
  const void* x;
  Strides4 xs;
  const float* w;        // (C, k*k)
  void* y;               // kForward output
  Strides4 ys;           // of y (kForward) or of the forward's y and grad_y (backward modes)
  const void* gy;        // grad_y (backward modes)
  const void* yf;        // forward output for the ReLU mask (backward modes, relu only)
  const float* mean;     // batch mean (null in eval: the affine is z + shift)
  const float* var;      // batch biased variance
  const float* bn_w;     // BN weight (training)
  const float* shift;    // bn_b in training, the folded bias in eval
  const float* sums;     // kGradZ: [sum_g (C), sum_g_zhat (C)]
  float eps;
  bool residual, relu;
  float* dz;             // kGradZ output / grad pass input, contiguous fp32 in the kernel family's layout
  void* gx;              // grad_x
  Strides4 gxs;
  float* part;           // partials: [S][C] (x3 planes for kStats), [S][2C] for kGradSums, [S][C*k*k] for grad_w
};

// Per-channel affine of kForward: (z - m) * s + t.
struct Affine {
  float m, s, t;
};

__device__ __forceinline__ Affine affine(const Args& a, int64_t c) {
  if (a.mean == nullptr) return {0.f, 1.f, a.shift[c]};
  return {a.mean[c], a.bn_w[c] / sqrtf(a.var[c] + a.eps), a.shift[c]};
}

// Number of partial rows S that a kStats / kGradSums conv pass and the grad_w pass write (fixed by the shape).
int64_t conv_partials_nchw(const DwShape& s);
int64_t conv_partials_cl(DType dt, const DwShape& s);
// grad_w: a block reduces a slice of the B*Ho*Wo outputs of a channel; at least 4096 outputs per slice.
inline int64_t grad_w_partials(const DwShape& s) {
  const int64_t n = ceil_div(s.B * s.Ho() * s.Wo(), 4096);
  return n < 32 ? n : 32;
}

Status conv_nchw(DType dt, Mode mode, const Args& a, cudaStream_t stream);
Status conv_cl(DType dt, Mode mode, const Args& a, cudaStream_t stream);
Status grad_x_nchw(DType dt, const Args& a, cudaStream_t stream);
Status grad_x_cl(DType dt, const Args& a, cudaStream_t stream);
Status grad_w_nchw(DType dt, const Args& a, cudaStream_t stream);
Status grad_w_cl(DType dt, const Args& a, cudaStream_t stream);

// Calls f(std::integral_constant<int, K>{}) for the odd kernel size k <= 7.
template <typename F>
Status dispatch_k(int k, F&& f) {
  switch (k) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 7: return f(std::integral_constant<int, 7>{});
  }
  return invalid("dwconv_bn: kernel size must be 1, 3, 5 or 7");
}

// g = grad_y [* (y > 0)] at element offset i (grad_y and y share strides).
template <typename T>
__device__ __forceinline__ float grad_out(const Args& a, int64_t i) {
  const float g = ld(static_cast<const T*>(a.gy) + i);
  return a.relu && !(ld(static_cast<const T*>(a.yf) + i) > 0.f) ? 0.f : g;
}

}  // namespace shvit::cuda::dw
