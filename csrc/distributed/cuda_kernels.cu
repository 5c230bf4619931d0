// Registers the distributed Batch Norm steps (composite.h) for CUDA tensors. They have no
// kernels of their own: they run on Batch Norm's CUDA backend.
#include <torch/library.h>

#include "batch_norm/cuda_backend.cuh"
#include "distributed/composite.h"

namespace bnext {
namespace distributed {

TORCH_LIBRARY_IMPL(bnext, CUDA, m) { register_kernels<batch_norm::CudaBackend>(m); }

}  // namespace distributed
}  // namespace bnext
