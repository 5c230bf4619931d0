// Batch Renorm's correction as a composition of ATen operators: the same
// math as the kernels (bnext::renorm_correction), for the reference path of
// autograd (autograd.cpp). The normalisation itself is Batch Norm's
// reference::train with r and d (batch_norm/reference.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace bnext {
namespace batch_renorm {
namespace reference {

using at::Tensor;

// Batch Renorm's (r, d) for batch statistics and running statistics (all
// (C,) vectors), as the kernels compute them; not differentiable.
std::tuple<Tensor, Tensor> correction(const Tensor& mean, const Tensor& var,
                                      const Tensor& running_mean, const Tensor& running_var,
                                      double eps, double r_max, double d_max);
// The same with r_max and d_max as 0-dim tensors (a schedule's values).
std::tuple<Tensor, Tensor> correction(const Tensor& mean, const Tensor& var,
                                      const Tensor& running_mean, const Tensor& running_var,
                                      double eps, const Tensor& r_max, const Tensor& d_max);

}  // namespace reference
}  // namespace batch_renorm
}  // namespace bnext
