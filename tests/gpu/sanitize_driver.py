"""Runs every registered CUDA kernel once on tiny shapes, for tests/gpu/sanitize.sh (compute-sanitizer).

Covers both dwconv kernel families (NCHW, channels_last with the 16-byte and the scalar path), every kernel size
and stride, and both SHSA attention paths (tensor cores: fp16 / bf16 with qk_dim <= 64; FMA: fp32, qk_dim > 64).
"""
import torch

import shvit_kernels  # noqa: F401  (loads the extension: registers the shvit::*_cuda ops)

ops = torch.ops.shvit
dev = "cuda"


def dwconv(dtype, channels_last, c, k, stride):
    x = torch.randn(2, c, 9, 7, device=dev).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, k, k, device=dev).to(dtype)
    g, b = torch.rand(c, device=dev) + 0.5, torch.randn(c, device=dev)
    residual = stride == 1
    ops.dwconv_bn_fwd_cuda(x, w, b, stride, True)
    y, mean, var = ops.dwconv_bn_train_fwd_cuda(x, w, g, b, 1e-5, stride, residual, True)
    ops.dwconv_bn_train_bwd_cuda(torch.randn_like(y), x, w, g, mean, var, y, 1e-5, stride, residual, True)


def shsa(dtype, dim, pdim, qk, h, w):
    o = 2 * qk + pdim
    x = torch.randn(2, dim, h, w, device=dev).to(dtype)
    gn_w, gn_b = torch.randn(pdim, device=dev), torch.randn(pdim, device=dev)
    qkv_w, proj_w = torch.randn(o, pdim, device=dev).to(dtype), torch.randn(dim, dim, device=dev).to(dtype)
    ev = (gn_w, gn_b, 1e-5, qkv_w, torch.randn(o, device=dev), proj_w, torch.randn(dim, device=dev), qk, True)
    tr = (gn_w, gn_b, 1e-5, qkv_w, torch.rand(o, device=dev) + 0.5, torch.randn(o, device=dev), 1e-5, proj_w,
          torch.rand(dim, device=dev) + 0.5, torch.randn(dim, device=dev), 1e-5, qk, True)
    y = ops.shsa_fwd_cuda(x, *ev)
    ops.shsa_bwd_cuda(torch.randn_like(y), x, *ev)
    y, *stats = ops.shsa_train_fwd_cuda(x, *tr)
    ops.shsa_train_bwd_cuda(torch.randn_like(y), x, *tr[:11], *stats, *tr[11:])


def main():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            for c, k, stride in ((16, 3, 1), (13, 5, 2), (8, 7, 1), (3, 1, 2)):
                dwconv(dtype, channels_last, c, k, stride)
        shsa(dtype, 24, 10, 4, 9, 8)      # N = 72: two key blocks, one partial
        shsa(dtype, 150, 136, 16, 5, 3)   # pdim > 128: two channel chunks of the tensor-core attention
        shsa(dtype, 160, 140, 70, 5, 3)   # qk_dim > 64: the FMA attention for every dtype
    torch.cuda.synchronize()
    print("sanitize_driver: ok")


if __name__ == "__main__":
    main()
