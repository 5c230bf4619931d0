// Batch Norm + activation operators, written once over a Batch Norm backend
// `K` (contract: batch_norm/composite.h) that also provides
//   void act_elemt(x, mean, scale, shift, residual, kind, param, out)
//       out = act((x - mean) * scale + shift [+ residual]); `out` may be x
//   (g, sum g, sum g * (x - mean)) = act_backward_reduce(dy, x, mean, scale, shift, residual,
//                                                        kind, param)
//       g = dy * act'(u), u recomputed as in act_elemt
//   (sum g, sum g * (x - mean)) = act_backward_sums(dy, x, mean, scale, shift, kind, param)
//       the same sums, g not stored (no residual)
//   dx = act_backward_elemt(dy, x, mean, scale, shift, a, k, c, kind, param)
//       dx = a * g + k * (x - mean) + c, g recomputed as act_backward_reduce does
//   (g, sum g, sum g * (x - mean)) = act_backward_reduce_from_output(dy, x, y, mean, kind, param)
//       g = dy * act'(u) from the output y (piecewise linear activations)
//   (g, sum g, sum g * xmu) = inplace_backward_reduce(dy, y, shift, inv_scale, kind, param)
//   dx = inplace_backward_elemt(g, y, shift, inv_scale, a, k, c, kind, param)
//       dx = a * g + k * xmu + c
// where, in in-place mode, xmu = (act^-1(y) - shift) * inv_scale is x - mean
// recomputed from the output y. x, dy, y, residual and out are canonical
// (common/layout.h) in one layout; per-channel tensors are opmath vectors.
//
// The forward is Batch Norm's (or Batch Renorm's) with the activation as the
// epilogue of its elementwise pass. The backward is Batch Norm's applied to
// g = dy * act'(u). With a residual, g is its gradient too: the reduce pass
// stores it and Batch Norm's elementwise pass finishes with g for dy. Without
// one, both passes compute g from dy and x, and it is never stored.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "batch_norm/composite.h"
#include "batch_norm_act/checks.h"
#include "batch_renorm/composite.h"
#include "bnext/batch_norm_math.h"
#include "common/checks.h"
#include "common/layout.h"

