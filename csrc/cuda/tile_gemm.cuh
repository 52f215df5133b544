// A 64 x 64 output tile GEMM, C[m, n] = sum over k in [k0, k1) of A(m, k) * B(k, n), whose operands come from
// element loaders and whose results go to an element epilogue: the fusions of SHSA (GroupNorm or ReLU(cat) in
// the operand load, bias / residual / statistics in the epilogue) are "Prob" types plugged into one kernel.
//
// Block = 256 threads, grid = (ceil(Nc / 64), ceil(M / 64), Z); Prob decides what blockIdx.z means (sample, or
// split of the reduction for the weight gradients). k advances in chunks of 32: the loaders convert to fp32
// (applying the fusion), the chunk is staged in shared memory, then
//   fp16 / bf16: tensor cores, mma.sync m16n8k16 with fp32 accumulation (8 warps of 32 x 16 outputs), operands
//                rounded to T once after the fused fp32 transform (sm_80+);
//   fp32:        FMA, 4 x 4 outputs per thread from float4 shared-memory reads (IEEE fp32, no TF32, to match
//                the float64 reference).
//
// Prob interface (all __device__ const members except the sizes):
//   int64_t M, Nc;                                 output rows / cols
//   void k_range(int z, int64_t& k0, int64_t& k1)  reduction range of this z
//   float a(int z, int64_t m, int64_t k), b(int z, int64_t k, int64_t n)
//   static constexpr bool kBKFastest               B's memory is contiguous along k (else along n)
//   void store(int z, int64_t m, int64_t n, float v)
//   static constexpr bool kRowStats                also Welford statistics of each row over the tile's columns:
//   void row_stats(int z, int64_t m, const Welford& w)   (one call per row of the tile, first thread of 4)
#pragma once

#include "common.cuh"

namespace shvit::cuda::gemm {

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 256;

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// d (16 x 8, fp32) += a (16 x 16, row-major fragment) * b (16 x 8, column-major fragment); T is __half or
// __nv_bfloat16. Fragment layout (PTX ISA, mma.m16n8k16): lane = 4 * g + t holds a rows g and g + 8, columns
// 2t, 2t+1 (a[0], a[1]) and 2t+8, 2t+9 (a[2], a[3]); b rows 2t, 2t+1 (b[0]) and 2t+8, 2t+9 (b[1]) of column g;
// d rows g (d[0], d[1]) and g + 8 (d[2], d[3]), columns 2t, 2t+1.
template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the launchers refuse devices below sm_80
#endif
}

namespace detail {

constexpr int kMmaLd = kBK + 8;  // T elements per row of the k-contiguous MMA tiles (conflict-free fragments)
constexpr int kFmaLd = kBM + 4;  // floats per k row of the FMA tiles (keeps float4 alignment)
constexpr int kStatLd = kBN + 1;
constexpr size_t kSmemBytes = 2 * kBK * kFmaLd * sizeof(float) > kBM * kStatLd * sizeof(float)
                                  ? 2 * kBK * kFmaLd * sizeof(float)
                                  : kBM * kStatLd * sizeof(float);

// (row, col) in the tile of accumulator i of this thread.
template <bool kMma>
__device__ __forceinline__ void acc_pos(int i, int& row, int& col) {
  if constexpr (kMma) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, e = i % 4, nt = i / 4 % 2, mt = i / 8;
    row = warp / 4 * 32 + mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
    col = warp % 4 * 16 + nt * 8 + lane % 4 * 2 + (e & 1);
  } else {
    row = threadIdx.x / 16 * 4 + i / 4;
    col = threadIdx.x % 16 * 4 + i % 4;
  }
}

}  // namespace detail

