// Batch Renorm (Ioffe 2017) operators, written once over a Batch Norm backend
// `K` (contract: batch_norm/composite.h). With r and d constants for autograd,
// training is Batch Norm with weight' = weight * r and bias' = bias + weight * d,
// so the forward is Batch Norm's stats_normalize<K> with those coefficients
// and the backward is Batch Norm's backward<K>, which already takes r and d.
//
// Compiled by both the host compiler (cpu_kernels.cpp) and nvcc (cuda_kernels.cu): keep it
// free of host-only code in anything that runs per channel.
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
#include "batch_renorm/checks.h"
#include "bnext/batch_norm_math.h"
#include "common/checks.h"
#include "common/layout.h"

namespace bnext {
namespace batch_renorm {

using at::Tensor;
using batch_norm::OptTensor;

// r_max and d_max as the kernels read them: values known on the host
// (batch_renorm_train), or 0-dim tensors on the input's device
// (batch_renorm_train_scheduled: a schedule evaluated inside the graph), read per channel.
template <typename T>
struct Limits {
  T r_max;
  T d_max;
  const T* r_max_p;
  const T* d_max_p;
  C10_HOST_DEVICE T r() const { return r_max_p ? *r_max_p : r_max; }
  C10_HOST_DEVICE T d() const { return d_max_p ? *d_max_p : d_max; }
};

// r_max and d_max given as 0-dim tensors, as the kernels take them. A tensor
// on the kernels' device is read there, per channel (a schedule evaluated
// inside the graph); on the GPU the shared math turns a bad limit into NaN.
// A CPU tensor beside a CUDA input is read here, as a float limit: that costs
// no synchronisation, where copying it to the GPU (pageable memory) would
// synchronise and break CUDA graph capture. Values read on the host are
// checked as float limits are.
struct TensorLimits {
  Tensor r_max_t;  // on the device, in opmath; undefined when read on the host
  Tensor d_max_t;
  double r_max = 1;
  double d_max = 0;

