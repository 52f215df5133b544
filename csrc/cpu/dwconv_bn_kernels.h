// Internal to the CPU dwconv_bn kernels: the raw-pointer arguments shared by the dispatcher
// (dwconv_bn.cpp) and the per-instruction-set kernel files (dwconv_bn_isa_*.cpp), which all compile
// dwconv_bn_kernels.inc.
#pragma once

#include <ATen/Parallel.h>

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace shvit::cpu::detail {

struct Geom {
  int64_t B, C, H, W, Ho, Wo;
  int k, stride;
  bool channels_last;  // else NCHW-contiguous
};

template <typename T>
struct EvalArgs {
  const T *x, *w, *bias;
  bool relu;
  T* y;
};

template <typename T>
struct TrainFwdArgs {
  const T *x, *w, *gamma, *beta;
  double eps;
  bool residual, relu;
  T *y, *mean, *var;
};

template <typename T>
struct TrainBwdArgs {
  const T *gy, *x, *w, *gamma, *mean, *var, *y;
  double eps;
  bool residual, relu;
  T *gx, *gw, *ggamma, *gbeta;
};

#define SHVIT_DECLARE_KERNELS(isa)                                     \
  namespace isa {                                                      \
  template <typename T> void eval_fwd(const Geom&, const EvalArgs<T>&);      \
  template <typename T> void train_fwd(const Geom&, const TrainFwdArgs<T>&); \
  template <typename T> void train_bwd(const Geom&, const TrainBwdArgs<T>&); \
  }

SHVIT_FOR_EACH_ISA(SHVIT_DECLARE_KERNELS)
#undef SHVIT_DECLARE_KERNELS

}  // namespace shvit::cpu::detail
