// SHSA attention: o = v softmax(q^T k * scale)^T over the N tokens of a sample (one head), forward and backward.
// q, k, v are rows [0, Q), [Q, 2Q), [2Q, O) of z, read through a per-row affine (the training BatchNorm). No
// N x N buffer: the forward runs an online softmax over key blocks and saves the row log-sum-exp; the backward
// recomputes P = exp(S - lse) tile by tile (FlashAttention-2), with dS = P * (dP - D), D = rowsum(go * o).
//
// Forward, fp16 / bf16 with Q <= 64: attn_fwd_mma, block = 4 warps x 16 queries, grid = (N / 64, P / (8 NT), B).
//   Per key block of 64: k ([key][d]) and v ([channel][key]) staged in shared memory, S = q^T k and O += P V on
//   tensor cores (mma.sync m16n8k16, fp32 accumulators); the S accumulators are re-packed in registers as the A
//   operand of P V, the row max / sum are reduced across the 4 lanes that share a row. NT 8-channel tiles of O per
//   block (NT in {4, 8, 12, 16}; P > 128 is split over grid.y, which recomputes S per split).
// Forward otherwise (fp32, or Q > 64): attn_fwd_fma, FMA on 64 x 64 fp32 tiles in shared memory, 256 threads of
//   4 x 4 outputs, grid = (N / 64, P / 64, B).
// Backward (every dtype): attn_bwd_fma in three roles, all FMA on the same tiles: dq per query block (loop over
//   key blocks), dk and dv per key block (loop over query blocks); grid = (N / 64, rows / 64, B). Every output
//   element is written by one block: no atomics, deterministic.
#include <cmath>

#include "shsa.cuh"
#include "tile_gemm.cuh"

