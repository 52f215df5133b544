// Instruction sets of the CPU kernels. Kernels with SIMD loops of their own (dwconv_bn, shsa) are compiled once
// per set, by a *_isa_<set>.cpp file each under `#pragma GCC target("...")` (a literal: GCC expands no macros
// there), and picked at run time, since the build sets no -march. Such a file includes every header before the
// pragma, so that the inline functions of torch and the standard library stay baseline code (the linker keeps one
// copy of each for the whole library, which the baseline path calls too); only code of its own comes out for the
// target. (The pragma does not define __AVX2__ / __AVX512F__ in C++: code that sizes vectors by them is told the
// width another way, see kernel_common.inc.)
#pragma once

// x86-64 with GCC has the AVX2 and AVX-512 copies; elsewhere only the baseline one exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SHVIT_MULTI_ISA 1
#else
#define SHVIT_MULTI_ISA 0
#endif

// X(namespace) for the namespace of each copy of a kernel family (its declarations, say).
#if SHVIT_MULTI_ISA
#define SHVIT_FOR_EACH_ISA(X) X(isa_base) X(isa_avx2) X(isa_avx512)
#else
#define SHVIT_FOR_EACH_ISA(X) X(isa_base)
#endif

// Runs `call` (e.g. `fn<T>(args)`) from the copy in ns::isa_<set> that cpu_isa() picks.
#if SHVIT_MULTI_ISA
#define SHVIT_ISA_DISPATCH(ns, call)                                   \
  switch (::shvit::cpu::cpu_isa()) {                                   \
    case ::shvit::cpu::Isa::kAvx512: ns::isa_avx512::call; break;      \
    case ::shvit::cpu::Isa::kAvx2: ns::isa_avx2::call; break;          \
    default: ns::isa_base::call; break;                                \
  }
#else
#define SHVIT_ISA_DISPATCH(ns, call) ns::isa_base::call
#endif

namespace shvit::cpu {

enum class Isa { kBase, kAvx2, kAvx512 };

// The best set this CPU has, capped by ATEN_CPU_CAPABILITY ("default", "avx2", "avx512") as for ATen's own
// kernels; decided once per process.
Isa cpu_isa();

// cpu_isa() as "avx512", "avx2" or "default".
const char* cpu_kernel_isa();

}  // namespace shvit::cpu
