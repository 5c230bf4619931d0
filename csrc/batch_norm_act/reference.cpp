#include "batch_norm_act/reference.h"

#include <ATen/ATen.h>

#include "batch_norm/reference.h"
#include "common/checks.h"

namespace bnext {
namespace batch_norm_act {
namespace reference {
namespace {

Tensor add_residual(const Tensor& y, const Tensor& residual) {
  return residual.defined() ? y + residual : y;
}

}  // namespace

Tensor activation(const Tensor& u, Activation fn) {
  using act::Kind;
  switch (fn.kind) {
    case Kind::kRelu:
      return at::relu(u);
    case Kind::kLeakyRelu:
      return at::leaky_relu(u, fn.param);
    case Kind::kElu:
      return at::elu(u, fn.param);
    case Kind::kSilu:
      return at::silu(u);
    case Kind::kGelu:
      return at::gelu(u, "none");
    case Kind::kGeluTanh:
      return at::gelu(u, "tanh");
    case Kind::kHardswish:
      return at::hardswish(u);
    case Kind::kRelu6:
      return at::hardtanh(u, 0.0, 6.0);
    case Kind::kIdentity:
      break;
  }
  return u;
}

Tensor derivative_from_output(const Tensor& y, Activation fn) {
  using act::Kind;
  const Tensor yo = y.detach().to(opmath_dtype(y.scalar_type()));
  switch (fn.kind) {
    case Kind::kRelu:
      return (yo > 0).to(yo.scalar_type());
    case Kind::kLeakyRelu:
      return at::where(yo > 0, 1.0, fn.param).to(yo.scalar_type());
    case Kind::kRelu6:
      return ((yo > 0) & (yo < 6)).to(yo.scalar_type());
    case Kind::kIdentity:
      return at::ones_like(yo);
    default:
      break;
  }
  TORCH_CHECK(false, "bnext: no derivative from the output for this activation");
}

std::tuple<Tensor, Tensor, Tensor> train(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                         const Tensor& residual, double eps, Activation fn,
                                         const Tensor& r, const Tensor& d) {
  auto [y, mean, var] = batch_norm::reference::train(x, weight, bias, eps, r, d);
  return {activation(add_residual(y, residual), fn), mean, var};
}

Tensor infer(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& weight,
             const Tensor& bias, const Tensor& residual, double eps, Activation fn) {
  return activation(
      add_residual(batch_norm::reference::infer(x, mean, var, weight, bias, eps), residual), fn);
}

}  // namespace reference
}  // namespace batch_norm_act
}  // namespace bnext
