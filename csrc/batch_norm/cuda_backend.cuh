// The CUDA implementation of the Batch Norm building blocks (see composite.h
// for the contract); the kernels are in cuda_kernels.cuh. CUDA-only: include
// it from .cu files (or the emulator's module), never from the CPU build.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "bnext/activation.h"

#include "common/cuda_launch.cuh"

namespace bnext {
namespace batch_norm {

namespace cuda_detail {

template <typename F>
__global__ void for_each_channel_kernel(int64_t C, F f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += stride) {
    f(c);
  }
}

}  // namespace cuda_detail

struct CudaBackend {
  using Tensor = at::Tensor;

  using DeviceGuard = cuda::DeviceGuard;

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

  // With an activation (contract: batch_norm_act/composite.h). Templates
  // (Unit is never given) so that only a unit that calls them compiles their
  // kernels, an instantiation per activation: batch_norm_act/cuda_kernels.cu,
  // not Batch Norm's own cuda_kernels.cu, which includes the same header.
  template <typename Unit = void>
  static void act_elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                        const Tensor& shift, const Tensor& residual, act::Kind kind, double param,
                        const Tensor& out);
  template <typename Unit = void>
  static std::tuple<Tensor, Tensor, Tensor> act_backward_reduce(
      const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& scale,
      const Tensor& shift, const Tensor& residual, act::Kind kind, double param);
  template <typename Unit = void>
  static std::tuple<Tensor, Tensor> act_backward_sums(const Tensor& dy, const Tensor& x,
                                                      const Tensor& mean, const Tensor& scale,
                                                      const Tensor& shift, act::Kind kind,
                                                      double param);
  template <typename Unit = void>
  static Tensor act_backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                   const Tensor& scale, const Tensor& shift, const Tensor& a,
                                   const Tensor& k, const Tensor& c, act::Kind kind, double param);
  // g = dy * act'(u) from the output y (piecewise linear activations), and
  // the sums of g and g * (x - mean).
  template <typename Unit = void>
  static std::tuple<Tensor, Tensor, Tensor> act_backward_reduce_from_output(
      const Tensor& dy, const Tensor& x, const Tensor& y, const Tensor& mean, act::Kind kind,
      double param);
  template <typename Unit = void>
  static std::tuple<Tensor, Tensor, Tensor> inplace_backward_reduce(const Tensor& dy,
                                                                    const Tensor& y,
                                                                    const Tensor& shift,
                                                                    const Tensor& inv_scale,
                                                                    act::Kind kind, double param);
  template <typename Unit = void>
  static Tensor inplace_backward_elemt(const Tensor& g, const Tensor& y, const Tensor& shift,
                                       const Tensor& inv_scale, const Tensor& a, const Tensor& k,
                                       const Tensor& c, act::Kind kind, double param);

  // Per-channel coefficients: a few flops per channel, so one thread each.
  template <typename F>
  static void for_each_channel(int64_t C, const F& f) {
    if (C <= 0) return;
    constexpr int kThreads = 256;
    const int64_t blocks = std::min<int64_t>(cuda::ceil_div(C, kThreads), 1024);
    cuda::launch(cuda_detail::for_each_channel_kernel<F>, dim3(static_cast<unsigned>(blocks)),
                 dim3(kThreads), C, f);
  }
};

}  // namespace batch_norm
}  // namespace bnext
