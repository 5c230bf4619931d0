// Autograd for the Batch Norm + activation operators, in C++ like Batch
// Norm's (batch_norm/autograd.cpp; how each kind of derivative is obtained:
// common/autograd_util.h).
//
// In-place mode (the *_ operators) overwrites the input with the output and
// differentiates from the output alone. Its Functions mark the input dirty
// and bump its version, so autograd catches every misuse as for torch's own
// in-place operators: a leaf that requires grad is refused, and a graph that
// saved the input for another use fails in backward ("modified by an inplace
// operation") instead of computing a wrong gradient.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "batch_norm/checks.h"
#include "batch_norm/reference.h"
#include "batch_norm_act/checks.h"
#include "batch_norm_act/reference.h"
#include "common/autograd_util.h"

namespace bnext {
namespace batch_norm_act {
namespace {

using namespace bnext::autograd_util;
using Grads4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Grads3 = std::tuple<Tensor, Tensor, Tensor>;

using BackwardSig = Grads4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, double, std::string_view, double, bool,
                           const OptTensor&);
using InplaceBackwardSig = Grads3(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                  const OptTensor&, double, std::string_view, double, bool);

const c10::TypedOperatorHandle<BackwardSig>& backward_handle() {
  static const auto handle = op<BackwardSig>("bnext::batch_norm_act_backward");
  return handle;
}

const c10::TypedOperatorHandle<InplaceBackwardSig>& inplace_backward_handle() {
  static const auto handle = op<InplaceBackwardSig>("bnext::batch_norm_act_inplace_backward");
  return handle;
}

// The activation as autograd's saved data keeps it.
void save_activation(AutogradContext* ctx, std::string_view name, double param) {
  ctx->saved_data["activation"] = std::string(name);
  ctx->saved_data["activation_param"] = param;
}

std::string saved_activation(AutogradContext* ctx) {
  return ctx->saved_data["activation"].toStringRef();
}

Activation parsed_activation(AutogradContext* ctx, const char* op) {
  return parse_activation(op, saved_activation(ctx),
                          ctx->saved_data["activation_param"].toDouble());
}

// -------------------------------------------------------------- backward op

// The backward pass as a differentiable operator: its derivative comes from
// the reference forward act(bn(x) + residual), statistics recomputed from x
// in training and constants in eval; r and d constants. Unlike plain Batch
// Norm's, this backward depends on the bias and the residual (through act').
struct BackwardFunction : public torch::autograd::Function<BackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& mean, const Tensor& var, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& r,
                               const OptTensor& d, double eps, std::string_view activation,
                               double param, bool training, const OptTensor& output) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db, dpre] =
        backward_handle().call(grad_out, input, mean, var, weight, bias, residual, r, d, eps,
                               activation, param, training, output);
    ctx->save_for_backward({grad_out, input, mean, var, weight.value_or(Tensor()),
                            bias.value_or(Tensor()), residual.value_or(Tensor()),
                            r.value_or(Tensor()), d.value_or(Tensor()), output.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["training"] = training;
    save_activation(ctx, activation, param);
    return {dx, dw, db, dpre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    const char* op = "bnext::batch_norm_act_backward";
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[1];
    const Tensor& mean = saved[2];
    const Tensor& var = saved[3];
    const Tensor& weight = saved[4];
    const Tensor& bias = saved[5];
    const Tensor& residual = saved[6];
    const Tensor& r = saved[7];
    const Tensor& d = saved[8];
    // Edges: grad_out, input, mean, var, then the optional tensors present.
    check_no_grad_needed(ctx, 2, op, "mean");
    check_no_grad_needed(ctx, 3, op, "var");
    size_t edge = 4;
    const size_t weight_edge = weight.defined() ? edge++ : 0;
    const size_t bias_edge = bias.defined() ? edge++ : 0;
    const size_t residual_edge = residual.defined() ? edge++ : 0;
    if (r.defined()) {
      check_no_grad_needed(ctx, edge, op, "r");
      check_no_grad_needed(ctx, edge + 1, op, "d");
    }
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool training = ctx->saved_data["training"].toBool();
    const Activation fn = parsed_activation(ctx, op);
    const bool training_ = training;
    // With the output kept instead of the residual (a piecewise linear
    // activation), act'(u) is the constant D it gives: the layer is
    // D * (bn(x) + residual) around this point, and its second derivatives
    // are those of that.
    const Tensor slope =
        saved[9].defined() ? reference::derivative_from_output(saved[9], fn) : Tensor();
    const ReferenceForward forward = [=](const variable_list& in) {
      if (slope.defined()) {
        const Tensor y =
            training_ ? std::get<0>(batch_norm::reference::train(in[0], in[1], in[2], eps, r, d))
                      : batch_norm::reference::infer(in[0], mean, var, in[1], in[2], eps);
        return slope * (y + in[3]);
      }
      return training_ ? std::get<0>(reference::train(in[0], in[1], in[2], in[3], eps, fn, r, d))
                       : reference::infer(in[0], mean, var, in[1], in[2], in[3], eps, fn);
    };
    // Stand-ins for what is absent: a weight of ones, a bias and a residual
    // of zeros (grad_pre is the gradient of the residual either way).
    const auto opmath = opmath_dtype(x.scalar_type());
    const auto param_options = weight.defined()
                                   ? weight.options()
                                   : (bias.defined() ? bias.options() : x.options().dtype(opmath));
    const Tensor w = weight.defined() ? weight : at::ones({x.size(1)}, param_options);
    const Tensor b = bias.defined() ? bias : at::zeros({x.size(1)}, param_options);
    const Tensor res = residual.defined() ? residual : at::zeros_like(x);
    // grad_pre is empty where neither a residual nor the output was given.
    const bool grad_pre_stored = residual.defined() || saved[9].defined();
    const auto h =
        backward_of_backward(forward, {x, w, b, res}, saved[0],
                             {gg[0], gg[1], gg[2], grad_pre_stored ? gg[3] : Tensor()},
                             {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                              weight.defined() && ctx->needs_input_grad(weight_edge),
                              bias.defined() && ctx->needs_input_grad(bias_edge),
                              residual.defined() && ctx->needs_input_grad(residual_edge)});
    variable_list out(14);
    out[0] = h[0];
    out[1] = h[1];
    if (weight.defined()) out[4] = h[2];
    if (bias.defined()) out[5] = h[3];
    if (residual.defined()) out[6] = h[4];
    return out;
  }
};

Grads4 batch_norm_act_backward_autograd(const Tensor& grad_out, const Tensor& input,
                                        const Tensor& mean, const Tensor& var,
                                        const OptTensor& weight, const OptTensor& bias,
                                        const OptTensor& residual, const OptTensor& r,
                                        const OptTensor& d, double eps, std::string_view activation,
                                        double param, bool training, const OptTensor& output) {
  check_reverse_mode_only("bnext::batch_norm_act_backward", {&grad_out, &input, &mean, &var},
                          {&weight, &bias, &residual, &r, &d, &output});
  const auto g = BackwardFunction::apply(grad_out, input, mean, var, weight, bias, residual, r, d,
                                         eps, activation, param, training, output);
  return {g[0], g[1], g[2], g[3]};
}

// Gradients of (input, weight, bias, residual) from the backward op's
// (grad_input, grad_weight, grad_bias, grad_pre), undefined where not wanted.
// Edges: the input (0), then each of weight, bias, residual that is present,
// from `first_edge` on.
variable_list input_grads4(AutogradContext* ctx, const Grads4& g, size_t first_edge) {
  const bool has_weight = ctx->saved_data["has_weight"].toBool();
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const bool has_residual = ctx->saved_data["has_residual"].toBool();
  size_t edge = first_edge;
  const auto take = [&](bool present, const Tensor& t) {
    if (!present) return Tensor();
    return ctx->needs_input_grad(edge++) ? t : Tensor();
  };
  Tensor dx = ctx->needs_input_grad(0) ? std::get<0>(g) : Tensor();
  Tensor dw = take(has_weight, std::get<1>(g));
  Tensor db = take(has_bias, std::get<2>(g));
  Tensor dr = take(has_residual, std::get<3>(g));
  return {dx, dw, db, dr};
}

void save_presence(AutogradContext* ctx, const OptTensor& weight, const OptTensor& bias,
                   const OptTensor& residual) {
  ctx->saved_data["has_weight"] = present(weight);
  ctx->saved_data["has_bias"] = present(bias);
  ctx->saved_data["has_residual"] = present(residual);
}

// Whether a layer with a residual keeps its output for backward instead of
// the residual: a piecewise linear activation's derivative comes from the
// output, which the next layer keeps anyway (ResNet's relu(bn(x) + identity)
// then keeps nothing a plain bn -> add -> relu would not).
bool keeps_output(const OptTensor& residual, std::string_view activation, double param) {
  return present(residual) &&
         act::piecewise_linear(parse_activation("bnext::batch_norm_act", activation, param).kind,
                               param);
}

// ------------------------------------------------------------ forward ops

struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, double eps,
                               std::string_view activation, double param) {
    static const auto train =
        op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                              const OptTensor&, double, std::string_view, double)>(
            "bnext::batch_norm_act_train");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, var] = train.call(input, weight, bias, residual, eps, activation, param);
    const bool keep_output = keeps_output(residual, activation, param);
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()),
                            keep_output ? Tensor() : residual.value_or(Tensor()), mean, var,
                            keep_output ? out : Tensor()});
    ctx->saved_data["eps"] = eps;
    save_activation(ctx, activation, param);
    save_presence(ctx, weight, bias, residual);
    ctx->mark_non_differentiable({mean, var});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto g =
        call_backward(backward_handle(), grads[0], s[0], s[4], s[5], optional_of(s[1]),
                      optional_of(s[2]), optional_of(s[3]), OptTensor(), OptTensor(),
                      ctx->saved_data["eps"].toDouble(), saved_activation(ctx),
                      ctx->saved_data["activation_param"].toDouble(), true, optional_of(s[6]));
    auto out = input_grads4(ctx, g, 1);
    out.resize(7);  // eps, activation, activation_param
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_train_autograd(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, std::string_view activation, double param) {
  if (use_reference({&input}, {&weight, &bias, &residual})) {
    const char* op = "bnext::batch_norm_act_train";
    const Tensor& w = value_or_undefined(weight);
    const Tensor& b = value_or_undefined(bias);
    batch_norm::check_args(op, input, w, b, Tensor(), Tensor());
    check_residual(op, value_or_undefined(residual), input);
    auto [out, mean, var] = reference::train(input, w, b, value_or_undefined(residual), eps,
                                             parse_activation(op, activation, param));
    return {out, mean.detach(), var.detach()};
  }
  auto out = TrainFunction::apply(input, weight, bias, residual, eps, activation, param);
  return {out[0], out[1], out[2]};
}

