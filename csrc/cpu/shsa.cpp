// Fused SHSA (SHViT single-head self-attention) on the CPU: eval and training forms, forward and backward,
// float32 / float64. The spec, argument lists and outputs are those of shvit_kernels/reference/shsa.py. This file
// checks the arguments, allocates the outputs and runs the kernels (shsa_kernels.inc, with the algorithm) compiled
// for the best instruction set of this CPU (isa.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "shsa_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace shvit::cpu {
namespace {

using shsa::Dims;

constexpr int64_t kQueryBlock = 128;  // query rows per attention block once N > 2 * kQueryBlock
constexpr int64_t kGroupCols = 256;   // small samples are grouped so that GEMMs see about this many tokens...
constexpr int64_t kMinTasks = 4;      // ...while the batch still gives this many tasks

Dims make_dims(const at::Tensor& x, int64_t pdim, int64_t qk_dim) {
  Dims d{};
  d.B = x.size(0);
  d.C = x.size(1);
  d.P = pdim;
  d.Q = qk_dim;
  d.O = 2 * qk_dim + pdim;
  d.N = x.size(2) * x.size(3);
  // One block while the scores of all queries fit comfortably in L2; beyond that memory stays O(bm * N).
  d.bm = d.N <= 2 * kQueryBlock ? d.N : kQueryBlock;
  d.G = d.blocks() == 1 ? std::clamp<int64_t>(kGroupCols / d.N, 1, std::max<int64_t>(1, d.B / kMinTasks)) : 1;
  d.scale = 1.0 / std::sqrt(static_cast<double>(qk_dim));
  return d;
}

// ---- argument checks ------------------------------------------------------------------------------------

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "shvit shsa (CPU kernel): ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "shvit shsa (CPU kernel): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "shvit shsa (CPU kernel): ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// Checks x, the weight matrices and qk_dim; returns the dimensions.
Dims check_main(const at::Tensor& x, const at::Tensor& gn_w, const at::Tensor& qkv_w, const at::Tensor& proj_w,
                int64_t qk_dim) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 4, "shvit shsa: x must be 4-D (B, dim, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0,
              "shvit shsa: x must have non-empty channel and spatial dims, got shape ", x.sizes());
  TORCH_CHECK(qk_dim > 0, "shvit shsa: qk_dim must be positive, got ", qk_dim);
  check_float(gn_w, "gn_w");
  TORCH_CHECK(gn_w.dim() == 1 && gn_w.size(0) > 0 && gn_w.size(0) <= x.size(1), "shvit shsa: gn_w must have shape ",
              "(pdim,) with 0 < pdim <= dim = ", x.size(1), ", got ", gn_w.sizes());
  const int64_t p = gn_w.size(0), c = x.size(1);
  for (const auto& [t, name, rows, cols] : {std::make_tuple(&qkv_w, "qkv_w", 2 * qk_dim + p, p),
                                            std::make_tuple(&proj_w, "proj_w", c, c)}) {
    check_float(*t, name);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == cols, "shvit shsa: ", name,
                " must have shape (", rows, ", ", cols, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "shvit shsa: ", name, " dtype ", t->scalar_type(),
                " does not match x dtype ", x.scalar_type());
  }
  return make_dims(x, p, qk_dim);
}

// A per-channel vector of length n, as a contiguous tensor of x's dtype.
at::Tensor vec(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& x) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "shvit shsa: ", name, " must have shape (", n, ",), got ", t.sizes());
  return t.to(x.scalar_type()).contiguous();
}

void check_eps(double eps, const char* name) {
  TORCH_CHECK(eps >= 0, "shvit shsa: ", name, " must be non-negative, got ", eps);
}

at::Tensor grad_like_x(const at::Tensor& gy, const at::Tensor& x) {
  check_float(gy, "gy");
  TORCH_CHECK(gy.sizes() == x.sizes(), "shvit shsa: gy must have x's shape ", x.sizes(), ", got ", gy.sizes());
  return gy.to(x.scalar_type()).contiguous();
}

