// Argument checks and the (rows, row length) view shared by the CPU and CUDA
// LayerNorm / RMSNorm kernels. Messages follow torch's native layer_norm so
// that errors read the same whichever implementation raised them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace bnext {
namespace layer_norm {

using at::Tensor;

// The input seen as M rows of N contiguous values, N = prod(normalized_shape).
struct RowProblem {
  Tensor x;                          // contiguous input
  Tensor dy;                         // contiguous grad_out (backward only)
  Tensor w;                          // contiguous opmath weight, or undefined
  Tensor b;                          // contiguous opmath bias, or undefined
  int64_t M = 0;
  int64_t N = 0;
  std::vector<int64_t> stat_shape;   // leading (batch) dims: shape of mean/rstd
  std::vector<int64_t> param_shape;  // normalized_shape
};

// Which parameter dtypes an op accepts: LayerNorm the input's (or float32
// for half/bfloat16 input), as torch's; RMSNorm any floating dtype, as
// torch's (the output keeps the input's dtype).
enum class ParamDtype { kLikeInput, kAnyFloat };

// Every argument check of the forward ops, also used by their reference
// paths (autograd.cpp).
void check_forward(const char* op, const Tensor& input, at::IntArrayRef normalized_shape,
                   const Tensor& weight, const Tensor& bias, ParamDtype rule);

RowProblem prepare_forward(const char* op, const Tensor& input, at::IntArrayRef normalized_shape,
                           const Tensor& weight, const Tensor& bias, ParamDtype rule);

// `stat` (mean or rstd) carries the batch dims, so the normalized dims are
// input's dims past stat.dim().
RowProblem prepare_backward(const char* op, const Tensor& grad_out, const Tensor& input,
                            const Tensor& stat, const Tensor& weight, ParamDtype rule);

// A requested parameter gradient of `param_shape`, in `dtype`, from an opmath
// column sum; not requested gives an empty (0,) tensor, as the fake kernels do.
Tensor finish_param_grad(const Tensor& column_sum, bool requested, const RowProblem& p,
                         at::ScalarType dtype);

// The dtype of parameter gradients: the weight's, or the input's without one.
at::ScalarType param_grad_dtype(const Tensor& weight, const Tensor& input);

}  // namespace layer_norm
}  // namespace bnext