struct InferFunction : public torch::autograd::Function<InferFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& mean,
                        const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& residual, double eps, std::string_view activation,
                        double param) {
    static const auto infer =
        op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                  const OptTensor&, double, std::string_view, double)>(
            "bnext::batch_norm_act_infer");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out = infer.call(input, mean, var, weight, bias, residual, eps, activation, param);
    const bool keep_output = keeps_output(residual, activation, param);
    ctx->save_for_backward({input, mean, var, weight.value_or(Tensor()), bias.value_or(Tensor()),
                            keep_output ? Tensor() : residual.value_or(Tensor()),
                            keep_output ? out : Tensor()});
    ctx->saved_data["eps"] = eps;
    save_activation(ctx, activation, param);
    save_presence(ctx, weight, bias, residual);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_grad_needed(ctx, 1, "bnext::batch_norm_act_infer", "running_mean");
    check_no_grad_needed(ctx, 2, "bnext::batch_norm_act_infer", "running_var");
    const auto s = ctx->get_saved_variables();
    const auto g =
        call_backward(backward_handle(), grads[0], s[0], s[1], s[2], optional_of(s[3]),
                      optional_of(s[4]), optional_of(s[5]), OptTensor(), OptTensor(),
                      ctx->saved_data["eps"].toDouble(), saved_activation(ctx),
                      ctx->saved_data["activation_param"].toDouble(), false, optional_of(s[6]));
    const auto in = input_grads4(ctx, g, 3);
    return {in[0], Tensor(), Tensor(), in[1], in[2], in[3], Tensor(), Tensor(), Tensor()};
  }
};

