// AVX-512 copy of the SHSA kernels and of the helpers they use (kernel_common.inc, with 64-byte vectors).
// Headers first (shsa_kernels.h), then the pragma: see isa.h.
#include "shsa_kernels.h"

#if SHVIT_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define SHVIT_VEC_BYTES 64
namespace shvit::cpu::shsa::isa_avx512 {
namespace {
#include "kernel_common.inc"
}  // namespace
#include "shsa_kernels.inc"
}  // namespace shvit::cpu::shsa::isa_avx512
#undef SHVIT_VEC_BYTES
#pragma GCC pop_options
#endif
