// Torch bindings of the CUDA kernels (compiled only when torch has CUDA; the kernels themselves are torch-free):
// argument checks naming the argument, output and scratch allocation on the caching allocator, and the launch on
// the current stream. Nothing here synchronises or reads device memory, so the ops can be captured in a CUDA graph.
// Schemas mirror the CPU ones (csrc/cpu/registration.cpp, shsa.cpp) with the suffix _cuda.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "launchers.h"

namespace shvit::cuda {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": the CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// t is a floating CUDA tensor with `dim` dims on x's device.
void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.sizes());
}

void check_vector(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t n) {
  check_tensor(t, name, x, 1);
  TORCH_CHECK(t.size(0) == n, name, " must have shape (", n, "), got ", t.sizes());
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type());
}

void check_status(const Status& st) {
  TORCH_CHECK(st.ok(), "shvit CUDA kernel failed in ", st.where, ": ", cudaGetErrorString(st.code));
}

// The current stream of the current device (the CUDAGuard of each op sets x's device); the same stream as
// at::cuda::getCurrentCUDAStream(), from the light c10 header.
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Small parameters and statistics go to the kernels as contiguous fp32.
at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

at::Tensor scratch(const at::Tensor& x, int64_t floats) { return at::empty({floats}, x.options().dtype(at::kFloat)); }

Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The layout rule of the CPU kernels and the Python op: channels_last when x is channels_last-contiguous and not
// NCHW-contiguous.
at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous;
}

// t with the canonical strides of `fmt`, so that tensors of one shape share strides (is_contiguous tolerates any
// stride on size-1 dims, which the kernels, indexing grad_y with y's strides, do not).
at::Tensor canonical(const at::Tensor& t, at::MemoryFormat fmt) {
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(fmt));
  if (t.strides() == out.strides()) return t;
  out.copy_(t);
  return out;
}

// ---- depthwise conv + BN --------------------------------------------------------------------------------------

DwShape dw_shape(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  check_tensor(x, "x", x, 4);
  dtype_of(x, "x");
  check_tensor(weight, "weight", x, 4);
  check_same_dtype(weight, "weight", x);
  const int64_t c = x.size(1), k = weight.size(3);
  TORCH_CHECK(weight.size(0) == c && weight.size(1) == 1 && weight.size(2) == k,
              "weight must have shape (", c, ", 1, k, k) for x with ", c, " channels, got ", weight.sizes());
  TORCH_CHECK(k % 2 == 1 && k <= 7, "weight: kernel size must be odd and at most 7, got ", k);
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  TORCH_CHECK(x.numel() > 0, "x must be non-empty, got shape ", x.sizes());
  return DwShape{x.size(0), c, x.size(2), x.size(3), static_cast<int>(k), static_cast<int>(stride)};
}

at::Tensor dw_weight(const at::Tensor& weight, const DwShape& s) { return f32(weight.reshape({s.C, s.k * s.k})); }

