// LayerNorm and RMSNorm operator schemas. Kernels: cpu_kernels.cpp,
// cuda_kernels.cu; autograd: autograd.cpp; fake kernels:
// torch_bnext/ops/layer_norm.py.
//
// The input is M rows of N = prod(normalized_shape) values. Row statistics
// (mean, rstd) have the input's leading (batch) shape and the opmath dtype
// (float32, float64 for float64 input); the backward ops recover the split
// from their dimension. A parameter gradient that output_mask does not ask
// for comes back as an empty (0,) tensor. The backward ops take the forward's
// eps for their own derivative (double backward), which recomputes the
// statistics from the input; the kernels use the saved ones.
//
// The *_2d ops normalise over dim 1 of an (N, C, *) input, as the zoos'
// LayerNorm2d / RmsNorm2d do (ConvNeXt), without permuting it: statistics
// have the input's shape without dim 1, parameters are (C,). An input whose
// channels are innermost (channels_last) is read as rows of C; any other
// layout as C strided planes. The outputs keep that layout.
//
// Defined in a header so that the CPU emulator's test library (emulator/module.cpp)
// declares the same schemas under its own namespace.
#pragma once

#include <torch/library.h>

namespace bnext {
namespace layer_norm {

inline void define_schemas(torch::Library& m) {
  m.def(
      "layer_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
      "float eps, bool[2] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "rms_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, float eps) "
      "-> (Tensor out, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight, float eps, "
      "bool weight_grad) -> (Tensor grad_input, Tensor grad_weight)");
  m.def(
      "layer_norm_2d_fwd(Tensor input, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_2d_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, "
      "Tensor? weight, float eps, bool[2] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def("rms_norm_2d_fwd(Tensor input, Tensor? weight, float eps) -> (Tensor out, Tensor rstd)");
  m.def(
      "rms_norm_2d_bwd(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight, float eps, "
      "bool weight_grad) -> (Tensor grad_input, Tensor grad_weight)");
}

}  // namespace layer_norm
}  // namespace bnext
