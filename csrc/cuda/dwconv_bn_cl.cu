// Depthwise conv + BN kernels for channels_last tensors (channel stride 1; the pixel strides are free).
//
// A thread owns V = 16 bytes / sizeof(T) consecutive channels (8 for fp16/bf16, 4 for fp32) of a pixel, so each
// tap is one 16-byte load (when C % V == 0 and every base pointer and pixel stride is V-aligned; otherwise the
// same code loads the channels one by one, masking the tail). Block = 256 threads = bx channel vectors x by pixel
// lanes (bx = pow2 >= C / V, at most 32, and small enough that the block's weights, transposed to [tap][channel]
// in shared memory, take <= 16 KiB); a block covers by * 4 pixels. Grid = (pixels / (by*4), C / (bx*V)).
// Neighbouring taps of a pixel are other pixels' centres, so the re-reads of x hit L1/L2.
// Statistics: each thread accumulates its pixels, then a fixed tree over the by pixel lanes in shared memory gives
// one partial per (block, channel).
#include "dwconv_bn.cuh"

namespace shvit::cuda::dw {
namespace {

constexpr int kThreads = 256, kPixPerThread = 4, kWeightFloats = 4096;

struct Geom {
  int bx, by;
  int64_t ppb;  // pixels per block
};

template <typename T>
Geom make_geom(const DwShape& s) {
  constexpr int V = kVec<T>;
  int cap = 32;
  while (cap > 1 && cap * V * s.k * s.k > kWeightFloats) cap /= 2;
  Geom g;
  g.bx = pow2_at_least(ceil_div(s.C, V), cap);
  g.by = kThreads / g.bx;
  g.ppb = int64_t{g.by} * kPixPerThread;
  return g;
}

// V channels starting at p (channel stride 1): one 16-byte access when vec, else n <= V scalar ones.
template <typename T>
__device__ __forceinline__ void load_px(const T* p, bool vec, int n, float* out) {
  if (vec) {
    ld_vec(p, out);
  } else {
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) out[v] = v < n ? ld(p + v) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_px(T* p, bool vec, int n, const float* in) {
  if (vec) {
    st_vec(p, in);
  } else {
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v)
      if (v < n) p[v] = from_f<T>(in[v]);
  }
}

// The same for the fp32 dz buffer (V floats: one or two 16-byte accesses).
template <int V>
__device__ __forceinline__ void load_dz(const float* p, bool vec, int n, float* out) {
#pragma unroll
  for (int v = 0; v < V; v += 4) {
    if (vec) {
      const float4 q = *reinterpret_cast<const float4*>(p + v);
      out[v] = q.x, out[v + 1] = q.y, out[v + 2] = q.z, out[v + 3] = q.w;
    } else {
#pragma unroll
      for (int u = v; u < v + 4; ++u) out[u] = u < n ? p[u] : 0.f;
    }
  }
}

template <int V>
__device__ __forceinline__ void store_dz(float* p, bool vec, int n, const float* in) {
#pragma unroll
  for (int v = 0; v < V; v += 4) {
    if (vec) {
      *reinterpret_cast<float4*>(p + v) = make_float4(in[v], in[v + 1], in[v + 2], in[v + 3]);
    } else {
#pragma unroll
      for (int u = v; u < v + 4; ++u)
        if (u < n) p[u] = in[u];
    }
  }
}

// g = grad_y [* (y > 0)] for V channels of a pixel at element offset i of grad_y / y.
template <typename T>
__device__ __forceinline__ void grad_px(const Args& a, int64_t i, bool vec, int n, float* g) {
  load_px(static_cast<const T*>(a.gy) + i, vec, n, g);
  if (a.relu) {
    float yv[kVec<T>];
    load_px(static_cast<const T*>(a.yf) + i, vec, n, yv);
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) g[v] = yv[v] > 0.f ? g[v] : 0.f;
  }
}

// Stages the block's weights as [tap][channel] (channels cb .. cb + cw) in shared memory.
template <int K>
__device__ __forceinline__ void stage_weights(const Args& a, int64_t cb, int cw, float* ws) {
  for (int i = threadIdx.x; i < K * K * cw; i += blockDim.x) {
    const int64_t c = cb + i % cw;
    ws[i] = c < a.s.C ? a.w[c * K * K + i / cw] : 0.f;
  }
}

// Merges acc (V values per thread) over the by pixel lanes of the block in a fixed tree; valid for ty == 0.
template <typename V, int N>
__device__ void reduce_lanes(V* acc, V* red, const Geom& g) {
  const int ty = threadIdx.x / g.bx, row = g.bx * N;
  __syncthreads();  // red aliases the staged weights
#pragma unroll
  for (int v = 0; v < N; ++v) red[threadIdx.x * N + v] = acc[v];
  __syncthreads();
  for (int half = g.by / 2; half > 0; half /= 2) {
    if (ty < half)
#pragma unroll
      for (int v = 0; v < N; ++v)
        red[threadIdx.x * N + v] = merge_any(red[threadIdx.x * N + v], red[threadIdx.x * N + half * row + v]);
    __syncthreads();
  }
#pragma unroll
  for (int v = 0; v < N; ++v) acc[v] = red[threadIdx.x * N + v];
}

template <typename T, int K, Mode M>
__global__ void __launch_bounds__(kThreads) conv_kernel(Args a, Geom g, bool vec) {
  constexpr int V = kVec<T>;
  extern __shared__ float4 smem4[];
  float* ws = reinterpret_cast<float*>(smem4);
  const int S = a.s.stride, pad = K / 2, cw = g.bx * V;
  const int tx = threadIdx.x % g.bx, ty = threadIdx.x / g.bx;
  const int64_t C = a.s.C, cb = int64_t{blockIdx.y} * cw, c0 = cb + tx * V;
  const int nc = C - c0 < V ? static_cast<int>(C - c0) : V;  // channels of this thread (<= 0: none)
  stage_weights<K>(a, cb, cw, ws);
  __syncthreads();

  Affine f[V];
  Welford st[V];
  float2 sums[V];
  float mean[V], invstd[V], k1[V], sg[V], sgz[V];
  const float count = static_cast<float>(a.s.B * a.Ho * a.Wo);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t c = v < nc ? c0 + v : 0;
    if constexpr (M == Mode::kForward) f[v] = affine(a, c);
    if constexpr (M == Mode::kStats) st[v] = Welford{0.f, 0.f, 0.f};
    if constexpr (M == Mode::kGradSums) sums[v] = make_float2(0.f, 0.f);
    if constexpr (M == Mode::kGradSums || M == Mode::kGradZ) {
      mean[v] = a.mean[c];
      invstd[v] = 1.f / sqrtf(a.var[c] + a.eps);
    }
    if constexpr (M == Mode::kGradZ) {
      k1[v] = invstd[v] * a.bn_w[c];
      sg[v] = a.sums[c];
      sgz[v] = a.sums[C + c];
    }
  }

