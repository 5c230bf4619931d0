// Batch Renorm operator schemas. Kernels: composite.h, instantiated per device
// (cpu_kernels.cpp, cuda_kernels.cu); autograd: autograd.cpp; fake kernels:
// torch_bnext/ops/batch_renorm.py.
//
// Eval and the running-buffer update are Batch Norm's own operators
// (batch_norm_infer, batch_norm_update_stats): Batch Renorm differs from Batch
// Norm only in training, and only through the per-channel r and d.
//
// Defined in a header so that the CPU emulator's test library (emulator/module.cpp)
// declares the same schemas under its own namespace.
#pragma once

#include <torch/library.h>

namespace bnext {
namespace batch_renorm {

inline void define_schemas(torch::Library& m) {
  // r and d are read from running_mean/running_var as they are before this
  // step's update; they are returned so that backward and callers (logging,
  // tests) see exactly the correction that was applied.
  m.def(
      "batch_renorm_train(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
      "Tensor? bias, float eps, float r_max, float d_max) "
      "-> (Tensor out, Tensor mean, Tensor var, Tensor r, Tensor d)");
  // r_max and d_max as 0-dim tensors: a schedule evaluated from
  // num_batches_tracked on the device, inside a compiled graph, without a
  // host synchronisation (torch_bnext/schedule.py).
  m.def(
      "batch_renorm_train_scheduled(Tensor input, Tensor running_mean, Tensor running_var, "
      "Tensor? weight, Tensor? bias, float eps, Tensor r_max, Tensor d_max) "
      "-> (Tensor out, Tensor mean, Tensor var, Tensor r, Tensor d)");
  m.def(
      "batch_renorm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor r, Tensor d, float eps) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

}  // namespace batch_renorm
}  // namespace bnext
