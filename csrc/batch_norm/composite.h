// The Batch Norm operators, written once over a backend `K` that supplies the
// four kernels (statistics, elementwise normalise, backward reduce, backward
// elementwise) and a way to run a per-channel function. cpu_kernels.cpp and
// cuda_kernels.cu instantiate these templates with their own backend.
//
// K must provide:
//   std::tuple<Tensor, Tensor> stats(x)                     mean, biased var (opmath)
//   Tensor elemt(x, mean, scale, shift)                      (x - mean) * scale + shift
//   Tensor normalize(x, mean, var, weight, bias, eps)        the same with ForwardStep's
//                                                            scale and shift
//   std::tuple<Tensor, Tensor> backward_reduce(dy, x, mean)  sum dy, sum dy * (x - mean)
//   Tensor backward_elemt(dy, x, mean, a, k, c)              a * dy + k * (x - mean) + c
//   std::tuple<Tensor, Tensor> backward_normalize(dy, x, mean, var, weight, r, d, sum_dy,
//       sum_dy_xmu, eps, training, count)                    the same with BackwardStep's
//                                                            a, k, c; and the weight grad
//   void for_each_channel(int64_t C, F f)                    f(c) for c in [0, C)
//   struct DeviceGuard { explicit DeviceGuard(at::Device); }  makes the device current
// where x and dy are canonical (common/layout.h) and per-channel tensors are
// contiguous vectors of the opmath dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "batch_norm/checks.h"
#include "bnext/batch_norm_math.h"
#include "common/checks.h"
#include "common/layout.h"