Tensor batch_norm_act_infer_autograd(const Tensor& input, const Tensor& mean, const Tensor& var,
                                     const OptTensor& weight, const OptTensor& bias,
                                     const OptTensor& residual, double eps,
                                     std::string_view activation, double param) {
  check_no_forward_grad("batch_norm", "running_mean and running_var", {&mean, &var});
  if (use_reference({&input, &mean, &var}, {&weight, &bias, &residual})) {
    const char* op = "bnext::batch_norm_act_infer";
    const Tensor& w = value_or_undefined(weight);
    const Tensor& b = value_or_undefined(bias);
    batch_norm::check_args(op, input, w, b, mean, var);
    check_residual(op, value_or_undefined(residual), input);
    return reference::infer(input, mean.detach(), var.detach(), w, b, value_or_undefined(residual),
                            eps, parse_activation(op, activation, param));
  }
  return InferFunction::apply(input, mean, var, weight, bias, residual, eps, activation, param);
}

using RenormOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using RenormTrainSig = RenormOutputs(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                     const OptTensor&, const OptTensor&, double, const Tensor&,
                                     const Tensor&, std::string_view, double);

const c10::TypedOperatorHandle<RenormTrainSig>& renorm_train_handle() {
  static const auto handle = op<RenormTrainSig>("bnext::batch_renorm_act_train");
  return handle;
}

