// LayerNorm / RMSNorm CUDA kernels.
//   forward, dx: one block per row (grid-stride over rows), per-thread Welford
//     or sum of squares, block reductions from common/cuda_reduce.cuh, the row
//     statistics broadcast through shared memory.
//   dweight/dbias: column sums over rows. Every (column, row-part) gets a
//     partial sum in a fixed row order, then a second kernel adds the parts in
//     a fixed order: no atomics, so the result is bitwise reproducible.
// The arithmetic is the CPU's (bnext/layer_norm_math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "bnext/layer_norm_math.h"
#include "bnext/welford.h"
#include "common/cuda_reduce.cuh"
#include "layer_norm/operators.h"
#include "layer_norm/prepare.h"

namespace bnext {
namespace layer_norm {
namespace {

// gridDim.y and the portable gridDim.x limit; loops stride over the rest.
constexpr int64_t kMaxGrid = 65535;
constexpr int kColumnThreads = 256;
// Rows per column partial at least this many, so each thread does real work.
constexpr int64_t kMinRowsPerPart = 32;
constexpr int64_t kMaxParts = 1024;

// Enough threads to cover a row in a few strides, a multiple of the warp size.
int row_threads(int64_t N) {
  if (N <= 32) return 32;
  if (N <= 256) return 64;
  if (N <= 1024) return 128;
  if (N <= 4096) return 256;
  return 512;
}

unsigned grid_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxGrid, (items + per_block - 1) / per_block)));
}

template <typename T>
__device__ __forceinline__ T weight_at(const T* w, int64_t i) {
  return w != nullptr ? w[i] : T(1);
}

// ------------------------------------------------------------------- forward

template <typename scalar_t, bool kCentred>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* w,
                               const at::opmath_type<scalar_t>* b, scalar_t* __restrict__ y,
                               at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* rstd,
                               int64_t M, int64_t N, at::opmath_type<scalar_t> eps) {
  using T = at::opmath_type<scalar_t>;
  // Raw storage: a __shared__ Welford<T>[] would need a (forbidden) initialiser.
  __shared__ __align__(16) unsigned char scratch[cuda::kWarpSize * sizeof(Welford<T>)];
  __shared__ T row_mean;
  __shared__ T row_rstd;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const scalar_t* xr = x + r * N;
    if constexpr (kCentred) {
      Welford<T> acc;
      for (int64_t i = threadIdx.x; i < N; i += blockDim.x) welford_push(acc, static_cast<T>(xr[i]));
      acc = cuda::block_reduce(acc, cuda::WelfordOp(), reinterpret_cast<Welford<T>*>(scratch),
                               Welford<T>());
      if (threadIdx.x == 0) {
        row_mean = acc.mean;
        row_rstd = layer_norm_rstd(acc, eps);
        mean[r] = row_mean;
        rstd[r] = row_rstd;
      }
    } else {
      T sum_sq = T(0);
      for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
        const T v = static_cast<T>(xr[i]);
        sum_sq += v * v;
      }
      sum_sq = cuda::block_reduce(sum_sq, cuda::SumOp(), reinterpret_cast<T*>(scratch), T(0));
      if (threadIdx.x == 0) {
        row_mean = T(0);
        row_rstd = rms_norm_rstd(sum_sq, N, eps);
        rstd[r] = row_rstd;
      }
    }
    __syncthreads();
    const T m = row_mean;
    const T s = row_rstd;
    scalar_t* yr = y + r * N;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      // Same order of operations as the CPU kernel: (x - mean) * (rstd * w) + b.
      T v = (static_cast<T>(xr[i]) - m) * (s * weight_at(w, i));
      if (b != nullptr) v += b[i];
      yr[i] = static_cast<scalar_t>(v);
    }
    // row_mean/row_rstd are rewritten for the next row.
    __syncthreads();
  }
}

// ------------------------------------------------------------------ backward

template <typename scalar_t, bool kCentred>
__global__ void backward_dx_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                   const at::opmath_type<scalar_t>* mean,
                                   const at::opmath_type<scalar_t>* rstd,
                                   const at::opmath_type<scalar_t>* w, scalar_t* __restrict__ dx,
                                   int64_t M, int64_t N) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T scratch[cuda::kWarpSize];
  __shared__ T row_sum_g;
  __shared__ T row_sum_g_xmu;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const scalar_t* xr = x + r * N;
    const scalar_t* dyr = dy + r * N;
    const T m = kCentred ? mean[r] : T(0);
    T sum_g = T(0);
    T sum_g_xmu = T(0);
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const T g = static_cast<T>(dyr[i]) * weight_at(w, i);
      sum_g += g;
      sum_g_xmu += g * (static_cast<T>(xr[i]) - m);
    }
    if constexpr (kCentred) sum_g = cuda::block_reduce(sum_g, cuda::SumOp(), scratch, T(0));
    sum_g_xmu = cuda::block_reduce(sum_g_xmu, cuda::SumOp(), scratch, T(0));
    if (threadIdx.x == 0) {
      row_sum_g = sum_g;
      row_sum_g_xmu = sum_g_xmu;
    }
    __syncthreads();
    const auto co = row_backward_coeffs(rstd[r], row_sum_g, row_sum_g_xmu, N, kCentred);
    scalar_t* dxr = dx + r * N;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const T g = static_cast<T>(dyr[i]) * weight_at(w, i);
      dxr[i] = static_cast<scalar_t>(row_backward_dx(co, g, static_cast<T>(xr[i]) - m));
    }
    // row_sum_g/row_sum_g_xmu are rewritten for the next row.
    __syncthreads();
  }
}

