// Warp and block reductions for CUDA kernels: sums and Welford triples
// (merged with bnext::welford_merge, the same code the CPU kernels run).
#pragma once

#include "bnext/welford.h"
#include "common/cuda_launch.cuh"

namespace bnext {
namespace cuda {

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

// Two sums reduced together (the backward pass needs sum dy and sum dy * (x - mean)).
template <typename T>
struct Pair {
  T a;
  T b;
};

template <typename T>
__device__ __forceinline__ Pair<T> shfl_down(const Pair<T>& p, int offset) {
  return {shfl_down(p.a, offset), shfl_down(p.b, offset)};
}

struct PairSumOp {
  template <typename T>
  __device__ __forceinline__ Pair<T> operator()(const Pair<T>& x, const Pair<T>& y) const {
    return {x.a + y.a, x.b + y.b};
  }
};

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
// the result is valid in thread 0. `scratch` (a BNEXT_SHARED array) holds at
// least 32 values. Ends with a barrier so that `scratch` may be reused right away.
template <typename T, class Op, class Shared>
__device__ __forceinline__ T block_reduce(T v, Op op, Shared scratch, const T& identity) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? static_cast<T>(scratch[lane]) : identity;
    v = warp_reduce(v, op);
  }
  __syncthreads();
  return v;
}

// Reduction over threadIdx.y of a 2-D block, separately for every column
// threadIdx.x (blockDim.y a power of two). A fixed tree, so the result does not
// depend on scheduling; it is valid in the threads with threadIdx.y == 0.
// `scratch` (a BNEXT_SHARED array) holds blockDim.x * blockDim.y values. Ends
// with a barrier so that `scratch` may be reused right away.
template <typename T, class Op, class Shared>
__device__ __forceinline__ T column_reduce(T v, Op op, Shared scratch) {
  const int idx = threadIdx.y * blockDim.x + threadIdx.x;
  scratch[idx] = v;
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
    if (threadIdx.y < stride) {
      scratch[idx] =
          op(static_cast<T>(scratch[idx]), static_cast<T>(scratch[idx + stride * blockDim.x]));
    }
    __syncthreads();
  }
  if (threadIdx.y == 0) v = scratch[idx];
  __syncthreads();
  return v;
}

}  // namespace cuda
}  // namespace bnext
