// Internal to the CPU SHSA kernels: what the entry points (shsa.cpp) share with the per-instruction-set kernel
// files (shsa_isa_*.cpp), which all compile shsa_kernels.inc. Every header those need is included here, before
// any target pragma (isa.h).
#pragma once

#include <ATen/Parallel.h>

#include "isa.h"
#include "kernel_common.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

namespace shvit::cpu::shsa {

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

template <typename T>
struct EvalFwdArgs {
  const T *x, *gn_w, *gn_b;
  double gn_eps;
  const T *qkv_w, *qkv_b, *proj_w, *proj_b;  // BatchNorms folded
  bool residual;
  T* y;
};

template <typename T>
struct TrainFwdArgs {
  const T *x, *gn_w, *gn_b;
  double gn_eps;
  const T *qkv_w, *qkv_bn_w, *qkv_bn_b;
  double qkv_eps;
  const T *proj_w, *proj_bn_w, *proj_bn_b;
  double proj_eps;
  bool residual;
  T *y, *qkv_mean, *qkv_var, *proj_mean, *proj_var;  // outputs: y and the batch statistics
  T* zp;                                             // where to keep the pre-BN proj for the backward, or null
};

// The normalisation after a projection, for the backward: training BatchNorm (w, b, batch mean, biased var, eps),
// or in eval the folded bias b alone (the rest null).
template <typename T>
struct BwdNorm {
  const T *w, *b, *mean, *var;
  double eps;
};

template <typename T>
struct BwdArgs {
  const T *gy, *x, *gn_w, *gn_b;
  double gn_eps;
  const T *qkv_w, *proj_w;
  BwdNorm<T> qkv, proj;
  const T* zp;  // training: the forward's pre-BN proj, or null (then recomputed)
  bool train, residual;
  T *gx, *g_gn_w, *g_gn_b, *g_qkv_w, *g_proj_w;
  // Gradients of the BatchNorm weights and biases (training), or of the folded biases (eval: *_nb; *_nw null).
  T *g_qkv_nw, *g_qkv_nb, *g_proj_nw, *g_proj_nb;
};

#define SHVIT_DECLARE_SHSA_KERNELS(isa)                                  \
  namespace isa {                                                        \
  template <typename T> void eval_fwd(const Dims&, const EvalFwdArgs<T>&);   \
  template <typename T> void train_fwd(const Dims&, const TrainFwdArgs<T>&); \
  template <typename T> void backward(const Dims&, const BwdArgs<T>&);       \
  }

SHVIT_FOR_EACH_ISA(SHVIT_DECLARE_SHSA_KERNELS)
#undef SHVIT_DECLARE_SHSA_KERNELS

}  // namespace shvit::cpu::shsa
