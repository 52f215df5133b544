// Fused depthwise k x k conv + BatchNorm (+ residual) (+ ReLU) on the CPU.
//
// Depthwise conv: groups = C, odd k in {1, 3, 5, 7}, stride 1 or 2, padding k / 2, no conv bias;
// output spatial size H' = (H + 2 * (k / 2) - k) / stride + 1 (same for W).
// Supported dtypes: float32, float64. x may be NCHW-contiguous or channels_last; the outputs that have
// x's shape or y's shape use x's layout: channels_last when x is channels_last-contiguous and not
// NCHW-contiguous, NCHW otherwise (other strides are made NCHW-contiguous first). Per-channel outputs
// (mean, var, grad_bn_*) and grad_weight are contiguous.
// All reductions run per channel in a fixed order, so results do not depend on the thread count.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace shvit::cpu {

// Eval form, BN (and any residual identity tap) folded by the caller:
// y = [relu](dwconv(x, weight) + bias). weight (C, 1, k, k), bias (C).
at::Tensor dwconv_bn_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             int64_t stride, bool relu);

// Training form with batch statistics: z = dwconv(x, weight); mean, var = per-channel mean and biased
// variance of z over (B, H', W'); y = [relu]((z - mean) / sqrt(var + eps) * bn_weight + bn_bias [+ x]).
// residual needs stride 1. Returns (y, mean, var); mean/var have x's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_train_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    double eps, int64_t stride, bool residual, bool relu);

// Backward of dwconv_bn_train_fwd_cpu. y is its output (read only for the ReLU mask when relu); z is
// recomputed from x. Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias); grad_bn_* have
// bn_weight's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_train_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& y, double eps, int64_t stride,
    bool residual, bool relu);

}  // namespace shvit::cpu
