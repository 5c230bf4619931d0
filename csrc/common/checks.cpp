#include "common/checks.h"

#include <c10/util/Exception.h>

namespace bnext {

at::ScalarType opmath_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const char* op, const at::Tensor& input, int64_t min_dim) {
  const auto dt = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      dt == at::kDouble || dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "\"", op,
      "\" not implemented for '", toString(dt),
      "': expected a float64, float32, float16 or bfloat16 input");
  TORCH_CHECK(input.dim() >= min_dim, op, ": expected an input with at least ", min_dim,
              " dimensions, got ", input.dim(), "D input of size ", input.sizes());
}

void check_param(const char* op, const char* name, const at::Tensor& param, const at::Tensor& input,
                 int64_t numel, bool check_dtype) {
  if (!param.defined()) return;
  TORCH_CHECK(param.numel() == numel, name, " should contain ", numel, " elements not ",
              param.numel(), " (", op, ": input of size ", input.sizes(), ")");
  TORCH_CHECK(param.device() == input.device(), op, ": expected ", name, " on device ",
              input.device(), " (the input's device), got ", param.device());
  if (!check_dtype) return;
  const auto dt = param.scalar_type();
  const bool reduced = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(dt == input.scalar_type() || (reduced && dt == at::kFloat), op, ": expected ", name,
              " of dtype ", input.scalar_type(), reduced ? " (or float32)" : "",
              " like the input, got ", dt);
}

}  // namespace bnext
