// Batch Norm + activation as compositions of ATen operators (Batch Norm's
// reference, then the residual and ATen's own activation), for autograd to
// differentiate beyond what the kernels do: double backward, forward mode,
// functorch transforms (common/autograd_util.h). Undefined weight, bias and
// residual mean 1, 0 and none.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "batch_norm_act/checks.h"

namespace bnext {
namespace batch_norm_act {
namespace reference {

using at::Tensor;

// act(u) with ATen's operator for the activation.
Tensor activation(const Tensor& u, Activation fn);

// act'(u) from y = act(u) for a piecewise linear activation (identity,
// relu, leaky_relu, relu6), in y's opmath dtype, with ATen's values at the kinks.
Tensor derivative_from_output(const Tensor& y, Activation fn);

// (act(bn(x) + residual), mean, biased var) with the batch statistics; with
// r and d, Batch Renorm's (constants).
std::tuple<Tensor, Tensor, Tensor> train(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                         const Tensor& residual, double eps, Activation fn,
                                         const Tensor& r = Tensor(), const Tensor& d = Tensor());

// act(bn(x) + residual) with given (constant) statistics.
Tensor infer(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& weight,
             const Tensor& bias, const Tensor& residual, double eps, Activation fn);

}  // namespace reference
}  // namespace batch_norm_act
}  // namespace bnext
