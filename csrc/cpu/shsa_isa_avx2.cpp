// AVX2 + FMA copy of the SHSA kernels and of the helpers they use (kernel_common.inc, with 32-byte vectors).
// Headers first (shsa_kernels.h), then the pragma: see isa.h.
#include "shsa_kernels.h"

#if SHVIT_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SHVIT_VEC_BYTES 32
namespace shvit::cpu::shsa::isa_avx2 {
namespace {
#include "kernel_common.inc"
}  // namespace
#include "shsa_kernels.inc"
}  // namespace shvit::cpu::shsa::isa_avx2
#undef SHVIT_VEC_BYTES
#pragma GCC pop_options
#endif
