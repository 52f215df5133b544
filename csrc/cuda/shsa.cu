// SHSA launchers (launchers.h) and the small kernels between the GEMMs and the attention (shsa.cuh).
//
// Eval forward (6 launches): GroupNorm stats (partials + fixed-order reduce + coefficients) -> qkv GEMM -> attention
//   -> proj GEMM (bias, residual in its epilogue).
// Training forward (11): as eval, with Welford partials of the qkv and proj products reduced to the batch statistics;
//   the qkv BatchNorm is applied when the attention loads q, k, v; the proj BatchNorm (+ x) by bn_apply in place.
// Backward (eval 22 launches, training 27): recompute GroupNorm stats, z, o and the row log-sum-exp (and the pre-BN
//   proj output for training); then proj grads (bias / BN sums, weight-gradient partials, W^T g with the ReLU mask
//   -> go and grad_x2), D = rowsum(go * o), attention backward -> ga, qkv BN / bias grads, qkv weight grad,
//   gn = W^T gz, the GroupNorm backward -> grad_x1.
// Every reduction over the batch is a per-block / per-sample partial reduced in a fixed order: deterministic results.
#include <climits>

#include "reduce.cuh"
#include "shsa.cuh"

namespace shvit::cuda {
namespace {

using shsa::Dims;
using shsa::GroupNorm;
using shsa::RowAffine;

constexpr int kThreads = 256, kGnChunk = 4096;

// ---- small kernels --------------------------------------------------------------------------------------------

// Welford partials of x1 = x[b, :P] (P*N contiguous values per sample): grid (chunks, B), S = chunks, R = B.
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_stats_kernel(Dims d, const T* x, float* part) {
  __shared__ Welford scratch[kThreads / 32];
  const int64_t b = blockIdx.y, n = d.P * d.N, e0 = int64_t{blockIdx.x} * kGnChunk;
  const int64_t e1 = e0 + kGnChunk < n ? e0 + kGnChunk : n;
  const T* xb = x + b * d.C * d.N;
  Welford w{0.f, 0.f, 0.f};
  for (int64_t e = e0 + threadIdx.x; e < e1; e += kThreads) push(w, ld(xb + e));
  w = segment_reduce(w, kThreads, scratch);
  if (threadIdx.x == 0) {
    const int64_t plane = int64_t{gridDim.x} * d.B, i = int64_t{blockIdx.x} * d.B + b;
    part[i] = w.n;
    part[plane + i] = w.mean;
    part[2 * plane + i] = w.m2;
  }
}

// invstd = 1 / sqrt(var + eps); s = w * invstd (invstd without w); t = b (0 without b). Outputs may be null.
__global__ void coefs_kernel(const float* var, const float* w, const float* b, float eps, int64_t R, float* invstd,
                             float* s, float* t) {
  const int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const float is = 1.f / sqrtf(var[r] + eps);
  if (invstd != nullptr) invstd[r] = is;
  if (s != nullptr) s[r] = w != nullptr ? w[r] * is : is;
  if (t != nullptr) t[r] = b != nullptr ? b[r] : 0.f;
}

Status coefs(const float* var, const float* w, const float* b, float eps, int64_t R, float* invstd, float* s,
             float* t, cudaStream_t stream) {
  coefs_kernel<<<static_cast<unsigned>(ceil_div(R, kThreads)), kThreads, 0, stream>>>(var, w, b, eps, R, invstd, s, t);
  SHVIT_CHECK_LAUNCH("shsa/normalisation coefficients");
  return kOk;
}

// y = (y - mean[c]) * s[c] + t[c] [+ x], in place (training forward, proj BatchNorm).
template <typename T>
__global__ void __launch_bounds__(kThreads) bn_apply_kernel(Dims d, RowAffine bn, const T* x, bool residual, T* y) {
  const int64_t total = d.B * d.C * d.N;
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < total; i += int64_t{gridDim.x} * kThreads) {
    float v = bn(ld(y + i), i / d.N % d.C);
    if (residual) v += ld(x + i);
    y[i] = from_f<T>(v);
  }
}

// Sums over n of (g, g * zhat) per (sample, row) of (B, R, N) tensors, zhat = (z - mean[r]) * invstd[r] (0 without z):
// part[b][0..R) and part[b][R..2R), reduced over b by sum_partials(S = B, 2R). Grid (R, B).
template <typename T>
struct GradSums {
  const T* g;
  const T* z;
  const float* mean;
  const float* invstd;
  __device__ float2 operator()(int64_t row, int64_t i) const {
    const float gv = ld(g + i);
    return make_float2(gv, z != nullptr ? gv * (ld(z + i) - mean[row]) * invstd[row] : 0.f);
  }
};

// The GroupNorm backward's sums of (gn, gn * xhat) per (sample, channel p); gn is fp32 (B, P, N).
template <typename T>
struct GnGradSums {
  const float* gn;
  const T* x;
  GroupNorm norm;
  int64_t C, P, N;
  __device__ float2 operator()(int64_t row, int64_t i) const {  // i = (b * P + p) * N + n
    const int64_t b = i / (P * N), n = i % N;
    const float g = gn[i];
    return make_float2(g, g * norm.xhat(ld(x + (b * C + row) * N + n), b));
  }
};

template <typename F>
__global__ void __launch_bounds__(kThreads) row_sums_kernel(int64_t R, int64_t N, F f, float* part) {
  __shared__ float2 scratch[kThreads / 32];
  const int64_t r = blockIdx.x, b = blockIdx.y, base = (b * R + r) * N;
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    const float2 v = f(r, base + n);
    acc.x += v.x;
    acc.y += v.y;
  }
  acc = segment_reduce(acc, kThreads, scratch);
  if (threadIdx.x == 0) {
    part[b * 2 * R + r] = acc.x;
    part[b * 2 * R + R + r] = acc.y;
  }
}

