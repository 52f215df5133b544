// C++ tests of the CPU dwconv_bn kernels against ATen: conv2d + native_batch_norm (+ add) (+ relu) forward,
// and native_batch_norm_backward + convolution_backward for the gradients, on random inputs of odd sizes,
// NCHW and channels_last, float32 and float64. Also: argument checks throw, results do not depend on the
// thread count, and the ops are registered with the dispatcher. Prints "N passed, N failed"; exit 1 on failure.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "dwconv_bn.h"
#include "isa.h"

namespace {

int g_passed = 0, g_failed = 0;

void expect(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// max |a - b| / max(1, max |b|): the error relative to the reference's scale.
double scaled_err(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);
  const double scale = std::max(1.0, b64.abs().max().item<double>());
  return (a64 - b64).abs().max().item<double>() / scale;
}

void expect_close(const at::Tensor& a, const at::Tensor& ref, double tol, const std::string& what) {
  const bool shapes = a.sizes() == ref.sizes();
  const double err = shapes ? scaled_err(a, ref) : INFINITY;
  expect(shapes && err <= tol, what + " (scaled error " + std::to_string(err) + ", tol " + std::to_string(tol) + ")");
}

void expect_throws(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  try {
    f();
    expect(false, what + ": no exception");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    expect(msg.find(needle) != std::string::npos, what + ": message lacks '" + needle + "': " + msg);
  }
}

struct Case {
  int64_t B, C, H, W;
  int64_t k, stride;
  bool residual, relu, channels_last;
  at::ScalarType dtype;

  std::string name() const {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "B%lld C%lld %lldx%lld k%lld s%lld res%d relu%d %s %s", (long long)B, (long long)C,
                  (long long)H, (long long)W, (long long)k, (long long)stride, residual, relu,
                  channels_last ? "channels_last" : "NCHW", dtype == at::kFloat ? "fp32" : "fp64");
    return buf;
  }
};

struct Inputs {
  at::Tensor x, w, gamma, beta, bias, gy;
};

// Float64 inputs (the reference runs on them); the kernels get them cast to the case's dtype.
Inputs make_inputs(const Case& c) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t p = c.k / 2, ho = (c.H + 2 * p - c.k) / c.stride + 1, wo = (c.W + 2 * p - c.k) / c.stride + 1;
  Inputs in;
  in.x = at::randn({c.B, c.C, c.H, c.W}, f64);
  if (c.channels_last) in.x = in.x.contiguous(at::MemoryFormat::ChannelsLast);
  in.w = at::randn({c.C, 1, c.k, c.k}, f64) * 0.5;
  in.gamma = at::rand({c.C}, f64) + 0.5;
  in.beta = at::randn({c.C}, f64);
  in.bias = at::randn({c.C}, f64);
  in.gy = at::randn({c.B, c.C, ho, wo}, f64);
  return in;
}