  const T* x = static_cast<const T*>(a.x);
  const int64_t hw = a.Ho * a.Wo, p_end = min(a.s.B * hw, (blockIdx.x + int64_t{1}) * g.ppb);
  for (int64_t p = int64_t{blockIdx.x} * g.ppb + ty; nc > 0 && p < p_end; p += g.by) {
    const int64_t b = p / hw, oh = p % hw / a.Wo, ow = p % a.Wo;
    float z[V] = {}, xc[V] = {};
#pragma unroll 1  // rows stay a loop (compile time of the 48 instantiations); the unrolled columns give the ILP
    for (int i = 0; i < K; ++i) {
      const int64_t ih = oh * S - pad + i;
      if (ih < 0 || ih >= a.s.H) continue;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int64_t iw = ow * S - pad + j;
        if (iw < 0 || iw >= a.s.W) continue;
        float xv[V];
        load_px(x + b * a.xs.n + ih * a.xs.h + iw * a.xs.w + c0, vec, nc, xv);
        const float4* wq = reinterpret_cast<const float4*>(ws + (i * K + j) * cw + tx * V);
#pragma unroll
        for (int v = 0; v < V; v += 4) {
          const float4 w4 = wq[v / 4];
          z[v] = fmaf(xv[v], w4.x, z[v]);
          z[v + 1] = fmaf(xv[v + 1], w4.y, z[v + 1]);
          z[v + 2] = fmaf(xv[v + 2], w4.z, z[v + 2]);
          z[v + 3] = fmaf(xv[v + 3], w4.w, z[v + 3]);
        }
        if (i == pad && j == pad)
#pragma unroll
          for (int v = 0; v < V; ++v) xc[v] = xv[v];  // stride 1: x at this output, for the residual
      }
    }
    const int64_t yi = b * a.ys.n + oh * a.ys.h + ow * a.ys.w + c0;
    if constexpr (M == Mode::kForward) {
      float out[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float u = (z[v] - f[v].m) * f[v].s + f[v].t;
        if (a.residual) u += xc[v];
        out[v] = a.relu && u < 0.f ? 0.f : u;
      }
      store_px(static_cast<T*>(a.y) + yi, vec, nc, out);
    } else if constexpr (M == Mode::kStats) {
#pragma unroll
      for (int v = 0; v < V; ++v) push(st[v], z[v]);
    } else {
      float gv[V];
      grad_px<T>(a, yi, vec, nc, gv);
      float out[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float zhat = (z[v] - mean[v]) * invstd[v];
        if constexpr (M == Mode::kGradSums) {
          sums[v].x += gv[v];
          sums[v].y = fmaf(gv[v], zhat, sums[v].y);
        } else {
          out[v] = (gv[v] - (sg[v] + zhat * sgz[v]) / count) * k1[v];
        }
      }
      if constexpr (M == Mode::kGradZ) store_dz<V>(a.dz + p * C + c0, vec, nc, out);
    }
  }

  if constexpr (M == Mode::kStats) {
    reduce_lanes<Welford, V>(st, reinterpret_cast<Welford*>(smem4), g);
    if (ty == 0) {
      const int64_t plane = int64_t{gridDim.x} * C, i = int64_t{blockIdx.x} * C + c0;
      for (int v = 0; v < nc; ++v) {
        a.part[i + v] = st[v].n;
        a.part[plane + i + v] = st[v].mean;
        a.part[2 * plane + i + v] = st[v].m2;
      }
    }
  } else if constexpr (M == Mode::kGradSums) {
    reduce_lanes<float2, V>(sums, reinterpret_cast<float2*>(smem4), g);
    if (ty == 0)
      for (int v = 0; v < nc; ++v) {
        a.part[int64_t{blockIdx.x} * 2 * C + c0 + v] = sums[v].x;
        a.part[int64_t{blockIdx.x} * 2 * C + C + c0 + v] = sums[v].y;
      }
  }
}

