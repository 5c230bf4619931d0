// The CPU implementation of the LayerNorm / RMSNorm row kernels (see
// composite.h for the contract); defined in cpu_kernels.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include "layer_norm/checks.h"

namespace bnext {
namespace layer_norm {

struct CpuBackend {
  // The dispatcher sends only CPU tensors here: nothing to make current.
  struct DeviceGuard {
    explicit DeviceGuard(at::Device) {}
  };
  // The CPU kernels read opmath parameters: a cast of N values is small next to the rows.
  static constexpr bool kNarrowParams = false;

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
