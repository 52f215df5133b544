// Depthwise conv + BN kernels for NCHW-strided tensors (any strides; the channels_last family is in
// dwconv_bn_cl.cu).
//
// Conv passes (conv_kernel, every Mode): a block computes a th x tw tile of outputs of g channel planes of one
// sample, one output per thread: tw = pow2 >= Wo (<= 32), th = pow2 >= Ho (<= 256 / tw), g = channels filling
// the block (<= 32), so small planes (7x7, 14x14) still give full blocks. The input halo of the tile
// ((th-1)*stride + k) x ((tw-1)*stride + k) per plane is staged in shared memory as fp32 (<= 19 KiB), each x
// element is read from global memory once per tile. Block = g*th*tw threads (32..256), grid = (B * tiles, C / g).
// Statistics are reduced over each plane's th*tw threads (segment_reduce) into one partial per (block, channel).
//
// grad_x (grad_x_kernel): the same tiling over the input, with the matching dz window in shared memory.
// grad_w (grad_w_kernel): grid (C, grad_w_partials): 256 threads stride over a slice of (b, oh, ow) holding the k*k
// tap sums in registers; warp shuffles + one shared-memory pass give a partial per tap.
#include "dwconv_bn.cuh"

namespace shvit::cuda::dw {
namespace {

struct Tile {
  int tw, th, g;
  int64_t tiles_w, tiles_h;
  int threads() const { return g * th * tw; }
};

Tile make_tile(int64_t h, int64_t w) {
  Tile t;
  t.tw = pow2_at_least(w, 32);
  t.th = pow2_at_least(h, 256 / t.tw);
  t.g = 256 / (t.tw * t.th) < 32 ? 256 / (t.tw * t.th) : 32;
  t.tiles_w = ceil_div(w, t.tw);
  t.tiles_h = ceil_div(h, t.th);
  return t;
}

__host__ __device__ inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Halo extent of a tile of n outputs (conv) or the dz window of n inputs (grad_x).
__host__ __device__ inline int conv_halo(int n, int k, int stride) { return (n - 1) * stride + k; }
__host__ __device__ inline int grad_window(int n, int k, int stride) { return (n + k - 2) / stride + 2; }

template <typename T, int K, Mode M>
__global__ void __launch_bounds__(256) conv_kernel(Args a, Tile t) {
  extern __shared__ float halo[];
  const int S = a.s.stride, pad = K / 2, L = t.th * t.tw;
  const int gi = threadIdx.x / L, ty = threadIdx.x % L / t.tw, tx = threadIdx.x % t.tw;
  const int64_t tiles = t.tiles_w * t.tiles_h, b = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const int64_t oh0 = tile / t.tiles_w * t.th, ow0 = tile % t.tiles_w * t.tw, c0 = int64_t{blockIdx.y} * t.g;
  const int IH = conv_halo(t.th, K, S), IW = conv_halo(t.tw, K, S);
  const int64_t C = a.s.C;

  const T* x = static_cast<const T*>(a.x);
  for (int i = threadIdx.x; i < t.g * IH * IW; i += blockDim.x) {
    const int p = i / (IH * IW), hh = i % (IH * IW) / IW, ww = i % IW;
    const int64_t c = c0 + p, ih = oh0 * S - pad + hh, iw = ow0 * S - pad + ww;
    const bool in = c < C && ih >= 0 && ih < a.s.H && iw >= 0 && iw < a.s.W;
    halo[i] = in ? ld(x + b * a.xs.n + c * a.xs.c + ih * a.xs.h + iw * a.xs.w) : 0.f;
  }
  __syncthreads();

  const int64_t c = c0 + gi, oh = oh0 + ty, ow = ow0 + tx;
  const bool valid = c < C && oh < a.Ho && ow < a.Wo;
  const float* hp = halo + (gi * IH + ty * S) * IW + tx * S;  // top-left tap of this output
  float z = 0.f;
  if (valid) {
    const float* wc = a.w + c * K * K;
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int j = 0; j < K; ++j) z = fmaf(hp[i * IW + j], __ldg(wc + i * K + j), z);
  }
  const int64_t yi = b * a.ys.n + c * a.ys.c + oh * a.ys.h + ow * a.ys.w;