// grad_x = transposed depthwise conv of dz [+ g], over input pixels.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads) grad_x_kernel(Args a, Geom g, bool vec) {
  constexpr int V = kVec<T>;
  extern __shared__ float4 smem4[];
  float* ws = reinterpret_cast<float*>(smem4);
  const int S = a.s.stride, pad = K / 2, cw = g.bx * V;
  const int tx = threadIdx.x % g.bx, ty = threadIdx.x / g.bx;
  const int64_t C = a.s.C, cb = int64_t{blockIdx.y} * cw, c0 = cb + tx * V;
  const int nc = C - c0 < V ? static_cast<int>(C - c0) : V;
  stage_weights<K>(a, cb, cw, ws);
  __syncthreads();

  const int64_t hw = a.s.H * a.s.W, p_end = min(a.s.B * hw, (blockIdx.x + int64_t{1}) * g.ppb);
  for (int64_t p = int64_t{blockIdx.x} * g.ppb + ty; nc > 0 && p < p_end; p += g.by) {
    const int64_t b = p / hw, ih = p % hw / a.s.W, iw = p % a.s.W;
    float acc[V] = {};
#pragma unroll 1
    for (int i = 0; i < K; ++i) {
      const int64_t rh = ih + pad - i;  // = oh * S for a tap that reaches an output
      if ((S == 2 && (rh & 1)) || rh < 0 || rh / S >= a.Ho) continue;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int64_t rw = iw + pad - j;
        if ((S == 2 && (rw & 1)) || rw < 0 || rw / S >= a.Wo) continue;
        float d[V];
        load_dz<V>(a.dz + ((b * a.Ho + rh / S) * a.Wo + rw / S) * C + c0, vec, nc, d);
        const float* wv = ws + (i * K + j) * cw + tx * V;
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = fmaf(d[v], wv[v], acc[v]);
      }
    }
    if (a.residual) {
      float gv[V];
      grad_px<T>(a, b * a.ys.n + ih * a.ys.h + iw * a.ys.w + c0, vec, nc, gv);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += gv[v];
    }
    store_px(static_cast<T*>(a.gx) + b * a.gxs.n + ih * a.gxs.h + iw * a.gxs.w + c0, vec, nc, acc);
  }
}

// grad_w partials of one tap (blockIdx.z) over a slice of the output pixels.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads) grad_w_kernel(Args a, Geom g, bool vec) {
  constexpr int V = kVec<T>;
  __shared__ float red[kThreads * V];
  const int S = a.s.stride, pad = K / 2, i = blockIdx.z / K, j = blockIdx.z % K;
  const int tx = threadIdx.x % g.bx, ty = threadIdx.x / g.bx;
  const int64_t C = a.s.C, c0 = (int64_t{blockIdx.x} * g.bx + tx) * V;
  const int nc = C - c0 < V ? static_cast<int>(C - c0) : V;
  const T* x = static_cast<const T*>(a.x);
  const int64_t hw = a.Ho * a.Wo, total = a.s.B * hw;
  float acc[V] = {};
  for (int64_t p = int64_t{blockIdx.y} * g.by + ty; nc > 0 && p < total; p += int64_t{gridDim.y} * g.by) {
    const int64_t b = p / hw, ih = p % hw / a.Wo * S - pad + i, iw = p % a.Wo * S - pad + j;
    if (ih < 0 || ih >= a.s.H || iw < 0 || iw >= a.s.W) continue;
    float d[V], xv[V];
    load_dz<V>(a.dz + p * C + c0, vec, nc, d);
    load_px(x + b * a.xs.n + ih * a.xs.h + iw * a.xs.w + c0, vec, nc, xv);
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = fmaf(d[v], xv[v], acc[v]);
  }
  reduce_lanes<float, V>(acc, red, g);
  if (ty == 0)
    for (int v = 0; v < nc; ++v) a.part[(blockIdx.y * C + c0 + v) * K * K + blockIdx.z] = acc[v];
}