namespace bnext {
namespace batch_norm {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A per-channel tensor as a contiguous opmath vector (undefined stays undefined).
inline Tensor per_channel(const Tensor& t, at::ScalarType opmath) {
  return t.defined() ? t.to(opmath).contiguous() : t;
}

template <typename T>
C10_HOST_DEVICE inline T load_or(const T* p, int64_t c, T fallback) {
  return p != nullptr ? p[c] : fallback;
}

// Batch Norm's per-channel forward step: (scale, shift) from the variance,
// weight and bias (absent weight: 1, absent bias: 0).
template <typename T>
struct ForwardStep {
  const T* weight;
  const T* bias;
  T* scale;
  T* shift;
  T eps;
  C10_HOST_DEVICE void operator()(int64_t c, T /*mean*/, T var) const {
    const auto co =
        forward_coeffs(inv_std(var, eps), load_or(weight, c, T(1)), load_or(bias, c, T(0)));
    scale[c] = co.scale;
    shift[c] = co.shift;
  }
};

// Batch Norm's per-channel backward step from the sums over the batch (of
// `count` values per channel): the coefficients of dx = a * dy + k * (x - mean)
// + c and the weight gradient. Batch Renorm's r and d (null for Batch Norm)
// rescale the weight and add d * sum(dy) to its gradient.
template <typename T>
struct BackwardStep {
  const T* var;
  const T* weight;
  const T* r;
  const T* d;
  T* grad_weight;
  T* a;
  T* k;
  T* c_out;
  T eps;
  bool training;
  // The coefficients alone and the weight gradient alone, for a map that
  // works them out where it uses them (the CUDA backend's).
  C10_HOST_DEVICE BackwardCoeffs<T> coeffs(int64_t c, T sum_dy, T sum_dy_xmu, int64_t count) const {
    const T w_c = load_or(weight, c, T(1)) * load_or(r, c, T(1));
    return backward_coeffs(inv_std(var[c], eps), w_c, sum_dy, sum_dy_xmu, count, training);
  }
  C10_HOST_DEVICE T weight_grad(int64_t c, T sum_dy, T sum_dy_xmu) const {
    return load_or(r, c, T(1)) * sum_dy_xmu * inv_std(var[c], eps) + load_or(d, c, T(0)) * sum_dy;
  }
  C10_HOST_DEVICE void operator()(int64_t c, T sum_dy, T sum_dy_xmu, int64_t count) const {
    const auto co = coeffs(c, sum_dy, sum_dy_xmu, count);
    grad_weight[c] = weight_grad(c, sum_dy, sum_dy_xmu);
    a[c] = co.a;
    k[c] = co.k;
    c_out[c] = co.c;
  }
};

inline Tensor empty_channel_vector(const Tensor& x, at::ScalarType opmath) {
  return at::empty({x.size(1)}, x.options().dtype(opmath));
}

// y = (x - mean) * scale + shift for given per-channel opmath mean/var, with
// ForwardStep's scale and shift worked out by a pass of their own: the CPU
// backend's K::normalize (a GPU's works them out inside its elementwise
// kernel, which saves a launch).
template <class K>
Tensor normalize_in_two_passes(const Tensor& x, const Tensor& mean, const Tensor& var,
                               const Tensor& weight, const Tensor& bias, double eps) {
  const auto opmath = mean.scalar_type();
  const Tensor scale = empty_channel_vector(x, opmath);
  const Tensor shift = empty_channel_vector(x, opmath);
  AT_DISPATCH_FLOATING_TYPES(opmath, "bnext_forward_coeffs", [&] {
    const scalar_t* var_p = var.const_data_ptr<scalar_t>();
    const ForwardStep<scalar_t> step{data_or_null<scalar_t>(weight), data_or_null<scalar_t>(bias),
                                     scale.mutable_data_ptr<scalar_t>(),
                                     shift.mutable_data_ptr<scalar_t>(),
                                     static_cast<scalar_t>(eps)};
    K::for_each_channel(x.size(1),
                        [=] C10_HOST_DEVICE(int64_t c) { step(c, scalar_t(0), var_p[c]); });
  });
  return K::elemt(x, mean, scale, shift);
}

// Batch statistics, then y = (x - mean) * scale + shift, where the per-channel
// step fn(c, mean_c, var_c) fills scale[c] and shift[c] (and whatever else its
// caller records, e.g. Batch Renorm's r and d). Returns (y, mean, var).
// `elemt(x, mean, scale, shift)` is the elementwise pass: K::elemt, or one
// with an activation (batch_norm_act/composite.h).
// fn(c, mean[c], var[c]). A named type rather than a __host__ __device__
// lambda: nvcc refuses such a lambda in a function template that has a local
// type (a caller's `elemt`) among its template arguments.
template <typename T, class F>
struct WithStats {
  F fn;
  const T* mean;
  const T* var;
  C10_HOST_DEVICE void operator()(int64_t c) const { fn(c, mean[c], var[c]); }
};

template <class K, typename T, class F, class E>
std::tuple<Tensor, Tensor, Tensor> stats_normalize(const Tensor& x, const Tensor& scale,
                                                   const Tensor& shift, const F& fn,
                                                   const E& elemt) {
  Tensor mean, var;
  std::tie(mean, var) = K::stats(x);
  K::for_each_channel(x.size(1),
                      WithStats<T, F>{fn, mean.const_data_ptr<T>(), var.const_data_ptr<T>()});
  return {elemt(x, mean, scale, shift), mean, var};
}

// Batch Norm's elementwise pass, as stats_normalize's `elemt`.
template <class K>
struct PlainElemt {
  Tensor operator()(const Tensor& x, const Tensor& mean, const Tensor& scale,
                    const Tensor& shift) const {
    return K::elemt(x, mean, scale, shift);
  }
};

// The coefficients of dx = a * dy + k * (x - mean) + c and the weight
// gradient, per channel, from the backward's two sums (opmath vectors) over
// `count` values per channel, or count_t[0] where the count is a tensor on the
// device (a distributed step's). r and d: Batch Renorm's, undefined for
// Batch Norm. Every backward pass (Batch Norm's, with an activation, in
// place, distributed) finishes with these.
struct BackwardCoefficients {
  Tensor grad_weight;
  Tensor a;
  Tensor k;
  Tensor c;
};

template <class K>
BackwardCoefficients backward_coefficients(const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                           const Tensor& var, const Tensor& weight, const Tensor& r,
                                           const Tensor& d, double eps, bool training,
                                           int64_t count, const Tensor& count_t = Tensor()) {
  const int64_t C = var.numel();
  const auto empty = [&] { return at::empty({C}, var.options()); };
  BackwardCoefficients out{empty(), empty(), empty(), empty()};
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "bnext_backward_coefficients", [&] {
    const BackwardStep<scalar_t> step{var.const_data_ptr<scalar_t>(),
                                      data_or_null<scalar_t>(weight),
                                      data_or_null<scalar_t>(r),
                                      data_or_null<scalar_t>(d),
                                      out.grad_weight.mutable_data_ptr<scalar_t>(),
                                      out.a.mutable_data_ptr<scalar_t>(),
                                      out.k.mutable_data_ptr<scalar_t>(),
                                      out.c.mutable_data_ptr<scalar_t>(),
                                      static_cast<scalar_t>(eps),
                                      training};
    const scalar_t* sdy_p = sum_dy.const_data_ptr<scalar_t>();
    const scalar_t* sdx_p = sum_dy_xmu.const_data_ptr<scalar_t>();
    const int64_t* count_p = data_or_null<int64_t>(count_t);
    K::for_each_channel(C, [=] C10_HOST_DEVICE(int64_t ch) {
      step(ch, sdy_p[ch], sdx_p[ch], count_p != nullptr ? count_p[0] : count);
    });
  });
  return out;
}

// The parameter gradients as the backward ops return them: in the weight's
// dtype (the opmath one without a weight).
inline std::tuple<Tensor, Tensor> param_grads(const Tensor& grad_weight, const Tensor& sum_dy,
                                              const Tensor& weight) {
  const auto dtype = weight.defined() ? weight.scalar_type() : grad_weight.scalar_type();
  return {grad_weight.to(dtype), sum_dy.to(dtype)};
}

// dx = a * dy + k * (x - mean) + c and the weight gradient, with BackwardStep's
// coefficients worked out by a pass of their own: the CPU backend's
// K::backward_normalize (a GPU's works them out inside its elementwise
// kernel, which saves a launch). Returns (dx, grad_weight in opmath).
template <class K>
std::tuple<Tensor, Tensor> backward_in_two_passes(const Tensor& dy, const Tensor& x,
                                                  const Tensor& mean, const Tensor& var,
                                                  const Tensor& weight, const Tensor& r,
                                                  const Tensor& d, const Tensor& sum_dy,
                                                  const Tensor& sum_dy_xmu, double eps,
                                                  bool training, int64_t count) {
  const BackwardCoefficients co =
      backward_coefficients<K>(sum_dy, sum_dy_xmu, var, weight, r, d, eps, training, count);
  return {K::backward_elemt(dy, x, mean, co.a, co.k, co.c), co.grad_weight};
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const OptTensor& weight,
                                                    const OptTensor& bias, double eps) {
  check_args("bnext::batch_norm_train", input, value_or_undefined(weight), value_or_undefined(bias),
             Tensor(), Tensor());
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const auto opmath = opmath_dtype(x.scalar_type());
  const Tensor w = per_channel(value_or_undefined(weight), opmath);
  const Tensor b = per_channel(value_or_undefined(bias), opmath);
  const auto [mean, var] = K::stats(x);
  return {K::normalize(x, mean, var, w, b, eps), mean, var};
}

template <class K>
Tensor batch_norm_infer(const Tensor& input, const Tensor& mean, const Tensor& var,
                        const OptTensor& weight, const OptTensor& bias, double eps) {
  const Tensor& w = value_or_undefined(weight);
  const Tensor& b = value_or_undefined(bias);
  check_args("bnext::batch_norm_infer", input, w, b, mean, var);
  const typename K::DeviceGuard guard(input.device());
  const auto opmath = opmath_dtype(input.scalar_type());
  return K::normalize(canonical(input), per_channel(mean, opmath), per_channel(var, opmath),
                      per_channel(w, opmath), per_channel(b, opmath), eps);
}

// Gradients of y = (x - mean) * invstd * weight' + bias', where in training
// mean and invstd are the batch statistics (functions of x) and in eval they
// are constants. `r`/`d` (Batch Renorm) rescale the weight: weight' = weight * r,
// and add d * sum(dy) to the weight gradient; pass undefined tensors for Batch Norm.
template <class K>
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& input,
                                            const Tensor& mean_in, const Tensor& var_in,
                                            const Tensor& weight, const Tensor& r_in,
                                            const Tensor& d_in, double eps, bool training) {
  check_args("bnext::batch_norm_backward", input, weight, Tensor(), mean_in, var_in);
  check_grad_out("bnext::batch_norm_backward", grad_out, input);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const Tensor dy = same_layout(grad_out, x);
  const int64_t C = x.size(1);
  const int64_t count = C > 0 ? x.numel() / C : 0;
  const auto opmath = opmath_dtype(input.scalar_type());
  const Tensor mean = per_channel(mean_in, opmath);
  const Tensor var = per_channel(var_in, opmath);
  const Tensor w = per_channel(weight, opmath);
  const Tensor r = per_channel(r_in, opmath);
  const Tensor d = per_channel(d_in, opmath);

  const auto [sum_dy, sum_dy_xmu] = K::backward_reduce(dy, x, mean);
  const auto [dx, grad_w] =
      K::backward_normalize(dy, x, mean, var, w, r, d, sum_dy, sum_dy_xmu, eps, training, count);
  const auto [grad_weight, grad_bias] = param_grads(grad_w, sum_dy, weight);
  return {dx, grad_weight, grad_bias};
}

