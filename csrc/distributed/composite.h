// The distributed Batch Norm steps (ops.cpp), written once over a Batch Norm
// backend `K` (batch_norm/composite.h) with the shared per-channel math:
// Chan's merge (bnext/welford.h), the coefficients and Batch Renorm's r/d
// (bnext/batch_norm_math.h). Compiled by the host compiler (cpu_kernels.cpp) and
// nvcc (cuda_kernels.cu).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "batch_norm/composite.h"
#include "batch_renorm/composite.h"
#include "bnext/batch_norm_math.h"
#include "bnext/welford.h"
#include "common/checks.h"
#include "distributed/checks.h"

namespace bnext {
namespace distributed {

using at::Tensor;
using batch_norm::per_channel;

// The global count as a 0-dim int64 tensor on `device`.
inline Tensor device_count(const char* op, const Tensor& count, at::Device device) {
  TORCH_CHECK(count.numel() == 1 && count.device() == device, op,
              ": expected count to be one value on ", device, ", got ", count.sizes(), " on ",
              count.device());
  return count.reshape({}).to(at::kLong).contiguous();
}

template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_gather_stats(
    const Tensor& means_in, const Tensor& vars_in, const Tensor& counts_in, at::ScalarType dtype,
    const OptTensor& weight, const OptTensor& bias, double eps, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& r_max, const OptTensor& d_max) {
  const char* op = "bnext::batch_norm_gather_stats";
  check_gather_stats_args(means_in, vars_in, counts_in, dtype, weight, bias, running_mean,
                          running_var, r_max, d_max);
  const int64_t W = means_in.size(0);
  const int64_t C = means_in.size(1);
  const at::Device device = means_in.device();
  const Tensor& rm_in = value_or_undefined(running_mean);
  const Tensor& rv_in = value_or_undefined(running_var);
  const Tensor& rmax_in = value_or_undefined(r_max);
  const Tensor& dmax_in = value_or_undefined(d_max);
  const typename K::DeviceGuard guard(device);

  const Tensor means = means_in.to(dtype).contiguous();
  const Tensor vars = vars_in.to(dtype).contiguous();
  const Tensor counts = counts_in.to(at::kLong).contiguous();
  const Tensor w = per_channel(value_or_undefined(weight), dtype);
  const Tensor b = per_channel(value_or_undefined(bias), dtype);
  const Tensor rm = per_channel(rm_in, dtype);
  const Tensor rv = per_channel(rv_in, dtype);
  batch_renorm::TensorLimits tl;  // r_max = 1, d_max = 0 without them: Batch Norm
  if (rmax_in.defined()) tl = batch_renorm::tensor_limits(op, device, dtype, rmax_in, dmax_in);
  const auto options = means.options();
  Tensor mean = at::empty({C}, options), var = at::empty({C}, options);
  Tensor scale = at::empty({C}, options), shift = at::empty({C}, options);
  Tensor r = at::empty({C}, options), d = at::empty({C}, options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "bnext_gather_stats", [&] {
    const scalar_t* means_p = means.const_data_ptr<scalar_t>();
    const scalar_t* vars_p = vars.const_data_ptr<scalar_t>();
    const int64_t* counts_p = counts.const_data_ptr<int64_t>();
    const scalar_t* w_p = data_or_null<scalar_t>(w);
    const scalar_t* b_p = data_or_null<scalar_t>(b);
    const scalar_t* rm_p = data_or_null<scalar_t>(rm);
    const scalar_t* rv_p = data_or_null<scalar_t>(rv);
    const batch_renorm::Limits<scalar_t> limits = tl.as<scalar_t>();
    scalar_t* mean_p = mean.mutable_data_ptr<scalar_t>();
    scalar_t* var_p = var.mutable_data_ptr<scalar_t>();
    scalar_t* scale_p = scale.mutable_data_ptr<scalar_t>();
    scalar_t* shift_p = shift.mutable_data_ptr<scalar_t>();
    scalar_t* r_p = r.mutable_data_ptr<scalar_t>();
    scalar_t* d_p = d.mutable_data_ptr<scalar_t>();
    const auto eps_ = static_cast<scalar_t>(eps);
    // Rank order is fixed, so every rank computes the same bits.
    K::for_each_channel(C, [=] C10_HOST_DEVICE(int64_t c) {
      Welford<scalar_t> acc;
      for (int64_t i = 0; i < W; ++i) {
        const int64_t n = counts_p[i];
        Welford<scalar_t> part;
        part.mean = means_p[i * C + c];
        part.m2 = vars_p[i * C + c] * static_cast<scalar_t>(n);
        part.count = n;
        acc = welford_merge(acc, part);
      }
      const scalar_t v = welford_var(acc);
      RenormCorrection<scalar_t> rd{scalar_t(1), scalar_t(0)};
      if (rm_p != nullptr && limits.r_max_p != nullptr)
        rd = renorm_correction(acc.mean, v, rm_p[c], rv_p[c], eps_, limits.r(), limits.d());
      const scalar_t w_c = batch_norm::load_or(w_p, c, scalar_t(1));
      const auto co = forward_coeffs(inv_std(v, eps_), w_c * rd.r,
                                     batch_norm::load_or(b_p, c, scalar_t(0)) + w_c * rd.d);
      mean_p[c] = acc.mean;
      var_p[c] = v;
      scale_p[c] = co.scale;
      shift_p[c] = co.shift;
      r_p[c] = rd.r;
      d_p[c] = rd.d;
    });
  });
  return {mean, var, counts.sum(), scale, shift, r, d};
}

template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_coeffs(
    const Tensor& sum_dy_in, const Tensor& sum_dy_xmu_in, const Tensor& var_in,
    const OptTensor& weight, const OptTensor& r_in, const OptTensor& d_in, double eps,
    const Tensor& count_in) {
  const char* op = "bnext::batch_norm_backward_coeffs";
  check_backward_coeffs_args(sum_dy_in, sum_dy_xmu_in, var_in, weight, r_in, d_in);
  const at::Device device = sum_dy_in.device();
  const auto dtype = sum_dy_in.scalar_type();
  const Tensor count = device_count(op, count_in, device);
  const typename K::DeviceGuard guard(device);
  const Tensor sum_dy = sum_dy_in.contiguous();
  const Tensor sum_dy_xmu = per_channel(sum_dy_xmu_in, dtype);
  const Tensor var = per_channel(var_in, dtype);
  const Tensor w = per_channel(value_or_undefined(weight), dtype);
  const Tensor r = per_channel(value_or_undefined(r_in), dtype);
  const Tensor d = per_channel(value_or_undefined(d_in), dtype);
  const batch_norm::BackwardCoefficients co =
      batch_norm::backward_coefficients<K>(sum_dy, sum_dy_xmu, var, w, r, d, eps,
                                           /*training=*/true, 0, count);
  return {co.a, co.k, co.c, co.grad_weight};
}

template <class K>
void register_kernels(torch::Library& m) {
  m.impl("batch_norm_gather_stats", &batch_norm_gather_stats<K>);
  m.impl("batch_norm_backward_coeffs", &batch_norm_backward_coeffs<K>);
}

}  // namespace distributed
}  // namespace bnext