template <typename T, typename Prob>
__global__ void __launch_bounds__(kThreads) tile_gemm(Prob pr) {
  using namespace detail;
  constexpr bool kMma = !std::is_same_v<T, float>;
  __shared__ __align__(16) unsigned char smem[kSmemBytes];
  const int z = blockIdx.z;
  const int64_t m0 = int64_t{blockIdx.y} * kBM, n0 = int64_t{blockIdx.x} * kBN;
  int64_t k0, k1;
  pr.k_range(z, k0, k1);
  float acc[16] = {};

  for (int64_t kc = k0; kc < k1; kc += kBK) {
    for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
      const int kk = e % kBK, mm = e / kBK;
      const int64_t m = m0 + mm, k = kc + kk;
      const float v = m < pr.M && k < k1 ? pr.a(z, m, k) : 0.f;
      if constexpr (kMma) reinterpret_cast<T*>(smem)[mm * kMmaLd + kk] = from_f<T>(v);
      else reinterpret_cast<float*>(smem)[kk * kFmaLd + mm] = v;
    }
    for (int e = threadIdx.x; e < kBK * kBN; e += kThreads) {
      const int kk = Prob::kBKFastest ? e % kBK : e / kBN, nn = Prob::kBKFastest ? e / kBK : e % kBN;
      const int64_t n = n0 + nn, k = kc + kk;
      const float v = n < pr.Nc && k < k1 ? pr.b(z, k, n) : 0.f;
      if constexpr (kMma) reinterpret_cast<T*>(smem)[(kBM + nn) * kMmaLd + kk] = from_f<T>(v);
      else reinterpret_cast<float*>(smem)[(kBK + kk) * kFmaLd + nn] = v;
    }
    __syncthreads();
    if constexpr (kMma) {
      const T* As = reinterpret_cast<const T*>(smem);
      const T* Bs = As + kBM * kMmaLd;
      const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
      const int wm = warp / 4 * 32, wn = warp % 4 * 16;
#pragma unroll
      for (int ks = 0; ks < kBK; ks += 16) {
        uint32_t a[2][4], b[2][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const T* p = As + (wm + mt * 16 + g) * kMmaLd + ks + 2 * t;
          a[mt][0] = *reinterpret_cast<const uint32_t*>(p);
          a[mt][1] = *reinterpret_cast<const uint32_t*>(p + 8 * kMmaLd);
          a[mt][2] = *reinterpret_cast<const uint32_t*>(p + 8);
          a[mt][3] = *reinterpret_cast<const uint32_t*>(p + 8 * kMmaLd + 8);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const T* p = Bs + (wn + nt * 8 + g) * kMmaLd + ks + 2 * t;
          b[nt][0] = *reinterpret_cast<const uint32_t*>(p);
          b[nt][1] = *reinterpret_cast<const uint32_t*>(p + 8);
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) mma16816<T>(acc + (mt * 2 + nt) * 4, a[mt], b[nt]);
      }
    } else {
      const float* As = reinterpret_cast<const float*>(smem);
      const float* Bs = As + kBK * kFmaLd;
      const int ti = threadIdx.x / 16 * 4, tj = threadIdx.x % 16 * 4;
#pragma unroll 8
      for (int kk = 0; kk < kBK; ++kk) {
        const float4 a = *reinterpret_cast<const float4*>(As + kk * kFmaLd + ti);
        const float4 b = *reinterpret_cast<const float4*>(Bs + kk * kFmaLd + tj);
        const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r * 4 + c] = fmaf(av[r], bv[c], acc[r * 4 + c]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 16; ++i) {
    int row, col;
    acc_pos<kMma>(i, row, col);
    if (m0 + row < pr.M && n0 + col < pr.Nc) pr.store(z, m0 + row, n0 + col, acc[i]);
  }
  if constexpr (Prob::kRowStats) {
    // Each row's values go through shared memory; 4 threads per row take 16 columns each in order.
    float* tile = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      int row, col;
      acc_pos<kMma>(i, row, col);
      tile[row * kStatLd + col] = acc[i];
    }
    __syncthreads();
    __shared__ Welford scratch[kThreads / 32];
    const int row = threadIdx.x / 4, c0 = threadIdx.x % 4 * 16;
    Welford w{0.f, 0.f, 0.f};
    for (int c = c0; c < c0 + 16 && n0 + c < pr.Nc; ++c) push(w, tile[row * kStatLd + c]);
    w = segment_reduce(w, 4, scratch);
    if (threadIdx.x % 4 == 0 && m0 + row < pr.M) pr.row_stats(z, m0 + row, w);
  }
}

// Launches tile_gemm over (Nc, M) tiles and `z` grid slices.
template <typename T, typename Prob>
Status launch(const Prob& pr, int64_t z, cudaStream_t stream, const char* where) {
  const dim3 grid(static_cast<unsigned>(ceil_div(pr.Nc, kBN)), static_cast<unsigned>(ceil_div(pr.M, kBM)),
                  static_cast<unsigned>(z));
  tile_gemm<T, Prob><<<grid, kThreads, 0, stream>>>(pr);
  SHVIT_CHECK_LAUNCH(where);
  return kOk;
}

}  // namespace shvit::cuda::gemm
