// LayerNorm and RMSNorm as compositions of ATen operators: the same math as
// the kernels, for autograd to differentiate beyond what the kernels do
// (double backward, forward mode, functorch transforms; see
// common/autograd_util.h). Computed in the opmath dtype, returned in the
// input's. The last `normalized_dims` dimensions are normalised; undefined
// weight/bias mean 1 and 0.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace bnext {
namespace layer_norm {
namespace reference {

using at::Tensor;

// (y, mean, rstd), the statistics of the input's leading shape.
std::tuple<Tensor, Tensor, Tensor> layer_norm(const Tensor& x, int64_t normalized_dims,
                                              const Tensor& weight, const Tensor& bias, double eps);

// (y, rstd). Complex input is normalised as torch does it,
// x * rsqrt(mean(x^2) + eps) * weight, with complex arithmetic throughout.
std::tuple<Tensor, Tensor> rms_norm(const Tensor& x, int64_t normalized_dims, const Tensor& weight,
                                    double eps);

// The _2d ops: normalised over dim 1 of (N, C, *), statistics of the
// input's shape without dim 1.
std::tuple<Tensor, Tensor, Tensor> layer_norm_2d(const Tensor& x, const Tensor& weight,
                                                 const Tensor& bias, double eps);
std::tuple<Tensor, Tensor> rms_norm_2d(const Tensor& x, const Tensor& weight, double eps);

}  // namespace reference
}  // namespace layer_norm
}  // namespace bnext