// Whether every tensor the kernels touch allows the 16-byte path.
template <typename T>
bool vec_ok(const Args& a) {
  constexpr int V = kVec<T>;
  const auto px = [](const void* p, Strides4 s) {
    return p == nullptr || (aligned16(p) && s.n % V == 0 && s.h % V == 0 && s.w % V == 0);
  };
  return a.s.C % V == 0 && px(a.x, a.xs) && px(a.y, a.ys) && px(a.gy, a.ys) && px(a.yf, a.ys) &&
         px(a.gx, a.gxs) && (a.dz == nullptr || aligned16(a.dz));
}

}  // namespace

int64_t conv_partials_cl(DType dt, const DwShape& s) {
  int64_t ppb = 0;
  dispatch_dtype(dt, [&](auto tag) {
    ppb = make_geom<decltype(tag)>(s).ppb;
    return kOk;
  });
  return ceil_div(s.B * s.Ho() * s.Wo(), ppb);
}

Status conv_cl(DType dt, Mode mode, const Args& a, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const Geom g = make_geom<T>(a.s);
    const int cw = g.bx * kVec<T>;
    const dim3 grid(static_cast<unsigned>(ceil_div(a.s.B * a.Ho * a.Wo, g.ppb)),
                    static_cast<unsigned>(ceil_div(a.s.C, cw)));
    const size_t red = mode == Mode::kStats ? sizeof(Welford) : mode == Mode::kGradSums ? sizeof(float2) : 0;
    const size_t wbytes = sizeof(float) * a.s.k * a.s.k * cw, rbytes = red * kThreads * kVec<T>;
    const size_t smem = wbytes > rbytes ? wbytes : rbytes;
    const bool vec = vec_ok<T>(a);
    return dispatch_k(a.s.k, [&](auto kk) {
      constexpr int K = decltype(kk)::value;
      switch (mode) {
        case Mode::kForward: conv_kernel<T, K, Mode::kForward><<<grid, kThreads, smem, stream>>>(a, g, vec); break;
        case Mode::kStats: conv_kernel<T, K, Mode::kStats><<<grid, kThreads, smem, stream>>>(a, g, vec); break;
        case Mode::kGradSums: conv_kernel<T, K, Mode::kGradSums><<<grid, kThreads, smem, stream>>>(a, g, vec); break;
        case Mode::kGradZ: conv_kernel<T, K, Mode::kGradZ><<<grid, kThreads, smem, stream>>>(a, g, vec); break;
      }
      SHVIT_CHECK_LAUNCH("dwconv_bn/conv (channels_last)");
      return kOk;
    });
  });
}

Status grad_x_cl(DType dt, const Args& a, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const Geom g = make_geom<T>(a.s);
    const int cw = g.bx * kVec<T>;
    const dim3 grid(static_cast<unsigned>(ceil_div(a.s.B * a.s.H * a.s.W, g.ppb)),
                    static_cast<unsigned>(ceil_div(a.s.C, cw)));
    const size_t smem = sizeof(float) * a.s.k * a.s.k * cw;
    const bool vec = vec_ok<T>(a);
    return dispatch_k(a.s.k, [&](auto kk) {
      grad_x_kernel<T, decltype(kk)::value><<<grid, kThreads, smem, stream>>>(a, g, vec);
      SHVIT_CHECK_LAUNCH("dwconv_bn/grad_x (channels_last)");
      return kOk;
    });
  });
}

Status grad_w_cl(DType dt, const Args& a, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const Geom g = make_geom<T>(a.s);
    const dim3 grid(static_cast<unsigned>(ceil_div(a.s.C, g.bx * kVec<T>)),
                    static_cast<unsigned>(grad_w_partials(a.s)), static_cast<unsigned>(a.s.k * a.s.k));
    const bool vec = vec_ok<T>(a);
    return dispatch_k(a.s.k, [&](auto kk) {
      grad_w_kernel<T, decltype(kk)::value><<<grid, kThreads, 0, stream>>>(a, g, vec);
      SHVIT_CHECK_LAUNCH("dwconv_bn/grad_w (channels_last)");
      return kOk;
    });
  });
}

}  // namespace shvit::cuda::dw
