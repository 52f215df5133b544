// Fused depthwise conv + BatchNorm (+ residual) (+ ReLU) on the CPU: argument checks, layout handling,
// and dispatch to the kernels of dwconv_bn_kernels.inc compiled for the best instruction set of this CPU.
#include "dwconv_bn.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "dwconv_bn_kernels.h"

namespace shvit::cpu {
namespace {

using detail::EvalArgs;
using detail::Geom;
using detail::TrainBwdArgs;
using detail::TrainFwdArgs;

// ---- argument checks --------------------------------------------------------------------------------

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "shvit dwconv_bn: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "shvit dwconv_bn (CPU kernel): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "shvit dwconv_bn (CPU kernel): ",
              name, " must be float32 or float64, got ", t.scalar_type());
}

// Checks x and the depthwise weight; returns the geometry (layout not yet decided).
Geom check_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  check_cpu_float(x, "x");
  check_cpu_float(weight, "weight");
  TORCH_CHECK(x.dim() == 4, "shvit dwconv_bn: x must be 4-D (B, C, H, W), got ", x.dim(), "-D with shape ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 4, "shvit dwconv_bn: weight must be 4-D (C, 1, k, k), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "shvit dwconv_bn: weight dtype ", weight.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  const int64_t C = x.size(1), k = weight.size(3);
  TORCH_CHECK(weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == k,
              "shvit dwconv_bn: weight must have shape (C, 1, k, k) = (", C, ", 1, k, k) for x with ", C,
              " channels, got ", weight.sizes());
  TORCH_CHECK(k % 2 == 1 && k <= 7, "shvit dwconv_bn: weight kernel size must be odd and at most 7, got ", k);
  TORCH_CHECK(stride == 1 || stride == 2, "shvit dwconv_bn: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(C > 0 && x.size(2) > 0 && x.size(3) > 0,
              "shvit dwconv_bn: x must have non-empty channel and spatial dims, got shape ", x.sizes());
  const int64_t p = k / 2;
  Geom g{};
  g.B = x.size(0);
  g.C = C;
  g.H = x.size(2);
  g.W = x.size(3);
  g.Ho = (g.H + 2 * p - k) / stride + 1;
  g.Wo = (g.W + 2 * p - k) / stride + 1;
  g.k = int(k);
  g.stride = int(stride);
  return g;
}

// check_conv plus the checks of the training form.
Geom check_train(const at::Tensor& x, const at::Tensor& weight, int64_t stride, bool residual, double eps) {
  const Geom g = check_conv(x, weight, stride);
  TORCH_CHECK(!residual || stride == 1, "shvit dwconv_bn: residual=True needs stride=1, got stride ", stride);
  TORCH_CHECK(g.B > 0, "shvit dwconv_bn: training needs at least one value per channel, got x of shape ",
              x.sizes());
  TORCH_CHECK(eps >= 0, "shvit dwconv_bn: eps must be non-negative, got ", eps);
  return g;
}

// A per-channel parameter as a contiguous tensor of x's dtype (a no-op for the usual inputs).
at::Tensor per_channel(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "shvit dwconv_bn: ", name, " must have shape (",
              x.size(1), ",) to match x's channels, got ", t.sizes());
  return t.to(x.scalar_type()).contiguous();
}

// x's layout as the kernels see it: channels_last only when x is channels_last-contiguous and not
// NCHW-contiguous (the rule the Python fake impls follow); any other strides are made NCHW-contiguous.
at::MemoryFormat layout_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                              : at::MemoryFormat::Contiguous;
}

// The layout the kernels run in. The NCHW kernels vectorise along rows; a row narrower than one 64-byte vector
// (W < 16 floats: SHViT's 14x14, 8x8, 7x7 and 4x4 maps) leaves every load partial, and those run lane by lane,
// up to 10x slower than the channels_last kernels (vectors across channels) plus the transposes in and out
// (training forward + backward at 16x336x8x8). Such an NCHW x runs channels_last; outputs keep x's layout.
at::MemoryFormat kernel_layout(const at::Tensor& x, const Geom& g) {
  const at::MemoryFormat fmt = layout_of(x);
  const int64_t lanes = 64 / int64_t(x.element_size());
  return fmt == at::MemoryFormat::Contiguous && g.W < lanes ? at::MemoryFormat::ChannelsLast : fmt;
}