namespace shvit::cuda::shsa {
namespace {

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// ---- tensor-core forward ---------------------------------------------------------------------------------------

constexpr int kMmaRows = 64, kMmaKeys = 64, kMaxQ = 64;
constexpr int kLdQK = kMaxQ + 8, kLdV = kMmaKeys + 8;  // padded rows: conflict-free fragment loads

template <typename T, int NT>
__global__ void __launch_bounds__(128) attn_fwd_mma(Dims d, const T* z, RowAffine aff, T* o, float* lse) {
  __shared__ __align__(16) T Qs[kMmaRows * kLdQK];
  __shared__ __align__(16) T Ks[kMmaKeys * kLdQK];
  __shared__ __align__(16) T Vs[NT * 8 * kLdV];
  const int64_t b = blockIdx.z, i0 = int64_t{blockIdx.x} * kMmaRows, c0 = int64_t{blockIdx.y} * NT * 8;
  const int64_t N = d.N, Q = d.Q;
  const int kq = static_cast<int>((Q + 15) / 16), QP = kq * 16;
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const T* zb = z + b * d.O * N;

  for (int e = threadIdx.x; e < kMmaRows * QP; e += blockDim.x) {
    const int i = e % kMmaRows, r = e / kMmaRows;
    Qs[i * kLdQK + r] = from_f<T>(r < Q && i0 + i < N ? aff(ld(zb + r * N + i0 + i), r) : 0.f);
  }
  __syncthreads();
  uint32_t qa[kMaxQ / 16][4] = {};
#pragma unroll
  for (int ks = 0; ks < kMaxQ / 16; ++ks) {
    if (ks >= kq) break;
    const T* p = Qs + (warp * 16 + g) * kLdQK + ks * 16 + 2 * t;
    qa[ks][0] = u32(p);
    qa[ks][1] = u32(p + 8 * kLdQK);
    qa[ks][2] = u32(p + 8);
    qa[ks][3] = u32(p + 8 * kLdQK + 8);
  }

  float acc[NT][4] = {};
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  const float sl = d.scale * kLog2e;  // scores in log2 units: exp2f
  for (int64_t j0 = 0; j0 < N; j0 += kMmaKeys) {
    __syncthreads();  // the previous step's reads of Ks / Vs are done
    for (int e = threadIdx.x; e < kMmaKeys * QP; e += blockDim.x) {
      const int j = e % kMmaKeys, r = e / kMmaKeys;
      Ks[j * kLdQK + r] = from_f<T>(r < Q && j0 + j < N ? aff(ld(zb + (Q + r) * N + j0 + j), Q + r) : 0.f);
    }
    for (int e = threadIdx.x; e < NT * 8 * kMmaKeys; e += blockDim.x) {
      const int j = e % kMmaKeys, c = e / kMmaKeys;
      const int64_t r = 2 * Q + c0 + c;
      Vs[c * kLdV + j] = from_f<T>(c0 + c < d.P && j0 + j < N ? aff(ld(zb + r * N + j0 + j), r) : 0.f);
    }
    __syncthreads();

    float s[8][4] = {};
#pragma unroll
    for (int ks = 0; ks < kMaxQ / 16; ++ks) {
      if (ks >= kq) break;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const T* p = Ks + (nt * 8 + g) * kLdQK + ks * 16 + 2 * t;
        const uint32_t kb[2] = {u32(p), u32(p + 8)};
        gemm::mma16816<T>(s[nt], qa[ks], kb);
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = j0 + nt * 8 + 2 * t + (e & 1) < N ? s[nt][e] * sl : -INFINITY;
        mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
      }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(mrow[h], mx[h]);  // finite: key 0 of the first block is valid
      alpha[h] = exp2f(mrow[h] - m_new);
      mrow[h] = m_new;
      lrow[h] *= alpha[h];
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - mrow[e / 2]);
        lrow[e / 2] += s[nt][e];
      }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] *= alpha[e / 2];
    // P (16 queries x 64 keys) as four k-steps of A fragments: the C layout of two adjacent n-tiles is the A layout.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t pa[4] = {gemm::pack2<T>(s[2 * kk][0], s[2 * kk][1]), gemm::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              gemm::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              gemm::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const T* p = Vs + (nt * 8 + g) * kLdV + kk * 16 + 2 * t;
        const uint32_t vb[2] = {u32(p), u32(p + 8)};
        gemm::mma16816<T>(acc[nt], pa, vb);
      }
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 1);
    lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 2);
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t c = c0 + nt * 8 + 2 * t + (e & 1), i = i0 + warp * 16 + g + (e >= 2 ? 8 : 0);
      if (c < d.P && i < N) o[(b * d.P + c) * N + i] = from_f<T>(acc[nt][e] / lrow[e / 2]);
    }
  if (lse != nullptr && blockIdx.y == 0 && t == 0)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = i0 + warp * 16 + g + 8 * h;
      if (i < N) lse[b * N + i] = (mrow[h] + log2f(lrow[h])) * kLn2;
    }
}

// ---- FMA tiles ---------------------------------------------------------------------------------------------------
// A 64 x 64 tile over 256 threads: thread (ti, tj) holds rows ti*4 .. +3, cols tj*4 .. +3 (index r * 4 + c).
// Operands are staged as [k][64] fp32 rows (kLd floats apart) in shared memory.

constexpr int kTile = 64, kLd = kTile + 4, kChunk = 16;

__device__ __forceinline__ int tile_row() { return threadIdx.x / 16 * 4; }
__device__ __forceinline__ int tile_col() { return threadIdx.x % 16 * 4; }

// acc[r][c] += sum over k < kn of A[k][row + r] * B[k][col + c].
__device__ __forceinline__ void outer(float* acc, const float* A, const float* B, int kn) {
  const int ti = tile_row(), tj = tile_col();
  for (int k = 0; k < kn; ++k) {
    const float4 a = *reinterpret_cast<const float4*>(A + k * kLd + ti);
    const float4 bq = *reinterpret_cast<const float4*>(B + k * kLd + tj);
    const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r * 4 + c] = fmaf(av[r], bv[c], acc[r * 4 + c]);
  }
}

// buf[k][x] = f(k, x) for k < kn, x < 64. kAlongK: consecutive threads take consecutive k (coalesced when f reads
// memory contiguous along k), else consecutive x.
template <bool kAlongK, typename F>
__device__ __forceinline__ void fill(float* buf, int kn, F f) {
  for (int e = threadIdx.x; e < kn * kTile; e += blockDim.x) {
    const int k = kAlongK ? e % kn : e / kTile, x = kAlongK ? e / kn : e % kTile;
    buf[k * kLd + x] = f(k, x);
  }
}

