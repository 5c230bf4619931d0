// Batch Norm + activation operator schemas (In-Place ABN and timm's
// BatchNormAct layers). Kernels: the Batch Norm backends (batch_norm/
// cpu_kernels.cpp, cuda_kernels.cuh) with the activation as an epilogue of the
// elementwise pass and a prologue of the backward reduce; registered by
// cpu_kernels.cpp and cuda_kernels.cu; autograd: autograd.cpp; fake kernels:
// torch_bnext/ops/batch_norm_act.py.
//
// `activation` is a torch.nn.functional name (identity, relu, leaky_relu, elu,
// silu, gelu, gelu_tanh, hardswish, relu6); `activation_param` is leaky_relu's
// negative_slope or elu's alpha, ignored by the others. `residual`, when
// given, is added before the activation: act(bn(x) + residual).
//
// Defined in a header so that the CPU emulator's test library (emulator/module.cpp)
// declares the same schemas under its own namespace.
#pragma once

#include <torch/library.h>

namespace bnext {
namespace batch_norm_act {

inline void define_schemas(torch::Library& m) {
  // ---- Building blocks: Batch Norm's statistics and backward elementwise
  // pass are reused as they are (batch_norm_stats, batch_norm_backward_elemt).
  // act((x - mean) * scale + shift [+ residual]).
  m.def(
      "batch_norm_act_elemt(Tensor input, Tensor mean, Tensor scale, Tensor shift, "
      "Tensor? residual, str activation, float activation_param) -> Tensor");
  // grad_pre = grad_out * act'(u) with u recomputed from the input, and its
  // sums: sum grad_pre, sum grad_pre * (x - mean).
  m.def(
      "batch_norm_act_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor scale, "
      "Tensor shift, Tensor? residual, str activation, float activation_param) "
      "-> (Tensor grad_pre, Tensor sum_dy, Tensor sum_dy_xmu)");
  // The same sums without a residual, grad_pre not stored, and the
  // elementwise pass that recomputes it: dx = a * grad_pre + k * (x - mean) + c
  // (batch_norm_backward_elemt's, for whose grad_out this one reads grad_pre).
  m.def(
      "batch_norm_act_backward_sums(Tensor grad_out, Tensor input, Tensor mean, Tensor scale, "
      "Tensor shift, str activation, float activation_param) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "batch_norm_act_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor scale, "
      "Tensor shift, Tensor a, Tensor k, Tensor c, str activation, float activation_param) "
      "-> Tensor");
  // The same for a piecewise linear activation (identity, relu, leaky_relu,
  // relu6) with act'(u) from its output (a layer with a residual keeps its
  // output, which the next layer keeps anyway, rather than the residual).
  m.def(
      "batch_norm_act_backward_reduce_from_output(Tensor grad_out, Tensor input, Tensor output, "
      "Tensor mean, str activation, float activation_param) "
      "-> (Tensor grad_pre, Tensor sum_dy, Tensor sum_dy_xmu)");
  // In-place mode: the same from the output y = act(u) alone, where
  // x - mean = (act^-1(y) - shift) * inv_scale.
  m.def(
      "batch_norm_act_inplace_backward_reduce(Tensor grad_out, Tensor output, Tensor shift, "
      "Tensor inv_scale, str activation, float activation_param) "
      "-> (Tensor grad_pre, Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "batch_norm_act_inplace_backward_elemt(Tensor grad_pre, Tensor output, Tensor shift, "
      "Tensor inv_scale, Tensor a, Tensor k, Tensor c, str activation, float activation_param) "
      "-> Tensor");

  // ---- Whole passes, differentiable (autograd.cpp).
  m.def(
      "batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "float eps, str activation, float activation_param) "
      "-> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "batch_norm_act_infer(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "Tensor? residual, float eps, str activation, float activation_param) -> Tensor");
  // Batch Renorm: r and d as batch_renorm_train computes them (limits as 0-dim
  // tensors, read on the device).
  m.def(
      "batch_renorm_act_train(Tensor input, Tensor running_mean, Tensor running_var, "
      "Tensor? weight, Tensor? bias, Tensor? residual, float eps, Tensor r_max, Tensor d_max, "
      "str activation, float activation_param) "
      "-> (Tensor out, Tensor mean, Tensor var, Tensor r, Tensor d)");
  // grad_pre is the gradient of the activation's input: that of `residual`
  // (without a residual or the output, an empty tensor: it is never stored).
  // r and d: Batch Renorm's correction (both or neither). `output`: the
  // forward's output, for act' of a piecewise linear activation instead of
  // recomputing it (then no residual is needed).
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? bias, Tensor? residual, Tensor? r, Tensor? d, float eps, "
      "str activation, float activation_param, bool training, Tensor? output=None) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_pre)");

  // In-place mode (invertible activations): the output overwrites the input,
  // and backward needs only the output.
  m.def(
      "batch_norm_act_train_(Tensor(a!) input, Tensor? weight, Tensor? bias, float eps, "
      "str activation, float activation_param) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_act_infer_(Tensor(a!) input, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, float eps, str activation, float activation_param) -> ()");
  m.def(
      "batch_norm_act_inplace_backward(Tensor grad_out, Tensor output, Tensor var, "
      "Tensor? weight, Tensor? bias, float eps, str activation, float activation_param, "
      "bool training) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

}  // namespace batch_norm_act
}  // namespace bnext
