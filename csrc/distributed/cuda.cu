// The distributed Batch Norm steps on CUDA (composite.h over the CUDA backend).
#include <torch/library.h>

#include "batch_norm/cuda_backend.cuh"
#include "distributed/composite.h"

namespace bnext {

TORCH_LIBRARY_IMPL(bnext, CUDA, m) {
  distributed::register_distributed_kernels<batch_norm::CudaBackend>(m);
}

}  // namespace bnext