template <typename F>
Status row_sums(const Dims& d, int64_t R, F f, float* part, float* out, cudaStream_t stream, const char* where) {
  row_sums_kernel<<<dim3(static_cast<unsigned>(R), static_cast<unsigned>(d.B)), kThreads, 0, stream>>>(R, d.N, f, part);
  SHVIT_CHECK_LAUNCH(where);
  return out == nullptr ? kOk : sum_partials(part, d.B, 2 * R, out, stream, where);
}

// Training BatchNorm backward of a (B, R, N) tensor: out = (g - (sum_g + zhat * sum_gz) / (B*N)) * invstd * w,
// zhat = (z - mean) * invstd, sums = [sum_g (R), sum_gz (R)]. out may alias g or z.
template <typename T>
__global__ void __launch_bounds__(kThreads) bn_grad_kernel(Dims d, int64_t R, const T* g, const T* z,
                                                           const float* mean, const float* invstd, const float* w,
                                                           const float* sums, T* out) {
  const int64_t total = d.B * R * d.N;
  const float count = static_cast<float>(d.B * d.N);
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < total; i += int64_t{gridDim.x} * kThreads) {
    const int64_t r = i / d.N % R;
    const float zhat = (ld(z + i) - mean[r]) * invstd[r];
    out[i] = from_f<T>((ld(g + i) - (sums[r] + zhat * sums[R + r]) / count) * invstd[r] * w[r]);
  }
}

// grad_x1 = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat)) [+ grad_y], gxhat = gn * gn_w, means over
// (P, N) of the sample from the per-(sample, p) sums rs = [sum gn, sum gn * xhat] (row_sums layout).
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_dx_kernel(Dims d, const float* gn, const T* x, GroupNorm norm,
                                                         const float* rs, const T* gy, bool residual, T* gx) {
  __shared__ float sums[2];
  const int64_t b = blockIdx.y, n = d.P * d.N;
  if (threadIdx.x == 0) {  // sequential: a fixed order
    float s1 = 0.f, s2 = 0.f;
    for (int64_t p = 0; p < d.P; ++p) {
      s1 = fmaf(norm.w[p], rs[b * 2 * d.P + p], s1);
      s2 = fmaf(norm.w[p], rs[b * 2 * d.P + d.P + p], s2);
    }
    sums[0] = s1 / static_cast<float>(n);
    sums[1] = s2 / static_cast<float>(n);
  }
  __syncthreads();
  for (int64_t e = int64_t{blockIdx.x} * kThreads + threadIdx.x; e < n; e += int64_t{gridDim.x} * kThreads) {
    const int64_t p = e / d.N, i = b * d.C * d.N + e;
    const float xhat = norm.xhat(ld(x + i), b);
    float v = norm.rstd[b] * (gn[b * n + e] * norm.w[p] - sums[0] - xhat * sums[1]);
    if (residual) v += ld(gy + i);
    gx[i] = from_f<T>(v);
  }
}

