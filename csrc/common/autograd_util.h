// Helpers for autograd functions registered in C++ (TORCH_LIBRARY_IMPL(bnext,
// Autograd, m)): they call the bnext operators below the autograd key.
//
// How every bnext operator is differentiated (csrc/*/autograd.cpp):
// - First-order reverse mode, the hot path, runs our kernels: the forward and
//   backward passes are torch::autograd::Functions over the operators.
// - Everything else is derived by autograd from a reference composite of the
//   same math in ATen operators (csrc/*/reference.cpp): the derivative of a
//   backward pass (double backward, to any order), forward mode (jvp), and
//   every functorch transform (grad, vjp, jacrev, jacfwd, hessian, vmap),
//   which refuse C++ Functions. Those are not performance paths, and ATen's
//   own derivative formulas are correct by construction.
// - Arguments that have no derivative (running statistics, the saved
//   statistics of a backward pass) raise when a gradient reaches them instead
//   of silently contributing zero.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <array>
#include <functional>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

namespace bnext {
namespace autograd_util {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Signature>();
}

inline OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// True when the call must take the reference composite instead of our
// kernels: an input carries a forward-mode tangent, or a functorch transform
// is active (functorch refuses C++ autograd Functions).
bool use_reference(std::initializer_list<const Tensor*> inputs);
bool use_reference(std::initializer_list<const Tensor*> inputs,
                   std::initializer_list<const OptTensor*> optional_inputs);

// Raises a clear error when a backward-pass operator is asked for forward
// mode or a functorch transform: those differentiate the forward operators
// through their reference composites and never reach here.
void check_reverse_mode_only(const char* op, std::initializer_list<const Tensor*> inputs,
                             std::initializer_list<const OptTensor*> optional_inputs);

// Whether autograd will record this call: grad mode on and an input requires grad.
bool records_graph(std::initializer_list<const Tensor*> inputs);

// Calls an operator straight to its kernels, recording nothing (the
// caller's autograd kernel does, or nothing is differentiated).
template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& handle, const Args&... args) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return handle.call(args...);
}

// Calls a backward-pass operator from a Function's backward: through its
// autograd kernel when grad mode is on (create_graph=True: the result must be
// differentiable), else straight to the kernel.
template <typename Signature, typename... Args>
auto call_backward(const c10::TypedOperatorHandle<Signature>& handle, const Args&... args) {
  if (at::GradMode::is_enabled()) return handle.call(args...);
  return call_below_autograd(handle, args...);
}

// Throws torch's "the derivative for '<name>' is not implemented" when a
// gradient is asked of an argument that has none (e.g. running statistics).
void check_no_grad_needed(AutogradContext* ctx, size_t edge, const char* op, const char* name);

// Raises, before any work, when an argument of a non-differentiable operator
// requires grad (and grad mode is on) or carries a forward-mode tangent:
// never an output that silently has no gradient or tangent.
void check_not_differentiated(const char* op, std::initializer_list<const Tensor*> inputs);

// Raises torch's error for arguments that have no forward-mode derivative
// ("<what> ... they cannot have forward grad defined", as batch_norm words it
// for its running statistics) when one carries a tangent: the reference
// composites take them as constants and would drop it without a word.
void check_no_forward_grad(const char* op, const char* what,
                           std::initializer_list<const Tensor*> inputs);

// The derivative of a backward pass (double backward), derived by autograd
// from a reference forward. With y = forward(inputs) and the backward pass
// g(dy, inputs) = (dL/dinputs given dL/dy = dy), returns the gradients of
// sum_i <gg[i], g_i> with respect to dy and each input, entries undefined
// where `wanted` is false (wanted[0] is dy, wanted[1 + i] is inputs[i]).
// Every input of `forward` must be defined (pass ones/zeros for an absent
// weight/bias). The result is itself differentiable when grad mode is on
// (create_graph=True), so derivatives of any order exist.
using ReferenceForward = std::function<Tensor(const variable_list& inputs)>;
variable_list backward_of_backward(const ReferenceForward& forward, const variable_list& inputs,
                                   const Tensor& dy, const variable_list& gg,
                                   const std::vector<bool>& wanted);

// The double backward of a norm's backward op, which returns (grad_input,
// grad_weight[, grad_bias]) whether or not the norm has parameters: the
// derivative of `forward(x, weight, bias)` (backward_of_backward) taken with
// the weight, or a stand-in of ones, and a stand-in bias of zeros, of
// `param_shape` and the dtype of the parameter gradients (the weight's, else
// `param_dtype`). gg holds the gradients reaching those outputs (2 or 3).
// Returns (d grad_out, d input, d weight), undefined where `wanted` is false.
std::array<Tensor, 3> norm_backward_of_backward(const ReferenceForward& forward,
                                                const Tensor& grad_out, const Tensor& input,
                                                const Tensor& weight, at::IntArrayRef param_shape,
                                                at::ScalarType param_dtype, const variable_list& gg,
                                                std::array<bool, 3> wanted);

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
