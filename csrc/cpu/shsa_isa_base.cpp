// Baseline (any CPU) copy of the SHSA kernels.
#include "shsa_kernels.h"

namespace shvit::cpu::shsa::isa_base {
#include "shsa_kernels.inc"
}