  template <typename T>
  Limits<T> as() const {
    return {static_cast<T>(r_max), static_cast<T>(d_max), data_or_null<T>(r_max_t),
            data_or_null<T>(d_max_t)};
  }
};

inline TensorLimits tensor_limits(const char* op, at::Device device, at::ScalarType opmath,
                                  const Tensor& r_max, const Tensor& d_max) {
  TensorLimits out;
  Tensor* on_device[2] = {&out.r_max_t, &out.d_max_t};
  double* on_host[2] = {&out.r_max, &out.d_max};
  const Tensor* in[2] = {&r_max, &d_max};
  const char* names[2] = {"r_max", "d_max"};
  bool host_read = false;
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(in[i]->dim() == 0, op, ": expected ", names[i],
                " to be a 0-dim tensor (one value for every channel), got shape ", in[i]->sizes());
    TORCH_CHECK(at::isFloatingType(in[i]->scalar_type()), op, ": expected ", names[i],
                " to be a floating-point tensor, got ", in[i]->scalar_type());
    if (in[i]->is_cpu() && !device.is_cpu()) {
      *on_host[i] = in[i]->item<double>();
      host_read = true;
    } else {
      *on_device[i] = in[i]->to(device, opmath).contiguous();
      // Reading a CPU value costs nothing either.
      if (device.is_cpu()) *on_host[i] = on_device[i]->item<double>();
      host_read = host_read || device.is_cpu();
    }
  }
  if (host_read) check_limits(op, out.r_max, out.d_max);
  return out;
}

// `elemt`: the elementwise pass (batch_norm/composite.h, stats_normalize).
template <class K, class E = batch_norm::PlainElemt<K>>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> train_with_limits(
    const char* op, const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps, double r_max, double d_max,
    const Tensor& r_max_t, const Tensor& d_max_t, const E& elemt = E{}) {
  const Tensor& w_in = value_or_undefined(weight);
  const Tensor& b_in = value_or_undefined(bias);
  batch_norm::check_args(op, input, w_in, b_in, running_mean, running_var);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const auto opmath = opmath_dtype(x.scalar_type());
  TensorLimits tl;
  if (r_max_t.defined()) {
    tl = tensor_limits(op, x.device(), opmath, r_max_t, d_max_t);
  } else {
    check_limits(op, r_max, d_max);
    tl.r_max = r_max;
    tl.d_max = d_max;
  }
  const Tensor rm = batch_norm::per_channel(running_mean, opmath);
  const Tensor rv = batch_norm::per_channel(running_var, opmath);
  const Tensor w = batch_norm::per_channel(w_in, opmath);
  const Tensor b = batch_norm::per_channel(b_in, opmath);
  const Tensor r = batch_norm::empty_channel_vector(x, opmath);
  const Tensor d = batch_norm::empty_channel_vector(x, opmath);
  const Tensor scale = batch_norm::empty_channel_vector(x, opmath);
  const Tensor shift = batch_norm::empty_channel_vector(x, opmath);
  Tensor out, mean, var;
  AT_DISPATCH_FLOATING_TYPES(opmath, "bnext_batch_renorm_train", [&] {
    const scalar_t* rm_p = rm.const_data_ptr<scalar_t>();
    const scalar_t* rv_p = rv.const_data_ptr<scalar_t>();
    const scalar_t* w_p = data_or_null<scalar_t>(w);
    const scalar_t* b_p = data_or_null<scalar_t>(b);
    scalar_t* r_p = r.mutable_data_ptr<scalar_t>();
    scalar_t* d_p = d.mutable_data_ptr<scalar_t>();
    scalar_t* scale_p = scale.mutable_data_ptr<scalar_t>();
    scalar_t* shift_p = shift.mutable_data_ptr<scalar_t>();
    const auto eps_ = static_cast<scalar_t>(eps);
    const Limits<scalar_t> limits = tl.as<scalar_t>();
    std::tie(out, mean, var) = batch_norm::stats_normalize<K, scalar_t>(
        x, scale, shift,
        [=] C10_HOST_DEVICE(int64_t c, scalar_t mean_c, scalar_t var_c) {
          const auto rd =
              renorm_correction(mean_c, var_c, rm_p[c], rv_p[c], eps_, limits.r(), limits.d());
          const scalar_t w_c = batch_norm::load_or(w_p, c, scalar_t(1));
          const auto co = forward_coeffs(inv_std(var_c, eps_), w_c * rd.r,
                                         batch_norm::load_or(b_p, c, scalar_t(0)) + w_c * rd.d);
          r_p[c] = rd.r;
          d_p[c] = rd.d;
          scale_p[c] = co.scale;
          shift_p[c] = co.shift;
        },
        elemt);
  });
  return {out, mean, var, r, d};
}

template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_renorm_train(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps, double r_max, double d_max) {
  return train_with_limits<K>("bnext::batch_renorm_train", input, running_mean, running_var, weight,
                              bias, eps, r_max, d_max, Tensor(), Tensor());
}

template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_renorm_train_scheduled(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps, const Tensor& r_max,
    const Tensor& d_max) {
  return train_with_limits<K>("bnext::batch_renorm_train_scheduled", input, running_mean,
                              running_var, weight, bias, eps, 0.0, 0.0, r_max, d_max);
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> batch_renorm_backward(const Tensor& grad_out,
                                                         const Tensor& input, const Tensor& mean,
                                                         const Tensor& var, const OptTensor& weight,
                                                         const Tensor& r, const Tensor& d,
                                                         double eps) {
  check_input("bnext::batch_renorm_backward", input, 2);
  batch_norm::check_channel_vectors("bnext::batch_renorm_backward", input, {&r, &d});
  return batch_norm::backward<K>(grad_out, input, mean, var, value_or_undefined(weight), r, d, eps,
                                 /*training=*/true);
}

template <class K>
void register_kernels(torch::Library& m) {
  m.impl("batch_renorm_train", &batch_renorm_train<K>);
  m.impl("batch_renorm_train_scheduled", &batch_renorm_train_scheduled<K>);
  m.impl("batch_renorm_backward", &batch_renorm_backward<K>);
}

}  // namespace batch_renorm
}  // namespace bnext
