// LayerNorm / RMSNorm over dim 1 of an NCHW-like input (the _2d ops'
// ChannelProblem, composite.h): CUDA kernels, their launch plan and
// CudaBackend's channel_forward / channel_backward. Included at the end of
// cuda_kernels.cuh, whose per-row helpers (statistics accumulators, the
// column merge kernel) it shares; the GPU counterpart of
// cpu_channel_kernels.h.
//
// The input is B planes of C rows of S contiguous values; the statistics of
// position q = b * S + s are over the C values x[b, :, s], S apart.
//   forward, dx: a block of 32 x Y threads takes a tile of 32 consecutive
//     positions (threadIdx.x), so that every load of a warp is one
//     contiguous run of a channel row; threadIdx.y splits the C channels
//     (y, y + Y, ...), so that few positions still give the GPU enough
//     threads. A thread adds its channels to a Welford accumulator
//     (LayerNorm, a chunk of loads at a time) or a sum of squares (RMSNorm);
//     dx's to sum(g) and sum(g * (x - mean)), g = dy * w. The Y partials of
//     a position merge by column_reduce, a fixed tree; its y == 0 thread
//     forms the statistics (or dx's coefficients) once and broadcasts them
//     through shared memory, and every thread then writes its channels of
//     the output. Both passes read the tile's C runs, the second mostly from
//     L1/L2. Blocks stride over the tiles, the grid capped at what the SMs
//     keep resident. Y is the power of two that fills the GPU with the
//     tiles there are, at most 16 and no more than the channels need (at
//     least 4 lanes where C allows: blocks of one warp leave SMs idle at
//     their block limit).
//   dweight/dbias: fused into the dx kernel, which has dy and x loaded: per
//     tile and channel, the warp that owns the channel (warp y = c % Y of the
//     block) sums its 32 positions' terms by a shuffle tree, and lane 0 adds
//     them into row blockIdx.x of a [grid, C] opmath buffer (written by the
//     block's first tile, then read-modify-written by the same thread: no
//     races, the tiles in order). A merge kernel (cuda_kernels.cuh's
//     column_merge_kernel) adds the grid's rows in a fixed order and rounds
//     16-bit gradients to their dtype; with one block the kernel writes
//     opmath dw_col / db_col directly. The cost: 10 (RMSNorm
//     5) shuffles per 32 elements, and per 32 elements one read and one write
//     of an opmath partial per sum, which stay in L2 (grid * C values); no
//     second read of dy and x by a separate column kernel (LayerNorm forward
//     + backward move 5 tensors, not 7). No atomics: the partition depends on
//     the shape and the SM count only, so results are bitwise reproducible on
//     one GPU model.
// Loads are scalar: a warp's run of a row is already one coalesced
// 64/128/256-byte segment, and vectors along s would tie the tiles to
// S's alignment. The arithmetic is the CPU kernels' (bnext/layer_norm_math.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "bnext/layer_norm_math.h"
#include "common/checks.h"
#include "common/cuda_launch.cuh"
#include "common/cuda_reduce.cuh"
#include "layer_norm/checks.h"
#include "layer_norm/cuda_backend.cuh"
#include "layer_norm/cuda_kernels.cuh"