// Partial column sums over rows [part * rows_per_part, ...): consecutive
// threads take consecutive columns, so every row read is coalesced.
template <typename scalar_t, bool kCentred>
__global__ void column_partials_kernel(const scalar_t* __restrict__ dy,
                                       const scalar_t* __restrict__ x,
                                       const at::opmath_type<scalar_t>* mean,
                                       const at::opmath_type<scalar_t>* rstd,
                                       at::opmath_type<scalar_t>* dw_parts,
                                       at::opmath_type<scalar_t>* db_parts, int64_t M, int64_t N,
                                       int64_t rows_per_part) {
  using T = at::opmath_type<scalar_t>;
  const int64_t part = blockIdx.y;
  const int64_t r0 = part * rows_per_part;
  const int64_t r1 = r0 + rows_per_part < M ? r0 + rows_per_part : M;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < N; c += stride) {
    T dw = T(0);
    T db = T(0);
    for (int64_t r = r0; r < r1; ++r) {
      const T d = static_cast<T>(dy[r * N + c]);
      const T xmu = static_cast<T>(x[r * N + c]) - (kCentred ? mean[r] : T(0));
      dw += d * xmu * rstd[r];
      if constexpr (kCentred) db += d;
    }
    dw_parts[part * N + c] = dw;
    if constexpr (kCentred) db_parts[part * N + c] = db;
  }
}

template <typename T>
__global__ void column_merge_kernel(const T* parts, T* out, int64_t num_parts, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < N; c += stride) {
    T sum = T(0);
    for (int64_t p = 0; p < num_parts; ++p) sum += parts[p * N + c];
    out[c] = sum;
  }
}

template <typename scalar_t, bool kCentred>
void column_sums(const RowProblem& p, const Tensor& mean, const Tensor& rstd, Tensor& dw_col,
                 Tensor& db_col) {
  using T = at::opmath_type<scalar_t>;
  if (p.N == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t by_memory = std::max<int64_t>(1, (int64_t(1) << 24) / p.N);
  const int64_t parts = std::max<int64_t>(
      1, std::min({(p.M + kMinRowsPerPart - 1) / kMinRowsPerPart, kMaxParts, by_memory}));
  const int64_t rows_per_part = (p.M + parts - 1) / parts;
  Tensor dw_parts = at::empty({parts, p.N}, rstd.options());
  Tensor db_parts = kCentred ? at::empty({parts, p.N}, rstd.options()) : Tensor();
  const dim3 grid(grid_for(p.N, kColumnThreads), static_cast<unsigned>(parts));
  column_partials_kernel<scalar_t, kCentred><<<grid, kColumnThreads, 0, stream>>>(
      p.dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), data_or_null<T>(mean),
      rstd.const_data_ptr<T>(), dw_parts.mutable_data_ptr<T>(),
      kCentred ? db_parts.mutable_data_ptr<T>() : nullptr, p.M, p.N, rows_per_part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned merge_grid = grid_for(p.N, kColumnThreads);
  column_merge_kernel<T><<<merge_grid, kColumnThreads, 0, stream>>>(
      dw_parts.const_data_ptr<T>(), dw_col.mutable_data_ptr<T>(), parts, p.N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (kCentred) {
    column_merge_kernel<T><<<merge_grid, kColumnThreads, 0, stream>>>(
        db_parts.const_data_ptr<T>(), db_col.mutable_data_ptr<T>(), parts, p.N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

// ------------------------------------------------------------------- backend

struct CudaKernels {
  // A CPU input can land here when a parameter is on the GPU; leaving the
  // device alone then lets the argument checks report the mismatch.
  struct DeviceGuard {
    explicit DeviceGuard(at::Device device) {
      if (device.is_cuda()) guard.emplace(device);
    }
    std::optional<c10::cuda::CUDAGuard> guard;
  };

  template <bool kCentred>
  static void forward(const RowProblem& p, double eps, Tensor& out, Tensor& mean, Tensor& rstd) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    const int threads = row_threads(p.N);
    const unsigned grid = grid_for(p.M, 1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "bnext_norm_fwd_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      forward_kernel<scalar_t, kCentred><<<grid, threads, 0, stream>>>(
          p.x.const_data_ptr<scalar_t>(), data_or_null<T>(p.w), data_or_null<T>(p.b),
          out.mutable_data_ptr<scalar_t>(), kCentred ? mean.mutable_data_ptr<T>() : nullptr,
          rstd.mutable_data_ptr<T>(), p.M, p.N, static_cast<T>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  template <bool kCentred>
  static void backward(const RowProblem& p, const Tensor& mean, const Tensor& rstd, bool columns,
                       Tensor& dx, Tensor& dw_col, Tensor& db_col) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    const int threads = row_threads(p.N);
    const unsigned grid = grid_for(p.M, 1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "bnext_norm_bwd_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      backward_dx_kernel<scalar_t, kCentred><<<grid, threads, 0, stream>>>(
          p.dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), data_or_null<T>(mean),
          rstd.const_data_ptr<T>(), data_or_null<T>(p.w), dx.mutable_data_ptr<scalar_t>(), p.M, p.N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (columns) column_sums<scalar_t, kCentred>(p, mean, rstd, dw_col, db_col);
    });
  }
};

TORCH_LIBRARY_IMPL(bnext, CUDA, m) {
  register_kernels<CudaKernels>(m);
}

}  // namespace layer_norm
}  // namespace bnext