unsigned ew_blocks(int64_t total) {
  const int64_t blocks = ceil_div(total, kThreads);
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}

// ---- workspace -------------------------------------------------------------------------------------------------

// Carves 256-byte aligned pieces out of the workspace; with a null base it only measures.
struct Carve {
  uintptr_t base, off = 0;
  template <typename U>
  U* take(int64_t n) {
    off = (off + 255) / 256 * 256;
    U* p = reinterpret_cast<U*>(base + off);
    off += static_cast<uintptr_t>(n) * sizeof(U);
    return p;
  }
};

struct Plan {
  Dims d;
  int64_t gn_chunks, col_tiles;
  float *gn_part, *gn_mean, *gn_var, *gn_rstd;
  void *z, *o;
  float *stat_part, *qkv_s, *qkv_t, *qkv_is, *proj_s, *proj_t, *proj_is;  // training
  float *lse, *D, *gn, *rs, *wpart;                                        // backward
  void *go, *ga, *yp;
  int64_t bytes;
};

Plan make_plan(DType dt, const ShsaShape& s, bool train, bool backward, void* base) {
  Plan p{};
  p.d = Dims{s.B, s.C, s.P, s.Q, 2 * s.Q + s.P, s.N, 1.f / sqrtf(static_cast<float>(s.Q))};
  const Dims& d = p.d;
  const int64_t es = dt == DType::kFloat32 ? 4 : 2;
  p.gn_chunks = ceil_div(d.P * d.N, kGnChunk);
  p.col_tiles = shsa::gemm_col_tiles(d);
  Carve c{reinterpret_cast<uintptr_t>(base)};
  p.gn_part = c.take<float>(3 * p.gn_chunks * d.B);
  p.gn_mean = c.take<float>(d.B);
  p.gn_var = c.take<float>(d.B);
  p.gn_rstd = c.take<float>(d.B);
  p.z = c.take<unsigned char>(d.B * d.O * d.N * es);
  p.o = c.take<unsigned char>(d.B * d.P * d.N * es);
  if (train) {
    const int64_t rows = d.O > d.C ? d.O : d.C;
    p.stat_part = c.take<float>(3 * d.B * p.col_tiles * rows);
    p.qkv_s = c.take<float>(d.O);
    p.qkv_t = c.take<float>(d.O);
    p.qkv_is = c.take<float>(d.O);
    p.proj_s = c.take<float>(d.C);
    p.proj_t = c.take<float>(d.C);
    p.proj_is = c.take<float>(d.C);
  }
  if (backward) {
    p.lse = c.take<float>(d.B * d.N);
    p.D = c.take<float>(d.B * d.N);
    p.gn = c.take<float>(d.B * d.P * d.N);
    const int64_t rows = d.O > d.C ? d.O : d.C;
    p.rs = c.take<float>(d.B * 2 * rows);
    const int64_t wp = shsa::wgrad_splits(d.C, d.C, d.B * d.N) * d.C * d.C;
    const int64_t wq = shsa::wgrad_splits(d.O, d.P, d.B * d.N) * d.O * d.P;
    p.wpart = c.take<float>(wp > wq ? wp : wq);
    p.go = c.take<unsigned char>(d.B * d.P * d.N * es);
    p.ga = c.take<unsigned char>(d.B * d.O * d.N * es);
    if (train) p.yp = c.take<unsigned char>(d.B * d.C * d.N * es);
  }
  p.bytes = static_cast<int64_t>(c.off);
  return p;
}

