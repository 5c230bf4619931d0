// Argument checks shared by every backend: one message per mistake, phrased
// as "expected ..., got ...", with the exception type torch.nn uses for it.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bnext {

// The accumulation type: float64 for float64 input, float32 otherwise.
at::ScalarType opmath_dtype(at::ScalarType input_dtype);

// Floating input of at least `min_dim` dimensions (NotImplementedError for
// integer or complex dtypes, as torch raises).
void check_input(const char* op, const at::Tensor& input, int64_t min_dim);

// A per-channel tensor (weight, bias, running statistics) of `numel` elements
// on the input's device, of the input's dtype or float32 for half/bfloat16
// input (mixed precision; not checked with check_dtype = false). Undefined
// tensors pass.
void check_param(const char* op, const char* name, const at::Tensor& param, const at::Tensor& input,
                 int64_t numel, bool check_dtype = true);

template <typename T>
inline const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

inline const at::Tensor& value_or_undefined(const std::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t.has_value() ? *t : undefined;
}

}  // namespace bnext
