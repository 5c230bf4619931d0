// Registers the LayerNorm / RMSNorm operators over the CUDA backend
// (cuda_kernels.cuh) for CUDA tensors.
#include <torch/library.h>

#include "layer_norm/composite.h"
#include "layer_norm/cuda_kernels.cuh"

namespace bnext {
namespace layer_norm {

TORCH_LIBRARY_IMPL(bnext, CUDA, m) { register_kernels<CudaBackend>(m); }

}  // namespace layer_norm
}  // namespace bnext
