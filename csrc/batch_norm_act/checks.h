// Argument checks of the Batch Norm + activation operators, shared by the
// kernels (composite.h) and autograd's reference paths (autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>

#include "batch_norm/checks.h"
#include "bnext/activation.h"

namespace bnext {
namespace batch_norm_act {

using at::Tensor;

struct Activation {
  act::Kind kind;
  double param;
};

// The names of torch.nn.functional (ValueError for anything else, as
// F.gelu's approximate argument).
inline Activation parse_activation(const char* op, std::string_view name, double param) {
  using act::Kind;
  constexpr std::pair<std::string_view, Kind> kNames[] = {{"identity", Kind::kIdentity},
                                                          {"relu", Kind::kRelu},
                                                          {"leaky_relu", Kind::kLeakyRelu},
                                                          {"elu", Kind::kElu},
                                                          {"silu", Kind::kSilu},
                                                          {"gelu", Kind::kGelu},
                                                          {"gelu_tanh", Kind::kGeluTanh},
                                                          {"hardswish", Kind::kHardswish},
                                                          {"relu6", Kind::kRelu6}};
  for (const auto& [n, k] : kNames) {
    if (n == name) return {k, param};
  }
  TORCH_CHECK_VALUE(false, op,
                    ": expected activation to be one of identity, relu, leaky_relu, elu, silu, "
                    "gelu, gelu_tanh, hardswish, relu6; got '",
                    name, "'");
}

inline Activation parse_invertible(const char* op, std::string_view name, double param) {
  const Activation a = parse_activation(op, name, param);
  TORCH_CHECK_VALUE(act::invertible(a.kind, a.param), op,
                    ": in-place mode recomputes the activation's input from its output, so it "
                    "needs an invertible activation (identity, leaky_relu with negative_slope > 0, "
                    "elu with alpha > 0); got ",
                    name, " with parameter ", param);
  return a;
}

inline Activation parse_piecewise_linear(const char* op, std::string_view name, double param) {
  const Activation a = parse_activation(op, name, param);
  TORCH_CHECK_VALUE(act::piecewise_linear(a.kind, a.param), op,
                    ": the derivative from the output needs a piecewise linear activation "
                    "(identity, relu, leaky_relu with negative_slope >= 0, relu6); got ",
                    name, " with parameter ", param);
  return a;
}

// A residual is added to the normalised input: the input's sizes and dtype.
inline void check_residual(const char* op, const Tensor& residual, const Tensor& input) {
  if (!residual.defined()) return;
  TORCH_CHECK(residual.sizes() == input.sizes() && residual.scalar_type() == input.scalar_type() &&
                  residual.device() == input.device(),
              op, ": expected residual of size ", input.sizes(), ", dtype ", input.scalar_type(),
              " on ", input.device(), " (the input's), got ", residual.sizes(), ", ",
              residual.scalar_type(), " on ", residual.device());
}

}  // namespace batch_norm_act
}  // namespace bnext