namespace bnext {
namespace batch_norm_act {

using batch_norm::empty_channel_vector;
using batch_norm::load_or;
using batch_norm::OptTensor;
using batch_norm::per_channel;

// The residual laid out as the canonical input (undefined stays undefined).
inline Tensor residual_like(const Tensor& residual, const Tensor& x) {
  return residual.defined() ? same_layout(residual, x) : residual;
}

// The elementwise pass with the activation, as stats_normalize's `elemt`.
template <class K>
struct ActElemt {
  Tensor residual;
  Activation act;
  Tensor operator()(const Tensor& x, const Tensor& mean, const Tensor& scale,
                    const Tensor& shift) const {
    Tensor out = empty_same_layout(x, x.scalar_type());
    K::act_elemt(x, mean, scale, shift, residual, act.kind, act.param, out);
    return out;
  }
};

// The forward coefficients again, in backward: u = (x - mean) * scale + shift
// with Batch Renorm's weight' = weight * r, bias' = bias + weight * d.
template <typename T>
struct RecomputeStep {
  const T* var;
  const T* weight;
  const T* bias;
  const T* r;
  const T* d;
  T* scale;
  T* shift;
  T eps;
  C10_HOST_DEVICE void operator()(int64_t c) const {
    const T w = load_or(weight, c, T(1));
    scale[c] = w * load_or(r, c, T(1)) * inv_std(var[c], eps);
    shift[c] = load_or(bias, c, T(0)) + w * load_or(d, c, T(0));
  }
};

// ------------------------------------------------------------ building blocks

template <class K>
Tensor batch_norm_act_elemt(const Tensor& input, const Tensor& mean, const Tensor& scale,
                            const Tensor& shift, const OptTensor& residual,
                            std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_elemt";
  check_input(op, input, 2);
  batch_norm::check_channel_vectors(op, input, {&mean, &scale, &shift});
  check_residual(op, value_or_undefined(residual), input);
  const Activation a = parse_activation(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  return ActElemt<K>{residual_like(value_or_undefined(residual), x), a}(
      x, per_channel(mean, opmath), per_channel(scale, opmath), per_channel(shift, opmath));
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> batch_norm_act_backward_reduce(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& scale,
    const Tensor& shift, const OptTensor& residual, std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_backward_reduce";
  check_input(op, input, 2);
  batch_norm::check_channel_vectors(op, input, {&mean, &scale, &shift});
  batch_norm::check_grad_out(op, grad_out, input);
  check_residual(op, value_or_undefined(residual), input);
  const Activation a = parse_activation(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  return K::act_backward_reduce(same_layout(grad_out, x), x, per_channel(mean, opmath),
                                per_channel(scale, opmath), per_channel(shift, opmath),
                                residual_like(value_or_undefined(residual), x), a.kind, a.param);
}

template <class K>
std::tuple<Tensor, Tensor> batch_norm_act_backward_sums(const Tensor& grad_out, const Tensor& input,
                                                        const Tensor& mean, const Tensor& scale,
                                                        const Tensor& shift,
                                                        std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_backward_sums";
  check_input(op, input, 2);
  batch_norm::check_channel_vectors(op, input, {&mean, &scale, &shift});
  batch_norm::check_grad_out(op, grad_out, input);
  const Activation a = parse_activation(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  return K::act_backward_sums(same_layout(grad_out, x), x, per_channel(mean, opmath),
                              per_channel(scale, opmath), per_channel(shift, opmath), a.kind,
                              a.param);
}

template <class K>
Tensor batch_norm_act_backward_elemt(const Tensor& grad_out, const Tensor& input,
                                     const Tensor& mean, const Tensor& scale, const Tensor& shift,
                                     const Tensor& a, const Tensor& k, const Tensor& c,
                                     std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_backward_elemt";
  check_input(op, input, 2);
  batch_norm::check_channel_vectors(op, input, {&mean, &scale, &shift, &a, &k, &c});
  batch_norm::check_grad_out(op, grad_out, input);
  const Activation act = parse_activation(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  return K::act_backward_elemt(same_layout(grad_out, x), x, per_channel(mean, opmath),
                               per_channel(scale, opmath), per_channel(shift, opmath),
                               per_channel(a, opmath), per_channel(k, opmath),
                               per_channel(c, opmath), act.kind, act.param);
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> batch_norm_act_backward_reduce_from_output(
    const Tensor& grad_out, const Tensor& input, const Tensor& output, const Tensor& mean,
    std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_backward_reduce_from_output";
  check_input(op, input, 2);
  batch_norm::check_channel_vectors(op, input, {&mean});
  batch_norm::check_grad_out(op, grad_out, input);
  batch_norm::check_grad_out(op, output, input);
  const Activation a = parse_piecewise_linear(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  return K::act_backward_reduce_from_output(same_layout(grad_out, x), x, same_layout(output, x),
                                            per_channel(mean, opmath_dtype(input.scalar_type())),
                                            a.kind, a.param);
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> batch_norm_act_inplace_backward_reduce(
    const Tensor& grad_out, const Tensor& output, const Tensor& shift, const Tensor& inv_scale,
    std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_inplace_backward_reduce";
  check_input(op, output, 2);
  batch_norm::check_channel_vectors(op, output, {&shift, &inv_scale});
  batch_norm::check_grad_out(op, grad_out, output);
  const Activation a = parse_invertible(op, activation, param);
  const typename K::DeviceGuard guard(output.device());
  const Tensor y = canonical(output);
  const auto opmath = opmath_dtype(output.scalar_type());
  return K::inplace_backward_reduce(same_layout(grad_out, y), y, per_channel(shift, opmath),
                                    per_channel(inv_scale, opmath), a.kind, a.param);
}

template <class K>
Tensor batch_norm_act_inplace_backward_elemt(const Tensor& grad_pre, const Tensor& output,
                                             const Tensor& shift, const Tensor& inv_scale,
                                             const Tensor& a, const Tensor& k, const Tensor& c,
                                             std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_inplace_backward_elemt";
  check_input(op, output, 2);
  batch_norm::check_channel_vectors(op, output, {&shift, &inv_scale, &a, &k, &c});
  batch_norm::check_grad_out(op, grad_pre, output);
  const Activation act = parse_invertible(op, activation, param);
  const typename K::DeviceGuard guard(output.device());
  const Tensor y = canonical(output);
  const auto opmath = opmath_dtype(output.scalar_type());
  return K::inplace_backward_elemt(
      same_layout(grad_pre, y), y, per_channel(shift, opmath), per_channel(inv_scale, opmath),
      per_channel(a, opmath), per_channel(k, opmath), per_channel(c, opmath), act.kind, act.param);
}

// -------------------------------------------------------------- whole passes

// Batch statistics, then act((x - mean) * scale + shift [+ residual]) into
// `out` (a new tensor, or the input itself in in-place mode).
template <class K, class E>
std::tuple<Tensor, Tensor, Tensor> train_into(const Tensor& x, const Tensor& w_in,
                                              const Tensor& b_in, double eps, const E& elemt) {
  const auto opmath = opmath_dtype(x.scalar_type());
  const Tensor w = per_channel(w_in, opmath);
  const Tensor b = per_channel(b_in, opmath);
  const Tensor scale = empty_channel_vector(x, opmath);
  const Tensor shift = empty_channel_vector(x, opmath);
  std::tuple<Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(opmath, "bnext_batch_norm_act_train", [&] {
    const batch_norm::ForwardStep<scalar_t> step{
        data_or_null<scalar_t>(w), data_or_null<scalar_t>(b), scale.mutable_data_ptr<scalar_t>(),
        shift.mutable_data_ptr<scalar_t>(), static_cast<scalar_t>(eps)};
    result = batch_norm::stats_normalize<K, scalar_t>(x, scale, shift, step, elemt);
  });
  return result;
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> batch_norm_act_train(const Tensor& input,
                                                        const OptTensor& weight,
                                                        const OptTensor& bias,
                                                        const OptTensor& residual, double eps,
                                                        std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_train";
  const Tensor& w = value_or_undefined(weight);
  const Tensor& b = value_or_undefined(bias);
  batch_norm::check_args(op, input, w, b, Tensor(), Tensor());
  check_residual(op, value_or_undefined(residual), input);
  const Activation a = parse_activation(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  return train_into<K>(x, w, b, eps,
                       ActElemt<K>{residual_like(value_or_undefined(residual), x), a});
}

template <class K>
Tensor batch_norm_act_infer(const Tensor& input, const Tensor& mean, const Tensor& var,
                            const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& residual, double eps, std::string_view activation,
                            double param) {
  const char* op = "bnext::batch_norm_act_infer";
  const Tensor& w = value_or_undefined(weight);
  const Tensor& b = value_or_undefined(bias);
  batch_norm::check_args(op, input, w, b, mean, var);
  check_residual(op, value_or_undefined(residual), input);
  const Activation a = parse_activation(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const auto opmath = opmath_dtype(x.scalar_type());
  const Tensor w_o = per_channel(w, opmath);
  const Tensor b_o = per_channel(b, opmath);
  const Tensor var_o = per_channel(var, opmath);
  const Tensor scale = empty_channel_vector(x, opmath);
  const Tensor shift = empty_channel_vector(x, opmath);
  AT_DISPATCH_FLOATING_TYPES(opmath, "bnext_batch_norm_act_infer", [&] {
    const scalar_t* var_p = var_o.const_data_ptr<scalar_t>();
    const batch_norm::ForwardStep<scalar_t> step{
        data_or_null<scalar_t>(w_o), data_or_null<scalar_t>(b_o),
        scale.mutable_data_ptr<scalar_t>(), shift.mutable_data_ptr<scalar_t>(),
        static_cast<scalar_t>(eps)};
    K::for_each_channel(x.size(1),
                        [=] C10_HOST_DEVICE(int64_t c) { step(c, scalar_t(0), var_p[c]); });
  });
  return ActElemt<K>{residual_like(value_or_undefined(residual), x), a}(
      x, per_channel(mean, opmath), scale, shift);
}

template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_renorm_act_train(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, const OptTensor& residual, double eps,
    const Tensor& r_max, const Tensor& d_max, std::string_view activation, double param) {
  const char* op = "bnext::batch_renorm_act_train";
  check_residual(op, value_or_undefined(residual), input);
  const Activation a = parse_activation(op, activation, param);
  check_input(op, input, 2);
  const Tensor x = canonical(input);
  return batch_renorm::train_with_limits<K>(
      op, x, running_mean, running_var, weight, bias, eps, 0.0, 0.0, r_max, d_max,
      ActElemt<K>{residual_like(value_or_undefined(residual), x), a});
}

// Gradients of act(y + residual), y = (x - mean) * invstd * weight' + bias'
// (Batch Norm's backward with dy * act'(u) for dy); also returns that
// product, the gradient of the residual (empty where neither a residual nor
// the output was given: then it is never stored).
template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean_in, const Tensor& var_in,
    const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    const OptTensor& r_in, const OptTensor& d_in, double eps, std::string_view activation,
    double param, bool training, const OptTensor& output) {
  const char* op = "bnext::batch_norm_act_backward";
  const Tensor& w_in = value_or_undefined(weight);
  const Tensor& b_in = value_or_undefined(bias);
  batch_norm::check_args(op, input, w_in, b_in, mean_in, var_in);
  batch_norm::check_grad_out(op, grad_out, input);
  check_residual(op, value_or_undefined(residual), input);
  const Tensor& r_t = value_or_undefined(r_in);
  const Tensor& d_t = value_or_undefined(d_in);
  TORCH_CHECK(r_t.defined() == d_t.defined(), op,
              ": expected Batch Renorm's r and d together, got only ", r_t.defined() ? "r" : "d");
  if (r_t.defined()) batch_norm::check_channel_vectors(op, input, {&r_t, &d_t});
  const Tensor& y = value_or_undefined(output);
  if (y.defined()) batch_norm::check_grad_out(op, y, input);
  const Activation a = y.defined() ? parse_piecewise_linear(op, activation, param)
                                   : parse_activation(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const Tensor dy = same_layout(grad_out, x);
  const int64_t C = x.size(1);
  const auto opmath = opmath_dtype(input.scalar_type());
  const Tensor mean = per_channel(mean_in, opmath);
  const Tensor var = per_channel(var_in, opmath);
  const Tensor w = per_channel(w_in, opmath);
  const Tensor b = per_channel(b_in, opmath);
  const Tensor r = per_channel(r_t, opmath);
  const Tensor d = per_channel(d_t, opmath);

  const int64_t count = C > 0 ? x.numel() / C : 0;
  const auto finish = [&](const Tensor& sum_g, const Tensor& sum_gx, const auto& elemt) {
    const batch_norm::BackwardCoefficients co =
        batch_norm::backward_coefficients<K>(sum_g, sum_gx, var, w, r, d, eps, training, count);
    const auto [grad_weight, grad_bias] = batch_norm::param_grads(co.grad_weight, sum_g, w_in);
    return std::tuple{elemt(co), grad_weight, grad_bias};
  };
  if (y.defined()) {
    const auto [g, sum_g, sum_gx] =
        K::act_backward_reduce_from_output(dy, x, same_layout(y, x), mean, a.kind, a.param);
    const auto [dx, dw, db] = finish(sum_g, sum_gx, [&](const auto& co) {
      return K::backward_elemt(g, x, mean, co.a, co.k, co.c);
    });
    return {dx, dw, db, g};
  }
  const Tensor scale = empty_channel_vector(x, opmath);
  const Tensor shift = empty_channel_vector(x, opmath);
  AT_DISPATCH_FLOATING_TYPES(opmath, "bnext_batch_norm_act_backward", [&] {
    const RecomputeStep<scalar_t> recompute{
        var.const_data_ptr<scalar_t>(),     data_or_null<scalar_t>(w),
        data_or_null<scalar_t>(b),          data_or_null<scalar_t>(r),
        data_or_null<scalar_t>(d),          scale.mutable_data_ptr<scalar_t>(),
        shift.mutable_data_ptr<scalar_t>(), static_cast<scalar_t>(eps)};
    K::for_each_channel(C, [=] C10_HOST_DEVICE(int64_t c) { recompute(c); });
  });
  const Tensor& res = value_or_undefined(residual);
  if (res.defined()) {
    // g is the residual's gradient: stored once, read back for dx.
    const auto [g, sum_g, sum_gx] =
        K::act_backward_reduce(dy, x, mean, scale, shift, residual_like(res, x), a.kind, a.param);
    const auto [dx, dw, db] = finish(sum_g, sum_gx, [&](const auto& co) {
      return K::backward_elemt(g, x, mean, co.a, co.k, co.c);
    });
    return {dx, dw, db, g};
  }
  // No residual: g is recomputed where it is needed, never stored (a tensor
  // written and read back less).
  const auto [sum_g, sum_gx] = K::act_backward_sums(dy, x, mean, scale, shift, a.kind, a.param);
  const auto [dx, dw, db] = finish(sum_g, sum_gx, [&](const auto& co) {
    return K::act_backward_elemt(dy, x, mean, scale, shift, co.a, co.k, co.c, a.kind, a.param);
  });
  return {dx, dw, db, at::empty({0}, x.options())};
}

// ------------------------------------------------------------ in-place mode

// The output is written over the input's storage. A non-dense input has been
// computed in a dense copy: the result is copied back.
inline void write_back(const Tensor& input, const Tensor& x) {
  if (!x.is_same(input)) input.copy_(x);
}

template <class K>
std::tuple<Tensor, Tensor> batch_norm_act_train_(const Tensor& input, const OptTensor& weight,
                                                 const OptTensor& bias, double eps,
                                                 std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_train_";
  const Tensor& w = value_or_undefined(weight);
  const Tensor& b = value_or_undefined(bias);
  batch_norm::check_args(op, input, w, b, Tensor(), Tensor());
  const Activation a = parse_invertible(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  struct IntoInput : ActElemt<K> {
    Tensor operator()(const Tensor& x, const Tensor& mean, const Tensor& scale,
                      const Tensor& shift) const {
      K::act_elemt(x, mean, scale, shift, Tensor(), this->act.kind, this->act.param, x);
      return x;
    }
  };
  auto [out, mean, var] = train_into<K>(x, w, b, eps, IntoInput{{Tensor(), a}});
  write_back(input, out);
  return {mean, var};
}

template <class K>
void batch_norm_act_infer_(const Tensor& input, const Tensor& mean, const Tensor& var,
                           const OptTensor& weight, const OptTensor& bias, double eps,
                           std::string_view activation, double param) {
  const char* op = "bnext::batch_norm_act_infer_";
  batch_norm::check_args(op, input, value_or_undefined(weight), value_or_undefined(bias), mean,
                         var);
  const Activation a = parse_invertible(op, activation, param);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const auto opmath = opmath_dtype(x.scalar_type());
  const Tensor w_o = per_channel(value_or_undefined(weight), opmath);
  const Tensor b_o = per_channel(value_or_undefined(bias), opmath);
  const Tensor var_o = per_channel(var, opmath);
  const Tensor scale = empty_channel_vector(x, opmath);
  const Tensor shift = empty_channel_vector(x, opmath);
  AT_DISPATCH_FLOATING_TYPES(opmath, "bnext_batch_norm_act_infer_", [&] {
    const RecomputeStep<scalar_t> step{var_o.const_data_ptr<scalar_t>(),
                                       data_or_null<scalar_t>(w_o),
                                       data_or_null<scalar_t>(b_o),
                                       nullptr,
                                       nullptr,
                                       scale.mutable_data_ptr<scalar_t>(),
                                       shift.mutable_data_ptr<scalar_t>(),
                                       static_cast<scalar_t>(eps)};
    K::for_each_channel(x.size(1), [=] C10_HOST_DEVICE(int64_t c) { step(c); });
  });
  K::act_elemt(x, per_channel(mean, opmath), scale, shift, Tensor(), a.kind, a.param, x);
  write_back(input, x);
}

// Gradients from the output alone: x - mean = (act^-1(y) - bias) / scale,
// scale = weight * invstd. A weight of 0 makes that 0/0: its gradients are
// NaN, never silently wrong (InPlaceABN uses |weight| + eps, as inplace_abn).
template <class K>
std::tuple<Tensor, Tensor, Tensor> batch_norm_act_inplace_backward(
    const Tensor& grad_out, const Tensor& output, const Tensor& var_in, const OptTensor& weight,
    const OptTensor& bias, double eps, std::string_view activation, double param, bool training) {
  const char* op = "bnext::batch_norm_act_inplace_backward";
  const Tensor& w_in = value_or_undefined(weight);
  const Tensor& b_in = value_or_undefined(bias);
  batch_norm::check_args(op, output, w_in, b_in, Tensor(), var_in);
  batch_norm::check_grad_out(op, grad_out, output);
  const Activation a = parse_invertible(op, activation, param);
  const typename K::DeviceGuard guard(output.device());
  const Tensor y = canonical(output);
  const Tensor dy = same_layout(grad_out, y);
  const int64_t C = y.size(1);
  const auto opmath = opmath_dtype(output.scalar_type());
  const Tensor var = per_channel(var_in, opmath);
  const Tensor w = per_channel(w_in, opmath);
  const Tensor b = per_channel(b_in, opmath);
  const Tensor shift = empty_channel_vector(y, opmath);
  const Tensor inv_scale = empty_channel_vector(y, opmath);
  AT_DISPATCH_FLOATING_TYPES(opmath, "bnext_batch_norm_act_inplace_backward", [&] {
    const scalar_t* var_p = var.const_data_ptr<scalar_t>();
    const scalar_t* w_p = data_or_null<scalar_t>(w);
    const scalar_t* b_p = data_or_null<scalar_t>(b);
    scalar_t* shift_p = shift.mutable_data_ptr<scalar_t>();
    scalar_t* inv_scale_p = inv_scale.mutable_data_ptr<scalar_t>();
    const auto eps_ = static_cast<scalar_t>(eps);
    K::for_each_channel(C, [=] C10_HOST_DEVICE(int64_t c) {
      shift_p[c] = load_or(b_p, c, scalar_t(0));
      inv_scale_p[c] = scalar_t(1) / (load_or(w_p, c, scalar_t(1)) * inv_std(var_p[c], eps_));
    });
  });
  const auto [g, sum_g, sum_gx] =
      K::inplace_backward_reduce(dy, y, shift, inv_scale, a.kind, a.param);
  const batch_norm::BackwardCoefficients co = batch_norm::backward_coefficients<K>(
      sum_g, sum_gx, var, w, Tensor(), Tensor(), eps, training, C > 0 ? y.numel() / C : 0);
  const auto [grad_weight, grad_bias] = batch_norm::param_grads(co.grad_weight, sum_g, w_in);
  return {K::inplace_backward_elemt(g, y, shift, inv_scale, co.a, co.k, co.c, a.kind, a.param),
          grad_weight, grad_bias};
}

template <class K>
void register_kernels(torch::Library& m) {
  m.impl("batch_norm_act_elemt", &batch_norm_act_elemt<K>);
  m.impl("batch_norm_act_backward_reduce", &batch_norm_act_backward_reduce<K>);
  m.impl("batch_norm_act_backward_sums", &batch_norm_act_backward_sums<K>);
  m.impl("batch_norm_act_backward_elemt", &batch_norm_act_backward_elemt<K>);
  m.impl("batch_norm_act_backward_reduce_from_output",
         &batch_norm_act_backward_reduce_from_output<K>);
  m.impl("batch_norm_act_inplace_backward_reduce", &batch_norm_act_inplace_backward_reduce<K>);
  m.impl("batch_norm_act_inplace_backward_elemt", &batch_norm_act_inplace_backward_elemt<K>);
  m.impl("batch_norm_act_train", &batch_norm_act_train<K>);
  m.impl("batch_norm_act_infer", &batch_norm_act_infer<K>);
  m.impl("batch_renorm_act_train", &batch_renorm_act_train<K>);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward<K>);
  m.impl("batch_norm_act_train_", &batch_norm_act_train_<K>);
  m.impl("batch_norm_act_infer_", &batch_norm_act_infer_<K>);
  m.impl("batch_norm_act_inplace_backward", &batch_norm_act_inplace_backward<K>);
}

}  // namespace batch_norm_act
}  // namespace bnext
