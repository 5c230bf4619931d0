#include "common/autograd_util.h"

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <c10/util/Exception.h>

namespace bnext {
namespace autograd_util {
namespace {

// Level 0 is the only forward-AD level core autograd and functorch's jvp use.
bool has_forward_grad(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

// A forward-mode tangent, or a functorch wrapper: vmap's batched tensors
// reach autograd kernels still wrapped, and our kernels have no batching rule.
bool needs_reference(const Tensor& t) {
  if (!t.defined()) return false;
  const auto keys = t.key_set();
  if (keys.has(c10::DispatchKey::FuncTorchBatched) ||
      keys.has(c10::DispatchKey::FuncTorchGradWrapper)) {
    return true;
  }
  return has_forward_grad(t);
}

// Whether a functorch transform (grad, vjp, jvp, vmap, ...) is active. Asked
// the way torch::autograd::Function::apply asks it, so that this is true
// exactly when our C++ Functions would be refused.
bool in_functorch_transform() {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return false;
  try {
    tls->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

}  // namespace

bool use_reference(std::initializer_list<const Tensor*> inputs) {
  if (in_functorch_transform()) return true;
  for (const Tensor* t : inputs) {
    if (needs_reference(*t)) return true;
  }
  return false;
}

bool use_reference(std::initializer_list<const Tensor*> inputs,
                   std::initializer_list<const OptTensor*> optional_inputs) {
  if (use_reference(inputs)) return true;
  for (const OptTensor* t : optional_inputs) {
    if (present(*t) && needs_reference(**t)) return true;
  }
  return false;
}

void check_reverse_mode_only(const char* op, std::initializer_list<const Tensor*> inputs,
                             std::initializer_list<const OptTensor*> optional_inputs) {
  TORCH_CHECK(!use_reference(inputs, optional_inputs), op,
              ": forward-mode AD and functorch transforms of a backward pass are not "
              "supported; apply them to the forward operator (whose derivatives of every order "
              "and mode are implemented)");
}

bool records_graph(std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

void check_no_grad_needed(AutogradContext* ctx, size_t edge, const char* op, const char* name) {
  // The wording of torch's not_implemented() derivatives.
  TORCH_CHECK(!ctx->needs_input_grad(edge), "the derivative for '", name, "' is not implemented (",
              op, ")");
}

void check_not_differentiated(const char* op, std::initializer_list<const Tensor*> inputs) {
  TORCH_CHECK(!records_graph(inputs), op,
              " is not differentiable: it was called with an input that requires grad. "
              "Call it under torch.no_grad() or with detached inputs.");
  for (const Tensor* t : inputs) {
    TORCH_CHECK(!has_forward_grad(*t), op,
                " is not differentiable: it was called with an input that carries a "
                "forward-mode tangent. Call it with the primal values (unpack_dual).");
  }
}

void check_no_forward_grad(const char* op, const char* what,
                           std::initializer_list<const Tensor*> inputs) {
  for (const Tensor* t : inputs) {
    TORCH_CHECK(!has_forward_grad(*t), op, " is not differentiable wrt ", what,
                ", they cannot have forward grad defined");
  }
}

variable_list backward_of_backward(const ReferenceForward& forward, const variable_list& inputs,
                                   const Tensor& dy, const variable_list& gg,
                                   const std::vector<bool>& wanted) {
  TORCH_INTERNAL_ASSERT(gg.size() == inputs.size() && wanted.size() == inputs.size() + 1);
  const bool create_graph = at::GradMode::is_enabled();
  variable_list result(wanted.size());
  std::vector<size_t> used;  // the first-order gradients that gg weighs
  for (size_t i = 0; i < gg.size(); ++i) {
    if (gg[i].defined()) used.push_back(i);
  }
  if (used.empty()) return result;

  const at::AutoGradMode enable_grad(true);
  // Each tensor is differentiated through a fresh alias: the gradient with
  // respect to the alias is the partial derivative (dy may itself depend on x
  // through the caller's graph: autograd::grad with respect to x itself would
  // add that path, which the engine adds again), and the alias keeps the
  // result connected to the caller's graph (third and higher orders).
  // Tensors outside any graph become leaves.
  const auto as_variable = [](const Tensor& t) {
    return t.requires_grad() ? t.view_as(t) : t.detach().requires_grad_();
  };
  variable_list xs;
  for (const Tensor& t : inputs) xs.push_back(as_variable(t));
  const Tensor dy_v = as_variable(dy);

  const Tensor y = forward(xs);
  const variable_list g = torch::autograd::grad({y}, xs, {dy_v}, /*retain_graph=*/true,
                                                /*create_graph=*/true, /*allow_unused=*/true);
  variable_list outputs, weights;
  for (size_t i : used) {
    // A first-order gradient that does not depend on anything (or is absent)
    // contributes nothing at second order.
    if (g[i].defined() && g[i].requires_grad()) {
      outputs.push_back(g[i]);
      weights.push_back(gg[i]);
    }
  }
  variable_list wrt;
  std::vector<size_t> slot;
  for (size_t j = 0; j < wanted.size(); ++j) {
    if (!wanted[j]) continue;
    wrt.push_back(j == 0 ? dy_v : xs[j - 1]);
    slot.push_back(j);
  }
  if (outputs.empty() || wrt.empty()) return result;
  const variable_list h = torch::autograd::grad(
      outputs, wrt, weights, /*retain_graph=*/create_graph, create_graph, /*allow_unused=*/true);
  for (size_t k = 0; k < slot.size(); ++k) result[slot[k]] = h[k];
  return result;
}

std::array<Tensor, 3> norm_backward_of_backward(const ReferenceForward& forward,
                                                const Tensor& grad_out, const Tensor& input,
                                                const Tensor& weight, at::IntArrayRef param_shape,
                                                at::ScalarType param_dtype, const variable_list& gg,
                                                std::array<bool, 3> wanted) {
  TORCH_INTERNAL_ASSERT(gg.size() == 2 || gg.size() == 3);
  const auto options = weight.defined() ? weight.options() : input.options().dtype(param_dtype);
  const Tensor w = weight.defined() ? weight : at::ones(param_shape, options);
  const Tensor b = at::zeros(param_shape, options);
  const auto h = backward_of_backward(forward, {input, w, b}, grad_out,
                                      {gg[0], gg[1], gg.size() == 3 ? gg[2] : Tensor()},
                                      {wanted[0], wanted[1], wanted[2], false});
  return {h[0], h[1], h[2]};
}

}  // namespace autograd_util
}  // namespace bnext