// Batch Renorm: r and d are constants (outputs without gradient), as are
// the running statistics and limits they are computed from.
struct RenormTrainFunction : public torch::autograd::Function<RenormTrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const Tensor& running_mean, const Tensor& running_var,
                               const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& residual, double eps, const Tensor& r_max,
                               const Tensor& d_max, std::string_view activation, double param) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, var, r, d] =
        renorm_train_handle().call(input, running_mean, running_var, weight, bias, residual, eps,
                                   r_max, d_max, activation, param);
    const bool keep_output = keeps_output(residual, activation, param);
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()),
                            keep_output ? Tensor() : residual.value_or(Tensor()), mean, var, r, d,
                            keep_output ? out : Tensor()});
    ctx->saved_data["eps"] = eps;
    save_activation(ctx, activation, param);
    save_presence(ctx, weight, bias, residual);
    ctx->mark_non_differentiable({mean, var, r, d});
    return {out, mean, var, r, d};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const char* op = "bnext::batch_renorm_act_train";
    check_no_grad_needed(ctx, 1, op, "running_mean");
    check_no_grad_needed(ctx, 2, op, "running_var");
    const auto s = ctx->get_saved_variables();
    const auto g =
        call_backward(backward_handle(), grads[0], s[0], s[4], s[5], optional_of(s[1]),
                      optional_of(s[2]), optional_of(s[3]), optional_of(s[6]), optional_of(s[7]),
                      ctx->saved_data["eps"].toDouble(), saved_activation(ctx),
                      ctx->saved_data["activation_param"].toDouble(), true, optional_of(s[8]));
    const auto in = input_grads4(ctx, g, 3);
    return {in[0],    Tensor(), Tensor(), in[1],    in[2],   in[3],
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

RenormOutputs batch_renorm_act_train_autograd(const Tensor& input, const Tensor& running_mean,
                                              const Tensor& running_var, const OptTensor& weight,
                                              const OptTensor& bias, const OptTensor& residual,
                                              double eps, const Tensor& r_max, const Tensor& d_max,
                                              std::string_view activation, double param) {
  check_no_forward_grad("batch_renorm", "running_mean, running_var, r_max and d_max",
                        {&running_mean, &running_var, &r_max, &d_max});
  if (use_reference({&input, &running_mean, &running_var, &r_max, &d_max},
                    {&weight, &bias, &residual})) {
    // r and d from the kernel (constants), the rest from the reference.
    auto [out_k, mean, var, r, d] = call_below_autograd(
        renorm_train_handle(), input.detach(), running_mean.detach(), running_var.detach(),
        weight.has_value() ? OptTensor(weight->detach()) : OptTensor(),
        bias.has_value() ? OptTensor(bias->detach()) : OptTensor(),
        residual.has_value() ? OptTensor(residual->detach()) : OptTensor(), eps, r_max.detach(),
        d_max.detach(), activation, param);
    auto [out, mean_ref, var_ref] = reference::train(
        input, value_or_undefined(weight), value_or_undefined(bias), value_or_undefined(residual),
        eps, parse_activation("bnext::batch_renorm_act_train", activation, param), r, d);
    return {out, mean, var, r, d};
  }
  auto out = RenormTrainFunction::apply(input, running_mean, running_var, weight, bias, residual,
                                        eps, r_max, d_max, activation, param);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ----------------------------------------------------------- in-place mode

// The in-place backward has no derivative of its own (the input it would
// need is gone): differentiating it raises rather than returning zeros.
struct InplaceBackwardFunction : public torch::autograd::Function<InplaceBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& output,
                               const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                               double eps, std::string_view activation, double param,
                               bool training) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] = inplace_backward_handle().call(grad_out, output, var, weight, bias, eps,
                                                       activation, param, training);
    return {dx, dw, db};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "bnext::batch_norm_act_inplace_backward: the derivative of the in-place mode's "
                "backward pass (double backward) is not implemented: the input it needs was "
                "overwritten. Use the out-of-place layer (in_place=False) for higher-order "
                "gradients.");
    return {};
  }
};

