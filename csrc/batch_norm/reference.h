// Batch Norm and Batch Renorm as compositions of ATen operators: the same math
// as the kernels, for autograd to differentiate beyond what the kernels do
// (double backward, forward mode, functorch transforms; see
// common/autograd_util.h). Computed in the opmath dtype, returned in the
// input's, like the kernels. Undefined weight/bias mean 1 and 0.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace bnext {
namespace batch_norm {
namespace reference {

using at::Tensor;

// (y, mean, biased var) with the batch statistics. With r and d (Batch
// Renorm), y = weight * ((x - mean) / sigma_B * r + d) + bias, r and d
// constants.
std::tuple<Tensor, Tensor, Tensor> train(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                         double eps, const Tensor& r = Tensor(),
                                         const Tensor& d = Tensor());

// y with given (constant) statistics.
Tensor infer(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& weight,
             const Tensor& bias, double eps);

// The four building blocks.
std::tuple<Tensor, Tensor> stats(const Tensor& x);
Tensor elemt(const Tensor& x, const Tensor& mean, const Tensor& scale, const Tensor& shift);
std::tuple<Tensor, Tensor> backward_reduce(const Tensor& dy, const Tensor& x, const Tensor& mean);
Tensor backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& a,
                      const Tensor& k, const Tensor& c);

}  // namespace reference
}  // namespace batch_norm
}  // namespace bnext
