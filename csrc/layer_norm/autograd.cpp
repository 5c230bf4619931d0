// Autograd of LayerNorm and RMSNorm, in C++ for the same reason as Batch
// Norm's (batch_norm/autograd.cpp): on a (64, 1024) input a Python
// autograd.Function costs more than the kernels. How each kind of derivative
// is obtained: common/autograd_util.h. The row statistics are outputs without
// gradient: the backward formulas differentiate through them.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/autograd_util.h"
#include "common/checks.h"
#include "layer_norm/checks.h"
#include "layer_norm/reference.h"

namespace bnext {
namespace layer_norm {
namespace {

using namespace bnext::autograd_util;

using LayerNormBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                           const Tensor&, const Tensor&,
                                                           const OptTensor&, double,
                                                           std::array<bool, 2>);
using RmsNormBwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                 const OptTensor&, double, bool);

const c10::TypedOperatorHandle<LayerNormBwdSig>& layer_norm_bwd_handle() {
  static const auto handle = op<LayerNormBwdSig>("bnext::layer_norm_bwd");
  return handle;
}

const c10::TypedOperatorHandle<RmsNormBwdSig>& rms_norm_bwd_handle() {
  static const auto handle = op<RmsNormBwdSig>("bnext::rms_norm_bwd");
  return handle;
}

using LayerNorm2dBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                             const Tensor&, const Tensor&,
                                                             const OptTensor&, double,
                                                             std::array<bool, 2>);

const c10::TypedOperatorHandle<LayerNorm2dBwdSig>& layer_norm_2d_bwd_handle() {
  static const auto handle = op<LayerNorm2dBwdSig>("bnext::layer_norm_2d_bwd");
  return handle;
}

const c10::TypedOperatorHandle<RmsNormBwdSig>& rms_norm_2d_bwd_handle() {
  static const auto handle = op<RmsNormBwdSig>("bnext::rms_norm_2d_bwd");
  return handle;
}

// The normalised dims are those past the statistics' (batch) dims.
int64_t normalized_dims(const Tensor& input, const Tensor& stat) {
  return input.dim() - stat.dim();
}

// ------------------------------------------------ backward passes, differentiable

struct LayerNormBackwardFunction : public torch::autograd::Function<LayerNormBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& mean, const Tensor& rstd, const OptTensor& weight,
                               double eps, std::array<bool, 2> output_mask) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] =
        layer_norm_bwd_handle().call(grad_out, input, mean, rstd, weight, eps, output_mask);
    ctx->save_for_backward({grad_out, input, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["nd"] = normalized_dims(input, rstd);
    ctx->saved_data["mask_w"] = output_mask[0];
    ctx->saved_data["mask_b"] = output_mask[1];
    return {dx, dw, db};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    const char* op = "bnext::layer_norm_bwd";
    check_no_grad_needed(ctx, 2, op, "mean");
    check_no_grad_needed(ctx, 3, op, "rstd");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[1];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t nd = ctx->saved_data["nd"].toInt();
    // A parameter gradient that was not asked for is an empty placeholder.
    const Tensor gg_w = ctx->saved_data["mask_w"].toBool() ? gg[1] : Tensor();
    const Tensor gg_b = ctx->saved_data["mask_b"].toBool() ? gg[2] : Tensor();
    const ReferenceForward forward = [=](const variable_list& in) {
      return std::get<0>(reference::layer_norm(in[0], nd, in[1], in[2], eps));
    };
    const auto h = norm_backward_of_backward(
        forward, saved[0], x, saved[2], x.sizes().slice(x.dim() - nd),
        param_grad_dtype(saved[2], x), {gg[0], gg_w, gg_b},
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
         saved[2].defined() && ctx->needs_input_grad(4)});  // no edge without a weight
    return {h[0], h[1], Tensor(), Tensor(), h[2], Tensor(), Tensor()};
  }
};

