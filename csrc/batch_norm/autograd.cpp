// Autograd for the Batch Norm passes, in C++: a Python autograd.Function
// costs ~40 us per forward+backward, as much as the kernels themselves for an
// (8, 512, 7, 7) or (64, 1024) input.
//
// The batch statistics are outputs without gradient: the backward formula
// already differentiates through them.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/autograd_util.h"

namespace bnext {
namespace batch_norm {
namespace {

using namespace bnext::autograd_util;

using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                       const Tensor&, const OptTensor&, double,
                                                       bool);

struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto train = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const OptTensor&, const OptTensor&, double)>("bnext::batch_norm_train");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, var] = train.call(input, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = weight.has_value() && weight->defined();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, var});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<BackwardSig>("bnext::batch_norm_backward");
    const auto saved = ctx->get_saved_variables();
    const auto g = backward_op.call(grads[0], saved[0], saved[2], saved[3], optional_of(saved[1]),
                                    ctx->saved_data["eps"].toDouble(), true);
    auto out = input_grads(ctx, g, 1, ctx->saved_data["has_weight"].toBool(),
                           ctx->saved_data["has_bias"].toBool());
    out.push_back(Tensor());  // eps
    return out;
  }
};

struct InferFunction : public torch::autograd::Function<InferFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& mean,
                        const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                        double eps) {
    static const auto infer =
        op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                  double)>("bnext::batch_norm_infer");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({input, mean, var, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = weight.has_value() && weight->defined();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return infer.call(input, mean, var, weight, bias, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<BackwardSig>("bnext::batch_norm_backward");
    const auto saved = ctx->get_saved_variables();
    const auto g = backward_op.call(grads[0], saved[0], saved[1], saved[2], optional_of(saved[3]),
                                    ctx->saved_data["eps"].toDouble(), false);
    const auto in = input_grads(ctx, g, 3, ctx->saved_data["has_weight"].toBool(),
                                ctx->saved_data["has_bias"].toBool());
    // The running statistics are constants in eval mode.
    return {in[0], Tensor(), Tensor(), in[1], in[2], Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> train_autograd(const Tensor& input, const OptTensor& weight,
                                                  const OptTensor& bias, double eps) {
  auto out = TrainFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensor infer_autograd(const Tensor& input, const Tensor& mean, const Tensor& var,
                      const OptTensor& weight, const OptTensor& bias, double eps) {
  return InferFunction::apply(input, mean, var, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_norm_train", &train_autograd);
  m.impl("batch_norm_infer", &infer_autograd);
}

}  // namespace batch_norm
}  // namespace bnext
