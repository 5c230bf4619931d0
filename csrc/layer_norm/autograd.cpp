// Autograd of LayerNorm and RMSNorm, in C++ for the same reason as Batch
// Norm's (batch_norm/autograd.cpp): on a (64, 1024) input a Python
// autograd.Function costs more than the kernels. How each kind of derivative
// is obtained: common/autograd_util.h. The row statistics are outputs without
// gradient: the backward formulas differentiate through them.
//
// The row ops (normalised over trailing dims) and the _2d ops (over dim 1)
// share every Function below; a geometry (Rows, Channels) says where they
// differ: the backward ops' names and the reference forward of their double
// backward.
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

// Normalised over the trailing dims past the statistics' (batch) dims.
struct Rows {
  static constexpr const char* kLayerNormBwd = "bnext::layer_norm_bwd";
  static constexpr const char* kRmsNormBwd = "bnext::rms_norm_bwd";
  static int64_t normalized_dims(const Tensor& input, const Tensor& stat) {
    return input.dim() - stat.dim();
  }
  static at::IntArrayRef param_shape(const Tensor& x, int64_t nd) {
    return x.sizes().slice(x.dim() - nd);
  }
  static Tensor layer_norm(const Tensor& x, int64_t nd, const Tensor& w, const Tensor& b,
                           double eps) {
    return std::get<0>(reference::layer_norm(x, nd, w, b, eps));
  }
  static Tensor rms_norm(const Tensor& x, int64_t nd, const Tensor& w, double eps) {
    return std::get<0>(reference::rms_norm(x, nd, w, eps));
  }
};

// Normalised over dim 1 (the _2d ops).
struct Channels {
  static constexpr const char* kLayerNormBwd = "bnext::layer_norm_2d_bwd";
  static constexpr const char* kRmsNormBwd = "bnext::rms_norm_2d_bwd";
  static int64_t normalized_dims(const Tensor&, const Tensor&) { return 1; }
  static at::IntArrayRef param_shape(const Tensor& x, int64_t) { return x.sizes().slice(1, 1); }
  static Tensor layer_norm(const Tensor& x, int64_t, const Tensor& w, const Tensor& b, double eps) {
    return std::get<0>(reference::layer_norm_2d(x, w, b, eps));
  }
  static Tensor rms_norm(const Tensor& x, int64_t, const Tensor& w, double eps) {
    return std::get<0>(reference::rms_norm_2d(x, w, eps));
  }
};

template <class G>
const c10::TypedOperatorHandle<LayerNormBwdSig>& layer_norm_bwd_handle() {
  static const auto handle = op<LayerNormBwdSig>(G::kLayerNormBwd);
  return handle;
}

template <class G>
const c10::TypedOperatorHandle<RmsNormBwdSig>& rms_norm_bwd_handle() {
  static const auto handle = op<RmsNormBwdSig>(G::kRmsNormBwd);
  return handle;
}

// ------------------------------------------------ backward passes, differentiable

template <class G>
struct LayerNormBackwardFunction : public torch::autograd::Function<LayerNormBackwardFunction<G>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& mean, const Tensor& rstd, const OptTensor& weight,
                               double eps, std::array<bool, 2> output_mask) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] =
        layer_norm_bwd_handle<G>().call(grad_out, input, mean, rstd, weight, eps, output_mask);
    ctx->save_for_backward({grad_out, input, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["nd"] = G::normalized_dims(input, rstd);
    ctx->saved_data["mask_w"] = output_mask[0];
    ctx->saved_data["mask_b"] = output_mask[1];
    return {dx, dw, db};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    check_no_grad_needed(ctx, 2, G::kLayerNormBwd, "mean");
    check_no_grad_needed(ctx, 3, G::kLayerNormBwd, "rstd");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[1];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t nd = ctx->saved_data["nd"].toInt();
    // A parameter gradient that was not asked for is an empty placeholder.
    const Tensor gg_w = ctx->saved_data["mask_w"].toBool() ? gg[1] : Tensor();
    const Tensor gg_b = ctx->saved_data["mask_b"].toBool() ? gg[2] : Tensor();
    const ReferenceForward forward = [=](const variable_list& in) {
      return G::layer_norm(in[0], nd, in[1], in[2], eps);
    };
    const auto h = norm_backward_of_backward(
        forward, saved[0], x, saved[2], G::param_shape(x, nd), param_grad_dtype(saved[2], x),
        {gg[0], gg_w, gg_b},
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
         saved[2].defined() && ctx->needs_input_grad(4)});  // no edge without a weight
    return {h[0], h[1], Tensor(), Tensor(), h[2], Tensor(), Tensor()};
  }
};

