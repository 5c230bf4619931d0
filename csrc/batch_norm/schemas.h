// Batch Norm operator schemas. Kernels: cpu_kernels.cpp, cuda_kernels.cu;
// autograd: autograd.cpp; fake kernels: torch_bnext/ops/batch_norm.py.
//
// Per-channel outputs (mean, var, sums) are float32, or float64 for float64
// input. `var` is always the biased batch variance.
//
// Defined in a header so that the CPU emulator's test library (emulator/module.cpp)
// declares the same schemas under its own namespace.
#pragma once

#include <torch/library.h>

namespace bnext {
namespace batch_norm {

inline void define_schemas(torch::Library& m) {
  // The four building blocks; a distributed version all-reduces between them.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def("batch_norm_elemt(Tensor input, Tensor mean, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor a, "
      "Tensor k, Tensor c) -> Tensor");

  // Whole passes, differentiable (autograd.cpp).
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "batch_norm_infer(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "float eps) -> Tensor");
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, float eps, bool training) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_update_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, float? momentum, int count) "
      "-> ()");
  // The count as a one-value tensor on the device (the global batch size of a
  // distributed step, known there only after a collective).
  m.def(
      "batch_norm_update_stats_global(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, float? momentum, Tensor count) "
      "-> ()");
}

}  // namespace batch_norm
}  // namespace bnext