  if constexpr (M == Mode::kForward) {
    if (valid) {
      const Affine f = affine(a, c);
      float v = (z - f.m) * f.s + f.t;
      if (a.residual) v += hp[pad * IW + pad];  // stride 1: the centre tap is x at this output
      if (a.relu) v = v < 0.f ? 0.f : v;
      static_cast<T*>(a.y)[yi] = from_f<T>(v);
    }
  } else if constexpr (M == Mode::kStats) {
    __shared__ Welford scratch[8];
    const Welford w = segment_reduce(valid ? Welford{1.f, z, 0.f} : Welford{0.f, 0.f, 0.f}, L, scratch);
    if (threadIdx.x % L == 0 && c < C) {
      const int64_t plane = int64_t{gridDim.x} * C, i = int64_t{blockIdx.x} * C + c;
      a.part[i] = w.n;
      a.part[plane + i] = w.mean;
      a.part[2 * plane + i] = w.m2;
    }
  } else {
    float g = 0.f, zhat = 0.f, invstd = 0.f;
    if (valid) {
      g = grad_out<T>(a, yi);
      invstd = 1.f / sqrtf(a.var[c] + a.eps);
      zhat = (z - a.mean[c]) * invstd;
    }
    if constexpr (M == Mode::kGradSums) {
      __shared__ float2 scratch[8];
      const float2 v = segment_reduce(make_float2(g, g * zhat), L, scratch);
      if (threadIdx.x % L == 0 && c < C) {
        a.part[int64_t{blockIdx.x} * 2 * C + c] = v.x;
        a.part[int64_t{blockIdx.x} * 2 * C + C + c] = v.y;
      }
    } else if (valid) {
      const float count = static_cast<float>(a.s.B * a.Ho * a.Wo);
      a.dz[((b * C + c) * a.Ho + oh) * a.Wo + ow] =
          (g - (a.sums[c] + zhat * a.sums[C + c]) / count) * invstd * a.bn_w[c];
    }
  }
}

// grad_x = transposed depthwise conv of dz [+ g]: gx[ih, iw] = sum over taps (i, j) with ih + pad - i = oh * stride
// (same for w) of dz[oh, ow] * w[i, j].
template <typename T, int K>
__global__ void __launch_bounds__(256) grad_x_kernel(Args a, Tile t) {
  extern __shared__ float win[];
  const int S = a.s.stride, pad = K / 2, L = t.th * t.tw;
  const int gi = threadIdx.x / L, ty = threadIdx.x % L / t.tw, tx = threadIdx.x % t.tw;
  const int64_t tiles = t.tiles_w * t.tiles_h, b = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const int64_t ih0 = tile / t.tiles_w * t.th, iw0 = tile % t.tiles_w * t.tw, c0 = int64_t{blockIdx.y} * t.g;
  const int DH = grad_window(t.th, K, S), DW = grad_window(t.tw, K, S);
  const int64_t oh_lo = floor_div(ih0 + pad - (K - 1), S), ow_lo = floor_div(iw0 + pad - (K - 1), S);
  const int64_t C = a.s.C;

  for (int i = threadIdx.x; i < t.g * DH * DW; i += blockDim.x) {
    const int p = i / (DH * DW), hh = i % (DH * DW) / DW, ww = i % DW;
    const int64_t c = c0 + p, oh = oh_lo + hh, ow = ow_lo + ww;
    const bool in = c < C && oh >= 0 && oh < a.Ho && ow >= 0 && ow < a.Wo;
    win[i] = in ? a.dz[((b * C + c) * a.Ho + oh) * a.Wo + ow] : 0.f;
  }
  __syncthreads();

  const int64_t c = c0 + gi, ih = ih0 + ty, iw = iw0 + tx;
  if (c >= C || ih >= a.s.H || iw >= a.s.W) return;
  const float* wc = a.w + c * K * K;
  const float* plane = win + gi * DH * DW;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int64_t rh = ih + pad - i;  // = oh * S for a tap that reaches an output
    if (S == 2 && (rh & 1)) continue;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int64_t rw = iw + pad - j;
      if (S == 2 && (rw & 1)) continue;
      acc = fmaf(plane[(rh / S - oh_lo) * DW + (rw / S - ow_lo)], __ldg(wc + i * K + j), acc);
    }
  }
  if (a.residual) acc += grad_out<T>(a, b * a.ys.n + c * a.ys.c + ih * a.ys.h + iw * a.ys.w);
  static_cast<T*>(a.gx)[b * a.gxs.n + c * a.gxs.c + ih * a.gxs.h + iw * a.gxs.w] = from_f<T>(acc);
}