void check_case(const Case& c) {
  const Inputs in = make_inputs(c);
  const double eps = 1e-5;
  const auto dt = c.dtype;
  const double tol = dt == at::kDouble ? 1e-10 : 2e-4;
  const std::vector<int64_t> stride{c.stride, c.stride}, pad{c.k / 2, c.k / 2}, dil{1, 1};
  const std::string name = c.name();
  const bool cl_out = c.channels_last && !in.x.is_contiguous();
  auto layout_ok = [&](const at::Tensor& t) {
    return cl_out ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous();
  };

  // Eval form.
  at::Tensor ref = at::conv2d(in.x, in.w, in.bias, stride, pad, dil, c.C);
  if (c.relu) ref = ref.relu();
  const at::Tensor y_eval =
      shvit::cpu::dwconv_bn_fwd_cpu(in.x.to(dt), in.w.to(dt), in.bias.to(dt), c.stride, c.relu);
  expect_close(y_eval, ref, tol, "eval " + name);
  expect(y_eval.scalar_type() == dt && layout_ok(y_eval), "eval dtype/layout " + name);

  if (c.B * ref.size(2) * ref.size(3) < 2) return;  // BatchNorm training needs two values per channel

  // Training forward.
  const at::Tensor z = at::conv2d(in.x, in.w, {}, stride, pad, dil, c.C);
  const auto [bn, save_mean, save_invstd] = at::native_batch_norm(z, in.gamma, in.beta, {}, {}, true, 0.1, eps);
  at::Tensor y_ref = c.residual ? bn + in.x : bn;
  if (c.relu) y_ref = y_ref.relu();
  const auto [y, mean, var] = shvit::cpu::dwconv_bn_train_fwd_cpu(
      in.x.to(dt), in.w.to(dt), in.gamma.to(dt), in.beta.to(dt), eps, c.stride, c.residual, c.relu);
  expect_close(y, y_ref, tol, "train fwd y " + name);
  expect_close(mean, z.mean({0, 2, 3}), tol, "train fwd mean " + name);
  expect_close(var, z.var({0, 2, 3}, /*unbiased=*/false), tol, "train fwd var " + name);
  expect(y.scalar_type() == dt && mean.scalar_type() == dt && layout_ok(y), "train fwd dtype/layout " + name);

  // Training backward.
  const at::Tensor g = c.relu ? in.gy * (y_ref > 0) : in.gy;
  const auto [gz, ggamma_ref, gbeta_ref] = at::native_batch_norm_backward(
      g, z, in.gamma, {}, {}, save_mean, save_invstd, true, eps, {true, true, true});
  auto [gx_ref, gw_ref, unused] = at::convolution_backward(gz, in.x, in.w, std::nullopt, stride, pad, dil, false,
                                                           {0, 0}, c.C, {true, true, false});
  if (c.residual) gx_ref = gx_ref + g;
  const auto [gx, gw, ggamma, gbeta] =
      shvit::cpu::dwconv_bn_train_bwd_cpu(in.gy.to(dt), in.x.to(dt), in.w.to(dt), in.gamma.to(dt), mean, var, y, eps,
                                          c.stride, c.residual, c.relu);
  expect_close(gx, gx_ref, tol, "train bwd grad_x " + name);
  expect_close(gw, gw_ref, tol, "train bwd grad_weight " + name);
  expect_close(ggamma, ggamma_ref, tol, "train bwd grad_bn_weight " + name);
  expect_close(gbeta, gbeta_ref, tol, "train bwd grad_bn_bias " + name);
  expect(layout_ok(gx) && gx.scalar_type() == dt, "train bwd grad_x dtype/layout " + name);
}

void check_numerics() {
  const std::vector<std::vector<int64_t>> shapes = {{2, 5, 7, 9}, {3, 40, 16, 16}, {1, 3, 1, 1}, {2, 13, 17, 13},
                                                    {2, 19, 6, 5}, {1, 1, 3, 8}};
  for (const auto& s : shapes)
    for (int64_t k : {1, 3, 5, 7})
      for (int64_t stride : {1, 2})
        for (int flags = 0; flags < 4; ++flags)
          for (bool cl : {false, true})
            for (auto dt : {at::kFloat, at::kDouble}) {
              const bool residual = flags & 1, relu = flags & 2;
              if (residual && stride != 1) continue;
              check_case({s[0], s[1], s[2], s[3], k, stride, residual, relu, cl, dt});
            }
}

// Strided (non-contiguous, not channels_last) x is accepted and gives the NCHW result.
void check_strided_input() {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor big = at::randn({2, 6, 9, 11}, f64), x = big.slice(1, 0, 6, 2), w = at::randn({3, 1, 3, 3}, f64);
  const at::Tensor b = at::randn({3}, f64);
  const at::Tensor y = shvit::cpu::dwconv_bn_fwd_cpu(x, w, b, 1, false);
  expect_close(y, at::conv2d(x, w, b, {1, 1}, {1, 1}, {1, 1}, 3), 1e-12, "strided x");
  expect(y.is_contiguous(), "strided x gives NCHW output");
}