// Row r of z through the affine at token n, 0 outside [0, N); rounded to T like the tensor-core operands, so that
// every path (and the backward's recomputation) sees the same q, k, v.
template <typename T>
__device__ __forceinline__ float zrow(const T* zb, const RowAffine& aff, int64_t N, int64_t r, int64_t n) {
  return n < N ? to_f(from_f<T>(aff(ld(zb + r * N + n), r))) : 0.f;
}

// s = q^T k (rows: queries i0.., cols: keys j0..), unscaled. Starts with a barrier (buffers are reused).
template <typename T>
__device__ void scores(float* s, float* A, float* B, const T* zb, const RowAffine& aff, const Dims& d, int64_t i0,
                       int64_t j0) {
  for (int i = 0; i < 16; ++i) s[i] = 0.f;
  for (int64_t d0 = 0; d0 < d.Q; d0 += kChunk) {
    const int kn = static_cast<int>(d.Q - d0 < kChunk ? d.Q - d0 : kChunk);
    __syncthreads();
    fill<false>(A, kn, [&](int k, int x) { return zrow(zb, aff, d.N, d0 + k, i0 + x); });
    fill<false>(B, kn, [&](int k, int x) { return zrow(zb, aff, d.N, d.Q + d0 + k, j0 + x); });
    __syncthreads();
    outer(s, A, B, kn);
  }
}

template <typename T>
__global__ void __launch_bounds__(256) attn_fwd_fma(Dims d, const T* z, RowAffine aff, T* o, float* lse) {
  __shared__ __align__(16) float A[kChunk * kLd], B[kChunk * kLd], Pt[kTile * kLd], Vt[kTile * kLd];
  const int64_t b = blockIdx.z, i0 = int64_t{blockIdx.x} * kTile, c0 = int64_t{blockIdx.y} * kTile, N = d.N;
  const int ti = tile_row(), tj = tile_col();
  const T* zb = z + b * d.O * N;
  const float sl = d.scale * kLog2e;
  float acc[16] = {}, s[16], mrow[4], lrow[4];
  for (int r = 0; r < 4; ++r) mrow[r] = -INFINITY, lrow[r] = 0.f;

  for (int64_t j0 = 0; j0 < N; j0 += kTile) {
    scores(s, A, B, zb, aff, d, i0, j0);
    for (int r = 0; r < 4; ++r) {
      float mx = -INFINITY;
      for (int c = 0; c < 4; ++c) {
        s[r * 4 + c] = j0 + tj + c < N ? s[r * 4 + c] * sl : -INFINITY;
        mx = fmaxf(mx, s[r * 4 + c]);
      }
      for (int off = 1; off < 16; off *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(mrow[r], mx), alpha = exp2f(mrow[r] - m_new);
      mrow[r] = m_new;
      lrow[r] *= alpha;
      for (int c = 0; c < 4; ++c) {
        s[r * 4 + c] = exp2f(s[r * 4 + c] - m_new);
        lrow[r] += s[r * 4 + c];
        acc[r * 4 + c] *= alpha;
      }
    }
    // P^T ([key][query]) and v^T ([key][channel]) for O[i][c] += sum_j P[i][j] v[c][j].
    for (int c = 0; c < 4; ++c)
      *reinterpret_cast<float4*>(Pt + (tj + c) * kLd + ti) = make_float4(s[c], s[4 + c], s[8 + c], s[12 + c]);
    fill<true>(Vt, kTile, [&](int k, int x) {
      return c0 + x < d.P ? zrow(zb, aff, N, 2 * d.Q + c0 + x, j0 + k) : 0.f;
    });
    __syncthreads();
    outer(acc, Pt, Vt, kTile);
  }

  for (int r = 0; r < 4; ++r) {
    for (int off = 1; off < 16; off *= 2) lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], off);
    const int64_t i = i0 + ti + r;
    for (int c = 0; c < 4; ++c)
      if (i < N && c0 + tj + c < d.P) o[(b * d.P + c0 + tj + c) * N + i] = from_f<T>(acc[r * 4 + c] / lrow[r]);
    if (lse != nullptr && blockIdx.y == 0 && tj == 0 && i < N) lse[b * N + i] = (mrow[r] + log2f(lrow[r])) * kLn2;
  }
}

