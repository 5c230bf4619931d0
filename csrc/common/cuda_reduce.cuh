// Warp and block reductions for CUDA kernels: sums and Welford triples
// (merged with bnext::welford_merge, the same code the CPU kernels run).
#pragma once

#include <cuda_runtime.h>

#include "bnext/welford.h"

namespace bnext {
namespace cuda {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int offset) {
  return __shfl_down_sync(0xffffffffu, v, offset);
}

template <typename T>
__device__ __forceinline__ Welford<T> shfl_down(const Welford<T>& w, int offset) {
  Welford<T> out;
  out.mean = shfl_down(w.mean, offset);
  out.m2 = shfl_down(w.m2, offset);
  out.count = static_cast<int64_t>(shfl_down(static_cast<long long>(w.count), offset));
  return out;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

struct WelfordOp {
  template <typename T>
  __device__ __forceinline__ Welford<T> operator()(const Welford<T>& a, const Welford<T>& b) const {
    return welford_merge(a, b);
  }
};

// The combined value of the 32 lanes ends up in lane 0.
template <typename T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = op(v, shfl_down(v, offset));
  return v;
}

// Reduction over a 1-D block (blockDim.x a multiple of 32, at most 1024);
// the result is valid in thread 0. `scratch` holds at least 32 values.
// Ends with a barrier so that `scratch` may be reused right away.
template <typename T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch, const T& identity) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : identity;
    v = warp_reduce(v, op);
  }
  __syncthreads();
  return v;
}

}  // namespace cuda
}  // namespace bnext