template <class G>
struct RmsNormBackwardFunction : public torch::autograd::Function<RmsNormBackwardFunction<G>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& rstd, const OptTensor& weight, double eps,
                               bool weight_grad) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw] = rms_norm_bwd_handle<G>().call(grad_out, input, rstd, weight, eps, weight_grad);
    ctx->save_for_backward({grad_out, input, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["nd"] = G::normalized_dims(input, rstd);
    ctx->saved_data["weight_grad"] = weight_grad;
    return {dx, dw};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    check_no_grad_needed(ctx, 2, G::kRmsNormBwd, "rstd");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[1];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t nd = ctx->saved_data["nd"].toInt();
    const Tensor gg_w = ctx->saved_data["weight_grad"].toBool() ? gg[1] : Tensor();
    const ReferenceForward forward = [=](const variable_list& in) {
      return G::rms_norm(in[0], nd, in[1], eps);  // no bias: in[2] unused
    };
    const auto h = norm_backward_of_backward(
        forward, saved[0], x, saved[2], G::param_shape(x, nd), param_grad_dtype(saved[2], x),
        {gg[0], gg_w},
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
         saved[2].defined() && ctx->needs_input_grad(3)});  // no edge without a weight
    return {h[0], h[1], Tensor(), h[2], Tensor(), Tensor()};
  }
};

template <class G>
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_autograd(const Tensor& grad_out,
                                                           const Tensor& input, const Tensor& mean,
                                                           const Tensor& rstd,
                                                           const OptTensor& weight, double eps,
                                                           std::array<bool, 2> output_mask) {
  check_reverse_mode_only(G::kLayerNormBwd, {&grad_out, &input, &mean, &rstd}, {&weight});
  const auto g =
      LayerNormBackwardFunction<G>::apply(grad_out, input, mean, rstd, weight, eps, output_mask);
  return {g[0], g[1], g[2]};
}

template <class G>
std::tuple<Tensor, Tensor> rms_norm_bwd_autograd(const Tensor& grad_out, const Tensor& input,
                                                 const Tensor& rstd, const OptTensor& weight,
                                                 double eps, bool weight_grad) {
  check_reverse_mode_only(G::kRmsNormBwd, {&grad_out, &input, &rstd}, {&weight});
  const auto g = RmsNormBackwardFunction<G>::apply(grad_out, input, rstd, weight, eps, weight_grad);
  return {g[0], g[1]};
}

// ------------------------------------------------------------ forward passes
// What the forward Functions save, and their backward, shared by both
// geometries; the Functions differ in the op they call (the row ops take
// normalized_shape) and so in their edges.

void save_layer_norm(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                     const OptTensor& bias, double eps, const Tensor& mean, const Tensor& rstd) {
  ctx->save_for_backward({input, weight.value_or(Tensor()), mean, rstd});
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_weight"] = present(weight);
  ctx->saved_data["has_bias"] = present(bias);
  if (present(bias)) ctx->saved_data["bias_dtype"] = bias->scalar_type();
  ctx->mark_non_differentiable({mean, rstd});
}

