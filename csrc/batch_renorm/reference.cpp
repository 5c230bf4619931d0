#include "batch_renorm/reference.h"

#include <ATen/ATen.h>

#include <cmath>

namespace bnext {
namespace batch_renorm {
namespace reference {
namespace {
// sigma_B / sigma and (mu_B - running_mean) / sigma, before clipping;
// constants for autograd, forward mode included.
std::tuple<Tensor, Tensor> renorm_ratios(const Tensor& mean, const Tensor& var,
                                         const Tensor& running_mean, const Tensor& running_var,
                                         double eps) {
  const Tensor m = mean.detach();
  const Tensor v = var.detach();
  const Tensor sigma = (running_var.detach().to(v.scalar_type()) + eps).sqrt();
  return {(v + eps).sqrt() / sigma, (m - running_mean.detach().to(m.scalar_type())) / sigma};
}
}  // namespace

std::tuple<Tensor, Tensor> correction(const Tensor& mean, const Tensor& var,
                                      const Tensor& running_mean, const Tensor& running_var,
                                      double eps, double r_max, double d_max) {
  auto [ratio, offset] = renorm_ratios(mean, var, running_mean, running_var, eps);
  return {ratio.clamp(1.0 / r_max, r_max), offset.clamp(-d_max, d_max)};
}

std::tuple<Tensor, Tensor> correction(const Tensor& mean, const Tensor& var,
                                      const Tensor& running_mean, const Tensor& running_var,
                                      double eps, const Tensor& r_max, const Tensor& d_max) {
  auto [ratio, offset] = renorm_ratios(mean, var, running_mean, running_var, eps);
  const Tensor r_hi = r_max.detach().to(ratio.options());
  const Tensor d_hi = d_max.detach().to(offset.options());
  // As the kernels do (bnext::renorm_correction): an invalid limit gives NaN.
  const Tensor valid = (r_hi >= 1).logical_and(d_hi >= 0);
  return {at::where(valid, ratio.clamp(r_hi.reciprocal(), r_hi), NAN),
          at::where(valid, offset.clamp(-d_hi, d_hi), NAN)};
}

}  // namespace reference
}  // namespace batch_renorm
}  // namespace bnext