namespace bnext {
namespace layer_norm {
namespace cuda_kernels {

// Channel lanes (blockDim.y): a power of two (column_reduce).
constexpr int kMaxChannelLanes = 16;
constexpr int kMinChannelLanes = 4;
constexpr int kMaxChannelThreads = cuda::kWarpSize * kMaxChannelLanes;
// Channels whose loads a thread has in flight per input.
constexpr int kChannelUnroll = 4;

// The lane's position q = b * S + s in the block's current tile. The tiles
// advance by the grid, gridDim.x * 32 positions, which the launch splits into
// (step_b, step_s): an add and a compare per tile rather than a 64-bit
// division, a subroutine call on the GPU whose calling convention spills.
struct ChannelCursor {
  int64_t b;
  int64_t s;
};

// The first tile's q is below the grid's stride (< 65535 * 32): a 32-bit
// division, inline.
__device__ __forceinline__ ChannelCursor first_position(int64_t S) {
  const uint32_t q = blockIdx.x * static_cast<uint32_t>(cuda::kWarpSize) + threadIdx.x;
  if (S > q) return {0, q};
  const uint32_t s32 = static_cast<uint32_t>(S);  // S <= q
  return {q / s32, q % s32};
}

template <class Args>
__device__ __forceinline__ void advance(ChannelCursor& at, const Args& a) {
  at.b += a.step_b;
  at.s += a.step_s;
  if (at.s >= a.S) {
    at.s -= a.S;
    ++at.b;
  }
}

// The flat position q and the offset of x[b, 0, s].
struct ChannelPosition {
  bool valid;  // q < B * S: lanes past the last position still reach every barrier and shuffle
  int64_t q;
  int64_t base;
};

template <class Args>
__device__ __forceinline__ ChannelPosition position_of(const ChannelCursor& at, const Args& a) {
  const int64_t q = at.b * a.S + at.s;
  if (q >= a.P) return {false, q, 0};
  return {true, q, at.b * a.C * a.S + at.s};
}

// Calls f(c0, n, v) for this thread's channels c = c0 + u * blockDim.y, u <
// n (<= kChannelUnroll), c0 = threadIdx.y, threadIdx.y + kChannelUnroll *
// blockDim.y, ...: v[i][u] is input i at (this position, c) in opmath, zero
// at a position past the last. The loop bound and n depend on threadIdx.y
// only, so f may shuffle within the warp.
template <int kInputs, typename scalar_t, class F>
__device__ __forceinline__ void visit_channels(const scalar_t* const (&in)[kInputs], bool valid,
                                               int64_t C, int64_t S, F&& f) {
  using T = at::opmath_type<scalar_t>;
  const int64_t step = blockDim.y;
  for (int64_t c0 = threadIdx.y; c0 < C; c0 += kChannelUnroll * step) {
    // Counted, not divided: a 64-bit division is a subroutine call on the GPU.
    int n = 0;
#pragma unroll
    for (int u = 0; u < kChannelUnroll; ++u) n += c0 + u * step < C ? 1 : 0;
    T v[kInputs][kChannelUnroll];
#pragma unroll
    for (int u = 0; u < kChannelUnroll; ++u) {
      const int64_t offset = (c0 + u * step) * S;
#pragma unroll
      for (int i = 0; i < kInputs; ++i)
        v[i][u] = valid && u < n ? static_cast<T>(in[i][offset]) : T(0);
    }
    f(c0, n, v);
  }
}

template <typename T>
__device__ __forceinline__ T param_at(const T* p, int64_t c, T fill) {
  return p != nullptr ? p[c] : fill;
}

// ------------------------------------------------------------------- forward

template <typename scalar_t>
struct ChannelForwardArgs {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  const T* w;  // may be null
  const T* b;  // may be null (always for RMSNorm)
  T* mean;     // null for RMSNorm
  T* rstd;
  int64_t P;  // positions, B * S
  int64_t C;
  int64_t S;
  T eps;
  int64_t step_b = 0;  // the grid's stride (set_steps)
  int64_t step_s = 0;
};

template <typename scalar_t, bool kCentred>
__global__ void __launch_bounds__(kMaxChannelThreads)
    channel_forward_kernel(ChannelForwardArgs<scalar_t> a) {
  using T = at::opmath_type<scalar_t>;
  using Acc = StatsAcc<T, kCentred>;
  BNEXT_SHARED(Acc, scratch, kMaxChannelThreads);
  BNEXT_SHARED(Pair<T>, shared_stats, cuda::kWarpSize);
  const int64_t tiles = cuda::ceil_div(a.P, cuda::kWarpSize);
  // The tile loop's bound is uniform over the block: every thread reaches the barriers.
  ChannelCursor at = first_position(a.S);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, advance(at, a)) {
    const ChannelPosition pos = position_of(at, a);
    const scalar_t* const in[1] = {a.x + pos.base};
    Acc acc{};
    visit_channels(in, pos.valid, a.C, a.S, [&](int64_t, int n, const T(&v)[1][kChannelUnroll]) {
      if (n == kChannelUnroll) {
        add_stats(acc, v[0]);  // one Welford division per chunk
      } else {
        // Unrolled with a guard, so that v stays in registers.
#pragma unroll
        for (int u = 0; u < kChannelUnroll; ++u) {
          if (u < n) {
            const T one[1] = {v[0][u]};
            add_stats(acc, one);
          }
        }
      }
    });
    acc = cuda::column_reduce(acc, StatsOp<kCentred>{}, scratch);
    // Every thread reads its position's pair before it can pass the next
    // tile's first barrier, after which the y == 0 thread alone rewrites it.
    if (threadIdx.y == 0) {
      const Pair<T> stats = row_stats(acc, a.C, a.eps);
      if (pos.valid) {
        if constexpr (kCentred) a.mean[pos.q] = stats.a;
        a.rstd[pos.q] = stats.b;
      }
      shared_stats[threadIdx.x] = stats;
    }
    __syncthreads();
    if (!pos.valid) continue;
    const Pair<T> stats = shared_stats[threadIdx.x];
    scalar_t* const y = a.y + pos.base;
    visit_channels(in, true, a.C, a.S, [&](int64_t c0, int n, const T(&v)[1][kChannelUnroll]) {
#pragma unroll
      for (int u = 0; u < kChannelUnroll; ++u) {
        if (u < n) {
          const int64_t c = c0 + u * blockDim.y;
          // The row kernels' order: (x - mean) * (rstd * w) + b.
          const T scale = stats.b * param_at(a.w, c, T(1));
          y[c * a.S] = static_cast<scalar_t>((v[0][u] - stats.a) * scale + param_at(a.b, c, T(0)));
        }
      }
    });
  }
}

// ------------------------------------------------------------------ backward

template <typename scalar_t>
struct ChannelBackwardArgs {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const T* mean;  // null for RMSNorm
  const T* rstd;
  const T* w;  // may be null
  scalar_t* dx;
  int64_t P;
  int64_t C;
  int64_t S;
  int64_t step_b = 0;  // the grid's stride (set_steps)
  int64_t step_s = 0;
  // With kColumns: row blockIdx.x of these [gridDim.x, C] buffers gets the
  // block's dweight (and dbias) sums.
  T* dw_parts = nullptr;
  T* db_parts = nullptr;  // null for RMSNorm
};

// The warp's terms of channel c summed over its 32 positions into the block's
// partial row, by lane 0; `first` on the block's first tile, which writes it.
template <bool kCentred, typename scalar_t>
__device__ __forceinline__ void add_channel_terms(const ChannelBackwardArgs<scalar_t>& a,
                                                  bool first, int64_t c,
                                                  at::opmath_type<scalar_t> dw_term,
                                                  at::opmath_type<scalar_t> db_term) {
  using T = at::opmath_type<scalar_t>;
  const T dw = cuda::warp_reduce(dw_term, cuda::SumOp{});
  const T db = kCentred ? cuda::warp_reduce(db_term, cuda::SumOp{}) : T(0);
  if (threadIdx.x != 0) return;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * a.C + c;
  a.dw_parts[slot] = first ? dw : a.dw_parts[slot] + dw;
  if constexpr (kCentred) a.db_parts[slot] = first ? db : a.db_parts[slot] + db;
}

template <typename scalar_t, bool kCentred, bool kColumns>
__global__ void __launch_bounds__(kMaxChannelThreads)
    channel_backward_kernel(ChannelBackwardArgs<scalar_t> a) {
  using T = at::opmath_type<scalar_t>;
  using Acc = GradAcc<T, kCentred>;
  BNEXT_SHARED(Acc, scratch, kMaxChannelThreads);
  BNEXT_SHARED(RowBackwardCoeffs<T>, shared_coeffs, cuda::kWarpSize);
  const int64_t tiles = cuda::ceil_div(a.P, cuda::kWarpSize);
  ChannelCursor at = first_position(a.S);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, advance(at, a)) {
    const ChannelPosition pos = position_of(at, a);
    // Zeros past the last position: its terms of the column sums vanish.
    const T m = kCentred && pos.valid ? a.mean[pos.q] : T(0);
    const T rstd = pos.valid ? a.rstd[pos.q] : T(0);
    const scalar_t* const in[2] = {a.dy + pos.base, a.x + pos.base};
    Acc acc{};
    visit_channels(in, pos.valid, a.C, a.S, [&](int64_t c0, int n, const T(&v)[2][kChannelUnroll]) {
#pragma unroll
      for (int u = 0; u < kChannelUnroll; ++u) {
        if (u < n) {
          const T w = param_at(a.w, c0 + u * blockDim.y, T(1));
          add_grad(acc, v[0][u] * w, v[1][u] - m);
        }
      }
    });
    acc = cuda::column_reduce(acc, GradOp<kCentred>{}, scratch);
    // As the forward's broadcast: read before the next tile's first barrier.
    if (threadIdx.y == 0) {
      const Pair<T> sums = grad_sums(acc);
      shared_coeffs[threadIdx.x] = row_backward_coeffs(rstd, sums.a, sums.b, a.C, kCentred);
    }
    __syncthreads();
    // Lanes past the last position stay for the shuffles of the column sums.
    if (!kColumns && !pos.valid) continue;
    const RowBackwardCoeffs<T> co = shared_coeffs[threadIdx.x];
    scalar_t* const dx = a.dx + pos.base;
    const bool first = tile == blockIdx.x;
    visit_channels(in, pos.valid, a.C, a.S, [&](int64_t c0, int n, const T(&v)[2][kChannelUnroll]) {
#pragma unroll
      for (int u = 0; u < kChannelUnroll; ++u) {
        if (u < n) {
          const int64_t c = c0 + u * blockDim.y;
          const T d = v[0][u];
          const T xmu = v[1][u] - m;
          if (pos.valid) {
            dx[c * a.S] =
                static_cast<scalar_t>(row_backward_dx(co, d * param_at(a.w, c, T(1)), xmu));
          }
          // The CPU kernels' order: (dy * (x - mean)) * rstd.
          if constexpr (kColumns) add_channel_terms<kCentred>(a, first, c, d * xmu * rstd, d);
        }
      }
    });
  }
}

// ------------------------------------------------------------------ launches

struct ChannelPlan {
  dim3 grid;
  dim3 block;
};

template <typename Kernel>
ChannelPlan channel_plan(int64_t P, int64_t C, Kernel kernel) {
  const int64_t tiles = cuda::ceil_div(P, cuda::kWarpSize);
  const int most = cuda::pow2_at_least(C, kMaxChannelLanes);
  const int64_t wanted = cuda::ceil_div(cuda::num_sms() * kThreadsPerSm, tiles * cuda::kWarpSize);
  const int lanes = std::clamp(cuda::pow2_at_least(wanted, kMaxChannelLanes),
                               std::min(kMinChannelLanes, most), most);
  const int threads = cuda::kWarpSize * lanes;
  // The tiles stride over the grid: as many blocks as the SMs keep resident
  // (the kernel's registers decide).
  const int64_t per_sm = cuda::resident_blocks(kernel, threads);
  const int64_t blocks = std::min({tiles, cuda::num_sms() * per_sm, cuda::max_grid_x()});
  return {dim3(static_cast<unsigned>(blocks)),
          dim3(static_cast<unsigned>(cuda::kWarpSize), static_cast<unsigned>(lanes))};
}

// The grid's stride over the positions in planes and positions (ChannelCursor).
template <class Args>
void set_steps(Args& a, const ChannelPlan& plan) {
  const int64_t stride = static_cast<int64_t>(plan.grid.x) * cuda::kWarpSize;
  a.step_b = stride / a.S;
  a.step_s = stride % a.S;
}

template <typename scalar_t, bool kCentred>
void launch_channel_forward(ChannelForwardArgs<scalar_t> a) {
  const auto kernel = channel_forward_kernel<scalar_t, kCentred>;
  const ChannelPlan plan = channel_plan(a.P, a.C, kernel);
  set_steps(a, plan);
  cuda::launch(kernel, plan.grid, plan.block, a);
}

// dx, and with `columns` dw_col (and db_col): from the kernel directly when
// its grid is one block and the sums are opmath, else through the [grid, C]
// partials and their merge (ColumnOut).
template <typename scalar_t, bool kCentred>
void launch_channel_backward(ChannelBackwardArgs<scalar_t> a, bool columns, Tensor& dw_col,
                             Tensor& db_col) {
  const auto kernel = columns ? channel_backward_kernel<scalar_t, kCentred, true>
                              : channel_backward_kernel<scalar_t, kCentred, false>;
  const ChannelPlan plan = channel_plan(a.P, a.C, kernel);
  set_steps(a, plan);
  if (!columns) {
    cuda::launch(kernel, plan.grid, plan.block, a);
    return;
  }
  // Block b writes row b of the sums (each block has a tile).
  ColumnOut<scalar_t, kCentred> out(plan.grid.x, a.C, dw_col, db_col);
  a.dw_parts = out.dw;
  a.db_parts = out.db;
  cuda::launch(kernel, plan.grid, plan.block, a);
  out.template merge<1>();
}

}  // namespace cuda_kernels

