// The CPU implementation of the Batch Norm building blocks (see composite.h
// for the contract); Batch Renorm instantiates its operators with it too.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#include "bnext/activation.h"

namespace bnext {
namespace batch_norm {

struct CpuBackend {
  using Tensor = at::Tensor;
  struct DeviceGuard {
    explicit DeviceGuard(at::Device) {}
  };
  static std::tuple<Tensor, Tensor> stats(const Tensor& x);
  static Tensor elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                      const Tensor& shift);
  static Tensor normalize(const Tensor& x, const Tensor& mean, const Tensor& var,
                          const Tensor& weight, const Tensor& bias, double eps);
  static std::tuple<Tensor, Tensor> backward_reduce(const Tensor& dy, const Tensor& x,
                                                    const Tensor& mean);
  static Tensor backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                               const Tensor& a, const Tensor& k, const Tensor& c);
  static std::tuple<Tensor, Tensor> backward_normalize(const Tensor& dy, const Tensor& x,
                                                       const Tensor& mean, const Tensor& var,
                                                       const Tensor& weight, const Tensor& r,
                                                       const Tensor& d, const Tensor& sum_dy,
                                                       const Tensor& sum_dy_xmu, double eps,
                                                       bool training, int64_t count);

  // With an activation (contract: batch_norm_act/composite.h).
  static void act_elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                        const Tensor& shift, const Tensor& residual, act::Kind kind, double param,
                        const Tensor& out);
  static std::tuple<Tensor, Tensor, Tensor> act_backward_reduce(
      const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& scale,
      const Tensor& shift, const Tensor& residual, act::Kind kind, double param);
  static std::tuple<Tensor, Tensor> act_backward_sums(const Tensor& dy, const Tensor& x,
                                                      const Tensor& mean, const Tensor& scale,
                                                      const Tensor& shift, act::Kind kind,
                                                      double param);
  static Tensor act_backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                   const Tensor& scale, const Tensor& shift, const Tensor& a,
                                   const Tensor& k, const Tensor& c, act::Kind kind, double param);
  static std::tuple<Tensor, Tensor, Tensor> act_backward_reduce_from_output(
      const Tensor& dy, const Tensor& x, const Tensor& y, const Tensor& mean, act::Kind kind,
      double param);
  static std::tuple<Tensor, Tensor, Tensor> inplace_backward_reduce(const Tensor& dy,
                                                                    const Tensor& y,
                                                                    const Tensor& shift,
                                                                    const Tensor& inv_scale,
                                                                    act::Kind kind, double param);
  static Tensor inplace_backward_elemt(const Tensor& g, const Tensor& y, const Tensor& shift,
                                       const Tensor& inv_scale, const Tensor& a, const Tensor& k,
                                       const Tensor& c, act::Kind kind, double param);

  // Per-channel work is a few dozen flops: not worth a thread, but worth
  // vectors (channels are independent and write disjoint elements).
  template <typename F>
  static void for_each_channel(int64_t C, const F& f) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) f(c);
  }
};

}  // namespace batch_norm
}  // namespace bnext