// A tensor with y's shape that the kernels read in layout fmt.
at::Tensor like_y(const at::Tensor& t, const char* name, const at::Tensor& x, const Geom& g,
                  at::MemoryFormat fmt) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 4 && t.size(0) == g.B && t.size(1) == g.C && t.size(2) == g.Ho && t.size(3) == g.Wo,
              "shvit dwconv_bn: ", name, " must have the output's shape (", g.B, ", ", g.C, ", ", g.Ho, ", ", g.Wo,
              "), got ", t.sizes());
  return t.to(x.scalar_type()).contiguous(fmt);
}

at::Tensor new_output(const at::Tensor& x, const Geom& g, at::MemoryFormat fmt) {
  return at::empty({g.B, g.C, g.Ho, g.Wo}, x.options().memory_format(fmt));
}

}  // namespace

at::Tensor dwconv_bn_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
                             int64_t stride, bool relu) {
  Geom g = check_conv(x_in, weight, stride);
  const at::Tensor bias_c = per_channel(bias, "bias", x_in);
  const at::MemoryFormat fmt = kernel_layout(x_in, g);
  const at::Tensor x = x_in.contiguous(fmt), w = weight.contiguous();
  g.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor y = new_output(x, g, fmt);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_fwd_cpu", [&] {
    const EvalArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                  bias_c.const_data_ptr<scalar_t>(), relu, y.mutable_data_ptr<scalar_t>()};
    SHVIT_ISA_DISPATCH(detail, eval_fwd<scalar_t>(g, args));
  });
  return y.contiguous(layout_of(x_in));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_train_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    double eps, int64_t stride, bool residual, bool relu) {
  Geom g = check_train(x_in, weight, stride, residual, eps);
  const at::Tensor gamma = per_channel(bn_weight, "bn_weight", x_in), beta = per_channel(bn_bias, "bn_bias", x_in);
  const at::MemoryFormat fmt = kernel_layout(x_in, g);
  const at::Tensor x = x_in.contiguous(fmt), w = weight.contiguous();
  g.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor y = new_output(x, g, fmt);
  at::Tensor mean = at::empty({g.C}, x.options()), var = at::empty({g.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_train_fwd_cpu", [&] {
    const TrainFwdArgs<scalar_t> args{x.const_data_ptr<scalar_t>(),     w.const_data_ptr<scalar_t>(),
                                      gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
                                      eps,                              residual,
                                      relu,                             y.mutable_data_ptr<scalar_t>(),
                                      mean.mutable_data_ptr<scalar_t>(), var.mutable_data_ptr<scalar_t>()};
    SHVIT_ISA_DISPATCH(detail, train_fwd<scalar_t>(g, args));
  });
  return {y.contiguous(layout_of(x_in)), mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_train_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& mean_in, const at::Tensor& var_in, const at::Tensor& y_in, double eps, int64_t stride,
    bool residual, bool relu) {
  Geom g = check_train(x_in, weight, stride, residual, eps);
  const at::Tensor gamma = per_channel(bn_weight, "bn_weight", x_in);
  const at::Tensor mean = per_channel(mean_in, "mean", x_in), var = per_channel(var_in, "var", x_in);
  const at::MemoryFormat fmt = kernel_layout(x_in, g);
  const at::Tensor x = x_in.contiguous(fmt), w = weight.contiguous();
  const at::Tensor gy = like_y(grad_y, "grad_y", x_in, g, fmt);
  // y is read only for the ReLU mask.
  const at::Tensor y = relu ? like_y(y_in, "y", x_in, g, fmt) : gy;
  g.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor gw = at::empty(w.sizes(), w.options());
  at::Tensor ggamma = at::empty({g.C}, x.options()), gbeta = at::empty({g.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_train_bwd_cpu", [&] {
    const TrainBwdArgs<scalar_t> args{gy.const_data_ptr<scalar_t>(),     x.const_data_ptr<scalar_t>(),
                                      w.const_data_ptr<scalar_t>(),      gamma.const_data_ptr<scalar_t>(),
                                      mean.const_data_ptr<scalar_t>(),   var.const_data_ptr<scalar_t>(),
                                      y.const_data_ptr<scalar_t>(),      eps,
                                      residual,                          relu,
                                      gx.mutable_data_ptr<scalar_t>(),   gw.mutable_data_ptr<scalar_t>(),
                                      ggamma.mutable_data_ptr<scalar_t>(), gbeta.mutable_data_ptr<scalar_t>()};
    SHVIT_ISA_DISPATCH(detail, train_bwd<scalar_t>(g, args));
  });
  const auto pdt = bn_weight.scalar_type();
  return {gx.contiguous(layout_of(x_in)), gw, ggamma.to(pdt), gbeta.to(pdt)};
}

}  // namespace shvit::cpu