Grads3 batch_norm_act_inplace_backward_autograd(const Tensor& grad_out, const Tensor& output,
                                                const Tensor& var, const OptTensor& weight,
                                                const OptTensor& bias, double eps,
                                                std::string_view activation, double param,
                                                bool training) {
  check_reverse_mode_only("bnext::batch_norm_act_inplace_backward", {&grad_out, &output, &var},
                          {&weight, &bias});
  const auto g = InplaceBackwardFunction::apply(grad_out, output, var, weight, bias, eps,
                                                activation, param, training);
  return {g[0], g[1], g[2]};
}

// Forward-mode AD and functorch transforms need the input, which in-place
// mode overwrites: they are refused with a pointer to the out-of-place layer.
void check_inplace_reverse_mode(const char* op, std::initializer_list<const Tensor*> inputs,
                                std::initializer_list<const OptTensor*> optional_inputs) {
  TORCH_CHECK(!use_reference(inputs, optional_inputs), op,
              ": forward-mode AD and functorch transforms are not supported in in-place mode; "
              "use the out-of-place layer (in_place=False)");
}

// Calls the in-place backward for grads[0] with the saved output, var and
// parameters (saved[0..3]); returns (input, weight, bias) gradients.
variable_list inplace_grads(AutogradContext* ctx, const Tensor& grad, bool training) {
  const auto s = ctx->get_saved_variables();
  const auto g =
      call_backward(inplace_backward_handle(), grad, s[0], s[1], optional_of(s[2]),
                    optional_of(s[3]), ctx->saved_data["eps"].toDouble(), saved_activation(ctx),
                    ctx->saved_data["activation_param"].toDouble(), training);
  return {std::get<0>(g), std::get<1>(g), std::get<2>(g)};
}

struct InplaceTrainFunction : public torch::autograd::Function<InplaceTrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, double eps, std::string_view activation,
                               double param) {
    static const auto train =
        op<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, double,
                                      std::string_view, double)>("bnext::batch_norm_act_train_");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [mean, var] = train.call(input, weight, bias, eps, activation, param);
    torch::autograd::increment_version(input);
    ctx->mark_dirty({input});
    ctx->save_for_backward({input, var, weight.value_or(Tensor()), bias.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    save_activation(ctx, activation, param);
    save_presence(ctx, weight, bias, OptTensor());
    ctx->mark_non_differentiable({mean, var});
    return {input, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = inplace_grads(ctx, grads[0], true);
    auto out = input_grads(ctx, {g[0], g[1], g[2]}, 1, ctx->saved_data["has_weight"].toBool(),
                           ctx->saved_data["has_bias"].toBool());
    out.resize(6);  // eps, activation, activation_param
    return out;
  }
};

std::tuple<Tensor, Tensor> batch_norm_act_train__autograd(const Tensor& input,
                                                          const OptTensor& weight,
                                                          const OptTensor& bias, double eps,
                                                          std::string_view activation,
                                                          double param) {
  check_inplace_reverse_mode("bnext::batch_norm_act_train_", {&input}, {&weight, &bias});
  if (!records_graph({&input}) && !(present(weight) && records_graph({&*weight})) &&
      !(present(bias) && records_graph({&*bias}))) {
    static const auto train =
        op<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, double,
                                      std::string_view, double)>("bnext::batch_norm_act_train_");
    auto result = call_below_autograd(train, input, weight, bias, eps, activation, param);
    torch::autograd::increment_version(input);
    return result;
  }
  auto out = InplaceTrainFunction::apply(input, weight, bias, eps, activation, param);
  return {out[1], out[2]};
}

