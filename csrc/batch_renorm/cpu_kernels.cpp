// Registers the Batch Renorm operators (composite.h) for CPU tensors. They have no
// kernels of their own: they run on Batch Norm's CPU backend.
#include <torch/library.h>

#include "batch_norm/cpu_backend.h"
#include "batch_renorm/composite.h"

namespace bnext {
namespace batch_renorm {

TORCH_LIBRARY_IMPL(bnext, CPU, m) { register_kernels<batch_norm::CpuBackend>(m); }

}  // namespace batch_renorm
}  // namespace bnext
