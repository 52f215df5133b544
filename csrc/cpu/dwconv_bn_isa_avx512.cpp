// AVX-512 copy of the dwconv_bn kernels. Only the kernels are compiled for the target: headers are
// included first, so that their inline functions stay baseline code: the linker keeps one copy of each
// for the whole library, which the baseline path calls too.
#include "dwconv_bn_kernels.h"

#if SHVIT_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
namespace shvit::cpu::detail::isa_avx512 {
#include "dwconv_bn_kernels.inc"
}
#pragma GCC pop_options
#endif