// running = momentum * batch + (1 - momentum) * running, with the unbiased
// batch variance; momentum=None is the cumulative average 1 / (steps + 1).
// num_batches_tracked is incremented here, after every check has passed, so a
// failing call leaves all three buffers as they were. Running tensors may be
// of any float dtype and are updated in place.
template <class K>
void update_stats_impl(const char* op, const Tensor& running_mean, const Tensor& running_var,
                       const OptTensor& num_batches_tracked, const Tensor& mean_in,
                       const Tensor& var_in, std::optional<double> momentum, int64_t count,
                       const Tensor& count_t) {
  const int64_t C = mean_in.numel();
  TORCH_CHECK(var_in.numel() == C && var_in.device() == mean_in.device() &&
                  var_in.scalar_type() == mean_in.scalar_type(),
              op, ": expected the batch var like the batch mean (", C, " values of ",
              mean_in.scalar_type(), " on ", mean_in.device(), "), got ", var_in.numel(),
              " values of ", var_in.scalar_type(), " on ", var_in.device());
  TORCH_CHECK(at::isFloatingType(mean_in.scalar_type()), op,
              ": expected a floating-point batch mean, got ", mean_in.scalar_type());
  for (const auto& [name, t] :
       {std::pair<const char*, const Tensor*>{"running_mean", &running_mean},
        {"running_var", &running_var}}) {
    TORCH_CHECK(t->numel() == C, name, " should contain ", C, " elements not ", t->numel());
    TORCH_CHECK(t->device() == mean_in.device(), op, ": expected ", name, " on device ",
                mean_in.device(), " (the input's device), got ", t->device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": expected a floating-point ", name,
                ", got ", t->scalar_type());
  }
  const Tensor& steps = value_or_undefined(num_batches_tracked);
  TORCH_CHECK(momentum.has_value() || steps.defined(), op,
              ": momentum=None (cumulative average) needs num_batches_tracked");
  TORCH_CHECK(!steps.defined() || (steps.numel() == 1 && steps.device() == mean_in.device()), op,
              ": expected num_batches_tracked to be one value on ", mean_in.device(), ", got ",
              steps.sizes(), " on ", steps.device());
  Tensor count_i64;
  if (count_t.defined()) {
    TORCH_CHECK(count_t.numel() == 1 && count_t.device() == mean_in.device(), op,
                ": expected count to be one value on ", mean_in.device(), ", got ", count_t.sizes(),
                " on ", count_t.device());
    count_i64 = count_t.to(at::kLong);
    // Read where that costs no synchronisation; on the GPU a count <= 1 gives
    // a NaN unbiased variance (bnext::unbiased_var).
    if (count_i64.is_cpu()) count = count_i64.item<int64_t>();
  }
  if (!count_t.defined() || count_i64.is_cpu())
    TORCH_CHECK(count > 1, "Expected more than 1 value per channel when training, got ", count);
  const typename K::DeviceGuard guard(mean_in.device());

  const auto opmath = mean_in.scalar_type();
  const auto work = [&](const Tensor& t) {
    return t.scalar_type() == opmath && t.is_contiguous() ? t : t.to(opmath).contiguous();
  };
  Tensor rm = work(running_mean);
  Tensor rv = work(running_var);
  const Tensor mean = mean_in.contiguous();
  const Tensor var = var_in.contiguous();
  // The step count stays on the device: reading it on the host would synchronise.
  const Tensor steps_i64 = momentum.has_value() ? Tensor() : steps.to(at::kLong);
  // With a fixed momentum no channel reads the count, so channel 0 counts the
  // step in the same pass (on a GPU, a launch fewer); the cumulative average
  // reads it in every channel, which must all see it before it changes.
  const bool count_in_pass = momentum.has_value() && steps.defined() && C > 0 &&
                             steps.scalar_type() == at::kLong && steps.is_contiguous();
  AT_DISPATCH_FLOATING_TYPES(opmath, "bnext_update_stats", [&] {
    scalar_t* rm_p = rm.mutable_data_ptr<scalar_t>();
    scalar_t* rv_p = rv.mutable_data_ptr<scalar_t>();
    const scalar_t* mean_p = mean.const_data_ptr<scalar_t>();
    const scalar_t* var_p = var.const_data_ptr<scalar_t>();
    const int64_t* steps_p = steps_i64.defined() ? steps_i64.const_data_ptr<int64_t>() : nullptr;
    const int64_t* count_p = count_i64.defined() ? count_i64.const_data_ptr<int64_t>() : nullptr;
    int64_t* counted_p = count_in_pass ? steps.mutable_data_ptr<int64_t>() : nullptr;
    const auto fixed = static_cast<scalar_t>(momentum.value_or(0.0));
    K::for_each_channel(C, [=] C10_HOST_DEVICE(int64_t c) {
      if (counted_p != nullptr && c == 0) ++*counted_p;
      const scalar_t m =
          steps_p != nullptr ? scalar_t(1) / static_cast<scalar_t>(steps_p[0] + 1) : fixed;
      rm_p[c] = running_update(rm_p[c], mean_p[c], m);
      const int64_t n = count_p != nullptr ? count_p[0] : count;
      rv_p[c] = running_update(rv_p[c], unbiased_var(var_p[c], n), m);
    });
  });
  if (!rm.is_same(running_mean)) running_mean.copy_(rm);
  if (!rv.is_same(running_var)) running_var.copy_(rv);
  if (steps.defined() && !count_in_pass) steps.add_(1);
}