// (dx, dw, db), undefined where not wanted; the weight and bias are the
// Function's edges 1 and 2 (1 for the bias without a weight).
template <class G>
std::array<Tensor, 3> layer_norm_grads(AutogradContext* ctx, const variable_list& grads) {
  const auto saved = ctx->get_saved_variables();
  const bool has_weight = ctx->saved_data["has_weight"].toBool();
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const bool want_weight = has_weight && ctx->needs_input_grad(1);
  const bool want_bias = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
  auto [dx, dw, db] = call_backward(
      layer_norm_bwd_handle<G>(), grads[0], saved[0], saved[2], saved[3], optional_of(saved[1]),
      ctx->saved_data["eps"].toDouble(), std::array<bool, 2>{want_weight, want_bias});
  if (want_bias) {
    // Without a weight the kernel returns the input's dtype for the bias gradient.
    db = db.to(ctx->saved_data["bias_dtype"].toScalarType());
  }
  return {ctx->needs_input_grad(0) ? dx : Tensor(), want_weight ? dw : Tensor(),
          want_bias ? db : Tensor()};
}

void save_rms_norm(AutogradContext* ctx, const Tensor& input, const OptTensor& weight, double eps,
                   const Tensor& rstd) {
  ctx->save_for_backward({input, weight.value_or(Tensor()), rstd});
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_weight"] = present(weight);
  ctx->mark_non_differentiable({rstd});
}

// (dx, dw), undefined where not wanted; the weight is the Function's edge 1.
template <class G>
std::array<Tensor, 2> rms_norm_grads(AutogradContext* ctx, const variable_list& grads) {
  const auto saved = ctx->get_saved_variables();
  const bool want_weight = ctx->saved_data["has_weight"].toBool() && ctx->needs_input_grad(1);
  auto [dx, dw] =
      call_backward(rms_norm_bwd_handle<G>(), grads[0], saved[0], saved[2], optional_of(saved[1]),
                    ctx->saved_data["eps"].toDouble(), want_weight);
  return {ctx->needs_input_grad(0) ? dx : Tensor(), want_weight ? dw : Tensor()};
}

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               at::IntArrayRef normalized_shape, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto fwd =
        op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, at::IntArrayRef, const OptTensor&,
                                              const OptTensor&, double)>("bnext::layer_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, rstd] = fwd.call(input, normalized_shape, weight, bias, eps);
    save_layer_norm(ctx, input, weight, bias, eps, mean, rstd);
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = layer_norm_grads<Rows>(ctx, grads);
    return {g[0], Tensor(), g[1], g[2], Tensor()};
  }
};

struct LayerNorm2dFunction : public torch::autograd::Function<LayerNorm2dFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto fwd = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const OptTensor&, const OptTensor&, double)>("bnext::layer_norm_2d_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, rstd] = fwd.call(input, weight, bias, eps);
    save_layer_norm(ctx, input, weight, bias, eps, mean, rstd);
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = layer_norm_grads<Channels>(ctx, grads);
    return {g[0], g[1], g[2], Tensor()};
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
    save_rms_norm(ctx, input, weight, eps, rstd);
    return {out, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = rms_norm_grads<Rows>(ctx, grads);
    return {g[0], Tensor(), g[1], Tensor()};
  }
};

struct RmsNorm2dFunction : public torch::autograd::Function<RmsNorm2dFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               double eps) {
    static const auto fwd = op<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, double)>(
        "bnext::rms_norm_2d_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, rstd] = fwd.call(input, weight, eps);
    save_rms_norm(ctx, input, weight, eps, rstd);
    return {out, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = rms_norm_grads<Channels>(ctx, grads);
    return {g[0], g[1], Tensor()};
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
  m.impl("layer_norm_bwd", &layer_norm_bwd_autograd<Rows>);
  m.impl("rms_norm_bwd", &rms_norm_bwd_autograd<Rows>);
  m.impl("layer_norm_2d_fwd", &layer_norm_2d_fwd_autograd);
  m.impl("rms_norm_2d_fwd", &rms_norm_2d_fwd_autograd);
  m.impl("layer_norm_2d_bwd", &layer_norm_bwd_autograd<Channels>);
  m.impl("rms_norm_2d_bwd", &rms_norm_bwd_autograd<Channels>);
}

}  // namespace layer_norm
}  // namespace bnext
