// The CUDA implementation of the LayerNorm / RMSNorm row kernels (see
// composite.h for the contract); the kernels, their launch plans and these
// methods are in cuda_kernels.cuh. CUDA-only: include it from .cu files (or
// the emulator's module), never from the CPU build.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cuda_launch.cuh"
#include "layer_norm/checks.h"

namespace bnext {
namespace layer_norm {

struct CudaBackend {
  using DeviceGuard = cuda::DeviceGuard;
  // The row kernels read 16-bit weights as they are (cuda_kernels::Param).
  static constexpr bool kNarrowParams = true;

  template <bool kCentred>
  static void forward(const RowProblem& p, double eps, Tensor& out, Tensor& mean, Tensor& rstd);

  template <bool kCentred>
  static void backward(const RowProblem& p, const Tensor& mean, const Tensor& rstd, bool columns,
                       Tensor& dx, Tensor& dw_col, Tensor& db_col);

  template <bool kCentred>
  static void channel_forward(const ChannelProblem& p, double eps, Tensor& out, Tensor& mean,
                              Tensor& rstd);

  template <bool kCentred>
  static void channel_backward(const ChannelProblem& p, const Tensor& mean, const Tensor& rstd,
                               bool columns, Tensor& dx, Tensor& dw_col, Tensor& db_col);
};

}  // namespace layer_norm
}  // namespace bnext
