// The distributed Batch Norm steps on CPU (composite.h over the CPU backend).
#include <torch/library.h>

#include "batch_norm/cpu_backend.h"
#include "distributed/composite.h"

namespace bnext {
namespace distributed {

TORCH_LIBRARY_IMPL(bnext, CPU, m) {
  register_distributed_kernels<batch_norm::CpuBackend>(m);
}

}  // namespace distributed
}  // namespace bnext