Status check(DType dt, const ShsaShape& s) {
  if (s.B < 1 || s.C < 1 || s.P < 1 || s.Q < 1 || s.N < 1) return invalid("shsa: empty shape");
  if (s.P > s.C) return invalid("shsa: pdim exceeds dim");
  if (s.B > 65535) return invalid("shsa: batch must be at most 65535 (grid z)");
  if (s.B * s.N >= INT_MAX || s.C * s.C >= INT_MAX) return invalid("shsa: shape too large");
  if (dt != DType::kFloat32) {
    int dev = 0, major = 0;
    const cudaError_t e1 = cudaGetDevice(&dev);
    if (e1 != cudaSuccess) return Status{e1, "shsa: cudaGetDevice"};
    const cudaError_t e2 = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (e2 != cudaSuccess) return Status{e2, "shsa: cudaDeviceGetAttribute"};
    if (major < 8) return invalid("shsa: the fp16 / bf16 kernels need compute capability 8.0 or newer");
  }
  return kOk;
}

// GroupNorm statistics of x1 into p.gn_mean / p.gn_rstd.
Status gn_stats(DType dt, const Plan& p, const void* x, const ShsaParams& prm, cudaStream_t stream) {
  const Dims& d = p.d;
  SHVIT_TRY(dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    gn_stats_kernel<T><<<dim3(static_cast<unsigned>(p.gn_chunks), static_cast<unsigned>(d.B)), kThreads, 0, stream>>>(
        d, static_cast<const T*>(x), p.gn_part);
    SHVIT_CHECK_LAUNCH("shsa/groupnorm stats");
    return kOk;
  }));
  SHVIT_TRY(welford_partials(p.gn_part, p.gn_chunks, d.B, p.gn_mean, p.gn_var, stream, "shsa/groupnorm reduce"));
  return coefs(p.gn_var, nullptr, nullptr, prm.gn_eps, d.B, p.gn_rstd, nullptr, nullptr, stream);
}

GroupNorm groupnorm(const Plan& p, const ShsaParams& prm) {
  return GroupNorm{p.gn_mean, p.gn_rstd, prm.gn_w, prm.gn_b};
}

// Training BatchNorm statistics of rows R from Welford partials (S = B * col_tiles) and the coefficients.
Status bn_stats(const Plan& p, int64_t R, const float* w, const float* b, float eps, float* mean, float* var, float* s,
                float* t, cudaStream_t stream) {
  SHVIT_TRY(welford_partials(p.stat_part, p.d.B * p.col_tiles, R, mean, var, stream, "shsa/batchnorm stats reduce"));
  return coefs(var, w, b, eps, R, nullptr, s, t, stream);
}

// Weight-gradient reduce of the split partials.
Status wgrad_reduce(const Plan& p, int64_t rows, int64_t cols, float* out, cudaStream_t stream, const char* where) {
  return sum_partials(p.wpart, shsa::wgrad_splits(rows, cols, p.d.B * p.d.N), rows * cols, out, stream, where);
}

