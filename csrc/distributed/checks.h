// Argument checks of the distributed steps, shared by their kernels
// (composite.h): a mistake one rank can see raises there, before any
// collective.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

#include "common/checks.h"

namespace bnext {
namespace distributed {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline void check_channel_vector(const char* op, const char* name, const Tensor& t, int64_t C,
                                 at::Device device) {
  if (!t.defined()) return;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": expected ", name, " of shape (", C, ",), got ",
              t.sizes());
  TORCH_CHECK(t.device() == device, op, ": expected ", name, " on ", device, ", got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected a floating-point ", name,
              ", got ", t.scalar_type());
}

inline void check_gather_stats_args(const Tensor& means_in, const Tensor& vars_in,
                                    const Tensor& counts_in, at::ScalarType dtype,
                                    const OptTensor& weight, const OptTensor& bias,
                                    const OptTensor& running_mean, const OptTensor& running_var,
                                    const OptTensor& r_max, const OptTensor& d_max) {
  const char* op = "bnext::batch_norm_gather_stats";
  TORCH_CHECK(means_in.dim() == 2 && vars_in.sizes() == means_in.sizes(), op,
              ": expected means and vars of one shape (world size, channels), got ",
              means_in.sizes(), " and ", vars_in.sizes());
  const int64_t W = means_in.size(0);
  const int64_t C = means_in.size(1);
  TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == W, op, ": expected one count per row (",
              W, "), got shape ", counts_in.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": expected dtype float32 or float64 (the opmath dtype), got ", dtype);
  const at::Device device = means_in.device();
  TORCH_CHECK(vars_in.device() == device && counts_in.device() == device, op,
              ": expected means, vars and counts on one device");
  const Tensor& rm_in = value_or_undefined(running_mean);
  const Tensor& rv_in = value_or_undefined(running_var);
  const Tensor& rmax_in = value_or_undefined(r_max);
  const Tensor& dmax_in = value_or_undefined(d_max);
  TORCH_CHECK(rm_in.defined() == rv_in.defined() && rmax_in.defined() == dmax_in.defined() &&
                  (!rmax_in.defined() || rm_in.defined()),
              op, ": Batch Renorm needs running_mean, running_var, r_max and d_max together");
  const std::pair<const char*, const Tensor*> vectors[] = {{"weight", &value_or_undefined(weight)},
                                                           {"bias", &value_or_undefined(bias)},
                                                           {"running_mean", &rm_in},
                                                           {"running_var", &rv_in}};
  for (const auto& [name, t] : vectors) check_channel_vector(op, name, *t, C, device);
}

inline void check_backward_coeffs_args(const Tensor& sum_dy_in, const Tensor& sum_dy_xmu_in,
                                       const Tensor& var_in, const OptTensor& weight,
                                       const OptTensor& r_in, const OptTensor& d_in) {
  const char* op = "bnext::batch_norm_backward_coeffs";
  TORCH_CHECK(sum_dy_in.dim() == 1, op, ": expected sum_dy of shape (C,), got ", sum_dy_in.sizes());
  const int64_t C = sum_dy_in.size(0);
  const at::Device device = sum_dy_in.device();
  const auto dtype = sum_dy_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": expected float32 or float64 sums (the opmath dtype), got ", dtype);
  const std::pair<const char*, const Tensor*> vectors[] = {{"sum_dy", &sum_dy_in},
                                                           {"sum_dy_xmu", &sum_dy_xmu_in},
                                                           {"var", &var_in},
                                                           {"weight", &value_or_undefined(weight)},
                                                           {"r", &value_or_undefined(r_in)},
                                                           {"d", &value_or_undefined(d_in)}};
  for (const auto& [name, t] : vectors) check_channel_vector(op, name, *t, C, device);
}

}  // namespace distributed
}  // namespace bnext