// ---- backward ------------------------------------------------------------------------------------------------

enum class Role { kDq, kDk, kDv };

// Role kDq: block = query block x0, loops over key blocks, writes dq rows r0 .. r0+63 of [0, Q).
// Role kDk / kDv: block = key block x0, loops over query blocks, writes dk rows of [0, Q) / dv rows of [0, P).
template <typename T, Role R>
__global__ void __launch_bounds__(256) attn_bwd_fma(Dims d, const T* z, RowAffine aff, const T* go, const float* lse,
                                                    const float* D, T* ga) {
  __shared__ __align__(16) float A[kChunk * kLd], B[kChunk * kLd], Tt[kTile * kLd];
  const int64_t b = blockIdx.z, x0 = int64_t{blockIdx.x} * kTile, r0 = int64_t{blockIdx.y} * kTile, N = d.N;
  const int ti = tile_row(), tj = tile_col();
  const T* zb = z + b * d.O * N;
  const T* gob = go + b * d.P * N;
  const float sl = d.scale * kLog2e;
  float acc[16] = {}, s[16];

  for (int64_t y0 = 0; y0 < N; y0 += kTile) {
    const int64_t i0 = R == Role::kDq ? x0 : y0, j0 = R == Role::kDq ? y0 : x0;
    scores(s, A, B, zb, aff, d, i0, j0);
    float lse2[4], Di[4];
    for (int r = 0; r < 4; ++r) {
      const int64_t i = i0 + ti + r;
      lse2[r] = i < N ? lse[b * N + i] * kLog2e : 0.f;
      Di[r] = i < N ? D[b * N + i] : 0.f;
      for (int c = 0; c < 4; ++c)
        s[r * 4 + c] = i < N && j0 + tj + c < N ? exp2f(s[r * 4 + c] * sl - lse2[r]) : 0.f;  // P
    }
    if constexpr (R != Role::kDv) {
      float dp[16] = {};
      for (int64_t c0 = 0; c0 < d.P; c0 += kChunk) {
        const int kn = static_cast<int>(d.P - c0 < kChunk ? d.P - c0 : kChunk);
        __syncthreads();
        fill<false>(A, kn, [&](int k, int x) { return i0 + x < N ? ld(gob + (c0 + k) * N + i0 + x) : 0.f; });
        fill<false>(B, kn, [&](int k, int x) { return zrow(zb, aff, N, 2 * d.Q + c0 + k, j0 + x); });
        __syncthreads();
        outer(dp, A, B, kn);
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) s[r * 4 + c] *= dp[r * 4 + c] - Di[r];  // dS
    }
    // Tt holds the tile with the reduction index as its row: dS^T ([key][query]) for dq, else P or dS as [query][key].
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) {
        if constexpr (R == Role::kDq) Tt[(tj + c) * kLd + ti + r] = s[r * 4 + c];
        else Tt[(ti + r) * kLd + tj + c] = s[r * 4 + c];
      }
    const int64_t y_base = R == Role::kDq ? j0 : i0;  // tokens of the reduction
    for (int kc = 0; kc < kTile; kc += kChunk) {
      __syncthreads();
      fill<true>(A, kChunk, [&](int k, int x) {
        const int64_t n = y_base + kc + k, row = r0 + x;
        if (R == Role::kDv) return row < d.P && n < N ? ld(gob + row * N + n) : 0.f;  // go[c][i]
        const int64_t zr = R == Role::kDq ? d.Q + row : row;                          // k[d][j] or q[d][i]
        return row < d.Q ? zrow(zb, aff, N, zr, n) : 0.f;
      });
      __syncthreads();
      outer(acc, A, Tt + kc * kLd, kChunk);
    }
  }

  const int64_t rows = R == Role::kDv ? d.P : d.Q, base = R == Role::kDq ? 0 : R == Role::kDk ? d.Q : 2 * d.Q;
  const float mul = R == Role::kDv ? 1.f : d.scale;
  T* out = ga + (b * d.O + base) * N;
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) {
      const int64_t row = r0 + ti + r, n = x0 + tj + c;
      if (row < rows && n < N) out[row * N + n] = from_f<T>(acc[r * 4 + c] * mul);
    }
}

