// Launchers of the fused depthwise conv + BN: argument checks, the choice of kernel family (NCHW or channels_last)
// and the sequence of passes (see dwconv_bn.cuh). Launches: eval 1; training forward 3 (stats, reduce, apply);
// training backward 6 (grad sums, reduce, dz, grad_w partials, reduce, grad_x).
#include <climits>

#include "dwconv_bn.cuh"

namespace shvit::cuda {
namespace {

bool channels_last(const DwShape& s, Strides4 xs) { return s.C > 1 && xs.c == 1; }

Status check_shape(const DwShape& s, bool residual) {
  if (s.k < 1 || s.k > 7 || s.k % 2 == 0) return invalid("dwconv_bn: kernel size must be 1, 3, 5 or 7");
  if (s.stride != 1 && s.stride != 2) return invalid("dwconv_bn: stride must be 1 or 2");
  if (s.B < 1 || s.C < 1 || s.H < 1 || s.W < 1) return invalid("dwconv_bn: empty input");
  if (residual && s.stride != 1) return invalid("dwconv_bn: residual needs stride 1");
  // Pixel counts bound every grid's x dimension.
  if (s.B * s.H * s.W > INT_MAX || s.C > INT_MAX) return invalid("dwconv_bn: input too large");
  return kOk;
}

dw::Args make_args(const DwShape& s, const void* x, Strides4 xs, const float* w) {
  dw::Args a{};
  a.s = s;
  a.Ho = s.Ho();
  a.Wo = s.Wo();
  a.x = x;
  a.xs = xs;
  a.w = w;
  return a;
}

Status conv(DType dt, dw::Mode mode, const dw::Args& a, cudaStream_t stream) {
  return channels_last(a.s, a.xs) ? dw::conv_cl(dt, mode, a, stream) : dw::conv_nchw(dt, mode, a, stream);
}

int64_t conv_partials(DType dt, const DwShape& s, Strides4 xs) {
  return channels_last(s, xs) ? dw::conv_partials_cl(dt, s) : dw::conv_partials_nchw(s);
}

}  // namespace

Status dwconv_bn_fwd(DType dt, const DwShape& s, const void* x, Strides4 xs, const float* w, const float* bias,
                     bool relu, void* y, Strides4 ys, cudaStream_t stream) {
  SHVIT_TRY(check_shape(s, false));
  if (channels_last(s, xs) && ys.c != 1) return invalid("dwconv_bn: y must be channels_last like x");
  dw::Args a = make_args(s, x, xs, w);
  a.shift = bias;
  a.relu = relu;
  a.y = y;
  a.ys = ys;
  return conv(dt, dw::Mode::kForward, a, stream);
}

int64_t dwconv_bn_train_fwd_workspace(DType dt, const DwShape& s, Strides4 xs) {
  return 3 * conv_partials(dt, s, xs) * s.C;
}

Status dwconv_bn_train_fwd(DType dt, const DwShape& s, const void* x, Strides4 xs, const float* w,
                           const float* bn_w, const float* bn_b, float eps, bool residual, bool relu, void* y,
                           Strides4 ys, float* mean, float* var, float* workspace, cudaStream_t stream) {
  SHVIT_TRY(check_shape(s, residual));
  if (channels_last(s, xs) && ys.c != 1) return invalid("dwconv_bn: y must be channels_last like x");
  dw::Args a = make_args(s, x, xs, w);
  a.part = workspace;
  SHVIT_TRY(conv(dt, dw::Mode::kStats, a, stream));
  SHVIT_TRY(welford_partials(workspace, conv_partials(dt, s, xs), s.C, mean, var, stream, "dwconv_bn/stats reduce"));
  a.mean = mean;
  a.var = var;
  a.bn_w = bn_w;
  a.shift = bn_b;
  a.eps = eps;
  a.residual = residual;
  a.relu = relu;
  a.y = y;
  a.ys = ys;
  return conv(dt, dw::Mode::kForward, a, stream);
}

namespace {
// dz (fp32, every output) first, rounded up to 16 bytes; the partials after it.
int64_t dz_floats(const DwShape& s) { return (s.B * s.C * s.Ho() * s.Wo() + 3) / 4 * 4; }
}  // namespace

int64_t dwconv_bn_train_bwd_workspace(DType dt, const DwShape& s, Strides4 xs) {
  const int64_t sums = 2 * conv_partials(dt, s, xs) * s.C, gw = dw::grad_w_partials(s) * s.C * s.k * s.k;
  return dz_floats(s) + (sums > gw ? sums : gw);
}

Status dwconv_bn_train_bwd(DType dt, const DwShape& s, const void* grad_y, const void* x, Strides4 xs,
                           const float* w, const float* bn_w, const float* mean, const float* var, const void* y,
                           Strides4 ys, float eps, bool residual, bool relu, void* grad_x, Strides4 gxs,
                           float* grad_w, float* grad_bn, float* workspace, cudaStream_t stream) {
  SHVIT_TRY(check_shape(s, residual));
  const bool cl = channels_last(s, xs);
  if (cl && (ys.c != 1 || gxs.c != 1)) return invalid("dwconv_bn: y, grad_y and grad_x must be channels_last like x");
  dw::Args a = make_args(s, x, xs, w);
  a.gy = grad_y;
  a.yf = relu ? y : nullptr;
  a.ys = ys;
  a.mean = mean;
  a.var = var;
  a.bn_w = bn_w;
  a.eps = eps;
  a.residual = residual;
  a.relu = relu;
  a.dz = workspace;
  a.part = workspace + dz_floats(s);
  a.sums = grad_bn;
  a.gx = grad_x;
  a.gxs = gxs;
  SHVIT_TRY(conv(dt, dw::Mode::kGradSums, a, stream));
  SHVIT_TRY(sum_partials(a.part, conv_partials(dt, s, xs), 2 * s.C, grad_bn, stream, "dwconv_bn/grad sums reduce"));
  SHVIT_TRY(conv(dt, dw::Mode::kGradZ, a, stream));
  SHVIT_TRY(cl ? dw::grad_w_cl(dt, a, stream) : dw::grad_w_nchw(dt, a, stream));
  SHVIT_TRY(sum_partials(a.part, dw::grad_w_partials(s), s.C * s.k * s.k, grad_w, stream, "dwconv_bn/grad_w reduce"));
  return cl ? dw::grad_x_cl(dt, a, stream) : dw::grad_x_nchw(dt, a, stream);
}

}  // namespace shvit::cuda