// The common backward after the recomputed forward: everything from the proj grads down to grad_x.
// gz: the grad of the proj products (grad_y in eval, the BatchNorm backward of it in training). qkv_aff: how z is
// read; train: the qkv BatchNorm backward runs on ga.
template <typename T>
Status backward(const Plan& p, const T* gz, const T* gy, const T* x, const ShsaParams& prm, const ShsaStats* st,
                bool residual, T* gx, const ShsaGrads& g, RowAffine qkv_aff, cudaStream_t stream, DType dt) {
  const Dims& d = p.d;
  const int64_t tokens = d.B * d.N;
  SHVIT_TRY(shsa::wgrad_proj(dt, d, gz, p.o, x, p.wpart, shsa::wgrad_splits(d.C, d.C, tokens), stream));
  SHVIT_TRY(wgrad_reduce(p, d.C, d.C, g.proj_w, stream, "shsa/proj weight grad reduce"));
  SHVIT_TRY(shsa::proj_bwd(dt, d, prm.proj_w, gz, p.o, x, gy, residual, p.go, gx, stream));
  SHVIT_TRY(shsa::attention_delta(dt, d, p.go, p.o, p.D, stream));
  SHVIT_TRY(shsa::attention_bwd(dt, d, p.z, qkv_aff, p.go, p.lse, p.D, p.ga, stream));
  T* ga = static_cast<T*>(p.ga);
  const T* zq = st != nullptr ? static_cast<const T*>(p.z) : nullptr;
  const float* qmean = st != nullptr ? st->qkv_mean : nullptr;
  SHVIT_TRY(row_sums(d, d.O, GradSums<T>{ga, zq, qmean, p.qkv_is}, p.rs, g.qkv_bn, stream, "shsa/qkv bias grad"));
  if (st != nullptr) {  // ga becomes the grad of the pre-BN qkv products, in place
    bn_grad_kernel<T><<<ew_blocks(d.B * d.O * d.N), kThreads, 0, stream>>>(d, d.O, ga, zq, qmean, p.qkv_is,
                                                                            prm.qkv_bn_w, g.qkv_bn, ga);
    SHVIT_CHECK_LAUNCH("shsa/qkv batchnorm backward");
  }
  const GroupNorm norm = groupnorm(p, prm);
  SHVIT_TRY(shsa::wgrad_qkv(dt, d, ga, x, norm, p.wpart, shsa::wgrad_splits(d.O, d.P, tokens), stream));
  SHVIT_TRY(wgrad_reduce(p, d.O, d.P, g.qkv_w, stream, "shsa/qkv weight grad reduce"));
  SHVIT_TRY(shsa::gn_bwd(dt, d, prm.qkv_w, ga, p.gn, stream));
  SHVIT_TRY(row_sums(d, d.P, GnGradSums<T>{p.gn, x, norm, d.C, d.P, d.N}, p.rs, g.gn, stream, "shsa/groupnorm grads"));
  gn_dx_kernel<T><<<dim3(ew_blocks(d.P * d.N), static_cast<unsigned>(d.B)), kThreads, 0, stream>>>(
      d, p.gn, x, norm, p.rs, gy, residual, gx);
  SHVIT_CHECK_LAUNCH("shsa/groupnorm backward");
  return kOk;
}

}  // namespace

int64_t shsa_workspace(DType dt, const ShsaShape& s, bool train, bool backward) {
  return make_plan(dt, s, train, backward, nullptr).bytes;
}

Status shsa_fwd(DType dt, const ShsaShape& s, const void* x, const ShsaParams& prm, bool residual, void* y,
                void* workspace, cudaStream_t stream) {
  SHVIT_TRY(check(dt, s));
  const Plan p = make_plan(dt, s, false, false, workspace);
  SHVIT_TRY(gn_stats(dt, p, x, prm, stream));
  SHVIT_TRY(shsa::qkv(dt, p.d, x, groupnorm(p, prm), prm.qkv_w, prm.qkv_b, p.z, nullptr, stream));
  SHVIT_TRY(shsa::attention_fwd(dt, p.d, p.z, RowAffine{}, p.o, nullptr, stream));
  return shsa::proj(dt, p.d, p.o, x, prm.proj_w, prm.proj_b, residual, y, nullptr, stream);
}

Status shsa_train_fwd(DType dt, const ShsaShape& s, const void* x, const ShsaParams& prm, bool residual, void* y,
                      const ShsaStats& st, void* workspace, cudaStream_t stream) {
  SHVIT_TRY(check(dt, s));
  const Plan p = make_plan(dt, s, true, false, workspace);
  const Dims& d = p.d;
  SHVIT_TRY(gn_stats(dt, p, x, prm, stream));
  SHVIT_TRY(shsa::qkv(dt, d, x, groupnorm(p, prm), prm.qkv_w, nullptr, p.z, p.stat_part, stream));
  SHVIT_TRY(bn_stats(p, d.O, prm.qkv_bn_w, prm.qkv_bn_b, prm.qkv_eps, st.qkv_mean, st.qkv_var, p.qkv_s, p.qkv_t,
                     stream));
  SHVIT_TRY(shsa::attention_fwd(dt, d, p.z, RowAffine{st.qkv_mean, p.qkv_s, p.qkv_t}, p.o, nullptr, stream));
  SHVIT_TRY(shsa::proj(dt, d, p.o, x, prm.proj_w, nullptr, false, y, p.stat_part, stream));
  SHVIT_TRY(bn_stats(p, d.C, prm.proj_bn_w, prm.proj_bn_b, prm.proj_eps, st.proj_mean, st.proj_var, p.proj_s,
                     p.proj_t, stream));
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    bn_apply_kernel<T><<<ew_blocks(d.B * d.C * d.N), kThreads, 0, stream>>>(
        d, RowAffine{st.proj_mean, p.proj_s, p.proj_t}, static_cast<const T*>(x), residual, static_cast<T*>(y));
    SHVIT_CHECK_LAUNCH("shsa/proj batchnorm");
    return kOk;
  });
}

