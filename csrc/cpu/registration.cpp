// Schemas and CPU bindings of the C++ kernels in namespace `shvit`. Loading the extension
// (`import shvit_kernels._C`) runs these registrations. The Python ops in the same namespace are
// torch.library fragments, which coexist with this TORCH_LIBRARY block in either import order; any
// other C++ file adding schemas to `shvit` (the CUDA bindings) must use TORCH_LIBRARY_FRAGMENT.
#include <torch/library.h>

#include <string>

#include "dwconv_bn.h"
#include "isa.h"

TORCH_LIBRARY(shvit, m) {
  m.def("dwconv_bn_fwd_cpu(Tensor x, Tensor weight, Tensor bias, int stride, bool relu) -> Tensor");
  m.def(
      "dwconv_bn_train_fwd_cpu(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, float eps, int stride, "
      "bool residual, bool relu) -> (Tensor y, Tensor mean, Tensor var)");
  m.def(
      "dwconv_bn_train_bwd_cpu(Tensor grad_y, Tensor x, Tensor weight, Tensor bn_weight, Tensor mean, Tensor var, "
      "Tensor y, float eps, int stride, bool residual, bool relu) -> (Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias)");
  // Which instruction set the CPU kernels use here ("avx512", "avx2", "default"), for benchmark records.
  m.def("cpu_kernel_isa() -> str", [] { return std::string(shvit::cpu::cpu_kernel_isa()); });
}

TORCH_LIBRARY_IMPL(shvit, CPU, m) {
  m.impl("dwconv_bn_fwd_cpu", &shvit::cpu::dwconv_bn_fwd_cpu);
  m.impl("dwconv_bn_train_fwd_cpu", &shvit::cpu::dwconv_bn_train_fwd_cpu);
  m.impl("dwconv_bn_train_bwd_cpu", &shvit::cpu::dwconv_bn_train_bwd_cpu);
}