at::Tensor dwconv_bn_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t stride,
                              bool relu) {
  const DwShape s = dw_shape(x, weight, stride);
  check_vector(bias, "bias", x, s.C);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = layout_of(x);
  const at::Tensor xc = canonical(x, fmt), w = dw_weight(weight, s), b = f32(bias);
  at::Tensor y = at::empty({s.B, s.C, s.Ho(), s.Wo()}, x.options().memory_format(fmt));
  check_status(dwconv_bn_fwd(dtype_of(x, "x"), s, xc.data_ptr(), strides4(xc), w.data_ptr<float>(),
                             b.data_ptr<float>(), relu, y.data_ptr(), strides4(y),
                             stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_train_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                        const at::Tensor& bn_weight,
                                                                        const at::Tensor& bn_bias, double eps,
                                                                        int64_t stride, bool residual, bool relu) {
  const DwShape s = dw_shape(x, weight, stride);
  check_vector(bn_weight, "bn_weight", x, s.C);
  check_vector(bn_bias, "bn_bias", x, s.C);
  TORCH_CHECK(!residual || stride == 1, "residual=True needs stride=1");
  TORCH_CHECK(s.B * s.Ho() * s.Wo() > 1, "x: BatchNorm training needs more than 1 value per channel, got shape ",
              x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const DType dt = dtype_of(x, "x");
  const at::MemoryFormat fmt = layout_of(x);
  const at::Tensor xc = canonical(x, fmt), w = dw_weight(weight, s), bw = f32(bn_weight), bb = f32(bn_bias);
  at::Tensor y = at::empty({s.B, s.C, s.Ho(), s.Wo()}, x.options().memory_format(fmt));
  at::Tensor mean = scratch(x, s.C), var = scratch(x, s.C);
  at::Tensor work = scratch(x, dwconv_bn_train_fwd_workspace(dt, s, strides4(xc)));
  check_status(dwconv_bn_train_fwd(dt, s, xc.data_ptr(), strides4(xc), w.data_ptr<float>(), bw.data_ptr<float>(),
                                   bb.data_ptr<float>(), static_cast<float>(eps), residual, relu, y.data_ptr(),
                                   strides4(y), mean.data_ptr<float>(), var.data_ptr<float>(),
                                   work.data_ptr<float>(), stream()));
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_train_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& y, double eps, int64_t stride, bool residual,
    bool relu) {
  const DwShape s = dw_shape(x, weight, stride);
  check_vector(bn_weight, "bn_weight", x, s.C);
  check_vector(mean, "mean", x, s.C);
  check_vector(var, "var", x, s.C);
  check_tensor(grad_y, "grad_y", x, 4);
  check_tensor(y, "y", x, 4);
  check_same_dtype(grad_y, "grad_y", x);
  check_same_dtype(y, "y", x);
  const std::vector<int64_t> out_shape{s.B, s.C, s.Ho(), s.Wo()};
  TORCH_CHECK(grad_y.sizes() == out_shape, "grad_y must have shape ", out_shape, ", got ", grad_y.sizes());
  TORCH_CHECK(y.sizes() == out_shape, "y must have shape ", out_shape, ", got ", y.sizes());
  TORCH_CHECK(!residual || stride == 1, "residual=True needs stride=1");
  const c10::cuda::CUDAGuard guard(x.device());
  const DType dt = dtype_of(x, "x");
  const at::MemoryFormat fmt = layout_of(x);
  const at::Tensor xc = canonical(x, fmt), gy = canonical(grad_y, fmt), yc = canonical(y, fmt);
  const at::Tensor w = dw_weight(weight, s), bw = f32(bn_weight), m = f32(mean), v = f32(var);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor gw = scratch(x, s.C * s.k * s.k), gbn = scratch(x, 2 * s.C);
  at::Tensor work = scratch(x, dwconv_bn_train_bwd_workspace(dt, s, strides4(xc)));
  check_status(dwconv_bn_train_bwd(dt, s, gy.data_ptr(), xc.data_ptr(), strides4(xc), w.data_ptr<float>(),
                                   bw.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), yc.data_ptr(),
                                   strides4(yc), static_cast<float>(eps), residual, relu, gx.data_ptr(),
                                   strides4(gx), gw.data_ptr<float>(), gbn.data_ptr<float>(), work.data_ptr<float>(),
                                   stream()));
  // copy=true: the two BN grads are slices of one buffer and op outputs must not alias.
  const auto pd = bn_weight.scalar_type();
  return {gx, gw.view(weight.sizes()).to(weight.scalar_type()), gbn.slice(0, s.C).to(pd, false, true),
          gbn.slice(0, 0, s.C).to(pd, false, true)};
}

// ---- SHSA ---------------------------------------------------------------------------------------------------------

// Checked shape and the parameters as the kernels take them (fp32 vectors, contiguous weights in x's dtype). The
// at::Tensor members keep the converted copies alive for the launch.
struct ShsaArgs {
  ShsaShape s;
  at::Tensor x, gn_w, gn_b, qkv_w, proj_w, qkv_b, proj_b;  // eval: qkv_b / proj_b are the folded biases,
  ShsaParams p{};                                           // training: the BN weights / biases below
  at::Tensor qkv_bn_w, qkv_bn_b, proj_bn_w, proj_bn_b;
};

ShsaArgs shsa_args(const at::Tensor& x, const at::Tensor& gn_w, const at::Tensor& gn_b, double gn_eps,
                   const at::Tensor& qkv_w, const at::Tensor& proj_w, int64_t qk_dim) {
  check_tensor(x, "x", x, 4);
  dtype_of(x, "x");
  TORCH_CHECK(qk_dim > 0, "qk_dim must be positive, got ", qk_dim);
  check_tensor(gn_w, "gn_w", x, 1);
  const int64_t c = x.size(1), pd = gn_w.size(0), o = 2 * qk_dim + pd;
  TORCH_CHECK(pd > 0 && pd <= c, "gn_w: pdim (", pd, ") must be in 1..dim, and x has dim=", c, " channels");
  check_vector(gn_b, "gn_b", x, pd);
  check_tensor(qkv_w, "qkv_w", x, 2);
  check_tensor(proj_w, "proj_w", x, 2);
  TORCH_CHECK(qkv_w.size(0) == o && qkv_w.size(1) == pd, "qkv_w must have shape (", o, ", ", pd, "), got ",
              qkv_w.sizes());
  TORCH_CHECK(proj_w.size(0) == c && proj_w.size(1) == c, "proj_w must have shape (", c, ", ", c, "), got ",
              proj_w.sizes());
  check_same_dtype(qkv_w, "qkv_w", x);
  check_same_dtype(proj_w, "proj_w", x);
  TORCH_CHECK(x.numel() > 0, "x must be non-empty, got shape ", x.sizes());
  ShsaArgs a;
  a.s = ShsaShape{x.size(0), c, pd, qk_dim, x.size(2) * x.size(3)};
  a.x = x.contiguous();
  a.gn_w = f32(gn_w);
  a.gn_b = f32(gn_b);
  a.qkv_w = qkv_w.contiguous();
  a.proj_w = proj_w.contiguous();
  a.p.gn_w = a.gn_w.data_ptr<float>();
  a.p.gn_b = a.gn_b.data_ptr<float>();
  a.p.gn_eps = static_cast<float>(gn_eps);
  a.p.qkv_w = a.qkv_w.data_ptr();
  a.p.proj_w = a.proj_w.data_ptr();
  return a;
}

void shsa_eval_params(ShsaArgs& a, const at::Tensor& qkv_b, const at::Tensor& proj_b) {
  check_vector(qkv_b, "qkv_b", a.x, 2 * a.s.Q + a.s.P);
  check_vector(proj_b, "proj_b", a.x, a.s.C);
  a.qkv_b = f32(qkv_b);
  a.proj_b = f32(proj_b);
  a.p.qkv_b = a.qkv_b.data_ptr<float>();
  a.p.proj_b = a.proj_b.data_ptr<float>();
}

void shsa_train_params(ShsaArgs& a, const at::Tensor& qkv_bn_w, const at::Tensor& qkv_bn_b, double qkv_eps,
                       const at::Tensor& proj_bn_w, const at::Tensor& proj_bn_b, double proj_eps) {
  const int64_t o = 2 * a.s.Q + a.s.P;
  check_vector(qkv_bn_w, "qkv_bn_w", a.x, o);
  check_vector(qkv_bn_b, "qkv_bn_b", a.x, o);
  check_vector(proj_bn_w, "proj_bn_w", a.x, a.s.C);
  check_vector(proj_bn_b, "proj_bn_b", a.x, a.s.C);
  TORCH_CHECK(a.s.B * a.s.N > 1, "x: BatchNorm training needs more than 1 value per channel, got shape ",
              a.x.sizes());
  a.qkv_bn_w = f32(qkv_bn_w);
  a.qkv_bn_b = f32(qkv_bn_b);
  a.proj_bn_w = f32(proj_bn_w);
  a.proj_bn_b = f32(proj_bn_b);
  a.p.qkv_bn_w = a.qkv_bn_w.data_ptr<float>();
  a.p.qkv_bn_b = a.qkv_bn_b.data_ptr<float>();
  a.p.qkv_eps = static_cast<float>(qkv_eps);
  a.p.proj_bn_w = a.proj_bn_w.data_ptr<float>();
  a.p.proj_bn_b = a.proj_bn_b.data_ptr<float>();
  a.p.proj_eps = static_cast<float>(proj_eps);
}

at::Tensor workspace(const ShsaArgs& a, bool train, bool backward) {
  return at::empty({shsa_workspace(dtype_of(a.x, "x"), a.s, train, backward)}, a.x.options().dtype(at::kByte));
}

at::Tensor grad_y_like(const at::Tensor& gy, const ShsaArgs& a) {
  check_tensor(gy, "gy", a.x, 4);
  check_same_dtype(gy, "gy", a.x);
  TORCH_CHECK(gy.sizes() == a.x.sizes(), "gy must have x's shape ", a.x.sizes(), ", got ", gy.sizes());
  return gy.contiguous();
}

// fp32 gradient buffers in the layout of ShsaGrads.
struct ShsaGradBuffers {
  at::Tensor gn, qkv_w, qkv_bn, proj_w, proj_bn;
  ShsaGrads ptrs() { return {gn.data_ptr<float>(), qkv_w.data_ptr<float>(), qkv_bn.data_ptr<float>(),
                             proj_w.data_ptr<float>(), proj_bn.data_ptr<float>()}; }
};

ShsaGradBuffers grad_buffers(const ShsaArgs& a) {
  const int64_t o = 2 * a.s.Q + a.s.P;
  return {scratch(a.x, 2 * a.s.P), scratch(a.x, o * a.s.P), scratch(a.x, 2 * o), scratch(a.x, a.s.C * a.s.C),
          scratch(a.x, 2 * a.s.C)};
}

// Slice [i*n, (i+1)*n) of an fp32 buffer in dtype `like` (a copy: op outputs must not alias each other).
at::Tensor part_as(const at::Tensor& buf, int64_t i, int64_t n, const at::Tensor& like) {
  return buf.slice(0, i * n, (i + 1) * n).to(like.scalar_type(), false, true);
}

at::Tensor shsa_fwd_cuda(const at::Tensor& x, const at::Tensor& gn_w, const at::Tensor& gn_b, double gn_eps,
                         const at::Tensor& qkv_w, const at::Tensor& qkv_b, const at::Tensor& proj_w,
                         const at::Tensor& proj_b, int64_t qk_dim, bool residual) {
  ShsaArgs a = shsa_args(x, gn_w, gn_b, gn_eps, qkv_w, proj_w, qk_dim);
  shsa_eval_params(a, qkv_b, proj_b);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(a.x), work = workspace(a, false, false);
  check_status(shsa_fwd(dtype_of(x, "x"), a.s, a.x.data_ptr(), a.p, residual, y.data_ptr(), work.data_ptr(), stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shsa_bwd_cuda(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gn_w, const at::Tensor& gn_b, double gn_eps,
    const at::Tensor& qkv_w, const at::Tensor& qkv_b, const at::Tensor& proj_w, const at::Tensor& proj_b,
    int64_t qk_dim, bool residual) {
  ShsaArgs a = shsa_args(x, gn_w, gn_b, gn_eps, qkv_w, proj_w, qk_dim);
  shsa_eval_params(a, qkv_b, proj_b);
  const at::Tensor g = grad_y_like(gy, a);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gx = at::empty_like(a.x), work = workspace(a, false, true);
  ShsaGradBuffers gb = grad_buffers(a);
  check_status(shsa_bwd(dtype_of(x, "x"), a.s, g.data_ptr(), a.x.data_ptr(), a.p, residual, gx.data_ptr(), gb.ptrs(),
                        work.data_ptr(), stream()));
  const int64_t o = 2 * a.s.Q + a.s.P;
  return {gx,
          part_as(gb.gn, 1, a.s.P, gn_w),
          part_as(gb.gn, 0, a.s.P, gn_b),
          gb.qkv_w.view({o, a.s.P}).to(qkv_w.scalar_type()),
          part_as(gb.qkv_bn, 0, o, qkv_b),
          gb.proj_w.view({a.s.C, a.s.C}).to(proj_w.scalar_type()),
          part_as(gb.proj_bn, 0, a.s.C, proj_b)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shsa_train_fwd_cuda(
    const at::Tensor& x, const at::Tensor& gn_w, const at::Tensor& gn_b, double gn_eps, const at::Tensor& qkv_w,
    const at::Tensor& qkv_bn_w, const at::Tensor& qkv_bn_b, double qkv_eps, const at::Tensor& proj_w,
    const at::Tensor& proj_bn_w, const at::Tensor& proj_bn_b, double proj_eps, int64_t qk_dim, bool residual) {
  ShsaArgs a = shsa_args(x, gn_w, gn_b, gn_eps, qkv_w, proj_w, qk_dim);
  shsa_train_params(a, qkv_bn_w, qkv_bn_b, qkv_eps, proj_bn_w, proj_bn_b, proj_eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t o = 2 * a.s.Q + a.s.P;
  at::Tensor y = at::empty_like(a.x), work = workspace(a, true, false);
  at::Tensor qm = scratch(x, o), qv = scratch(x, o), pm = scratch(x, a.s.C), pv = scratch(x, a.s.C);
  const ShsaStats st{qm.data_ptr<float>(), qv.data_ptr<float>(), pm.data_ptr<float>(), pv.data_ptr<float>()};
  check_status(shsa_train_fwd(dtype_of(x, "x"), a.s, a.x.data_ptr(), a.p, residual, y.data_ptr(), st, work.data_ptr(),
                              stream()));
  return {y, qm, qv, pm, pv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
shsa_train_bwd_cuda(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gn_w, const at::Tensor& gn_b,
                    double gn_eps, const at::Tensor& qkv_w, const at::Tensor& qkv_bn_w, const at::Tensor& qkv_bn_b,
                    double qkv_eps, const at::Tensor& proj_w, const at::Tensor& proj_bn_w,
                    const at::Tensor& proj_bn_b, double proj_eps, const at::Tensor& qkv_mean,
                    const at::Tensor& qkv_var, const at::Tensor& proj_mean, const at::Tensor& proj_var,
                    int64_t qk_dim, bool residual) {
  ShsaArgs a = shsa_args(x, gn_w, gn_b, gn_eps, qkv_w, proj_w, qk_dim);
  shsa_train_params(a, qkv_bn_w, qkv_bn_b, qkv_eps, proj_bn_w, proj_bn_b, proj_eps);
  const int64_t o = 2 * a.s.Q + a.s.P;
  check_vector(qkv_mean, "qkv_mean", x, o);
  check_vector(qkv_var, "qkv_var", x, o);
  check_vector(proj_mean, "proj_mean", x, a.s.C);
  check_vector(proj_var, "proj_var", x, a.s.C);
  const at::Tensor g = grad_y_like(gy, a);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor qm = f32(qkv_mean), qv = f32(qkv_var), pm = f32(proj_mean), pv = f32(proj_var);
  const ShsaStats st{qm.data_ptr<float>(), qv.data_ptr<float>(), pm.data_ptr<float>(), pv.data_ptr<float>()};
  at::Tensor gx = at::empty_like(a.x), work = workspace(a, true, true);
  ShsaGradBuffers gb = grad_buffers(a);
  check_status(shsa_train_bwd(dtype_of(x, "x"), a.s, g.data_ptr(), a.x.data_ptr(), a.p, st, residual, gx.data_ptr(),
                              gb.ptrs(), work.data_ptr(), stream()));
  return {gx,
          part_as(gb.gn, 1, a.s.P, gn_w),
          part_as(gb.gn, 0, a.s.P, gn_b),
          gb.qkv_w.view({o, a.s.P}).to(qkv_w.scalar_type()),
          part_as(gb.qkv_bn, 1, o, qkv_bn_w),
          part_as(gb.qkv_bn, 0, o, qkv_bn_b),
          gb.proj_w.view({a.s.C, a.s.C}).to(proj_w.scalar_type()),
          part_as(gb.proj_bn, 1, a.s.C, proj_bn_w),
          part_as(gb.proj_bn, 0, a.s.C, proj_bn_b)};
}

std::string cuda_build_info() {
  const int v = build_cuda_version();
  return "CUDA " + std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10) + "; archs " + build_archs();
}

}  // namespace
}  // namespace shvit::cuda

TORCH_LIBRARY_FRAGMENT(shvit, m) {
  // Present only in builds with the CUDA kernels: shvit_kernels._ext.has_cuda_kernels() looks for it.
  m.def("cuda_build_info() -> str", &shvit::cuda::cuda_build_info);
  m.def("dwconv_bn_fwd_cuda(Tensor x, Tensor weight, Tensor bias, int stride, bool relu) -> Tensor");
  m.def(
      "dwconv_bn_train_fwd_cuda(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, float eps, int stride, "
      "bool residual, bool relu) -> (Tensor y, Tensor mean, Tensor var)");
  m.def(
      "dwconv_bn_train_bwd_cuda(Tensor grad_y, Tensor x, Tensor weight, Tensor bn_weight, Tensor mean, Tensor var, "
      "Tensor y, float eps, int stride, bool residual, bool relu) -> (Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias)");
  m.def(
      "shsa_fwd_cuda(Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, Tensor qkv_b, Tensor proj_w, "
      "Tensor proj_b, int qk_dim, bool residual) -> Tensor");
  m.def(
      "shsa_bwd_cuda(Tensor gy, Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, Tensor qkv_b, "
      "Tensor proj_w, Tensor proj_b, int qk_dim, bool residual) -> (Tensor gx, Tensor g_gn_w, Tensor g_gn_b, "
      "Tensor g_qkv_w, Tensor g_qkv_b, Tensor g_proj_w, Tensor g_proj_b)");
  m.def(
      "shsa_train_fwd_cuda(Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, Tensor qkv_bn_w, "
      "Tensor qkv_bn_b, float qkv_eps, Tensor proj_w, Tensor proj_bn_w, Tensor proj_bn_b, float proj_eps, "
      "int qk_dim, bool residual) -> (Tensor y, Tensor qkv_mean, Tensor qkv_var, Tensor proj_mean, "
      "Tensor proj_var)");
  m.def(
      "shsa_train_bwd_cuda(Tensor gy, Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, "
      "Tensor qkv_bn_w, Tensor qkv_bn_b, float qkv_eps, Tensor proj_w, Tensor proj_bn_w, Tensor proj_bn_b, "
      "float proj_eps, Tensor qkv_mean, Tensor qkv_var, Tensor proj_mean, Tensor proj_var, int qk_dim, "
      "bool residual) -> (Tensor gx, Tensor g_gn_w, Tensor g_gn_b, Tensor g_qkv_w, Tensor g_qkv_bn_w, "
      "Tensor g_qkv_bn_b, Tensor g_proj_w, Tensor g_proj_bn_w, Tensor g_proj_bn_b)");
}

TORCH_LIBRARY_IMPL(shvit, CUDA, m) {
  m.impl("dwconv_bn_fwd_cuda", &shvit::cuda::dwconv_bn_fwd_cuda);
  m.impl("dwconv_bn_train_fwd_cuda", &shvit::cuda::dwconv_bn_train_fwd_cuda);
  m.impl("dwconv_bn_train_bwd_cuda", &shvit::cuda::dwconv_bn_train_bwd_cuda);
  m.impl("shsa_fwd_cuda", &shvit::cuda::shsa_fwd_cuda);
  m.impl("shsa_bwd_cuda", &shvit::cuda::shsa_bwd_cuda);
  m.impl("shsa_train_fwd_cuda", &shvit::cuda::shsa_train_fwd_cuda);
  m.impl("shsa_train_bwd_cuda", &shvit::cuda::shsa_train_bwd_cuda);
}
