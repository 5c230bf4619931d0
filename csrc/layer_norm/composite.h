// The LayerNorm / RMSNorm operators, written once over a backend `K` that
// supplies the row kernels; cpu_kernels.cpp and cuda_kernels.cu register them
// with their own backend (cpu_backend.h, cuda_backend.cuh). K must provide:
//   struct DeviceGuard { explicit DeviceGuard(at::Device); }  makes the device current
//   template <bool kCentred> void forward(p, eps, out, mean, rstd)
//       rows of p.x normalised into out; mean (kCentred only) and rstd filled
//   template <bool kCentred> void backward(p, mean, rstd, columns, dx, dw_col, db_col)
//       dx; with `columns`, the column sums of dy * xhat (and of dy when
//       kCentred) written into dw_col (db_col), of column_dtype<K>
//   template <bool kCentred> void channel_forward(p, eps, out, mean, rstd)
//   template <bool kCentred> void channel_backward(p, mean, rstd, columns, dx, dw_col, db_col)
//       the same over the C values S apart of every position (b, s) of a
//       ChannelProblem (the _2d ops on NCHW-like input); out and dx are
//       contiguous (B, C, S), mean and rstd (B, S); with `columns` the sums
//       are written into dw_col (db_col), of column_dtype<K>
// kCentred = true is LayerNorm, false is RMSNorm (mean 0, no bias).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "layer_norm/checks.h"
#include "layer_norm/reference.h"

namespace bnext {
namespace layer_norm {

using OptTensor = std::optional<Tensor>;

// RMSNorm's outputs keep the input's memory format, as torch's do (its
// RMSNorm is elementwise composite); the kernels work on contiguous rows.
inline Tensor in_input_layout(const Tensor& out, const Tensor& input) {
  if (input.is_contiguous()) return out;
  Tensor like = at::empty_like(input);
  if (like.strides() == out.strides()) return out;
  return like.copy_(out);
}

// The dtype the backend writes the column sums in: the gradients' own where
// they are the 16-bit input's and the backend reads such parameters (its
// kNarrowParams; its merge rounds to them, so no cast launches follow), else
// opmath.
template <class K>
at::ScalarType column_dtype(at::ScalarType grad_dtype, const Tensor& input) {
  const auto opmath = opmath_dtype(input.scalar_type());
  return K::kNarrowParams && grad_dtype == input.scalar_type() ? grad_dtype : opmath;
}

// The (N,) column sums of dweight or dbias, undefined unless `wanted`.
// The backends write every value when there are rows: zeros (a memset before
// kernels that overwrite it, on a GPU) only without rows.
inline Tensor column_sums_buffer(bool wanted, const RowProblem& p, const at::TensorOptions& o) {
  if (!wanted) return Tensor();
  return p.M > 0 ? at::empty({p.N}, o) : at::zeros({p.N}, o);
}

// A requested parameter gradient of `param_shape`, in `dtype`, from a column
// sum; not requested gives an empty (0,) tensor, as the fake kernels do.
inline Tensor finish_param_grad(const Tensor& column_sum, bool requested, const RowProblem& p,
                                at::ScalarType dtype) {
  if (!requested) return at::empty({0}, p.x.options().dtype(dtype));
  return column_sum.view(p.param_shape).to(dtype);
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& input,
                                                  at::IntArrayRef normalized_shape,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  double eps) {
  const typename K::DeviceGuard guard(input.device());
  const RowProblem p =
      prepare_forward("bnext::layer_norm_fwd", input, normalized_shape, value_or_undefined(weight),
                      value_or_undefined(bias), ParamDtype::kLikeInput, K::kNarrowParams);
  const auto stat_opts = p.x.options().dtype(opmath_dtype(input.scalar_type()));
  Tensor out = at::empty(input.sizes(), p.x.options());
  Tensor mean = at::empty(p.stat_shape, stat_opts);
  Tensor rstd = at::empty(p.stat_shape, stat_opts);
  if (p.M > 0) K::template forward<true>(p, eps, out, mean, rstd);
  return {out, mean, rstd};
}

template <class K>
std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& input, at::IntArrayRef normalized_shape,
                                        const OptTensor& weight, double eps) {
  const typename K::DeviceGuard guard(input.device());
  if (input.is_complex()) {
    // Not a performance case (and reached here only without autograd, e.g.
    // under inference_mode): torch's formula, composite.
    check_forward("bnext::rms_norm_fwd", input, normalized_shape, value_or_undefined(weight),
                  Tensor(), ParamDtype::kAnyFloat);
    return reference::rms_norm(input, static_cast<int64_t>(normalized_shape.size()),
                               value_or_undefined(weight), eps);
  }
  const RowProblem p =
      prepare_forward("bnext::rms_norm_fwd", input, normalized_shape, value_or_undefined(weight),
                      Tensor(), ParamDtype::kAnyFloat, K::kNarrowParams);
  Tensor out = at::empty(input.sizes(), p.x.options());
  Tensor rstd = at::empty(p.stat_shape, p.x.options().dtype(opmath_dtype(input.scalar_type())));
  Tensor no_mean;
  if (p.M > 0) K::template forward<false>(p, eps, out, no_mean, rstd);
  return {in_input_layout(out, input), rstd};
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const OptTensor& weight, double /*eps*/,
                                                  std::array<bool, 2> output_mask) {
  const char* op = "bnext::layer_norm_bwd";
  const typename K::DeviceGuard guard(input.device());
  const Tensor& w = value_or_undefined(weight);
  TORCH_CHECK(mean.sizes() == rstd.sizes() && mean.scalar_type() == rstd.scalar_type() &&
                  mean.device() == rstd.device(),
              op, ": mean and rstd differ: ", mean.sizes(), " ", mean.scalar_type(), " on ",
              mean.device(), " vs ", rstd.sizes(), " ", rstd.scalar_type(), " on ", rstd.device());
  TORCH_CHECK(w.defined() || !output_mask[0], op, ": grad_weight requested without a weight");
  const RowProblem p =
      prepare_backward(op, grad_out, input, rstd, w, ParamDtype::kLikeInput, K::kNarrowParams);
  const bool columns = output_mask[0] || output_mask[1];
  const auto dtype = param_grad_dtype(w, input);
  const auto col_opts = rstd.options().dtype(column_dtype<K>(dtype, input));
  Tensor dx = at::empty(input.sizes(), p.x.options());
  Tensor dw_col = column_sums_buffer(columns, p, col_opts);
  Tensor db_col = column_sums_buffer(columns, p, col_opts);
  if (p.M > 0) {
    K::template backward<true>(p, mean.contiguous(), rstd.contiguous(), columns, dx, dw_col,
                               db_col);
  }
  return {dx, finish_param_grad(dw_col, output_mask[0], p, dtype),
          finish_param_grad(db_col, output_mask[1], p, dtype)};
}

template <class K>
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                        const Tensor& rstd, const OptTensor& weight, double /*eps*/,
                                        bool weight_grad) {
  const char* op = "bnext::rms_norm_bwd";
  const typename K::DeviceGuard guard(input.device());
  const Tensor& w = value_or_undefined(weight);
  TORCH_CHECK(w.defined() || !weight_grad, op, ": grad_weight requested without a weight");
  const RowProblem p =
      prepare_backward(op, grad_out, input, rstd, w, ParamDtype::kAnyFloat, K::kNarrowParams);
  const auto dtype = param_grad_dtype(w, input);
  Tensor dx = at::empty(input.sizes(), p.x.options());
  Tensor dw_col =
      column_sums_buffer(weight_grad, p, rstd.options().dtype(column_dtype<K>(dtype, input)));
  Tensor no_db;
  if (p.M > 0)
    K::template backward<false>(p, Tensor(), rstd.contiguous(), weight_grad, dx, dw_col, no_db);
  return {in_input_layout(dx, input), finish_param_grad(dw_col, weight_grad, p, dtype)};
}