struct InplaceInferFunction : public torch::autograd::Function<InplaceInferFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& mean,
                               const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                               double eps, std::string_view activation, double param) {
    static const auto infer =
        op<void(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                double, std::string_view, double)>("bnext::batch_norm_act_infer_");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    infer.call(input, mean, var, weight, bias, eps, activation, param);
    torch::autograd::increment_version(input);
    ctx->mark_dirty({input});
    ctx->save_for_backward({input, var, weight.value_or(Tensor()), bias.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    save_activation(ctx, activation, param);
    save_presence(ctx, weight, bias, OptTensor());
    return {input};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_grad_needed(ctx, 1, "bnext::batch_norm_act_infer_", "running_mean");
    check_no_grad_needed(ctx, 2, "bnext::batch_norm_act_infer_", "running_var");
    const auto g = inplace_grads(ctx, grads[0], false);
    const auto in = input_grads(ctx, {g[0], g[1], g[2]}, 3, ctx->saved_data["has_weight"].toBool(),
                                ctx->saved_data["has_bias"].toBool());
    return {in[0], Tensor(), Tensor(), in[1], in[2], Tensor(), Tensor(), Tensor()};
  }
};

void batch_norm_act_infer__autograd(const Tensor& input, const Tensor& mean, const Tensor& var,
                                    const OptTensor& weight, const OptTensor& bias, double eps,
                                    std::string_view activation, double param) {
  check_inplace_reverse_mode("bnext::batch_norm_act_infer_", {&input, &mean, &var},
                             {&weight, &bias});
  if (!records_graph({&input}) && !(present(weight) && records_graph({&*weight})) &&
      !(present(bias) && records_graph({&*bias}))) {
    static const auto infer =
        op<void(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                double, std::string_view, double)>("bnext::batch_norm_act_infer_");
    call_below_autograd(infer, input, mean, var, weight, bias, eps, activation, param);
    torch::autograd::increment_version(input);
    return;
  }
  InplaceInferFunction::apply(input, mean, var, weight, bias, eps, activation, param);
}

// ------------------------------------------------------- the building blocks
// No derivative of their own (the whole passes have one): they refuse to be
// differentiated rather than record nothing.

// The operator's name is a template argument: the handle is cached per
// operator (two of these ops share a signature, so a cache keyed by the
// signature alone would call whichever was looked up first).
template <const char* kName, class Sig, typename... Args>
auto not_differentiated(std::initializer_list<const Tensor*> tensors, const Args&... args) {
  check_not_differentiated(kName, tensors);
  static const auto handle = op<Sig>(kName);
  return call_below_autograd(handle, args...);
}

constexpr char kElemt[] = "bnext::batch_norm_act_elemt";
constexpr char kBackwardReduce[] = "bnext::batch_norm_act_backward_reduce";
constexpr char kBackwardSums[] = "bnext::batch_norm_act_backward_sums";
constexpr char kBackwardElemt[] = "bnext::batch_norm_act_backward_elemt";
constexpr char kBackwardReduceFromOutput[] = "bnext::batch_norm_act_backward_reduce_from_output";
constexpr char kInplaceBackwardReduce[] = "bnext::batch_norm_act_inplace_backward_reduce";
constexpr char kInplaceBackwardElemt[] = "bnext::batch_norm_act_inplace_backward_elemt";

Tensor batch_norm_act_elemt_autograd(const Tensor& input, const Tensor& mean, const Tensor& scale,
                                     const Tensor& shift, const OptTensor& residual,
                                     std::string_view activation, double param) {
  const Tensor& r = value_or_undefined(residual);
  return not_differentiated<kElemt,
                            Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const OptTensor&, std::string_view, double)>(
      {&input, &mean, &scale, &shift, &r}, input, mean, scale, shift, residual, activation, param);
}