// grad_w[c, tap] partial over a slice of the outputs:
// sum of dz[b, c, oh, ow] * x[b, c, oh*S - pad + i, ow*S - pad + j].
template <typename T, int K>
__global__ void __launch_bounds__(256) grad_w_kernel(Args a) {
  __shared__ float red[K * K][8];
  const int S = a.s.stride, pad = K / 2;
  const int64_t c = blockIdx.x, C = a.s.C, n = a.Ho * a.Wo, total = a.s.B * n;
  const T* x = static_cast<const T*>(a.x) + c * a.xs.c;
  float acc[K * K];
#pragma unroll
  for (int i = 0; i < K * K; ++i) acc[i] = 0.f;
  for (int64_t e = int64_t{blockIdx.y} * blockDim.x + threadIdx.x; e < total; e += int64_t{gridDim.y} * blockDim.x) {
    const int64_t b = e / n, oh = e % n / a.Wo, ow = e % a.Wo;
    const float d = a.dz[(b * C + c) * n + oh * a.Wo + ow];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int64_t ih = oh * S - pad + i;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int64_t iw = ow * S - pad + j;
        if (ih >= 0 && ih < a.s.H && iw >= 0 && iw < a.s.W)
          acc[i * K + j] = fmaf(d, ld(x + b * a.xs.n + ih * a.xs.h + iw * a.xs.w), acc[i * K + j]);
      }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < K * K; ++i) {
    float v = acc[i];
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) red[i][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < K * K) {
    float v = 0.f;
    for (int w = 0; w < 8; ++w) v += red[threadIdx.x][w];
    a.part[(blockIdx.y * C + c) * K * K + threadIdx.x] = v;
  }
}

}  // namespace

int64_t conv_partials_nchw(const DwShape& s) {
  const Tile t = make_tile(s.Ho(), s.Wo());
  return s.B * t.tiles_h * t.tiles_w;
}

Status conv_nchw(DType dt, Mode mode, const Args& a, cudaStream_t stream) {
  const Tile t = make_tile(a.Ho, a.Wo);
  const dim3 grid(static_cast<unsigned>(a.s.B * t.tiles_h * t.tiles_w), static_cast<unsigned>(ceil_div(a.s.C, t.g)));
  const size_t smem = sizeof(float) * t.g * conv_halo(t.th, a.s.k, a.s.stride) * conv_halo(t.tw, a.s.k, a.s.stride);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_k(a.s.k, [&](auto kk) {
      constexpr int K = decltype(kk)::value;
      switch (mode) {
        case Mode::kForward: conv_kernel<T, K, Mode::kForward><<<grid, t.threads(), smem, stream>>>(a, t); break;
        case Mode::kStats: conv_kernel<T, K, Mode::kStats><<<grid, t.threads(), smem, stream>>>(a, t); break;
        case Mode::kGradSums: conv_kernel<T, K, Mode::kGradSums><<<grid, t.threads(), smem, stream>>>(a, t); break;
        case Mode::kGradZ: conv_kernel<T, K, Mode::kGradZ><<<grid, t.threads(), smem, stream>>>(a, t); break;
      }
      SHVIT_CHECK_LAUNCH("dwconv_bn/conv (NCHW)");
      return kOk;
    });
  });
}

Status grad_x_nchw(DType dt, const Args& a, cudaStream_t stream) {
  const Tile t = make_tile(a.s.H, a.s.W);
  const dim3 grid(static_cast<unsigned>(a.s.B * t.tiles_h * t.tiles_w), static_cast<unsigned>(ceil_div(a.s.C, t.g)));
  const size_t smem =
      sizeof(float) * t.g * grad_window(t.th, a.s.k, a.s.stride) * grad_window(t.tw, a.s.k, a.s.stride);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_k(a.s.k, [&](auto kk) {
      grad_x_kernel<T, decltype(kk)::value><<<grid, t.threads(), smem, stream>>>(a, t);
      SHVIT_CHECK_LAUNCH("dwconv_bn/grad_x (NCHW)");
      return kOk;
    });
  });
}

Status grad_w_nchw(DType dt, const Args& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.s.C), static_cast<unsigned>(grad_w_partials(a.s)));
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_k(a.s.k, [&](auto kk) {
      grad_w_kernel<T, decltype(kk)::value><<<grid, 256, 0, stream>>>(a);
      SHVIT_CHECK_LAUNCH("dwconv_bn/grad_w (NCHW)");
      return kOk;
    });
  });
}

}  // namespace shvit::cuda::dw