template <class K>
void batch_norm_update_stats(const Tensor& running_mean, const Tensor& running_var,
                             const OptTensor& num_batches_tracked, const Tensor& mean,
                             const Tensor& var, std::optional<double> momentum, int64_t count) {
  update_stats_impl<K>("bnext::batch_norm_update_stats", running_mean, running_var,
                       num_batches_tracked, mean, var, momentum, count, Tensor());
}

// The count as a tensor on the device: the global batch size of a
// distributed step, known only after a collective.
template <class K>
void batch_norm_update_stats_global(const Tensor& running_mean, const Tensor& running_var,
                                    const OptTensor& num_batches_tracked, const Tensor& mean,
                                    const Tensor& var, std::optional<double> momentum,
                                    const Tensor& count) {
  update_stats_impl<K>("bnext::batch_norm_update_stats_global", running_mean, running_var,
                       num_batches_tracked, mean, var, momentum, 0, count);
}

// ------------------------------------------------ operator entry points
// The split ops receive tensors straight from Python: check and canonicalise.

template <class K>
std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_stats_args(input);
  const typename K::DeviceGuard guard(input.device());
  return K::stats(canonical(input));
}

template <class K>
Tensor batch_norm_elemt(const Tensor& input, const Tensor& mean, const Tensor& scale,
                        const Tensor& shift) {
  check_elemt_args(input, mean, scale, shift);
  const typename K::DeviceGuard guard(input.device());
  const auto opmath = opmath_dtype(input.scalar_type());
  return K::elemt(canonical(input), per_channel(mean, opmath), per_channel(scale, opmath),
                  per_channel(shift, opmath));
}