// ------------------------------------------------------------------- backend

template <bool kCentred>
void CudaBackend::channel_forward(const ChannelProblem& p, double eps, Tensor& out, Tensor& mean,
                                  Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "bnext_norm_2d_fwd_cuda", [&] {
                                    using T = at::opmath_type<scalar_t>;
                                    const cuda_kernels::ChannelForwardArgs<scalar_t> a{
                                        p.x.const_data_ptr<scalar_t>(),
                                        out.mutable_data_ptr<scalar_t>(),
                                        data_or_null<T>(p.w),
                                        kCentred ? data_or_null<T>(p.b) : nullptr,
                                        kCentred ? mean.mutable_data_ptr<T>() : nullptr,
                                        rstd.mutable_data_ptr<T>(),
                                        p.B * p.S,
                                        p.C,
                                        p.S,
                                        static_cast<T>(eps)};
                                    cuda_kernels::launch_channel_forward<scalar_t, kCentred>(a);
                                  });
}

template <bool kCentred>
void CudaBackend::channel_backward(const ChannelProblem& p, const Tensor& mean, const Tensor& rstd,
                                   bool columns, Tensor& dx, Tensor& dw_col, Tensor& db_col) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "bnext_norm_2d_bwd_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        const cuda_kernels::ChannelBackwardArgs<scalar_t> a{
            p.dy.const_data_ptr<scalar_t>(),
            p.x.const_data_ptr<scalar_t>(),
            kCentred ? mean.const_data_ptr<T>() : nullptr,
            rstd.const_data_ptr<T>(),
            data_or_null<T>(p.w),
            dx.mutable_data_ptr<scalar_t>(),
            p.B * p.S,
            p.C,
            p.S};
        cuda_kernels::launch_channel_backward<scalar_t, kCentred>(a, columns, dw_col, db_col);
      });
}

}  // namespace layer_norm
}  // namespace bnext
