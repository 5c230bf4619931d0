// Autograd for the Batch Norm operators, in C++: a Python autograd.Function
// costs ~40 us per forward+backward, as much as the kernels themselves for an
// (8, 512, 7, 7) or (64, 1024) input. How each kind of derivative is obtained:
// common/autograd_util.h.
//
// The batch statistics are outputs without gradient: the backward formula
// already differentiates through them.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "batch_norm/checks.h"
#include "batch_norm/reference.h"
#include "common/autograd_util.h"

namespace bnext {
namespace batch_norm {
namespace {

using namespace bnext::autograd_util;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

using BackwardSig = Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const OptTensor&, double, bool);

const c10::TypedOperatorHandle<BackwardSig>& backward_handle() {
  static const auto handle = op<BackwardSig>("bnext::batch_norm_backward");
  return handle;
}

// The backward pass as a differentiable operator: its own derivative (double
// backward) comes from the reference forward, with the batch statistics
// recomputed from the input in training and constants in eval.
struct BackwardFunction : public torch::autograd::Function<BackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& mean, const Tensor& var, const OptTensor& weight,
                               double eps, bool training) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] = backward_handle().call(grad_out, input, mean, var, weight, eps, training);
    ctx->save_for_backward({grad_out, input, mean, var, weight.value_or(Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["training"] = training;
    return {dx, dw, db};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    const char* op = "bnext::batch_norm_backward";
    check_no_grad_needed(ctx, 2, op, "mean");
    check_no_grad_needed(ctx, 3, op, "var");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[1];
    const Tensor& mean = saved[2];
    const Tensor& var = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool training = ctx->saved_data["training"].toBool();
    const ReferenceForward forward = [=](const variable_list& in) {
      return training ? std::get<0>(reference::train(in[0], in[1], in[2], eps))
                      : reference::infer(in[0], mean, var, in[1], in[2], eps);
    };
    const auto h = norm_backward_of_backward(
        forward, saved[0], x, saved[4], {x.size(1)}, opmath_dtype(x.scalar_type()), gg,
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
         saved[4].defined() && ctx->needs_input_grad(4)});  // no edge without a weight
    return {h[0], h[1], Tensor(), Tensor(), h[2], Tensor(), Tensor()};
  }
};

Grads batch_norm_backward_autograd(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                   const Tensor& var, const OptTensor& weight, double eps,
                                   bool training) {
  check_reverse_mode_only("bnext::batch_norm_backward", {&grad_out, &input, &mean, &var},
                          {&weight});
  const auto g = BackwardFunction::apply(grad_out, input, mean, var, weight, eps, training);
  return {g[0], g[1], g[2]};
}

struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto train = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const OptTensor&, const OptTensor&, double)>("bnext::batch_norm_train");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, var] = train.call(input, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = present(weight);
    ctx->saved_data["has_bias"] = present(bias);
    ctx->mark_non_differentiable({mean, var});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto g = call_backward(backward_handle(), grads[0], saved[0], saved[2], saved[3],
                                 optional_of(saved[1]), ctx->saved_data["eps"].toDouble(), true);
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
    ctx->saved_data["has_weight"] = present(weight);
    ctx->saved_data["has_bias"] = present(bias);
    return infer.call(input, mean, var, weight, bias, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // torch.nn.functional.batch_norm has no derivative for the running
    // statistics either.
    check_no_grad_needed(ctx, 1, "bnext::batch_norm_infer", "running_mean");
    check_no_grad_needed(ctx, 2, "bnext::batch_norm_infer", "running_var");
    const auto saved = ctx->get_saved_variables();
    const auto g = call_backward(backward_handle(), grads[0], saved[0], saved[1], saved[2],
                                 optional_of(saved[3]), ctx->saved_data["eps"].toDouble(), false);
    const auto in = input_grads(ctx, g, 3, ctx->saved_data["has_weight"].toBool(),
                                ctx->saved_data["has_bias"].toBool());
    return {in[0], Tensor(), Tensor(), in[1], in[2], Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(const Tensor& input,
                                                             const OptTensor& weight,
                                                             const OptTensor& bias, double eps) {
  if (use_reference({&input}, {&weight, &bias})) {
    const Tensor& w = value_or_undefined(weight);
    const Tensor& b = value_or_undefined(bias);
    check_args("bnext::batch_norm_train", input, w, b, Tensor(), Tensor());
    auto [out, mean, var] = reference::train(input, w, b, eps);
    return {out, mean.detach(), var.detach()};
  }
  auto out = TrainFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensor batch_norm_infer_autograd(const Tensor& input, const Tensor& mean, const Tensor& var,
                                 const OptTensor& weight, const OptTensor& bias, double eps) {
  // As torch.nn.functional.batch_norm: no derivative for the running
  // statistics in either mode (InferFunction refuses their gradient).
  check_no_forward_grad("batch_norm", "running_mean and running_var", {&mean, &var});
  if (use_reference({&input, &mean, &var}, {&weight, &bias})) {
    const Tensor& w = value_or_undefined(weight);
    const Tensor& b = value_or_undefined(bias);
    check_args("bnext::batch_norm_infer", input, w, b, mean, var);
    return reference::infer(input, mean.detach(), var.detach(), w, b, eps);
  }
  return InferFunction::apply(input, mean, var, weight, bias, eps);
}

// ------------------------------------------------------- the building blocks
// Differentiated through their reference composites (ATen's derivatives), and
// run on our kernels when nothing is differentiated.

std::tuple<Tensor, Tensor> batch_norm_stats_autograd(const Tensor& input) {
  if (use_reference({&input}) || records_graph({&input})) {
    check_stats_args(input);
    return reference::stats(input);
  }
  static const auto stats =
      op<std::tuple<Tensor, Tensor>(const Tensor&)>("bnext::batch_norm_stats");
  return call_below_autograd(stats, input);
}

Tensor batch_norm_elemt_autograd(const Tensor& input, const Tensor& mean, const Tensor& scale,
                                 const Tensor& shift) {
  if (use_reference({&input, &mean, &scale, &shift}) ||
      records_graph({&input, &mean, &scale, &shift})) {
    check_elemt_args(input, mean, scale, shift);
    return reference::elemt(input, mean, scale, shift);
  }
  static const auto elemt = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
      "bnext::batch_norm_elemt");
  return call_below_autograd(elemt, input, mean, scale, shift);
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_autograd(const Tensor& grad_out,
                                                               const Tensor& input,
                                                               const Tensor& mean) {
  if (use_reference({&grad_out, &input, &mean}) || records_graph({&grad_out, &input, &mean})) {
    check_backward_reduce_args(grad_out, input, mean);
    return reference::backward_reduce(grad_out, input, mean);
  }
  static const auto reduce =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>(
          "bnext::batch_norm_backward_reduce");
  return call_below_autograd(reduce, grad_out, input, mean);
}

Tensor batch_norm_backward_elemt_autograd(const Tensor& grad_out, const Tensor& input,
                                          const Tensor& mean, const Tensor& a, const Tensor& k,
                                          const Tensor& c) {
  if (use_reference({&grad_out, &input, &mean, &a, &k, &c}) ||
      records_graph({&grad_out, &input, &mean, &a, &k, &c})) {
    check_backward_elemt_args(grad_out, input, mean, a, k, c);
    return reference::backward_elemt(grad_out, input, mean, a, k, c);
  }
  static const auto elemt =
      op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                const Tensor&)>("bnext::batch_norm_backward_elemt");
  return call_below_autograd(elemt, grad_out, input, mean, a, k, c);
}

// The running-statistics update has no derivative (torch's has none either):
// it refuses inputs that require grad rather than recording nothing.
void batch_norm_update_stats_autograd(const Tensor& running_mean, const Tensor& running_var,
                                      const OptTensor& num_batches_tracked, const Tensor& mean,
                                      const Tensor& var, std::optional<double> momentum,
                                      int64_t count) {
  check_not_differentiated("bnext::batch_norm_update_stats",
                           {&running_mean, &running_var, &mean, &var});
  static const auto update =
      op<void(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
              std::optional<double>, int64_t)>("bnext::batch_norm_update_stats");
  call_below_autograd(update, running_mean, running_var, num_batches_tracked, mean, var, momentum,
                      count);
  // What the ADInplaceOrView kernel of an in-place op does: saved copies of
  // these buffers must see that they changed.
  torch::autograd::increment_version(running_mean);
  torch::autograd::increment_version(running_var);
  if (present(num_batches_tracked)) torch::autograd::increment_version(*num_batches_tracked);
}

void batch_norm_update_stats_global_autograd(const Tensor& running_mean, const Tensor& running_var,
                                             const OptTensor& num_batches_tracked,
                                             const Tensor& mean, const Tensor& var,
                                             std::optional<double> momentum, const Tensor& count) {
  check_not_differentiated("bnext::batch_norm_update_stats_global",
                           {&running_mean, &running_var, &mean, &var});
  static const auto update =
      op<void(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
              std::optional<double>, const Tensor&)>("bnext::batch_norm_update_stats_global");
  call_below_autograd(update, running_mean, running_var, num_batches_tracked, mean, var, momentum,
                      count);
  torch::autograd::increment_version(running_mean);
  torch::autograd::increment_version(running_var);
  if (present(num_batches_tracked)) torch::autograd::increment_version(*num_batches_tracked);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_infer", &batch_norm_infer_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
  m.impl("batch_norm_stats", &batch_norm_stats_autograd);
  m.impl("batch_norm_elemt", &batch_norm_elemt_autograd);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_autograd);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_autograd);
  m.impl("batch_norm_update_stats", &batch_norm_update_stats_autograd);
  m.impl("batch_norm_update_stats_global", &batch_norm_update_stats_global_autograd);
}

}  // namespace batch_norm
}  // namespace bnext
