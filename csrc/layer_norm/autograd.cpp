// Autograd of LayerNorm and RMSNorm, in C++ for the same reason as Batch
// Norm's (batch_norm/autograd.cpp): on a (64, 1024) input a Python
// autograd.Function costs more than the kernels. The row statistics are
// outputs without gradient: the backward formulas differentiate through them.
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/autograd_util.h"

namespace bnext {
namespace layer_norm {
namespace {

using namespace bnext::autograd_util;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               at::IntArrayRef normalized_shape, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto fwd = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, at::IntArrayRef, const OptTensor&, const OptTensor&, double)>(
        "bnext::layer_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, rstd] = fwd.call(input, normalized_shape, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, rstd});
    ctx->saved_data["has_weight"] = present(weight);
    ctx->saved_data["has_bias"] = present(bias);
    if (present(bias)) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
        std::array<bool, 2>)>("bnext::layer_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool want_weight = has_weight && ctx->needs_input_grad(1);
    const bool want_bias = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    auto [dx, dw, db] = bwd.call(grads[0], saved[0], saved[2], saved[3], optional_of(saved[1]),
                                 {want_weight, want_bias});
    if (want_bias) {
      // Without a weight the kernel returns the input's dtype for the bias gradient.
      db = db.to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    return {ctx->needs_input_grad(0) ? dx : Tensor(), Tensor(), want_weight ? dw : Tensor(),
            want_bias ? db : Tensor(), Tensor()};
  }
};

struct RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               at::IntArrayRef normalized_shape, const OptTensor& weight,
                               double eps) {
    static const auto fwd =
        op<std::tuple<Tensor, Tensor>(const Tensor&, at::IntArrayRef, const OptTensor&, double)>(
            "bnext::rms_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, rstd] = fwd.call(input, normalized_shape, weight, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), rstd});
    ctx->saved_data["has_weight"] = present(weight);
    ctx->mark_non_differentiable({rstd});
    return {out, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool)>(
        "bnext::rms_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const bool want_weight = ctx->saved_data["has_weight"].toBool() && ctx->needs_input_grad(1);
    auto [dx, dw] = bwd.call(grads[0], saved[0], saved[2], optional_of(saved[1]), want_weight);
    return {ctx->needs_input_grad(0) ? dx : Tensor(), Tensor(), want_weight ? dw : Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_autograd(const Tensor& input,
                                                       at::IntArrayRef normalized_shape,
                                                       const OptTensor& weight,
                                                       const OptTensor& bias, double eps) {
  auto out = LayerNormFunction::apply(input, normalized_shape, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> rms_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                                             const OptTensor& weight, double eps) {
  auto out = RMSNormFunction::apply(input, normalized_shape, weight, eps);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_autograd);
  m.impl("rms_norm_fwd", &rms_norm_autograd);
}

}  // namespace layer_norm
}  // namespace bnext
