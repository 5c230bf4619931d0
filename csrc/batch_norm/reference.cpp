#include "batch_norm/reference.h"

#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"

namespace bnext {
namespace batch_norm {
namespace reference {
namespace {

// Every dimension but the channels'.
std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

// A per-channel (C,) vector shaped to broadcast against x, in x's opmath dtype.
Tensor per_channel(const Tensor& v, const Tensor& x) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[1] = x.size(1);
  return v.to(opmath_dtype(x.scalar_type())).view(shape);
}

Tensor opmath(const Tensor& x) { return x.to(opmath_dtype(x.scalar_type())); }

Tensor affine(Tensor y, const Tensor& x, const Tensor& weight, const Tensor& bias) {
  if (weight.defined()) y = y * per_channel(weight, x);
  if (bias.defined()) y = y + per_channel(bias, x);
  return y.to(x.scalar_type());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> train(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                         double eps, const Tensor& r, const Tensor& d) {
  const Tensor xo = opmath(x);
  const auto dims = reduce_dims(x);
  const Tensor mean = xo.mean(dims, /*keepdim=*/true);
  const Tensor xmu = xo - mean;
  const Tensor var = xmu.square().mean(dims, /*keepdim=*/true);
  Tensor xhat = xmu * (var + eps).rsqrt();
  if (r.defined()) xhat = xhat * per_channel(r, x).detach() + per_channel(d, x).detach();
  return {affine(xhat, x, weight, bias), mean.flatten(), var.flatten()};
}

Tensor infer(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& weight,
             const Tensor& bias, double eps) {
  const Tensor xhat = (opmath(x) - per_channel(mean, x)) * (per_channel(var, x) + eps).rsqrt();
  return affine(xhat, x, weight, bias);
}

std::tuple<Tensor, Tensor> stats(const Tensor& x) {
  const Tensor xo = opmath(x);
  const auto dims = reduce_dims(x);
  const Tensor mean = xo.mean(dims, /*keepdim=*/true);
  return {mean.flatten(), (xo - mean).square().mean(dims).flatten()};
}

Tensor elemt(const Tensor& x, const Tensor& mean, const Tensor& scale, const Tensor& shift) {
  return ((opmath(x) - per_channel(mean, x)) * per_channel(scale, x) + per_channel(shift, x))
      .to(x.scalar_type());
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& dy, const Tensor& x, const Tensor& mean) {
  const auto dims = reduce_dims(x);
  const Tensor dyo = opmath(dy);
  return {dyo.sum(dims), (dyo * (opmath(x) - per_channel(mean, x))).sum(dims)};
}

Tensor backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& a,
                      const Tensor& k, const Tensor& c) {
  return (per_channel(a, x) * opmath(dy) + per_channel(k, x) * (opmath(x) - per_channel(mean, x)) +
          per_channel(c, x))
      .to(x.scalar_type());
}

}  // namespace reference
}  // namespace batch_norm
}  // namespace bnext
