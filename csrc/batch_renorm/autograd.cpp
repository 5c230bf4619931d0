// Autograd for Batch Renorm training, in C++ like Batch Norm's
// (batch_norm/autograd.cpp). The batch statistics and r and d are outputs
// without gradient: r and d are constants by definition (stop-gradient).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "batch_norm/checks.h"
#include "batch_norm/reference.h"
#include "batch_renorm/checks.h"
#include "batch_renorm/reference.h"
#include "common/autograd_util.h"

namespace bnext {
namespace batch_renorm {
namespace {

using namespace bnext::autograd_util;
namespace bn_reference = batch_norm::reference;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

using BackwardSig = Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const OptTensor&, const Tensor&, const Tensor&, double);

const c10::TypedOperatorHandle<BackwardSig>& backward_handle() {
  static const auto handle = op<BackwardSig>("bnext::batch_renorm_backward");
  return handle;
}

// The backward pass as a differentiable operator, like Batch Norm's: the
// reference forward recomputes the batch statistics; r and d stay constants.
struct BackwardFunction : public torch::autograd::Function<BackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& mean, const Tensor& var, const OptTensor& weight,
                               const Tensor& r, const Tensor& d, double eps) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] = backward_handle().call(grad_out, input, mean, var, weight, r, d, eps);
    ctx->save_for_backward({grad_out, input, weight.value_or(Tensor()), r, d});
    ctx->saved_data["eps"] = eps;
    return {dx, dw, db};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    const char* op = "bnext::batch_renorm_backward";
    check_no_grad_needed(ctx, 2, op, "mean");
    check_no_grad_needed(ctx, 3, op, "var");
    const auto saved = ctx->get_saved_variables();
    // An absent weight is no edge (autograd skips an empty optional).
    const size_t r_edge = saved[2].defined() ? 5 : 4;
    check_no_grad_needed(ctx, r_edge, op, "r");
    check_no_grad_needed(ctx, r_edge + 1, op, "d");
    const Tensor& x = saved[1];
    const Tensor r = saved[3];
    const Tensor d = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const ReferenceForward forward = [=](const variable_list& in) {
      return std::get<0>(bn_reference::train(in[0], in[1], in[2], eps, r, d));
    };
    const auto h = norm_backward_of_backward(
        forward, saved[0], x, saved[2], {x.size(1)}, opmath_dtype(x.scalar_type()), gg,
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
         saved[2].defined() && ctx->needs_input_grad(4)});  // no edge without a weight
    return {h[0], h[1], Tensor(), Tensor(), h[2], Tensor(), Tensor(), Tensor()};
  }
};

Grads batch_renorm_backward_autograd(const Tensor& grad_out, const Tensor& input,
                                     const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                     const Tensor& r, const Tensor& d, double eps) {
  check_reverse_mode_only("bnext::batch_renorm_backward", {&grad_out, &input, &mean, &var, &r, &d},
                          {&weight});
  const auto g = BackwardFunction::apply(grad_out, input, mean, var, weight, r, d, eps);
  return {g[0], g[1], g[2]};
}

using TrainResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using TrainSig = TrainResult(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                             const OptTensor&, double, double, double);
using TrainTensorSig = TrainResult(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                   const OptTensor&, double, const Tensor&, const Tensor&);

// r_max and d_max of batch_renorm_train (floats) or batch_renorm_train_scheduled (0-dim tensors).
struct LimitArgs {
  double r_max = 0.0;
  double d_max = 0.0;
  Tensor r_max_t;
  Tensor d_max_t;
  bool tensors() const { return r_max_t.defined(); }
};

TrainResult call_train(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                       const OptTensor& weight, const OptTensor& bias, double eps,
                       const LimitArgs& limits) {
  static const auto by_value = op<TrainSig>("bnext::batch_renorm_train");
  static const auto by_tensor = op<TrainTensorSig>("bnext::batch_renorm_train_scheduled");
  if (limits.tensors())
    return by_tensor.call(input, running_mean, running_var, weight, bias, eps, limits.r_max_t,
                          limits.d_max_t);
  return by_value.call(input, running_mean, running_var, weight, bias, eps, limits.r_max,
                       limits.d_max);
}

struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  // The limit tensors are passed separately so that autograd sees them as
  // inputs (and can refuse a gradient for them).
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const Tensor& running_mean, const Tensor& running_var,
                               const OptTensor& weight, const OptTensor& bias, double eps,
                               const OptTensor& r_max_t, const OptTensor& d_max_t,
                               LimitArgs limits) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, var, r, d] =
        call_train(input, running_mean, running_var, weight, bias, eps, limits);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, var, r, d});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = present(weight);
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["tensor_limits"] = limits.tensors();
    ctx->mark_non_differentiable({mean, var, r, d});
    return {out, mean, var, r, d};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // r and d are constants, so the running statistics and limits they come
    // from get no gradient.
    const char* op = "bnext::batch_renorm_train";
    check_no_grad_needed(ctx, 1, op, "running_mean");
    check_no_grad_needed(ctx, 2, op, "running_var");
    // Absent weight or bias are no edges (autograd skips an empty optional),
    // nor are batch_renorm_train's absent limit tensors.
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    if (ctx->saved_data["tensor_limits"].toBool()) {
      const size_t r_max_edge = 3 + has_weight + has_bias;
      check_no_grad_needed(ctx, r_max_edge, op, "r_max");
      check_no_grad_needed(ctx, r_max_edge + 1, op, "d_max");
    }
    const auto saved = ctx->get_saved_variables();
    const auto g =
        call_backward(backward_handle(), grads[0], saved[0], saved[2], saved[3],
                      optional_of(saved[1]), saved[4], saved[5], ctx->saved_data["eps"].toDouble());
    const auto in = input_grads(ctx, g, 3, has_weight, has_bias);
    return {in[0], Tensor(), Tensor(), in[1], in[2], Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

TrainResult train_autograd_impl(const char* op, const Tensor& input, const Tensor& running_mean,
                                const Tensor& running_var, const OptTensor& weight,
                                const OptTensor& bias, double eps, const LimitArgs& limits) {
  // r and d are constants of the running statistics and the limits, by
  // definition: no derivative for either, in either mode (TrainFunction
  // refuses their gradient).
  check_no_forward_grad("batch_renorm", "running_mean and running_var",
                        {&running_mean, &running_var});
  check_no_forward_grad("batch_renorm", "r_max and d_max", {&limits.r_max_t, &limits.d_max_t});
  if (use_reference({&input, &running_mean, &running_var}, {&weight, &bias})) {
    if (!limits.tensors()) check_limits(op, limits.r_max, limits.d_max);
    const Tensor& w = value_or_undefined(weight);
    const Tensor& b = value_or_undefined(bias);
    batch_norm::check_args(op, input, w, b, running_mean, running_var);
    auto [mean, var] = bn_reference::stats(input);
    auto [r, d] = limits.tensors() ? reference::correction(mean, var, running_mean, running_var,
                                                           eps, limits.r_max_t, limits.d_max_t)
                                   : reference::correction(mean, var, running_mean, running_var,
                                                           eps, limits.r_max, limits.d_max);
    const Tensor out = std::get<0>(bn_reference::train(input, w, b, eps, r, d));
    return {out, mean.detach(), var.detach(), r, d};
  }
  auto out = TrainFunction::apply(input, running_mean, running_var, weight, bias, eps,
                                  optional_of(limits.r_max_t), optional_of(limits.d_max_t), limits);
  return {out[0], out[1], out[2], out[3], out[4]};
}

TrainResult batch_renorm_train_autograd(const Tensor& input, const Tensor& running_mean,
                                        const Tensor& running_var, const OptTensor& weight,
                                        const OptTensor& bias, double eps, double r_max,
                                        double d_max) {
  return train_autograd_impl("bnext::batch_renorm_train", input, running_mean, running_var, weight,
                             bias, eps, {r_max, d_max, Tensor(), Tensor()});
}

TrainResult batch_renorm_train_scheduled_autograd(const Tensor& input, const Tensor& running_mean,
                                                  const Tensor& running_var,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  double eps, const Tensor& r_max,
                                                  const Tensor& d_max) {
  return train_autograd_impl("bnext::batch_renorm_train_scheduled", input, running_mean,
                             running_var, weight, bias, eps, {0.0, 0.0, r_max, d_max});
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_renorm_train", &batch_renorm_train_autograd);
  m.impl("batch_renorm_train_scheduled", &batch_renorm_train_scheduled_autograd);
  m.impl("batch_renorm_backward", &batch_renorm_backward_autograd);
}

}  // namespace batch_renorm
}  // namespace bnext