// Same bits with one thread and with several: reductions are per channel, in a fixed order.
void check_determinism() {
  for (bool cl : {false, true}) {
    const Case c{4, 37, 15, 14, 3, 1, true, true, cl, at::kFloat};
    const Inputs in = make_inputs(c);
    auto run = [&] {
      const at::Tensor x = in.x.to(at::kFloat), w = in.w.to(at::kFloat), ga = in.gamma.to(at::kFloat);
      const auto [y, m, v] = shvit::cpu::dwconv_bn_train_fwd_cpu(x, w, ga, in.beta.to(at::kFloat), 1e-5, 1, true, true);
      const auto [gx, gw, gg, gb] =
          shvit::cpu::dwconv_bn_train_bwd_cpu(in.gy.to(at::kFloat), x, w, ga, m, v, y, 1e-5, 1, true, true);
      return std::vector<at::Tensor>{y, m, v, gx, gw, gg, gb};
    };
    at::set_num_threads(1);
    const auto one = run();
    at::set_num_threads(3);  // an odd count: uneven chunks of channels per thread
    const auto many = run();
    at::set_num_threads(1);
    bool same = true;
    for (size_t i = 0; i < one.size(); ++i) same = same && at::equal(one[i], many[i]);
    expect(same, std::string("bitwise equal across thread counts, ") + (cl ? "channels_last" : "NCHW"));
  }
}

void check_errors() {
  const at::Tensor x = at::randn({2, 4, 5, 5}), w = at::randn({4, 1, 3, 3}), v = at::randn({4});
  using shvit::cpu::dwconv_bn_fwd_cpu;
  using shvit::cpu::dwconv_bn_train_fwd_cpu;
  expect_throws([&] { dwconv_bn_fwd_cpu(x, w, v, 3, false); }, "stride must be 1 or 2", "stride 3");
  expect_throws([&] { dwconv_bn_fwd_cpu(x, at::randn({4, 1, 4, 4}), v, 1, false); }, "odd", "even kernel");
  expect_throws([&] { dwconv_bn_fwd_cpu(x, at::randn({4, 1, 9, 9}), v, 1, false); }, "at most 7", "kernel 9");
  expect_throws([&] { dwconv_bn_fwd_cpu(x, at::randn({5, 1, 3, 3}), v, 1, false); }, "weight must have shape",
                "channel mismatch");
  expect_throws([&] { dwconv_bn_fwd_cpu(x[0], w, v, 1, false); }, "x must be 4-D", "3-D x");
  expect_throws([&] { dwconv_bn_fwd_cpu(x, w, at::randn({3}), 1, false); }, "bias must have shape", "bias size");
  expect_throws([&] { dwconv_bn_fwd_cpu(x.to(at::kHalf), w.to(at::kHalf), v, 1, false); }, "float32 or float64",
                "fp16");
  expect_throws([&] { dwconv_bn_fwd_cpu(x, w.to(at::kDouble), v, 1, false); }, "does not match x dtype",
                "dtype mismatch");
  expect_throws([&] { dwconv_bn_train_fwd_cpu(x, w, v, v, 1e-5, 2, true, false); }, "residual=True needs stride=1",
                "residual with stride 2");
}

void check_registration() {
  for (const char* op : {"shvit::dwconv_bn_fwd_cpu", "shvit::dwconv_bn_train_fwd_cpu", "shvit::dwconv_bn_train_bwd_cpu"}) {
    const auto handle = c10::Dispatcher::singleton().findSchema({op, ""});
    expect(handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU),
           std::string(op) + " registered with a CPU kernel");
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  // One thread: the inputs are small, and idle OpenMP threads spinning on a busy machine would dominate.
  // check_determinism uses more.
  at::set_num_threads(1);
  std::printf("kernels: %s\n", shvit::cpu::cpu_kernel_isa());
  check_numerics();
  check_strided_input();
  check_determinism();
  check_errors();
  check_registration();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
