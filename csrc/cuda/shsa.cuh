// Internal interface of the SHSA kernels (shsa.cu: launchers and small kernels; shsa_gemm.cu: the 1x1 convolutions
// as tile GEMMs; shsa_attn.cu: attention forward and backward).
//
// Sizes: dim C, pdim P, qk_dim Q, O = 2Q + P rows of qkv, N = H*W tokens. x, y, grad_y, grad_x are contiguous
// (B, C, N); intermediates are contiguous (B, rows, N) buffers in the activation dtype T (z: the qkv conv output,
// o: attention output, go: its grad, ga: grads of q, k, v) or fp32 (lse, D, the GroupNorm grad gn).
#pragma once

#include "common.cuh"

namespace shvit::cuda::shsa {

struct Dims {
  int64_t B, C, P, Q, O, N;
  float scale;  // Q ** -0.5
};

// Per-row affine applied when a row of z is read: (z - m[r]) * s[r] + t[r]; identity when m is null (eval: z
// already holds the folded BN bias). Training BatchNorm: batch mean, s = weight / sqrt(var + eps), t = bias.
struct RowAffine {
  const float* m;
  const float* s;
  const float* t;
  __device__ __forceinline__ float operator()(float z, int64_t r) const {
    return m == nullptr ? z : (z - m[r]) * s[r] + t[r];
  }
};

// GroupNorm(1 group) of x1 = x[:, :P]: (x - mean[b]) * rstd[b] * w[p] + b[p].
struct GroupNorm {
  const float* mean;
  const float* rstd;
  const float* w;
  const float* b;
  __device__ __forceinline__ float xhat(float x, int64_t s) const { return (x - mean[s]) * rstd[s]; }
  __device__ __forceinline__ float operator()(float x, int64_t s, int64_t p) const { return xhat(x, s) * w[p] + b[p]; }
};

// ---- shsa_gemm.cu ---------------------------------------------------------------------------------------------
// z = W_qkv @ GroupNorm(x1) [+ bias]; with part (training forward): Welford partials of each row of the fp32
// products, S = B * gemm_col_tiles partials.
int64_t gemm_col_tiles(const Dims& d);  // tiles along N: the S of the row-statistics partials is B times this
Status qkv(DType dt, const Dims& d, const void* x, GroupNorm gn, const void* w, const float* bias, void* z,
           float* part, cudaStream_t stream);
// y = W_proj @ relu(cat[o, x2]) [+ bias] [+ x]; with part: Welford partials of each row as for qkv.
Status proj(DType dt, const Dims& d, const void* o, const void* x, const void* w, const float* bias, bool residual,
            void* y, float* part, cudaStream_t stream);
// Weight-gradient partials, part[split][rows][cols] = sum over the split's tokens of gz[b, row, n] * in[b, col, n]
// with in = relu(cat[o, x2]) (proj) or GroupNorm(x1) (qkv).
int64_t wgrad_splits(int64_t rows, int64_t cols, int64_t tokens);
Status wgrad_proj(DType dt, const Dims& d, const void* gz, const void* o, const void* x, float* part, int64_t splits,
                  cudaStream_t stream);
Status wgrad_qkv(DType dt, const Dims& d, const void* gz, const void* x, GroupNorm gn, float* part, int64_t splits,
                 cudaStream_t stream);
// gu = W_proj^T @ gz masked by relu(cat[o, x2]) > 0: rows < P to go, the others to grad_x [+ grad_y].
Status proj_bwd(DType dt, const Dims& d, const void* w, const void* gz, const void* o, const void* x, const void* gy,
                bool residual, void* go, void* gx, cudaStream_t stream);
// gn = W_qkv^T @ gz (fp32, (B, P, N)).
Status gn_bwd(DType dt, const Dims& d, const void* w, const void* gz, float* gn, cudaStream_t stream);

// ---- shsa_attn.cu ---------------------------------------------------------------------------------------------
// o = v softmax(q^T k * scale)^T with q, k, v the rows of z through `aff`; lse (B, N) the row log-sum-exp of the
// scaled scores when not null.
Status attention_fwd(DType dt, const Dims& d, const void* z, RowAffine aff, void* o, float* lse, cudaStream_t stream);
// D[b, n] = sum over c of go[b, c, n] * o[b, c, n].
Status attention_delta(DType dt, const Dims& d, const void* go, const void* o, float* D, cudaStream_t stream);
// ga = [dq; dk; dv] (B, O, N), recomputing the attention from z, lse and D.
Status attention_bwd(DType dt, const Dims& d, const void* z, RowAffine aff, const void* go, const float* lse,
                     const float* D, void* ga, cudaStream_t stream);

}  // namespace shvit::cuda::shsa
