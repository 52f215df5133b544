// What the CUDA kernels were compiled for, for `torch.ops.shvit.cuda_build_info()`.
#include "common.cuh"

#define SHVIT_STR2(...) #__VA_ARGS__
#define SHVIT_STR(...) SHVIT_STR2(__VA_ARGS__)

namespace shvit::cuda {

const char* build_archs() {
#ifdef __CUDA_ARCH_LIST__
  return SHVIT_STR(__CUDA_ARCH_LIST__);  // virtual architectures, e.g. "800,900"
#else
  return "unknown";
#endif
}

int build_cuda_version() { return CUDART_VERSION; }

}  // namespace shvit::cuda
