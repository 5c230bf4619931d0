// Argument checks of the LayerNorm / RMSNorm operators, shared by the kernels
// (composite.h) and the reference paths of autograd (autograd.cpp), and the
// checked (rows, row length) view of the input that the backends work on.
// Messages follow torch's native layer_norm so that errors read the same
// whichever implementation raised them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "common/checks.h"

namespace bnext {
namespace layer_norm {

using at::Tensor;

// The input seen as M rows of N contiguous values, N = prod(normalized_shape).
struct RowProblem {
  Tensor x;   // contiguous input
  Tensor dy;  // contiguous grad_out (backward only)
  // Contiguous weight and bias, or undefined: opmath, or in the input's own
  // 16-bit dtype where the backend reads that (its kNarrowParams).
  Tensor w;
  Tensor b;
  int64_t M = 0;
  int64_t N = 0;
  std::vector<int64_t> stat_shape;   // leading (batch) dims: shape of mean/rstd
  std::vector<int64_t> param_shape;  // normalized_shape
};

// Which parameter dtypes an op accepts: LayerNorm the input's (or float32
// for half/bfloat16 input), as torch's; RMSNorm any floating dtype, as
// torch's (the output keeps the input's dtype).
enum class ParamDtype { kLikeInput, kAnyFloat };

namespace detail {

inline void check_param_shape(const char* op, const char* name, const Tensor& param,
                              const Tensor& input, at::IntArrayRef normalized_shape,
                              ParamDtype rule) {
  if (!param.defined()) return;
  TORCH_CHECK(param.sizes() == normalized_shape, "Expected ", name,
              " to be of same shape as normalized_shape, but got ", name, " of shape ",
              param.sizes(), " and normalized_shape = ", normalized_shape);
  check_param(op, name, param, input, param.numel(),
              /*check_dtype=*/rule == ParamDtype::kLikeInput);
  if (rule == ParamDtype::kAnyFloat) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        at::isFloatingType(param.scalar_type()) || (input.is_complex() && param.is_complex()), "\"",
        op, "\" not implemented for a ", name, " of dtype ", param.scalar_type());
  }
}

// torch checks a parameter's dtype against the input's before the input's
// own dtype: an integer input with a float weight is a RuntimeError (mixed
// dtypes), without a weight a NotImplementedError.
inline void check_param_dtype_first(const char* op, const Tensor& input, const Tensor& weight,
                                    const Tensor& bias, ParamDtype rule) {
  if (rule == ParamDtype::kAnyFloat) return;
  for (const Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(!t->defined() || at::isFloatingType(input.scalar_type()) ||
                    t->scalar_type() == input.scalar_type(),
                op, ": expected the input and parameters to share a dtype, got input of dtype ",
                input.scalar_type(), " and a parameter of dtype ", t->scalar_type());
  }
}

inline void check_grad_like_input(const char* op, const Tensor& grad_out, const Tensor& input) {
  TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.dtype() == input.dtype() &&
                  grad_out.device() == input.device(),
              op, ": expected grad_out like the input (", input.sizes(), ", ", input.dtype(), ", ",
              input.device(), "), got ", grad_out.sizes(), ", ", grad_out.dtype(), ", ",
              grad_out.device());
}

inline Tensor opmath_contiguous(const Tensor& t, at::ScalarType opmath) {
  return t.defined() ? t.to(opmath).contiguous() : t;
}

// A row kernel's parameter: the input's dtype kept when the backend reads it
// (`narrow`): a bfloat16 model's weights then cost no cast launch per call.
inline Tensor kernel_param(const Tensor& t, const Tensor& input, at::ScalarType opmath,
                           bool narrow) {
  if (narrow && t.defined() && t.scalar_type() == input.scalar_type()) return t.contiguous();
  return opmath_contiguous(t, opmath);
}