template <typename T>
__global__ void __launch_bounds__(256) delta_kernel(Dims d, const T* go, const T* o, float* D) {
  const int64_t b = blockIdx.y, n = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (n >= d.N) return;
  float acc = 0.f;
  for (int64_t c = 0; c < d.P; ++c) {
    const int64_t i = (b * d.P + c) * d.N + n;
    acc = fmaf(ld(go + i), ld(o + i), acc);
  }
  D[b * d.N + n] = acc;
}

dim3 grid(const Dims& d, int64_t rows, int64_t rows_per_block) {
  return dim3(static_cast<unsigned>(ceil_div(d.N, kTile)), static_cast<unsigned>(ceil_div(rows, rows_per_block)),
              static_cast<unsigned>(d.B));
}

}  // namespace

Status attention_fwd(DType dt, const Dims& d, const void* z, RowAffine aff, void* o, float* lse, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* zt = static_cast<const T*>(z);
    T* ot = static_cast<T*>(o);
    if constexpr (!std::is_same_v<T, float>) {
      if (d.Q <= kMaxQ) {
        const int nt = d.P <= 32 ? 4 : d.P <= 64 ? 8 : d.P <= 96 ? 12 : 16;
        const dim3 g = grid(d, d.P, 8 * nt);
        switch (nt) {
          case 4: attn_fwd_mma<T, 4><<<g, 128, 0, stream>>>(d, zt, aff, ot, lse); break;
          case 8: attn_fwd_mma<T, 8><<<g, 128, 0, stream>>>(d, zt, aff, ot, lse); break;
          case 12: attn_fwd_mma<T, 12><<<g, 128, 0, stream>>>(d, zt, aff, ot, lse); break;
          default: attn_fwd_mma<T, 16><<<g, 128, 0, stream>>>(d, zt, aff, ot, lse); break;
        }
        SHVIT_CHECK_LAUNCH("shsa/attention forward (tensor cores)");
        return kOk;
      }
    }
    attn_fwd_fma<T><<<grid(d, d.P, kTile), 256, 0, stream>>>(d, zt, aff, ot, lse);
    SHVIT_CHECK_LAUNCH("shsa/attention forward");
    return kOk;
  });
}

Status attention_delta(DType dt, const Dims& d, const void* go, const void* o, float* D, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    delta_kernel<T><<<dim3(static_cast<unsigned>(ceil_div(d.N, 256)), static_cast<unsigned>(d.B)), 256, 0, stream>>>(
        d, static_cast<const T*>(go), static_cast<const T*>(o), D);
    SHVIT_CHECK_LAUNCH("shsa/attention delta");
    return kOk;
  });
}

Status attention_bwd(DType dt, const Dims& d, const void* z, RowAffine aff, const void* go, const float* lse,
                     const float* D, void* ga, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* zt = static_cast<const T*>(z);
    const T* got = static_cast<const T*>(go);
    T* gat = static_cast<T*>(ga);
    attn_bwd_fma<T, Role::kDq><<<grid(d, d.Q, kTile), 256, 0, stream>>>(d, zt, aff, got, lse, D, gat);
    SHVIT_CHECK_LAUNCH("shsa/attention backward dq");
    attn_bwd_fma<T, Role::kDk><<<grid(d, d.Q, kTile), 256, 0, stream>>>(d, zt, aff, got, lse, D, gat);
    SHVIT_CHECK_LAUNCH("shsa/attention backward dk");
    attn_bwd_fma<T, Role::kDv><<<grid(d, d.P, kTile), 256, 0, stream>>>(d, zt, aff, got, lse, D, gat);
    SHVIT_CHECK_LAUNCH("shsa/attention backward dv");
    return kOk;
  });
}

}  // namespace shvit::cuda::shsa
