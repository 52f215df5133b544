// Device helpers and the error convention shared by the CUDA kernels (torch-free: CUDA headers only).
//
// Errors: a launcher returns a Status (launchers.h). SHVIT_CHECK_LAUNCH(where) after every kernel launch returns
// the launch error (bad configuration, missing kernel image for this GPU, ...) with the step's name, and
// SHVIT_TRY propagates the Status of a nested launcher. Kernels never fail silently on bad arguments: the
// launchers validate what the kernels rely on and return cudaErrorInvalidValue with a description instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "launchers.h"

#define SHVIT_CHECK_LAUNCH(where)                                      \
  do {                                                                 \
    const cudaError_t shvit_err_ = cudaGetLastError();                 \
    if (shvit_err_ != cudaSuccess) return ::shvit::cuda::Status{shvit_err_, where}; \
  } while (0)

#define SHVIT_TRY(expr)                                \
  do {                                                 \
    const ::shvit::cuda::Status shvit_st_ = (expr);    \
    if (!shvit_st_.ok()) return shvit_st_;             \
  } while (0)

namespace shvit::cuda {

constexpr Status kOk{cudaSuccess, ""};

inline Status invalid(const char* what) { return Status{cudaErrorInvalidValue, what}; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= v (v >= 1), capped at cap (a power of two).
inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

// Calls f(T{}) with T the storage type of dt.
template <typename F>
Status dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return invalid("unsupported dtype");
}

// ---- storage <-> fp32 ---------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
  return to_f(__ldg(p));
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// 16-byte load / store of kVec<T> elements, converted to / from fp32. p must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void ld_vec(const T* p, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_f(e[i]);
}

template <typename T>
__device__ __forceinline__ void st_vec(T* p, const float* in) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) e[i] = from_f<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- deterministic statistics ---------------------------------------------------------------------------------
// Count, mean and sum of squared deviations of a set of values (Welford / Chan et al.); merging is exact in
// arithmetic and, done in a fixed order, bitwise reproducible.
struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float d = b.mean - a.mean, f = b.n / n;
  return {n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}

__device__ __forceinline__ void push(Welford& w, float v) {
  w.n += 1.f;
  const float d = v - w.mean;
  w.mean += d / w.n;
  w.m2 += d * (v - w.mean);
}

__device__ __forceinline__ Welford shfl_down(const Welford& w, int off) {
  return {__shfl_down_sync(0xffffffffu, w.n, off), __shfl_down_sync(0xffffffffu, w.mean, off),
          __shfl_down_sync(0xffffffffu, w.m2, off)};
}

__device__ __forceinline__ float2 shfl_down(float2 v, int off) {
  return {__shfl_down_sync(0xffffffffu, v.x, off), __shfl_down_sync(0xffffffffu, v.y, off)};
}

__device__ __forceinline__ Welford merge_any(const Welford& a, const Welford& b) { return merge(a, b); }
__device__ __forceinline__ float merge_any(float a, float b) { return a + b; }
__device__ __forceinline__ float2 merge_any(float2 a, float2 b) { return {a.x + b.x, a.y + b.y}; }

// Reduces v over each segment of L consecutive threads of the block (L a power of two; blockDim.x a multiple of
// L and of 32; every thread of the block must call it). The result is valid in the first thread of each segment.
// The order of the operations depends only on L. `scratch` holds blockDim.x / 32 values.
template <typename V>
__device__ V segment_reduce(V v, int L, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int width = L < 32 ? L : 32;
  for (int off = 1; off < width; off *= 2) {
    const V o = shfl_down(v, off);
    if ((lane & (2 * off - 1)) == 0) v = merge_any(v, o);
  }
  if (L <= 32) return v;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x % L == 0)
    for (int i = 1; i < L / 32; ++i) v = merge_any(v, scratch[warp + i]);
  return v;
}

}  // namespace shvit::cuda
