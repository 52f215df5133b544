// Baseline (any CPU) copy of the dwconv_bn kernels.
#include "dwconv_bn_kernels.h"

namespace shvit::cpu::detail::isa_base {
#include "dwconv_bn_kernels.inc"
}
