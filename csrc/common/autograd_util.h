// Helpers for autograd functions registered in C++ (TORCH_LIBRARY_IMPL(bnext,
// Autograd, m)): they call the bnext operators below the autograd key.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>
#include <tuple>

namespace bnext {
namespace autograd_util {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline OptTensor optional_of(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// (grad_input, grad_weight, grad_bias) as autograd wants them: undefined
// where no gradient was asked for. Autograd numbers only the tensors actually
// passed (absent optional weight/bias have no edge): the input is edge 0 and
// the weight, then the bias, follow from edge `first_param_edge` on.
inline variable_list input_grads(AutogradContext* ctx, const std::tuple<Tensor, Tensor, Tensor>& g,
                                 int64_t first_param_edge, bool has_weight, bool has_bias) {
  const auto wanted = [&](bool present, int64_t edge) {
    return present && ctx->needs_input_grad(static_cast<size_t>(edge));
  };
  const int64_t weight_edge = first_param_edge;
  const int64_t bias_edge = first_param_edge + (has_weight ? 1 : 0);
  return {ctx->needs_input_grad(0) ? std::get<0>(g) : Tensor(),
          wanted(has_weight, weight_edge) ? std::get<1>(g) : Tensor(),
          wanted(has_bias, bias_edge) ? std::get<2>(g) : Tensor()};
}

}  // namespace autograd_util
}  // namespace bnext
