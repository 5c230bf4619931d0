#include "layer_norm/reference.h"

#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"

namespace bnext {
namespace layer_norm {
namespace reference {
namespace {

std::vector<int64_t> trailing_dims(const Tensor& x, int64_t n) {
  std::vector<int64_t> dims;
  for (int64_t d = x.dim() - n; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

Tensor opmath(const Tensor& x) { return x.is_complex() ? x : x.to(opmath_dtype(x.scalar_type())); }

// The statistics, kept with singleton trailing dims, as the op returns them.
Tensor row_stat(const Tensor& s, int64_t normalized_dims) {
  auto shape = s.sizes().vec();
  shape.resize(shape.size() - static_cast<size_t>(normalized_dims));
  return s.view(shape);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm(const Tensor& x, int64_t normalized_dims,
                                              const Tensor& weight, const Tensor& bias,
                                              double eps) {
  const Tensor xo = opmath(x);
  const auto dims = trailing_dims(x, normalized_dims);
  const Tensor mean = xo.mean(dims, /*keepdim=*/true);
  const Tensor xmu = xo - mean;
  const Tensor rstd = (xmu.square().mean(dims, /*keepdim=*/true) + eps).rsqrt();
  Tensor y = xmu * rstd;
  if (weight.defined()) y = y * opmath(weight);
  if (bias.defined()) y = y + opmath(bias);
  return {y.to(x.scalar_type()), row_stat(mean, normalized_dims), row_stat(rstd, normalized_dims)};
}

std::tuple<Tensor, Tensor> rms_norm(const Tensor& x, int64_t normalized_dims, const Tensor& weight,
                                    double eps) {
  const Tensor xo = opmath(x);
  const auto dims = trailing_dims(x, normalized_dims);
  const Tensor rstd = (xo.pow(2).mean(dims, /*keepdim=*/true) + eps).rsqrt();
  Tensor y = xo * rstd;
  if (weight.defined()) y = y * (x.is_complex() ? weight : opmath(weight));
  return {y.to(x.scalar_type()), row_stat(rstd, normalized_dims)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_2d(const Tensor& x, const Tensor& weight,
                                                 const Tensor& bias, double eps) {
  auto [y, mean, rstd] = layer_norm(x.movedim(1, -1), 1, weight, bias, eps);
  return {y.movedim(-1, 1), mean, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_2d(const Tensor& x, const Tensor& weight, double eps) {
  auto [y, rstd] = rms_norm(x.movedim(1, -1), 1, weight, eps);
  return {y.movedim(-1, 1), rstd};
}

}  // namespace reference
}  // namespace layer_norm
}  // namespace bnext
