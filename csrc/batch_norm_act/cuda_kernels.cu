// Registers the Batch Norm + activation operators (composite.h) for CUDA
// tensors. Their kernels are Batch Norm's CUDA backend's (batch_norm/cuda_kernels.cuh).
#include <torch/library.h>

#include "batch_norm/cuda_kernels.cuh"
#include "batch_norm_act/composite.h"

namespace bnext {
namespace batch_norm_act {

TORCH_LIBRARY_IMPL(bnext, CUDA, m) { register_kernels<batch_norm::CudaBackend>(m); }

}  // namespace batch_norm_act
}  // namespace bnext
