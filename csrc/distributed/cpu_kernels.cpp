// Registers the distributed Batch Norm steps (composite.h) for CPU tensors. They have no
// kernels of their own: they run on Batch Norm's CPU backend.
#include <torch/library.h>

#include "batch_norm/cpu_backend.h"
#include "distributed/composite.h"

namespace bnext {
namespace distributed {

TORCH_LIBRARY_IMPL(bnext, CPU, m) { register_kernels<batch_norm::CpuBackend>(m); }

}  // namespace distributed
}  // namespace bnext
