// Argument checks of the Batch Norm operators, shared by the kernels
// (composite.h) and the reference paths of autograd (autograd.cpp), so that
// both reject the same mistakes with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

#include "common/checks.h"

namespace bnext {
namespace batch_norm {

using at::Tensor;

inline void check_args(const char* op, const Tensor& input, const Tensor& weight,
                       const Tensor& bias, const Tensor& mean, const Tensor& var) {
  check_input(op, input, 2);
  const int64_t C = input.size(1);
  // torch.nn's Batch Norm fails with an IndexError on zero channels too.
  TORCH_CHECK_INDEX(C > 0, op, ": expected at least one channel, got input of size ",
                    input.sizes());
  // An empty batch reads no parameter: torch returns the empty output
  // whatever their dtypes.
  const bool check_dtype = input.numel() > 0;
  check_param(op, "weight", weight, input, C, check_dtype);
  check_param(op, "bias", bias, input, C, check_dtype);
  check_param(op, "running_mean", mean, input, C, check_dtype);
  check_param(op, "running_var", var, input, C, check_dtype);
}

inline void check_channel_vectors(const char* op, const Tensor& x,
                                  std::initializer_list<const Tensor*> vectors) {
  for (const Tensor* t : vectors) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": expected per-channel vectors of ",
                x.size(1), " elements, got size ", t->sizes());
    TORCH_CHECK(t->device() == x.device(), op, ": expected per-channel vectors on ", x.device(),
                ", got ", t->device());
  }
}

inline void check_grad_out(const char* op, const Tensor& grad_out, const Tensor& input) {
  TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.dtype() == input.dtype(), op,
              ": expected grad_out of size ", input.sizes(), " and dtype ", input.scalar_type(),
              ", got ", grad_out.sizes(), " and ", grad_out.scalar_type());
}

// The building blocks.
inline void check_stats_args(const Tensor& input) {
  check_input("bnext::batch_norm_stats", input, 2);
}

inline void check_elemt_args(const Tensor& input, const Tensor& mean, const Tensor& scale,
                             const Tensor& shift) {
  check_input("bnext::batch_norm_elemt", input, 2);
  check_channel_vectors("bnext::batch_norm_elemt", input, {&mean, &scale, &shift});
}

inline void check_backward_reduce_args(const Tensor& grad_out, const Tensor& input,
                                       const Tensor& mean) {
  const char* op = "bnext::batch_norm_backward_reduce";
  check_input(op, input, 2);
  check_channel_vectors(op, input, {&mean});
  check_grad_out(op, grad_out, input);
}

inline void check_backward_elemt_args(const Tensor& grad_out, const Tensor& input,
                                      const Tensor& mean, const Tensor& a, const Tensor& k,
                                      const Tensor& c) {
  const char* op = "bnext::batch_norm_backward_elemt";
  check_input(op, input, 2);
  check_channel_vectors(op, input, {&mean, &a, &k, &c});
  check_grad_out(op, grad_out, input);
}

}  // namespace batch_norm
}  // namespace bnext
