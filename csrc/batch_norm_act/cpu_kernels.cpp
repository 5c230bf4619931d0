// Registers the Batch Norm + activation operators (composite.h) for CPU
// tensors. Their kernels are Batch Norm's CPU backend's (batch_norm/cpu_kernels.cpp).
#include <torch/library.h>

#include "batch_norm/cpu_backend.h"
#include "batch_norm_act/composite.h"

namespace bnext {
namespace batch_norm_act {

TORCH_LIBRARY_IMPL(bnext, CPU, m) { register_kernels<batch_norm::CpuBackend>(m); }

}  // namespace batch_norm_act
}  // namespace bnext
