#include "isa.h"

#include <cstdlib>
#include <string>

namespace shvit::cpu {
namespace {

Isa detect_isa() {
#if SHVIT_MULTI_ISA
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string cap = env ? env : "";
  if (cap == "default") return Isa::kBase;
  if (avx512 && cap != "avx2") return Isa::kAvx512;
  return avx2 ? Isa::kAvx2 : Isa::kBase;
#else
  return Isa::kBase;
#endif
}

}  // namespace

Isa cpu_isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

const char* cpu_kernel_isa() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace shvit::cpu
