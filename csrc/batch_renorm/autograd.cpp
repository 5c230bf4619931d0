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
#include "common/autograd_util.h"

namespace bnext {
namespace batch_renorm {
namespace {

using namespace bnext::autograd_util;
namespace reference = batch_norm::reference;
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
    const size_t r_edge = 5;  // weight is edge 4, present or not
    check_no_grad_needed(ctx, r_edge, op, "r");
    check_no_grad_needed(ctx, r_edge + 1, op, "d");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[1];
    const Tensor r = saved[3];
    const Tensor d = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const ReferenceForward forward = [=](const variable_list& in) {
      return std::get<0>(reference::train(in[0], in[1], in[2], eps, r, d));
    };
    const auto h = norm_backward_of_backward(
        forward, saved[0], x, saved[2], {x.size(1)}, opmath_dtype(x.scalar_type()), gg,
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
         saved[2].defined() && ctx->needs_input_grad(4)});  // no edge without a weight
    return {h[0], h[1], Tensor(), Tensor(), h[2], Tensor(), Tensor(), Tensor()};
  }
};

Grads backward_autograd(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                        const Tensor& var, const OptTensor& weight, const Tensor& r,
                        const Tensor& d, double eps) {
  check_reverse_mode_only("bnext::batch_renorm_backward", {&grad_out, &input, &mean, &var, &r, &d},
                          {&weight});
  const auto g = BackwardFunction::apply(grad_out, input, mean, var, weight, r, d, eps);
  return {g[0], g[1], g[2]};
}

struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const Tensor& running_mean, const Tensor& running_var,
                               const OptTensor& weight, const OptTensor& bias, double eps,
                               double r_max, double d_max) {
    static const auto train =
        op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
            const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
            double, double, double)>("bnext::batch_renorm_train");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, var, r, d] =
        train.call(input, running_mean, running_var, weight, bias, eps, r_max, d_max);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, var, r, d});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = present(weight);
    ctx->saved_data["has_bias"] = present(bias);
    ctx->mark_non_differentiable({mean, var, r, d});
    return {out, mean, var, r, d};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // r and d are constants, so the running statistics they come from get no gradient.
    check_no_grad_needed(ctx, 1, "bnext::batch_renorm_train", "running_mean");
    check_no_grad_needed(ctx, 2, "bnext::batch_renorm_train", "running_var");
    const auto saved = ctx->get_saved_variables();
    const auto g = call_backward(backward_handle(), grads[0], saved[0], saved[2], saved[3],
                                 optional_of(saved[1]), saved[4], saved[5],
                                 ctx->saved_data["eps"].toDouble());
    const auto in = input_grads(ctx, g, 3, ctx->saved_data["has_weight"].toBool(),
                                ctx->saved_data["has_bias"].toBool());
    return {in[0], Tensor(), Tensor(), in[1], in[2], Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> train_autograd(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps, double r_max, double d_max) {
  if (use_reference({&input, &running_mean, &running_var}, {&weight, &bias})) {
    const char* op = "bnext::batch_renorm_train";
    check_limits(op, r_max, d_max);
    const Tensor& w = value_or_undefined(weight);
    const Tensor& b = value_or_undefined(bias);
    batch_norm::check_args(op, input, w, b, running_mean, running_var);
    auto [mean, var] = reference::stats(input);
    auto [r, d] = reference::renorm_correction(mean, var, running_mean, running_var, eps, r_max,
                                               d_max);
    const Tensor out = std::get<0>(reference::train(input, w, b, eps, r, d));
    return {out, mean.detach(), var.detach(), r, d};
  }
  auto out = TrainFunction::apply(input, running_mean, running_var, weight, bias, eps, r_max,
                                  d_max);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_renorm_train", &train_autograd);
  m.impl("batch_renorm_backward", &backward_autograd);
}

}  // namespace batch_renorm
}  // namespace bnext