Grads3 batch_norm_act_backward_reduce_autograd(const Tensor& grad_out, const Tensor& input,
                                               const Tensor& mean, const Tensor& scale,
                                               const Tensor& shift, const OptTensor& residual,
                                               std::string_view activation, double param) {
  const Tensor& r = value_or_undefined(residual);
  return not_differentiated<kBackwardReduce,
                            Grads3(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const OptTensor&, std::string_view, double)>(
      {&grad_out, &input, &mean, &scale, &shift, &r}, grad_out, input, mean, scale, shift, residual,
      activation, param);
}

std::tuple<Tensor, Tensor> batch_norm_act_backward_sums_autograd(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& scale,
    const Tensor& shift, std::string_view activation, double param) {
  return not_differentiated<kBackwardSums,
                            std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&,
                                                       std::string_view, double)>(
      {&grad_out, &input, &mean, &scale, &shift}, grad_out, input, mean, scale, shift, activation,
      param);
}

Tensor batch_norm_act_backward_elemt_autograd(const Tensor& grad_out, const Tensor& input,
                                              const Tensor& mean, const Tensor& scale,
                                              const Tensor& shift, const Tensor& a, const Tensor& k,
                                              const Tensor& c, std::string_view activation,
                                              double param) {
  return not_differentiated<kBackwardElemt,
                            Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   std::string_view, double)>(
      {&grad_out, &input, &mean, &scale, &shift, &a, &k, &c}, grad_out, input, mean, scale, shift,
      a, k, c, activation, param);
}

Grads3 batch_norm_act_backward_reduce_from_output_autograd(const Tensor& grad_out,
                                                           const Tensor& input,
                                                           const Tensor& output, const Tensor& mean,
                                                           std::string_view activation,
                                                           double param) {
  return not_differentiated<kBackwardReduceFromOutput,
                            Grads3(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   std::string_view, double)>(
      {&grad_out, &input, &output, &mean}, grad_out, input, output, mean, activation, param);
}

Grads3 batch_norm_act_inplace_backward_reduce_autograd(const Tensor& grad_out, const Tensor& output,
                                                       const Tensor& shift, const Tensor& inv_scale,
                                                       std::string_view activation, double param) {
  return not_differentiated<kInplaceBackwardReduce,
                            Grads3(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   std::string_view, double)>(
      {&grad_out, &output, &shift, &inv_scale}, grad_out, output, shift, inv_scale, activation,
      param);
}

Tensor batch_norm_act_inplace_backward_elemt_autograd(const Tensor& grad_pre, const Tensor& output,
                                                      const Tensor& shift, const Tensor& inv_scale,
                                                      const Tensor& a, const Tensor& k,
                                                      const Tensor& c, std::string_view activation,
                                                      double param) {
  return not_differentiated<kInplaceBackwardElemt,
                            Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&, const Tensor&, std::string_view,
                                   double)>({&grad_pre, &output, &shift, &inv_scale, &a, &k, &c},
                                            grad_pre, output, shift, inv_scale, a, k, c, activation,
                                            param);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_norm_act_train", &batch_norm_act_train_autograd);
  m.impl("batch_norm_act_infer", &batch_norm_act_infer_autograd);
  m.impl("batch_renorm_act_train", &batch_renorm_act_train_autograd);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_autograd);
  m.impl("batch_norm_act_train_", &batch_norm_act_train__autograd);
  m.impl("batch_norm_act_infer_", &batch_norm_act_infer__autograd);
  m.impl("batch_norm_act_inplace_backward", &batch_norm_act_inplace_backward_autograd);
  m.impl("batch_norm_act_elemt", &batch_norm_act_elemt_autograd);
  m.impl("batch_norm_act_backward_reduce", &batch_norm_act_backward_reduce_autograd);
  m.impl("batch_norm_act_backward_sums", &batch_norm_act_backward_sums_autograd);
  m.impl("batch_norm_act_backward_elemt", &batch_norm_act_backward_elemt_autograd);
  m.impl("batch_norm_act_backward_reduce_from_output",
         &batch_norm_act_backward_reduce_from_output_autograd);
  m.impl("batch_norm_act_inplace_backward_reduce",
         &batch_norm_act_inplace_backward_reduce_autograd);
  m.impl("batch_norm_act_inplace_backward_elemt", &batch_norm_act_inplace_backward_elemt_autograd);
}

}  // namespace batch_norm_act
}  // namespace bnext
