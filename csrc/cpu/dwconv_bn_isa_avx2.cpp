// AVX2 + FMA copy of the dwconv_bn kernels. Only the kernels are compiled for the target: headers are
// included first, so their inline functions stay baseline (the linker may keep any one copy of those).
#include "dwconv_bn_kernels.h"

#if SHVIT_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace shvit::cpu::detail::isa_avx2 {
#include "dwconv_bn_kernels.inc"
}
#pragma GCC pop_options
#endif