template <class K>
std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& mean) {
  check_backward_reduce_args(grad_out, input, mean);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  return K::backward_reduce(same_layout(grad_out, x), x,
                            per_channel(mean, opmath_dtype(input.scalar_type())));
}

template <class K>
Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                 const Tensor& a, const Tensor& k, const Tensor& c) {
  check_backward_elemt_args(grad_out, input, mean, a, k, c);
  const typename K::DeviceGuard guard(input.device());
  const Tensor x = canonical(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  return K::backward_elemt(same_layout(grad_out, x), x, per_channel(mean, opmath),
                           per_channel(a, opmath), per_channel(k, opmath), per_channel(c, opmath));
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       const Tensor& mean, const Tensor& var,
                                                       const OptTensor& weight, double eps,
                                                       bool training) {
  return backward<K>(grad_out, input, mean, var, value_or_undefined(weight), Tensor(), Tensor(),
                     eps, training);
}

template <class K>
void register_kernels(torch::Library& m) {
  m.impl("batch_norm_stats", &batch_norm_stats<K>);
  m.impl("batch_norm_elemt", &batch_norm_elemt<K>);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce<K>);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt<K>);
  m.impl("batch_norm_train", &batch_norm_train<K>);
  m.impl("batch_norm_infer", &batch_norm_infer<K>);
  m.impl("batch_norm_backward", &batch_norm_backward<K>);
  m.impl("batch_norm_update_stats", &batch_norm_update_stats<K>);
  m.impl("batch_norm_update_stats_global", &batch_norm_update_stats_global<K>);
}

}  // namespace batch_norm
}  // namespace bnext