// The pre-BN proj that the training forward keeps for the backward (optional): a contiguous tensor like x.
const at::Tensor* kept_proj(const std::optional<at::Tensor>& z, const at::Tensor& x) {
  if (!z) return nullptr;
  check_float(*z, "proj_z");
  TORCH_CHECK(z->sizes() == x.sizes() && z->scalar_type() == x.scalar_type() && z->is_contiguous(),
              "shvit shsa: proj_z must be a contiguous tensor of x's shape ", x.sizes(), " and dtype ",
              x.scalar_type(), ", got ", z->sizes(), " ", z->scalar_type());
  return &*z;
}

void check_batch_stats(const Dims& d) {
  TORCH_CHECK(d.B * d.N > 1, "shvit shsa: BatchNorm training needs more than 1 value per channel, got B = ", d.B,
              " and H * W = ", d.N);
}

// ---- op entry points ----------------------------------------------------------------------------------------

at::Tensor shsa_fwd_cpu(const at::Tensor& x_in, const at::Tensor& gn_w_in, const at::Tensor& gn_b_in, double gn_eps,
                        const at::Tensor& qkv_w_in, const at::Tensor& qkv_b_in, const at::Tensor& proj_w_in,
                        const at::Tensor& proj_b_in, int64_t qk_dim, bool residual) {
  const Dims d = check_main(x_in, gn_w_in, qkv_w_in, proj_w_in, qk_dim);
  check_eps(gn_eps, "gn_eps");
  const at::Tensor x = x_in.contiguous(), qkv_w = qkv_w_in.contiguous(), proj_w = proj_w_in.contiguous();
  const at::Tensor gn_w = vec(gn_w_in, "gn_w", d.P, x), gn_b = vec(gn_b_in, "gn_b", d.P, x);
  const at::Tensor qkv_b = vec(qkv_b_in, "qkv_b", d.O, x), proj_b = vec(proj_b_in, "proj_b", d.C, x);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (d.B == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shsa_fwd_cpu", [&] {
    using T = scalar_t;
    const shsa::EvalFwdArgs<T> a{.x = ptr<T>(x), .gn_w = ptr<T>(gn_w), .gn_b = ptr<T>(gn_b), .gn_eps = gn_eps,
                                 .qkv_w = ptr<T>(qkv_w), .qkv_b = ptr<T>(qkv_b), .proj_w = ptr<T>(proj_w),
                                 .proj_b = ptr<T>(proj_b), .residual = residual, .y = y.mutable_data_ptr<T>()};
    SHVIT_ISA_DISPATCH(shsa, eval_fwd<T>(d, a));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shsa_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& gn_w_in, const at::Tensor& gn_b_in,
    double gn_eps, const at::Tensor& qkv_w_in, const at::Tensor& qkv_b_in, const at::Tensor& proj_w_in,
    const at::Tensor& proj_b_in, int64_t qk_dim, bool residual) {
  const Dims d = check_main(x_in, gn_w_in, qkv_w_in, proj_w_in, qk_dim);
  check_eps(gn_eps, "gn_eps");
  const at::Tensor x = x_in.contiguous(), qkv_w = qkv_w_in.contiguous(), proj_w = proj_w_in.contiguous();
  const at::Tensor gy = grad_like_x(gy_in, x);
  const at::Tensor gn_w = vec(gn_w_in, "gn_w", d.P, x), gn_b = vec(gn_b_in, "gn_b", d.P, x);
  const at::Tensor qkv_b = vec(qkv_b_in, "qkv_b", d.O, x), proj_b = vec(proj_b_in, "proj_b", d.C, x);
  const auto opt = x.options();
  at::Tensor gx = at::empty(x.sizes(), opt), g_gn_w = at::zeros({d.P}, opt), g_gn_b = at::zeros({d.P}, opt);
  at::Tensor g_qkv_w = at::zeros({d.O, d.P}, opt), g_qkv_b = at::zeros({d.O}, opt);
  at::Tensor g_proj_w = at::zeros({d.C, d.C}, opt), g_proj_b = at::zeros({d.C}, opt);
  if (d.B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shsa_bwd_cpu", [&] {
      using T = scalar_t;
      const auto out = [](at::Tensor& t) { return t.mutable_data_ptr<T>(); };
      const shsa::BwdArgs<T> a{.gy = ptr<T>(gy), .x = ptr<T>(x), .gn_w = ptr<T>(gn_w), .gn_b = ptr<T>(gn_b),
                               .gn_eps = gn_eps, .qkv_w = ptr<T>(qkv_w), .proj_w = ptr<T>(proj_w),
                               .qkv = {.b = ptr<T>(qkv_b)}, .proj = {.b = ptr<T>(proj_b)}, .zp = nullptr,
                               .train = false, .residual = residual, .gx = out(gx), .g_gn_w = out(g_gn_w),
                               .g_gn_b = out(g_gn_b), .g_qkv_w = out(g_qkv_w), .g_proj_w = out(g_proj_w),
                               .g_qkv_nb = out(g_qkv_b), .g_proj_nb = out(g_proj_b)};
      SHVIT_ISA_DISPATCH(shsa, backward<T>(d, a));
    });
  } else if (residual) {
    gx.copy_(gy);
  }
  return {gx,
          g_gn_w.to(gn_w_in.scalar_type()),
          g_gn_b.to(gn_b_in.scalar_type()),
          g_qkv_w,
          g_qkv_b.to(qkv_b_in.scalar_type()),
          g_proj_w,
          g_proj_b.to(proj_b_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shsa_train_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& gn_w_in, const at::Tensor& gn_b_in, double gn_eps,
    const at::Tensor& qkv_w_in, const at::Tensor& qkv_bn_w_in, const at::Tensor& qkv_bn_b_in, double qkv_eps,
    const at::Tensor& proj_w_in, const at::Tensor& proj_bn_w_in, const at::Tensor& proj_bn_b_in, double proj_eps,
    int64_t qk_dim, bool residual, const std::optional<at::Tensor>& proj_z) {
  const Dims d = check_main(x_in, gn_w_in, qkv_w_in, proj_w_in, qk_dim);
  const at::Tensor* zp = kept_proj(proj_z, x_in);
  check_batch_stats(d);
  check_eps(gn_eps, "gn_eps");
  check_eps(qkv_eps, "qkv_eps");
  check_eps(proj_eps, "proj_eps");
  const at::Tensor x = x_in.contiguous(), qkv_w = qkv_w_in.contiguous(), proj_w = proj_w_in.contiguous();
  const at::Tensor gn_w = vec(gn_w_in, "gn_w", d.P, x), gn_b = vec(gn_b_in, "gn_b", d.P, x);
  const at::Tensor qkv_bn_w = vec(qkv_bn_w_in, "qkv_bn_w", d.O, x), qkv_bn_b = vec(qkv_bn_b_in, "qkv_bn_b", d.O, x);
  const at::Tensor proj_bn_w = vec(proj_bn_w_in, "proj_bn_w", d.C, x);
  const at::Tensor proj_bn_b = vec(proj_bn_b_in, "proj_bn_b", d.C, x);
  const auto opt = x.options();
  at::Tensor y = at::empty(x.sizes(), opt);
  at::Tensor qkv_mean = at::empty({d.O}, opt), qkv_var = at::empty({d.O}, opt);
  at::Tensor proj_mean = at::empty({d.C}, opt), proj_var = at::empty({d.C}, opt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shsa_train_fwd_cpu", [&] {
    using T = scalar_t;
    const auto out = [](const at::Tensor& t) { return t.mutable_data_ptr<T>(); };
    const shsa::TrainFwdArgs<T> a{.x = ptr<T>(x), .gn_w = ptr<T>(gn_w), .gn_b = ptr<T>(gn_b), .gn_eps = gn_eps,
                                  .qkv_w = ptr<T>(qkv_w), .qkv_bn_w = ptr<T>(qkv_bn_w),
                                  .qkv_bn_b = ptr<T>(qkv_bn_b), .qkv_eps = qkv_eps, .proj_w = ptr<T>(proj_w),
                                  .proj_bn_w = ptr<T>(proj_bn_w), .proj_bn_b = ptr<T>(proj_bn_b),
                                  .proj_eps = proj_eps, .residual = residual, .y = out(y),
                                  .qkv_mean = out(qkv_mean), .qkv_var = out(qkv_var), .proj_mean = out(proj_mean),
                                  .proj_var = out(proj_var), .zp = zp ? out(*zp) : nullptr};
    SHVIT_ISA_DISPATCH(shsa, train_fwd<T>(d, a));
  });
  return {y, qkv_mean, qkv_var, proj_mean, proj_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
shsa_train_bwd_cpu(const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& gn_w_in,
                   const at::Tensor& gn_b_in, double gn_eps, const at::Tensor& qkv_w_in, const at::Tensor& qkv_bn_w_in,
                   const at::Tensor& qkv_bn_b_in, double qkv_eps, const at::Tensor& proj_w_in,
                   const at::Tensor& proj_bn_w_in, const at::Tensor& proj_bn_b_in, double proj_eps,
                   const at::Tensor& qkv_mean_in, const at::Tensor& qkv_var_in, const at::Tensor& proj_mean_in,
                   const at::Tensor& proj_var_in, int64_t qk_dim, bool residual,
                   const std::optional<at::Tensor>& proj_z) {
  const Dims d = check_main(x_in, gn_w_in, qkv_w_in, proj_w_in, qk_dim);
  const at::Tensor* zp = kept_proj(proj_z, x_in);
  check_batch_stats(d);
  check_eps(gn_eps, "gn_eps");
  check_eps(qkv_eps, "qkv_eps");
  check_eps(proj_eps, "proj_eps");
  const at::Tensor x = x_in.contiguous(), qkv_w = qkv_w_in.contiguous(), proj_w = proj_w_in.contiguous();
  const at::Tensor gy = grad_like_x(gy_in, x);
  const at::Tensor gn_w = vec(gn_w_in, "gn_w", d.P, x), gn_b = vec(gn_b_in, "gn_b", d.P, x);
  const at::Tensor qkv_bn_w = vec(qkv_bn_w_in, "qkv_bn_w", d.O, x), qkv_bn_b = vec(qkv_bn_b_in, "qkv_bn_b", d.O, x);
  const at::Tensor proj_bn_w = vec(proj_bn_w_in, "proj_bn_w", d.C, x);
  const at::Tensor proj_bn_b = vec(proj_bn_b_in, "proj_bn_b", d.C, x);
  const at::Tensor qkv_mean = vec(qkv_mean_in, "qkv_mean", d.O, x), qkv_var = vec(qkv_var_in, "qkv_var", d.O, x);
  const at::Tensor proj_mean = vec(proj_mean_in, "proj_mean", d.C, x);
  const at::Tensor proj_var = vec(proj_var_in, "proj_var", d.C, x);
  const auto opt = x.options();
  at::Tensor gx = at::empty(x.sizes(), opt), g_gn_w = at::empty({d.P}, opt), g_gn_b = at::empty({d.P}, opt);
  at::Tensor g_qkv_w = at::empty({d.O, d.P}, opt), g_qkv_bn_w = at::empty({d.O}, opt);
  at::Tensor g_qkv_bn_b = at::empty({d.O}, opt), g_proj_w = at::empty({d.C, d.C}, opt);
  at::Tensor g_proj_bn_w = at::empty({d.C}, opt), g_proj_bn_b = at::empty({d.C}, opt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shsa_train_bwd_cpu", [&] {
    using T = scalar_t;
    const auto out = [](at::Tensor& t) { return t.mutable_data_ptr<T>(); };
    const shsa::BwdArgs<T> a{
      .gy = ptr<T>(gy), .x = ptr<T>(x), .gn_w = ptr<T>(gn_w), .gn_b = ptr<T>(gn_b), .gn_eps = gn_eps,
      .qkv_w = ptr<T>(qkv_w), .proj_w = ptr<T>(proj_w),
      .qkv = {ptr<T>(qkv_bn_w), ptr<T>(qkv_bn_b), ptr<T>(qkv_mean), ptr<T>(qkv_var), qkv_eps},
      .proj = {ptr<T>(proj_bn_w), ptr<T>(proj_bn_b), ptr<T>(proj_mean), ptr<T>(proj_var), proj_eps},
      .zp = zp ? ptr<T>(*zp) : nullptr, .train = true, .residual = residual, .gx = out(gx), .g_gn_w = out(g_gn_w),
      .g_gn_b = out(g_gn_b), .g_qkv_w = out(g_qkv_w), .g_proj_w = out(g_proj_w), .g_qkv_nw = out(g_qkv_bn_w),
      .g_qkv_nb = out(g_qkv_bn_b), .g_proj_nw = out(g_proj_bn_w), .g_proj_nb = out(g_proj_bn_b)};
    SHVIT_ISA_DISPATCH(shsa, backward<T>(d, a));
  });
  return {gx,
          g_gn_w.to(gn_w_in.scalar_type()),
          g_gn_b.to(gn_b_in.scalar_type()),
          g_qkv_w,
          g_qkv_bn_w.to(qkv_bn_w_in.scalar_type()),
          g_qkv_bn_b.to(qkv_bn_b_in.scalar_type()),
          g_proj_w,
          g_proj_bn_w.to(proj_bn_w_in.scalar_type()),
          g_proj_bn_b.to(proj_bn_b_in.scalar_type())};
}

}  // namespace
}  // namespace shvit::cpu

