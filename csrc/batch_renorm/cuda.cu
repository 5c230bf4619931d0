// Batch Renorm on CUDA: the shared operators over the CUDA Batch Norm backend.
#include <torch/library.h>

#include "batch_norm/cuda_backend.cuh"
#include "batch_renorm/composite.h"

namespace bnext {

TORCH_LIBRARY_IMPL(bnext, CUDA, m) {
  batch_renorm::register_renorm_kernels<batch_norm::CudaBackend>(m);
}

}  // namespace bnext