// ------------------------------------------------------------- the _2d ops
// Normalising over dim 1: an input whose channels are innermost is rows of C
// for the row kernels (no copy); any other is made NCHW-contiguous for the
// channel kernels. The outputs keep the layout the kernels wrote, as the fake
// kernels (torch_bnext/ops/layer_norm.py) predict.

template <class K, bool kCentred>
std::tuple<Tensor, Tensor, Tensor> norm_2d_fwd(const char* op, const Tensor& input,
                                               const Tensor& weight, const Tensor& bias, double eps,
                                               ParamDtype rule) {
  const typename K::DeviceGuard guard(input.device());
  check_channel_forward(op, input, weight, bias, rule);
  const auto stat_opts = input.options().dtype(opmath_dtype(input.scalar_type()));
  Tensor mean = kCentred ? at::empty(channel_stat_shape(input), stat_opts) : Tensor();
  Tensor rstd = at::empty(channel_stat_shape(input), stat_opts);
  const Tensor rows = channel_rows(input);
  if (rows.is_contiguous()) {
    const RowProblem p = channel_row_problem(rows, Tensor(), weight, bias);
    Tensor out = at::empty(rows.sizes(), rows.options());
    if (p.M > 0) K::template forward<kCentred>(p, eps, out, mean, rstd);
    return {from_channel_rows(out), mean, rstd};
  }
  const ChannelProblem p = channel_problem(input, Tensor(), weight, bias);
  Tensor out = at::empty(input.sizes(), p.x.options());
  K::template channel_forward<kCentred>(p, eps, out, mean, rstd);
  return {out, mean, rstd};
}