TORCH_LIBRARY_FRAGMENT(shvit, m) {
  m.def(
      "shsa_fwd_cpu(Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, Tensor qkv_b, Tensor proj_w, "
      "Tensor proj_b, int qk_dim, bool residual) -> Tensor");
  m.def(
      "shsa_bwd_cpu(Tensor gy, Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, Tensor qkv_b, "
      "Tensor proj_w, Tensor proj_b, int qk_dim, bool residual) -> (Tensor gx, Tensor g_gn_w, Tensor g_gn_b, "
      "Tensor g_qkv_w, Tensor g_qkv_b, Tensor g_proj_w, Tensor g_proj_b)");
  m.def(
      "shsa_train_fwd_cpu(Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, Tensor qkv_bn_w, "
      "Tensor qkv_bn_b, float qkv_eps, Tensor proj_w, Tensor proj_bn_w, Tensor proj_bn_b, float proj_eps, "
      "int qk_dim, bool residual, Tensor(a!)? proj_z=None) -> (Tensor y, Tensor qkv_mean, Tensor qkv_var, "
      "Tensor proj_mean, Tensor proj_var)");
  m.def(
      "shsa_train_bwd_cpu(Tensor gy, Tensor x, Tensor gn_w, Tensor gn_b, float gn_eps, Tensor qkv_w, "
      "Tensor qkv_bn_w, Tensor qkv_bn_b, float qkv_eps, Tensor proj_w, Tensor proj_bn_w, Tensor proj_bn_b, "
      "float proj_eps, Tensor qkv_mean, Tensor qkv_var, Tensor proj_mean, Tensor proj_var, int qk_dim, "
      "bool residual, Tensor? proj_z=None) -> (Tensor gx, Tensor g_gn_w, Tensor g_gn_b, Tensor g_qkv_w, "
      "Tensor g_qkv_bn_w, Tensor g_qkv_bn_b, Tensor g_proj_w, Tensor g_proj_bn_w, Tensor g_proj_bn_b)");
}

TORCH_LIBRARY_IMPL(shvit, CPU, m) {
  m.impl("shsa_fwd_cpu", &shvit::cpu::shsa_fwd_cpu);
  m.impl("shsa_bwd_cpu", &shvit::cpu::shsa_bwd_cpu);
  m.impl("shsa_train_fwd_cpu", &shvit::cpu::shsa_train_fwd_cpu);
  m.impl("shsa_train_bwd_cpu", &shvit::cpu::shsa_train_bwd_cpu);
}
