// Registers the Batch Renorm operators (composite.h) for CUDA tensors. They have no
// kernels of their own: they run on Batch Norm's CUDA backend.
#include <torch/library.h>

#include "batch_norm/cuda_backend.cuh"
#include "batch_renorm/composite.h"

namespace bnext {
namespace batch_renorm {

TORCH_LIBRARY_IMPL(bnext, CUDA, m) { register_kernels<batch_norm::CudaBackend>(m); }

}  // namespace batch_renorm
}  // namespace bnext