Status shsa_bwd(DType dt, const ShsaShape& s, const void* grad_y, const void* x, const ShsaParams& prm, bool residual,
                void* grad_x, const ShsaGrads& g, void* workspace, cudaStream_t stream) {
  SHVIT_TRY(check(dt, s));
  const Plan p = make_plan(dt, s, false, true, workspace);
  const Dims& d = p.d;
  SHVIT_TRY(gn_stats(dt, p, x, prm, stream));
  SHVIT_TRY(shsa::qkv(dt, d, x, groupnorm(p, prm), prm.qkv_w, prm.qkv_b, p.z, nullptr, stream));
  SHVIT_TRY(shsa::attention_fwd(dt, d, p.z, RowAffine{}, p.o, p.lse, stream));
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* gy = static_cast<const T*>(grad_y);
    SHVIT_TRY(row_sums(d, d.C, GradSums<T>{gy, nullptr, nullptr, nullptr}, p.rs, g.proj_bn, stream,
                       "shsa/proj bias grad"));
    return backward<T>(p, gy, gy, static_cast<const T*>(x), prm, nullptr, residual, static_cast<T*>(grad_x), g,
                       RowAffine{}, stream, dt);
  });
}

Status shsa_train_bwd(DType dt, const ShsaShape& s, const void* grad_y, const void* x, const ShsaParams& prm,
                      const ShsaStats& st, bool residual, void* grad_x, const ShsaGrads& g, void* workspace,
                      cudaStream_t stream) {
  SHVIT_TRY(check(dt, s));
  const Plan p = make_plan(dt, s, true, true, workspace);
  const Dims& d = p.d;
  SHVIT_TRY(gn_stats(dt, p, x, prm, stream));
  SHVIT_TRY(shsa::qkv(dt, d, x, groupnorm(p, prm), prm.qkv_w, nullptr, p.z, nullptr, stream));
  SHVIT_TRY(coefs(st.qkv_var, prm.qkv_bn_w, prm.qkv_bn_b, prm.qkv_eps, d.O, p.qkv_is, p.qkv_s, p.qkv_t, stream));
  const RowAffine qkv_aff{st.qkv_mean, p.qkv_s, p.qkv_t};
  SHVIT_TRY(shsa::attention_fwd(dt, d, p.z, qkv_aff, p.o, p.lse, stream));
  SHVIT_TRY(shsa::proj(dt, d, p.o, x, prm.proj_w, nullptr, false, p.yp, nullptr, stream));
  SHVIT_TRY(coefs(st.proj_var, nullptr, nullptr, prm.proj_eps, d.C, p.proj_is, nullptr, nullptr, stream));
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* gy = static_cast<const T*>(grad_y);
    T* gz = static_cast<T*>(p.yp);  // the proj BatchNorm backward overwrites the recomputed pre-BN output
    SHVIT_TRY(row_sums(d, d.C, GradSums<T>{gy, gz, st.proj_mean, p.proj_is}, p.rs, g.proj_bn, stream,
                       "shsa/proj batchnorm grads"));
    bn_grad_kernel<T><<<ew_blocks(d.B * d.C * d.N), kThreads, 0, stream>>>(d, d.C, gy, gz, st.proj_mean, p.proj_is,
                                                                            prm.proj_bn_w, g.proj_bn, gz);
    SHVIT_CHECK_LAUNCH("shsa/proj batchnorm backward");
    return backward<T>(p, gz, gy, static_cast<const T*>(x), prm, &st, residual, static_cast<T*>(grad_x), g, qkv_aff,
                       stream, dt);
  });
}

}  // namespace shvit::cuda