// (dx, dw, db); dw and db are (C,) column sums of column_dtype<K>, undefined
// unless `columns`.
template <class K, bool kCentred>
std::tuple<Tensor, Tensor, Tensor> norm_2d_bwd(const Tensor& grad_out, const Tensor& input,
                                               const Tensor& mean, const Tensor& rstd,
                                               const Tensor& weight, bool columns) {
  const auto col_opts =
      rstd.options().dtype(column_dtype<K>(param_grad_dtype(weight, input), input));
  const Tensor rows = channel_rows(input);
  if (rows.is_contiguous()) {
    const RowProblem p = channel_row_problem(rows, channel_rows(grad_out), weight, Tensor());
    Tensor dx = at::empty(rows.sizes(), rows.options());
    Tensor dw = column_sums_buffer(columns, p, col_opts);
    Tensor db = column_sums_buffer(columns && kCentred, p, col_opts);
    if (p.M > 0) {
      K::template backward<kCentred>(p, kCentred ? mean.contiguous() : Tensor(), rstd.contiguous(),
                                     columns, dx, dw, db);
    }
    return {from_channel_rows(dx), dw, db};
  }
  const ChannelProblem p = channel_problem(input, grad_out, weight, Tensor());
  Tensor dx = at::empty(input.sizes(), p.x.options());
  Tensor dw = columns ? at::empty({p.C}, col_opts) : Tensor();
  Tensor db = columns && kCentred ? at::empty({p.C}, col_opts) : Tensor();
  // An empty input counts as contiguous rows: the channel kernels see values.
  K::template channel_backward<kCentred>(p, kCentred ? mean.contiguous() : Tensor(),
                                         rstd.contiguous(), columns, dx, dw, db);
  return {dx, dw, db};
}

// A requested (C,) parameter gradient in `dtype`, else an empty (0,) tensor.
inline Tensor finish_channel_grad(const Tensor& sum, bool requested, const Tensor& input,
                                  at::ScalarType dtype) {
  if (!requested) return at::empty({0}, input.options().dtype(dtype));
  return sum.to(dtype);
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> layer_norm_2d_fwd(const Tensor& input, const OptTensor& weight,
                                                     const OptTensor& bias, double eps) {
  return norm_2d_fwd<K, true>("bnext::layer_norm_2d_fwd", input, value_or_undefined(weight),
                              value_or_undefined(bias), eps, ParamDtype::kLikeInput);
}

template <class K>
std::tuple<Tensor, Tensor> rms_norm_2d_fwd(const Tensor& input, const OptTensor& weight,
                                           double eps) {
  auto [out, no_mean, rstd] =
      norm_2d_fwd<K, false>("bnext::rms_norm_2d_fwd", input, value_or_undefined(weight), Tensor(),
                            eps, ParamDtype::kAnyFloat);
  return {out, rstd};
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> layer_norm_2d_bwd(const Tensor& grad_out, const Tensor& input,
                                                     const Tensor& mean, const Tensor& rstd,
                                                     const OptTensor& weight, double /*eps*/,
                                                     std::array<bool, 2> output_mask) {
  const char* op = "bnext::layer_norm_2d_bwd";
  const typename K::DeviceGuard guard(input.device());
  const Tensor& w = value_or_undefined(weight);
  TORCH_CHECK(w.defined() || !output_mask[0], op, ": grad_weight requested without a weight");
  check_channel_backward(op, grad_out, input, mean, w, ParamDtype::kLikeInput);
  check_channel_backward(op, grad_out, input, rstd, w, ParamDtype::kLikeInput);
  auto [dx, dw, db] =
      norm_2d_bwd<K, true>(grad_out, input, mean, rstd, w, output_mask[0] || output_mask[1]);
  const auto dtype = param_grad_dtype(w, input);
  return {dx, finish_channel_grad(dw, output_mask[0], input, dtype),
          finish_channel_grad(db, output_mask[1], input, dtype)};
}

template <class K>
std::tuple<Tensor, Tensor> rms_norm_2d_bwd(const Tensor& grad_out, const Tensor& input,
                                           const Tensor& rstd, const OptTensor& weight,
                                           double /*eps*/, bool weight_grad) {
  const char* op = "bnext::rms_norm_2d_bwd";
  const typename K::DeviceGuard guard(input.device());
  const Tensor& w = value_or_undefined(weight);
  TORCH_CHECK(w.defined() || !weight_grad, op, ": grad_weight requested without a weight");
  check_channel_backward(op, grad_out, input, rstd, w, ParamDtype::kAnyFloat);
  auto [dx, dw, no_db] = norm_2d_bwd<K, false>(grad_out, input, Tensor(), rstd, w, weight_grad);
  return {dx, finish_channel_grad(dw, weight_grad, input, param_grad_dtype(w, input))};
}

template <class K>
void register_kernels(torch::Library& m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd<K>);
  m.impl("layer_norm_bwd", &layer_norm_bwd<K>);
  m.impl("rms_norm_fwd", &rms_norm_fwd<K>);
  m.impl("rms_norm_bwd", &rms_norm_bwd<K>);
  m.impl("layer_norm_2d_fwd", &layer_norm_2d_fwd<K>);
  m.impl("layer_norm_2d_bwd", &layer_norm_2d_bwd<K>);
  m.impl("rms_norm_2d_fwd", &rms_norm_2d_fwd<K>);
  m.impl("rms_norm_2d_bwd", &rms_norm_2d_bwd<K>);
}

}  // namespace layer_norm
}  // namespace bnext