struct RmsNormBackwardFunction : public torch::autograd::Function<RmsNormBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& rstd, const OptTensor& weight, double eps,
                               bool weight_grad) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw] = rms_norm_bwd_handle().call(grad_out, input, rstd, weight, eps, weight_grad);
    ctx->save_for_backward({grad_out, input, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["nd"] = normalized_dims(input, rstd);
    ctx->saved_data["weight_grad"] = weight_grad;
    return {dx, dw};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    check_no_grad_needed(ctx, 2, "bnext::rms_norm_bwd", "rstd");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[1];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t nd = ctx->saved_data["nd"].toInt();
    const Tensor gg_w = ctx->saved_data["weight_grad"].toBool() ? gg[1] : Tensor();
    const ReferenceForward forward = [=](const variable_list& in) {
      return std::get<0>(reference::rms_norm(in[0], nd, in[1], eps));  // no bias: in[2] unused
    };
    const auto h = norm_backward_of_backward(
        forward, saved[0], x, saved[2], x.sizes().slice(x.dim() - nd),
        param_grad_dtype(saved[2], x), {gg[0], gg_w},
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
         saved[2].defined() && ctx->needs_input_grad(3)});  // no edge without a weight
    return {h[0], h[1], Tensor(), h[2], Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_autograd(const Tensor& grad_out,
                                                           const Tensor& input, const Tensor& mean,
                                                           const Tensor& rstd,
                                                           const OptTensor& weight, double eps,
                                                           std::array<bool, 2> output_mask) {
  check_reverse_mode_only("bnext::layer_norm_bwd", {&grad_out, &input, &mean, &rstd}, {&weight});
  const auto g =
      LayerNormBackwardFunction::apply(grad_out, input, mean, rstd, weight, eps, output_mask);
  return {g[0], g[1], g[2]};
}

std::tuple<Tensor, Tensor> rms_norm_bwd_autograd(const Tensor& grad_out, const Tensor& input,
                                                 const Tensor& rstd, const OptTensor& weight,
                                                 double eps, bool weight_grad) {
  check_reverse_mode_only("bnext::rms_norm_bwd", {&grad_out, &input, &rstd}, {&weight});
  const auto g = RmsNormBackwardFunction::apply(grad_out, input, rstd, weight, eps, weight_grad);
  return {g[0], g[1]};
}

// ------------------------------------------------------------ forward passes

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               at::IntArrayRef normalized_shape, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto fwd =
        op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, at::IntArrayRef, const OptTensor&,
                                              const OptTensor&, double)>("bnext::layer_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, rstd] = fwd.call(input, normalized_shape, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = present(weight);
    ctx->saved_data["has_bias"] = present(bias);
    if (present(bias)) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool want_weight = has_weight && ctx->needs_input_grad(1);
    const bool want_bias = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    auto [dx, dw, db] = call_backward(
        layer_norm_bwd_handle(), grads[0], saved[0], saved[2], saved[3], optional_of(saved[1]),
        ctx->saved_data["eps"].toDouble(), std::array<bool, 2>{want_weight, want_bias});
    if (want_bias) {
      // Without a weight the kernel returns the input's dtype for the bias gradient.
      db = db.to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    return {ctx->needs_input_grad(0) ? dx : Tensor(), Tensor(), want_weight ? dw : Tensor(),
            want_bias ? db : Tensor(), Tensor()};
  }
};

struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               at::IntArrayRef normalized_shape, const OptTensor& weight,
                               double eps) {
    static const auto fwd =
        op<std::tuple<Tensor, Tensor>(const Tensor&, at::IntArrayRef, const OptTensor&, double)>(
            "bnext::rms_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, rstd] = fwd.call(input, normalized_shape, weight, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = present(weight);
    ctx->mark_non_differentiable({rstd});
    return {out, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool want_weight = ctx->saved_data["has_weight"].toBool() && ctx->needs_input_grad(1);
    auto [dx, dw] =
        call_backward(rms_norm_bwd_handle(), grads[0], saved[0], saved[2], optional_of(saved[1]),
                      ctx->saved_data["eps"].toDouble(), want_weight);
    return {ctx->needs_input_grad(0) ? dx : Tensor(), Tensor(), want_weight ? dw : Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_autograd(const Tensor& input,
                                                           at::IntArrayRef normalized_shape,
                                                           const OptTensor& weight,
                                                           const OptTensor& bias, double eps) {
  if (use_reference({&input}, {&weight, &bias})) {
    const Tensor& w = value_or_undefined(weight);
    const Tensor& b = value_or_undefined(bias);
    check_forward("bnext::layer_norm_fwd", input, normalized_shape, w, b, ParamDtype::kLikeInput);
    auto [out, mean, rstd] =
        reference::layer_norm(input, static_cast<int64_t>(normalized_shape.size()), w, b, eps);
    return {out, mean.detach(), rstd.detach()};
  }
  auto out = LayerNormFunction::apply(input, normalized_shape, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> rms_norm_fwd_autograd(const Tensor& input,
                                                 at::IntArrayRef normalized_shape,
                                                 const OptTensor& weight, double eps) {
  // Complex input is not a performance case: torch's formula, composite.
  if (input.is_complex() || use_reference({&input}, {&weight})) {
    const Tensor& w = value_or_undefined(weight);
    check_forward("bnext::rms_norm_fwd", input, normalized_shape, w, Tensor(),
                  ParamDtype::kAnyFloat);
    auto [out, rstd] =
        reference::rms_norm(input, static_cast<int64_t>(normalized_shape.size()), w, eps);
    return {out, rstd.detach()};
  }
  auto out = RmsNormFunction::apply(input, normalized_shape, weight, eps);
  return {out[0], out[1]};
}

// ------------------------------------------- the _2d ops (normalised over dim 1)

struct LayerNorm2dBackwardFunction : public torch::autograd::Function<LayerNorm2dBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& mean, const Tensor& rstd, const OptTensor& weight,
                               double eps, std::array<bool, 2> output_mask) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] =
        layer_norm_2d_bwd_handle().call(grad_out, input, mean, rstd, weight, eps, output_mask);
    ctx->save_for_backward({grad_out, input, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["mask_w"] = output_mask[0];
    ctx->saved_data["mask_b"] = output_mask[1];
    return {dx, dw, db};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    const char* op = "bnext::layer_norm_2d_bwd";
    check_no_grad_needed(ctx, 2, op, "mean");
    check_no_grad_needed(ctx, 3, op, "rstd");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[1];
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor gg_w = ctx->saved_data["mask_w"].toBool() ? gg[1] : Tensor();
    const Tensor gg_b = ctx->saved_data["mask_b"].toBool() ? gg[2] : Tensor();
    const ReferenceForward forward = [=](const variable_list& in) {
      return std::get<0>(reference::layer_norm_2d(in[0], in[1], in[2], eps));
    };
    const auto h = norm_backward_of_backward(forward, saved[0], x, saved[2], x.sizes().slice(1, 1),
                                             param_grad_dtype(saved[2], x), {gg[0], gg_w, gg_b},
                                             {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                              saved[2].defined() && ctx->needs_input_grad(4)});
    return {h[0], h[1], Tensor(), Tensor(), h[2], Tensor(), Tensor()};
  }
};

struct RmsNorm2dBackwardFunction : public torch::autograd::Function<RmsNorm2dBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& rstd, const OptTensor& weight, double eps,
                               bool weight_grad) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw] = rms_norm_2d_bwd_handle().call(grad_out, input, rstd, weight, eps, weight_grad);
    ctx->save_for_backward({grad_out, input, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["weight_grad"] = weight_grad;
    return {dx, dw};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    check_no_grad_needed(ctx, 2, "bnext::rms_norm_2d_bwd", "rstd");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[1];
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor gg_w = ctx->saved_data["weight_grad"].toBool() ? gg[1] : Tensor();
    const ReferenceForward forward = [=](const variable_list& in) {
      return std::get<0>(reference::rms_norm_2d(in[0], in[1], eps));  // no bias: in[2] unused
    };
    const auto h = norm_backward_of_backward(forward, saved[0], x, saved[2], x.sizes().slice(1, 1),
                                             param_grad_dtype(saved[2], x), {gg[0], gg_w},
                                             {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                              saved[2].defined() && ctx->needs_input_grad(3)});
    return {h[0], h[1], Tensor(), h[2], Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_2d_bwd_autograd(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& rstd,
    const OptTensor& weight, double eps, std::array<bool, 2> output_mask) {
  check_reverse_mode_only("bnext::layer_norm_2d_bwd", {&grad_out, &input, &mean, &rstd}, {&weight});
  const auto g =
      LayerNorm2dBackwardFunction::apply(grad_out, input, mean, rstd, weight, eps, output_mask);
  return {g[0], g[1], g[2]};
}

std::tuple<Tensor, Tensor> rms_norm_2d_bwd_autograd(const Tensor& grad_out, const Tensor& input,
                                                    const Tensor& rstd, const OptTensor& weight,
                                                    double eps, bool weight_grad) {
  check_reverse_mode_only("bnext::rms_norm_2d_bwd", {&grad_out, &input, &rstd}, {&weight});
  const auto g = RmsNorm2dBackwardFunction::apply(grad_out, input, rstd, weight, eps, weight_grad);
  return {g[0], g[1]};
}

struct LayerNorm2dFunction : public torch::autograd::Function<LayerNorm2dFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto fwd = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const OptTensor&, const OptTensor&, double)>("bnext::layer_norm_2d_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, rstd] = fwd.call(input, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = present(weight);
    ctx->saved_data["has_bias"] = present(bias);
    if (present(bias)) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool want_weight = has_weight && ctx->needs_input_grad(1);
    const bool want_bias = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    auto [dx, dw, db] = call_backward(
        layer_norm_2d_bwd_handle(), grads[0], saved[0], saved[2], saved[3], optional_of(saved[1]),
        ctx->saved_data["eps"].toDouble(), std::array<bool, 2>{want_weight, want_bias});
    if (want_bias) db = db.to(ctx->saved_data["bias_dtype"].toScalarType());
    return {ctx->needs_input_grad(0) ? dx : Tensor(), want_weight ? dw : Tensor(),
            want_bias ? db : Tensor(), Tensor()};
  }
};

struct RmsNorm2dFunction : public torch::autograd::Function<RmsNorm2dFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               double eps) {
    static const auto fwd = op<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, double)>(
        "bnext::rms_norm_2d_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, rstd] = fwd.call(input, weight, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = present(weight);
    ctx->mark_non_differentiable({rstd});
    return {out, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool want_weight = ctx->saved_data["has_weight"].toBool() && ctx->needs_input_grad(1);
    auto [dx, dw] =
        call_backward(rms_norm_2d_bwd_handle(), grads[0], saved[0], saved[2], optional_of(saved[1]),
                      ctx->saved_data["eps"].toDouble(), want_weight);
    return {ctx->needs_input_grad(0) ? dx : Tensor(), want_weight ? dw : Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_2d_fwd_autograd(const Tensor& input,
                                                              const OptTensor& weight,
                                                              const OptTensor& bias, double eps) {
  if (use_reference({&input}, {&weight, &bias})) {
    const Tensor& w = value_or_undefined(weight);
    const Tensor& b = value_or_undefined(bias);
    check_channel_forward("bnext::layer_norm_2d_fwd", input, w, b, ParamDtype::kLikeInput);
    auto [out, mean, rstd] = reference::layer_norm_2d(input, w, b, eps);
    return {out, mean.detach(), rstd.detach()};
  }
  auto out = LayerNorm2dFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> rms_norm_2d_fwd_autograd(const Tensor& input, const OptTensor& weight,
                                                    double eps) {
  if (use_reference({&input}, {&weight})) {
    const Tensor& w = value_or_undefined(weight);
    check_channel_forward("bnext::rms_norm_2d_fwd", input, w, Tensor(), ParamDtype::kAnyFloat);
    auto [out, rstd] = reference::rms_norm_2d(input, w, eps);
    return {out, rstd.detach()};
  }
  auto out = RmsNorm2dFunction::apply(input, weight, eps);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("rms_norm_fwd", &rms_norm_fwd_autograd);
  m.impl("layer_norm_bwd", &layer_norm_bwd_autograd);
  m.impl("rms_norm_bwd", &rms_norm_bwd_autograd);
  m.impl("layer_norm_2d_fwd", &layer_norm_2d_fwd_autograd);
  m.impl("rms_norm_2d_fwd", &rms_norm_2d_fwd_autograd);
  m.impl("layer_norm_2d_bwd", &layer_norm_2d_bwd_autograd);
  m.impl("rms_norm_2d_bwd", &rms_norm_2d_bwd_autograd);
}

}  // namespace layer_norm
}  // namespace bnext
