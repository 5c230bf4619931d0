// The distributed steps have no derivative of their own: the distributed
// autograd function (torch_bnext/functional/sync_batch_norm.py) calls them in its forward
// and backward. Called directly with inputs that require grad, they raise
// rather than return outputs that silently have no gradient.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/autograd_util.h"

namespace bnext {
namespace distributed {
namespace {

using namespace bnext::autograd_util;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_gather_stats_autograd(
    const Tensor& means, const Tensor& vars, const Tensor& counts, at::ScalarType dtype,
    const OptTensor& weight, const OptTensor& bias, double eps, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& r_max, const OptTensor& d_max) {
  const char* name = "bnext::batch_norm_gather_stats";
  check_not_differentiated(name, {&means, &vars});
  for (const OptTensor* t : {&weight, &bias, &running_mean, &running_var, &r_max, &d_max})
    if (present(*t)) check_not_differentiated(name, {&t->value()});
  static const auto handle = op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, at::ScalarType, const OptTensor&,
      const OptTensor&, double, const OptTensor&, const OptTensor&, const OptTensor&,
      const OptTensor&)>(name);
  return call_below_autograd(handle, means, vars, counts, dtype, weight, bias, eps, running_mean,
                             running_var, r_max, d_max);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_coeffs_autograd(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& var, const OptTensor& weight,
    const OptTensor& r, const OptTensor& d, double eps, const Tensor& count) {
  const char* name = "bnext::batch_norm_backward_coeffs";
  check_not_differentiated(name, {&sum_dy, &sum_dy_xmu, &var});
  for (const OptTensor* t : {&weight, &r, &d})
    if (present(*t)) check_not_differentiated(name, {&t->value()});
  static const auto handle = op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
      const OptTensor&, double, const Tensor&)>(name);
  return call_below_autograd(handle, sum_dy, sum_dy_xmu, var, weight, r, d, eps, count);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_norm_gather_stats", &batch_norm_gather_stats_autograd);
  m.impl("batch_norm_backward_coeffs", &batch_norm_backward_coeffs_autograd);
}

}  // namespace distributed
}  // namespace bnext
