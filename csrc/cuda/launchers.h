// Host API of the CUDA kernels: torch-free launchers over raw pointers, shared by the .cu files and the torch
// bindings (bindings.cpp). Every launcher enqueues its kernels on `stream` and returns a Status: cudaSuccess,
// or the first launch (or argument) error with the name of the step that failed. Launchers never allocate,
// synchronise or read device memory on the host, so they can be captured into a CUDA graph; scratch memory
// ("workspace", fp32) is allocated by the caller with the size the matching *_workspace function returns.
//
// Activations are fp32, fp16 or bf16 (DType); every accumulation is fp32. Small per-channel parameters and
// statistics are fp32 arrays (the bindings convert them), so that they keep full precision under AMP.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace shvit::cuda {

enum class DType : int { kFloat32, kFloat16, kBFloat16 };

// cudaSuccess, or the error and the step it came from ("dwconv_bn/stats", "shsa/attention", ...).
struct Status {
  cudaError_t code;
  const char* where;
  bool ok() const { return code == cudaSuccess; }
};

// The virtual architectures the kernels were compiled for ("800,900") and CUDART_VERSION at build time.
const char* build_archs();
int build_cuda_version();

// Element strides of a 4-D (B, C, H, W) tensor.
struct Strides4 {
  int64_t n, c, h, w;
};

// ---- depthwise k x k conv + BatchNorm (+ residual) (+ ReLU) -------------------------------------------------
// Odd k <= 7, stride 1 or 2, padding k / 2, no conv bias. w is (C, k*k) fp32. Residual needs stride 1 (y has
// x's shape). Layout: the channels_last kernels run when C > 1 and x's channel stride is 1 (then y, grad_y and
// grad_x must have channel stride 1 too), the NCHW kernels (any strides) otherwise.
struct DwShape {
  int64_t B, C, H, W;  // input
  int k, stride;
  int64_t Ho() const { return (H + 2 * (k / 2) - k) / stride + 1; }
  int64_t Wo() const { return (W + 2 * (k / 2) - k) / stride + 1; }
};

// Eval form: y = [relu](dwconv(x, w) + bias).
Status dwconv_bn_fwd(DType dt, const DwShape& s, const void* x, Strides4 xs, const float* w, const float* bias,
                     bool relu, void* y, Strides4 ys, cudaStream_t stream);

// Training forward: mean / biased var of z = dwconv(x, w) per channel (written to mean, var: C floats each),
// y = [relu]((z - mean) / sqrt(var + eps) * bn_w + bn_b [+ x]).
int64_t dwconv_bn_train_fwd_workspace(DType dt, const DwShape& s, Strides4 xs);  // floats
Status dwconv_bn_train_fwd(DType dt, const DwShape& s, const void* x, Strides4 xs, const float* w,
                           const float* bn_w, const float* bn_b, float eps, bool residual, bool relu, void* y,
                           Strides4 ys, float* mean, float* var, float* workspace, cudaStream_t stream);

// Training backward; y is the forward's output (read for the ReLU mask) and grad_y has y's strides. grad_x has
// its own strides (gxs). grad_w (C*k*k) and grad_bn = [grad_bn_b (C), grad_bn_w (C)] are fp32.
int64_t dwconv_bn_train_bwd_workspace(DType dt, const DwShape& s, Strides4 xs);  // floats
Status dwconv_bn_train_bwd(DType dt, const DwShape& s, const void* grad_y, const void* x, Strides4 xs,
                           const float* w, const float* bn_w, const float* mean, const float* var, const void* y,
                           Strides4 ys, float eps, bool residual, bool relu, void* grad_x, Strides4 gxs,
                           float* grad_w, float* grad_bn, float* workspace, cudaStream_t stream);

// ---- SHSA (single-head self-attention of SHViT) -------------------------------------------------------------------
// x, y, grad_y, grad_x: contiguous (B, C, H*W) in dt. O = 2Q + P. Needs compute capability 8.0+ for fp16 / bf16.
struct ShsaShape {
  int64_t B, C, P, Q, N;  // batch, dim, pdim, qk_dim, H*W
};

// qkv_w (O, P) and proj_w (C, C) contiguous in dt; the vectors are fp32. Eval form: qkv_b, proj_b (BN folded).
// Training form: qkv_bn_w/b (O), proj_bn_w/b (C) and the eps of both BatchNorms.
struct ShsaParams {
  const float* gn_w;
  const float* gn_b;
  float gn_eps;
  const void* qkv_w;
  const void* proj_w;
  const float* qkv_b;
  const float* proj_b;
  const float* qkv_bn_w;
  const float* qkv_bn_b;
  float qkv_eps;
  const float* proj_bn_w;
  const float* proj_bn_b;
  float proj_eps;
};

// Batch mean and biased variance of the two BatchNorms' inputs (O, O, C, C floats).
struct ShsaStats {
  float* qkv_mean;
  float* qkv_var;
  float* proj_mean;
  float* proj_var;
};

// fp32 parameter gradients. gn = [grad gn_b (P), grad gn_w (P)]; qkv_bn = [grad of qkv_b or qkv_bn_b (O),
// grad qkv_bn_w (O, zero in the eval form)]; proj_bn likewise with C; qkv_w (O * P); proj_w (C * C).
struct ShsaGrads {
  float* gn;
  float* qkv_w;
  float* qkv_bn;
  float* proj_w;
  float* proj_bn;
};

// Bytes of workspace for the given form (train) and direction (backward).
int64_t shsa_workspace(DType dt, const ShsaShape& s, bool train, bool backward);

Status shsa_fwd(DType dt, const ShsaShape& s, const void* x, const ShsaParams& p, bool residual, void* y,
                void* workspace, cudaStream_t stream);
Status shsa_train_fwd(DType dt, const ShsaShape& s, const void* x, const ShsaParams& p, bool residual, void* y,
                      const ShsaStats& stats, void* workspace, cudaStream_t stream);
Status shsa_bwd(DType dt, const ShsaShape& s, const void* grad_y, const void* x, const ShsaParams& p, bool residual,
                void* grad_x, const ShsaGrads& g, void* workspace, cudaStream_t stream);
Status shsa_train_bwd(DType dt, const ShsaShape& s, const void* grad_y, const void* x, const ShsaParams& p,
                      const ShsaStats& stats, bool residual, void* grad_x, const ShsaGrads& g, void* workspace,
                      cudaStream_t stream);

}  // namespace shvit::cuda