inline void fill_view(RowProblem& p, const Tensor& input, int64_t axis) {
  const auto sizes = input.sizes();
  p.stat_shape.assign(sizes.begin(), sizes.begin() + axis);
  p.param_shape.assign(sizes.begin() + axis, sizes.end());
  p.M = 1;
  for (int64_t d : p.stat_shape) p.M *= d;
  p.N = 1;
  for (int64_t d : p.param_shape) p.N *= d;
}

}  // namespace detail

// Every argument check of the forward ops, also used by their reference
// paths (autograd.cpp).
inline void check_forward(const char* op, const Tensor& input, at::IntArrayRef normalized_shape,
                          const Tensor& weight, const Tensor& bias, ParamDtype rule) {
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(nd >= 1,
              "Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
              "least one element, but got normalized_shape = ",
              normalized_shape);
  detail::check_param_dtype_first(op, input, weight, bias, rule);
  // RMSNorm takes complex input too (through its composite path).
  if (!(rule == ParamDtype::kAnyFloat && input.is_complex())) check_input(op, input, 0);
  const auto sizes = input.sizes();
  TORCH_CHECK(input.dim() >= nd && sizes.slice(input.dim() - nd) == normalized_shape,
              "Given normalized_shape=", normalized_shape, ", expected input with shape [*, ",
              c10::Join(", ", normalized_shape), "], but got input of size", sizes);
  detail::check_param_shape(op, "weight", weight, input, normalized_shape, rule);
  detail::check_param_shape(op, "bias", bias, input, normalized_shape, rule);
}

inline RowProblem prepare_forward(const char* op, const Tensor& input,
                                  at::IntArrayRef normalized_shape, const Tensor& weight,
                                  const Tensor& bias, ParamDtype rule, bool narrow_params) {
  check_forward(op, input, normalized_shape, weight, bias, rule);
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  RowProblem p;
  const auto opmath = opmath_dtype(input.scalar_type());
  p.x = input.contiguous();
  p.w = detail::kernel_param(weight, input, opmath, narrow_params);
  p.b = detail::kernel_param(bias, input, opmath, narrow_params);
  detail::fill_view(p, input, input.dim() - nd);
  return p;
}

// `stat` (mean or rstd) carries the batch dims, so the normalized dims are
// input's dims past stat.dim().
inline RowProblem prepare_backward(const char* op, const Tensor& grad_out, const Tensor& input,
                                   const Tensor& stat, const Tensor& weight, ParamDtype rule,
                                   bool narrow_params) {
  check_input(op, input, 0);
  detail::check_grad_like_input(op, grad_out, input);
  const auto opmath = opmath_dtype(input.scalar_type());
  TORCH_CHECK(stat.dim() <= input.dim() && stat.sizes() == input.sizes().slice(0, stat.dim()) &&
                  stat.scalar_type() == opmath && stat.device() == input.device(),
              op, ": expected row statistics of shape ", input.sizes().slice(0, stat.dim()),
              " and dtype ", opmath, " on ", input.device(), ", got ", stat.sizes(), ", ",
              stat.scalar_type(), ", ", stat.device());
  RowProblem p;
  detail::fill_view(p, input, stat.dim());
  detail::check_param_shape(op, "weight", weight, input, p.param_shape, rule);
  p.x = input.contiguous();
  p.dy = grad_out.contiguous();
  p.w = detail::kernel_param(weight, input, opmath, narrow_params);
  return p;
}

// ------------------------------------------------- channels-first (the _2d ops)

// An (N, C, *) input normalised over dim 1, seen as B = N planes of C rows of
// S = prod(*) contiguous values: the statistics of position (b, s) are over
// x[b, :, s], C values S apart. Only NCHW-like layouts come here; an input
// whose channels are innermost goes to the row kernels (channel_rows).
struct ChannelProblem {
  Tensor x;   // contiguous input
  Tensor dy;  // contiguous grad_out (backward only)
  Tensor w;   // contiguous opmath (C,) weight, or undefined
  Tensor b;   // contiguous opmath (C,) bias, or undefined
  int64_t B = 0;
  int64_t C = 0;
  int64_t S = 0;
};

