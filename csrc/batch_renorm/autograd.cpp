// Autograd for Batch Renorm training, in C++ like Batch Norm's
// (batch_norm/autograd.cpp). The batch statistics and r and d are outputs
// without gradient: r and d are constants by definition (stop-gradient).
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/autograd_util.h"

namespace bnext {
namespace batch_renorm {
namespace {

using namespace bnext::autograd_util;

struct RenormTrainFunction : public torch::autograd::Function<RenormTrainFunction> {
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
    ctx->saved_data["has_weight"] = weight.has_value() && weight->defined();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, var, r, d});
    return {out, mean, var, r, d};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
        const Tensor&, const Tensor&, double)>("bnext::batch_renorm_backward");
    const auto saved = ctx->get_saved_variables();
    const auto g = backward_op.call(grads[0], saved[0], saved[2], saved[3], optional_of(saved[1]),
                                    saved[4], saved[5], ctx->saved_data["eps"].toDouble());
    const auto in = input_grads(ctx, g, 3, ctx->saved_data["has_weight"].toBool(),
                                ctx->saved_data["has_bias"].toBool());
    return {in[0], Tensor(), Tensor(), in[1], in[2], Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> renorm_train_autograd(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps, double r_max, double d_max) {
  auto out = RenormTrainFunction::apply(input, running_mean, running_var, weight, bias, eps, r_max,
                                        d_max);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_renorm_train", &renorm_train_autograd);
}

}  // namespace batch_renorm
}  // namespace bnext
