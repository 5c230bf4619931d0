// Registers the LayerNorm / RMSNorm CUDA kernels (cuda_kernels.cuh) for CUDA tensors.
#include <torch/library.h>

#include "layer_norm/cuda_kernels.cuh"

namespace bnext {
namespace layer_norm {

TORCH_LIBRARY_IMPL(bnext, CUDA, m) {
  register_kernels<CudaKernels>(m);
}

}  // namespace layer_norm
}  // namespace bnext