// The input with dim 1 moved last: contiguous exactly when its channels are
// innermost (channels_last, or nothing past dim 1), when the row kernels
// read it in place.
inline Tensor channel_rows(const Tensor& t) {
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < t.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return t.permute(perm);
}

// Undoes channel_rows: a tensor laid out as rows of C back to (N, C, *).
inline Tensor from_channel_rows(const Tensor& rows) {
  std::vector<int64_t> perm{0, rows.dim() - 1};
  for (int64_t d = 1; d + 1 < rows.dim(); ++d) perm.push_back(d);
  return rows.permute(perm);
}

// The shape of the statistics: the input's without dim 1.
inline std::vector<int64_t> channel_stat_shape(const Tensor& input) {
  std::vector<int64_t> shape = input.sizes().vec();
  shape.erase(shape.begin() + 1);
  return shape;
}

inline void check_channel_forward(const char* op, const Tensor& input, const Tensor& weight,
                                  const Tensor& bias, ParamDtype rule) {
  detail::check_param_dtype_first(op, input, weight, bias, rule);
  check_input(op, input, 2);
  const std::vector<int64_t> channels{input.size(1)};
  detail::check_param_shape(op, "weight", weight, input, channels, rule);
  detail::check_param_shape(op, "bias", bias, input, channels, rule);
}

// Checks of the _2d backward ops, shared by both layouts: grad_out like the
// input, statistics of the input's shape without dim 1.
inline void check_channel_backward(const char* op, const Tensor& grad_out, const Tensor& input,
                                   const Tensor& stat, const Tensor& weight, ParamDtype rule) {
  check_input(op, input, 2);
  detail::check_grad_like_input(op, grad_out, input);
  const auto opmath = opmath_dtype(input.scalar_type());
  const auto stat_shape = channel_stat_shape(input);
  TORCH_CHECK(stat.sizes() == at::IntArrayRef(stat_shape) && stat.scalar_type() == opmath &&
                  stat.device() == input.device(),
              op, ": expected statistics of shape ", at::IntArrayRef(stat_shape), " and dtype ",
              opmath, " on ", input.device(), ", got ", stat.sizes(), ", ", stat.scalar_type(),
              ", ", stat.device());
  const std::vector<int64_t> channels{input.size(1)};
  detail::check_param_shape(op, "weight", weight, input, channels, rule);
}

// The (B, C, S) view of an NCHW-like input (any layout but channels-innermost).
inline ChannelProblem channel_problem(const Tensor& input, const Tensor& grad_out,
                                      const Tensor& weight, const Tensor& bias) {
  const auto opmath = opmath_dtype(input.scalar_type());
  ChannelProblem p;
  p.x = input.contiguous();
  if (grad_out.defined()) p.dy = grad_out.contiguous();
  p.w = detail::opmath_contiguous(weight, opmath);
  p.b = detail::opmath_contiguous(bias, opmath);
  p.B = input.size(0);
  p.C = input.size(1);
  p.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) p.S *= input.size(d);
  return p;
}

// The RowProblem of a channels-innermost input: rows of C, the statistics'
// shape being the input's without dim 1.
inline RowProblem channel_row_problem(const Tensor& rows, const Tensor& grad_rows,
                                      const Tensor& weight, const Tensor& bias) {
  const auto opmath = opmath_dtype(rows.scalar_type());
  RowProblem p;
  p.x = rows.contiguous();
  if (grad_rows.defined()) p.dy = grad_rows.contiguous();
  p.w = detail::opmath_contiguous(weight, opmath);
  p.b = detail::opmath_contiguous(bias, opmath);
  detail::fill_view(p, rows, rows.dim() - 1);
  return p;
}

// The dtype of parameter gradients: the weight's, or the input's without one.
inline at::ScalarType param_grad_dtype(const Tensor& weight, const Tensor& input) {
  return weight.defined() ? weight.scalar_type() : input.scalar_type();
}

}  // namespace layer_norm
}  // namespace bnext
