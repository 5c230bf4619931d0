// Schemas of the per-channel steps that a distributed Batch Norm / Batch
// Renorm runs between its collectives (torch_bnext/functional/sync_batch_norm.py):
//
//   forward:  batch_norm_stats -> all-gather (mean, var, count) of every rank
//             -> batch_norm_gather_stats -> batch_norm_elemt
//             -> batch_norm_update_stats_global (the global count)
//   backward: batch_norm_backward_reduce -> all-reduce (sum dy, sum dy*(x-mean))
//             -> batch_norm_backward_coeffs -> batch_norm_backward_elemt
//
// Kernels: composite.h over the Batch Norm backends; fake kernels:
// torch_bnext/ops/distributed.py. Neither op is differentiable (the
// distributed autograd function calls them in its forward and backward;
// autograd.cpp makes them raise when differentiated).
//
// Defined in a header so that the CPU emulator's test library (emulator/module.cpp)
// declares the same schemas under its own namespace.
#pragma once

#include <torch/library.h>

namespace bnext {
namespace distributed {

inline void define_schemas(torch::Library& m) {
  // Chan's merge, in rank order, of W ranks' (mean, biased var, count) rows
  // ((W, C), (W, C), (W,)), in `dtype` (the input's opmath dtype); then the
  // forward coefficients y = (x - mean) * scale + shift. With running
  // statistics and limits, Batch Renorm's r and d as well (else r = 1, d = 0).
  m.def(
      "batch_norm_gather_stats(Tensor means, Tensor vars, Tensor counts, ScalarType dtype, "
      "Tensor? weight, Tensor? bias, float eps, Tensor? running_mean, Tensor? running_var, "
      "Tensor? r_max, Tensor? d_max) "
      "-> (Tensor mean, Tensor var, Tensor count, Tensor scale, Tensor shift, Tensor r, "
      "Tensor d)");
  // dx = a * dy + k * (x - mean) + c from the sums over the global batch of
  // `count` values per channel (a 0-dim tensor), and the weight gradient from
  // the given sums (pass a rank's own sums for its local weight gradient).
  m.def(
      "batch_norm_backward_coeffs(Tensor sum_dy, Tensor sum_dy_xmu, Tensor var, Tensor? weight, "
      "Tensor? r, Tensor? d, float eps, Tensor count) "
      "-> (Tensor a, Tensor k, Tensor c, Tensor grad_weight)");
}

}  // namespace distributed
}  // namespace bnext
