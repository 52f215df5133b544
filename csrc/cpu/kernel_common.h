// Helpers shared by the C++ CPU kernels (shsa_kernels.inc, ffn.cpp, pw_conv_bn.cpp, sra.cpp): GEMMs on raw
// buffers, deterministic parallel tasks, SIMD sums, per-channel moments and their fixed-order combination,
// per-thread scratch.
//
// Everything sits in an anonymous namespace on purpose: each kernel file gets its own copy, compiled with its own
// flags (the SIMD width follows them), so no definition is shared across files with different code. The helpers
// themselves are in kernel_common.inc, which a per-instruction-set kernel file (isa.h) includes a second time under
// its target pragma, inside its own namespace, with SHVIT_VEC_BYTES set to its vector width.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/from_blob.h>

#include "scratch_arena.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

// Fortran BLAS of the library torch links (MKL in the x86 wheels), weak: where torch exports none, at::addmm_out.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL's per-thread thread count, C interface (returns the previous one; 0 = the global setting; the lowercase
// mkl_set_num_threads_local is the Fortran entry, by pointer), weak: absent without MKL.
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace shvit::cpu {
namespace {
#include "kernel_common.inc"
}  // namespace
}  // namespace shvit::cpu
