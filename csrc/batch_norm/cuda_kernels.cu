// Registers the Batch Norm operators (composite.h) over the CUDA backend
// (cuda_kernels.cuh) for CUDA tensors, and defines that backend's Batch Norm
// functions, which Batch Renorm's, the distributed and the activations' units
// link to.
#define BNEXT_DEFINE_BATCH_NORM_CUDA_BACKEND
#include <torch/library.h>

#include "batch_norm/composite.h"
#include "batch_norm/cuda_kernels.cuh"

namespace bnext {
namespace batch_norm {

TORCH_LIBRARY_IMPL(bnext, CUDA, m) { register_kernels<CudaBackend>(m); }

}  // namespace batch_norm
}  // namespace bnext
