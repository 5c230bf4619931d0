// LayerNorm / RMSNorm CUDA kernels, their launch plans and the methods of
// CudaBackend (cuda_backend.cuh) that run them: the GPU counterpart of
// cpu_kernels.cpp. Included by exactly one translation unit of a binary:
// cuda_kernels.cu (nvcc), or the CPU emulator's module (emulator/module.cpp),
// which runs these same kernels in the tests.
//
// The input is M rows of N contiguous values.
//   forward, dx: short rows (N <= kMaxShortRow) go to groups of G lanes of a
//     warp, G the power of two that gives every lane about one 16-byte vector
//     (up to 32, then several per lane), so a block holds many rows and the
//     row statistics are merged by shuffles alone; long rows get a block each
//     and a block reduction. A lane adds one vector at a time to its Welford
//     accumulator (one division per vector) or sum, with several vector loads
//     in flight; the row's statistics are formed once by the group's or
//     block's first thread and broadcast, so every lane applies the same
//     values. Rows that are not 16-byte aligned, or whose length is not a
//     multiple of the vector, take the same kernels with scalar loads.
//   dweight/dbias: column sums over the rows, fused into the dx kernels: a
//     thread visits the same column vectors of every row it takes (lane g of
//     a group vectors g, g + G, ...; thread t of a long row's block t, t +
//     blockDim, ...), so it adds their terms in registers while it has dy and
//     x loaded for dx, and the second read of both by separate column
//     kernels goes away (LayerNorm forward + backward: 5 tensor passes, not
//     7). At the end a block merges its row groups' sums in a fixed order and
//     writes one partial row; a merge kernel adds the gridDim.x rows (none
//     with one block) and writes 16-bit parameters' gradients in their
//     dtype, so that no cast launch follows. The registers bound a thread's
//     columns (kernels templated on KV, its most vectors): float64 and rows
//     over the budget (kFusedColumnValues) keep the separate column kernels,
//     where block (tile, part) adds 32 vectors of columns over its part of
//     the rows with coalesced loads, 8 row lanes each summing a strided
//     subset in order, merged by a fixed shared-memory tree, then a second
//     kernel merges the parts the same way (none when one part suffices and
//     the sums are opmath). No atomics: the partition depends on the shape
//     and the SM count only, so results are bitwise reproducible on one GPU
//     model.
// The arithmetic is the CPU kernels' (bnext/layer_norm_math.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "bnext/layer_norm_math.h"
#include "bnext/welford.h"
#include "common/checks.h"
#include "common/cuda_launch.cuh"
#include "common/cuda_reduce.cuh"
#include "common/cuda_vec.cuh"
#include "layer_norm/checks.h"
#include "layer_norm/cuda_backend.cuh"

namespace bnext {
namespace layer_norm {
namespace cuda_kernels {

using cuda::Pair;
using cuda::Vec;

// Rows of at most this many values go to groups of lanes within a warp.
constexpr int64_t kMaxShortRow = 1024;
constexpr int kShortRowThreads = 256;
constexpr int kMinLongRowThreads = 128;
constexpr int kMaxLongRowThreads = 512;
// Threads one SM keeps resident at most (sm_80 / sm_90), whatever the
// kernel: what the channel plans spread a tile's lanes over.
constexpr int64_t kThreadsPerSm = 2048;
// Vector loads in flight per thread and input: 4, but at most 16 values, so
// that the 8-value vectors of 2-byte types (converted to float) do not push a
// kernel to 128 registers and a quarter of an SM's threads.
template <int VEC>
constexpr int unroll_for() {
  return VEC <= 4 ? 4 : 16 / VEC;
}

// Column sums: 32 threads of VEC columns (one warp's coalesced row segment)
// by 8 row lanes.
constexpr int kColumnTile = 32;
constexpr int kColumnLanes = 8;  // a power of two (column_reduce)
constexpr int kColumnThreads = kColumnTile * kColumnLanes;
// A part spans at least this many rows, so each thread sums a few.
constexpr int64_t kMinRowsPerPart = 128;

// ----------------------------------------------------------- per-row values
// What a lane accumulates over its share of a row: LayerNorm's forward a
// Welford triple, RMSNorm's a sum of squares; the backward sum(g) and
// sum(g * (x - mean)) (RMSNorm only the latter), g = dy * w.

template <typename T, bool kCentred>
using StatsAcc = std::conditional_t<kCentred, Welford<T>, T>;
template <bool kCentred>
using StatsOp = std::conditional_t<kCentred, cuda::WelfordOp, cuda::SumOp>;

template <typename T, bool kCentred>
using GradAcc = std::conditional_t<kCentred, Pair<T>, T>;
template <bool kCentred>
using GradOp = std::conditional_t<kCentred, cuda::PairSumOp, cuda::SumOp>;

template <typename T, int K>
__device__ __forceinline__ void add_stats(Welford<T>& acc, const T (&v)[K]) {
  if constexpr (K == 1) {
    welford_push(acc, v[0]);
  } else {
    welford_push_chunk(acc, v);
  }
}

// Squares are non-negative: no cancellation, so a plain sum is accurate.
template <typename T, int K>
__device__ __forceinline__ void add_stats(T& acc, const T (&v)[K]) {
#pragma unroll
  for (int e = 0; e < K; ++e) acc += v[e] * v[e];
}

template <typename T>
__device__ __forceinline__ void add_grad(Pair<T>& acc, T g, T xmu) {
  acc.a += g;
  acc.b += g * xmu;
}

template <typename T>
__device__ __forceinline__ void add_grad(T& acc, T g, T xmu) {
  acc += g * xmu;
}

// (mean, rstd) of a row from its accumulated statistics.
template <typename T>
__device__ __forceinline__ Pair<T> row_stats(const Welford<T>& acc, int64_t /*n*/, T eps) {
  return {acc.mean, layer_norm_rstd(acc, eps)};
}

template <typename T>
__device__ __forceinline__ Pair<T> row_stats(T sum_sq, int64_t n, T eps) {
  return {T(0), rms_norm_rstd(sum_sq, n, eps)};
}

// (sum g, sum g * (x - mean)) of a row.
template <typename T>
__device__ __forceinline__ Pair<T> grad_sums(const Pair<T>& acc) {
  return acc;
}

template <typename T>
__device__ __forceinline__ Pair<T> grad_sums(T sum_g_xmu) {
  return {T(0), sum_g_xmu};
}

// ------------------------------------------------------------- row helpers

// Calls f(j, vecs) for this thread's vectors j = first, first + step, ... <
// nvec of a row, vecs[i] the j-th vector of input i; the loads of kUnroll
// vectors are issued before any is used.
template <int VEC, int kInputs, typename scalar_t, class F>
__device__ __forceinline__ void visit_vectors(const scalar_t* const (&in)[kInputs], int64_t nvec,
                                              int64_t first, int64_t step, F&& f) {
  constexpr int kUnroll = unroll_for<VEC>();
  for (int64_t j0 = first; j0 < nvec; j0 += kUnroll * step) {
    Vec<scalar_t, VEC> buf[kUnroll][kInputs];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * step;
      if (j < nvec) {
#pragma unroll
        for (int i = 0; i < kInputs; ++i) buf[u][i] = cuda::load_vec<VEC>(in[i] + j * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * step;
      if (j < nvec) f(j, buf[u]);
    }
  }
}

// The VEC parameters at element i, or `fill` without the parameter (a
// warp-uniform branch per vector rather than a null check per element).
template <int VEC, typename T>
__device__ __forceinline__ Vec<T, VEC> param_vec(const T* p, int64_t i, T fill) {
  if (p != nullptr) return cuda::load_vec<VEC>(p + i);
  Vec<T, VEC> v;
#pragma unroll
  for (int e = 0; e < VEC; ++e) v.v[e] = fill;
  return v;
}

// A row kernel's weight or bias: opmath, or `narrow`, in the input's 16-bit
// type (a bfloat16 model's parameters, read as they are instead of cast to
// float32 by a launch of their own on every call); null without one.
template <typename scalar_t>
struct Param {
  using T = at::opmath_type<scalar_t>;
  const void* data = nullptr;
  bool narrow = false;

  static Param of(const Tensor& t) {
    if (!t.defined()) return {};
    const bool narrow = t.scalar_type() != c10::CppTypeToScalarType<T>::value;
    return {t.const_data_ptr(), narrow};
  }
  // The alignment its vectors of kVec values need.
  int64_t vector_bytes(int vec) const {
    return vec * static_cast<int64_t>(narrow ? sizeof(scalar_t) : sizeof(T));
  }
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Vec<at::opmath_type<scalar_t>, VEC> param_vec(
    const Param<scalar_t>& p, int64_t i, at::opmath_type<scalar_t> fill) {
  using T = at::opmath_type<scalar_t>;
  // The scalar kernels get opmath parameters only (opmath_unless_vector): the
  // 16-bit branch made them spill on sm_80.
  if (VEC == 1 || !p.narrow) return param_vec<VEC>(static_cast<const T*>(p.data), i, fill);
  const Vec<scalar_t, VEC> v = cuda::load_vec<VEC>(static_cast<const scalar_t*>(p.data) + i);
  Vec<T, VEC> out;
#pragma unroll
  for (int e = 0; e < VEC; ++e) out.v[e] = static_cast<T>(v.v[e]);
  return out;
}

template <typename T, int VEC, typename scalar_t>
__device__ __forceinline__ void to_opmath(const Vec<scalar_t, VEC>& in, T (&out)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = static_cast<T>(in.v[e]);
}

// Reduction over the G lanes of each group (G a power of two <= 32, the same
// for the whole warp, so every lane takes part in every shuffle); the result
// is valid in the group's first lane. A fixed tree, as warp_reduce.
template <typename V, class Op>
__device__ __forceinline__ V group_reduce(V v, Op op, int group) {
  for (int offset = group / 2; offset > 0; offset >>= 1) v = op(v, cuda::shfl_down(v, offset));
  return v;
}

// The group leader's pair, in every lane of the group. RMSNorm's first
// member (mean, sum g) is zero in every lane already.
template <bool kCentred, typename T>
__device__ __forceinline__ Pair<T> group_broadcast(const Pair<T>& p, int group) {
  if (group == 1) return p;
  const int leader = threadIdx.x % cuda::kWarpSize / group * group;
  const T a = kCentred ? __shfl_sync(0xffffffffu, p.a, leader) : T(0);
  return {a, __shfl_sync(0xffffffffu, p.b, leader)};
}

// Short rows: groups of `group` lanes per row, blockDim.x / group rows per
// block, striding over the M rows by the grid: f(r, valid, lane in group).
// The loop bound is uniform over the block, so groups past the last row
// (valid false) still take part in the shuffles f makes.
template <class F>
__device__ __forceinline__ void for_each_row_of_group(int64_t M, int group, F&& f) {
  const int64_t rows_per_block = blockDim.x / group;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block; r0 < M;
       r0 += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t r = r0 + threadIdx.x / group;
    f(r, r < M, static_cast<int>(threadIdx.x % group));
  }
}

// Reduces over the block, forms the row's pair `finish(total)` in thread 0
// and broadcasts it through shared memory. Every thread reads the pair
// before it can reach the next call's first barrier, after which thread 0
// alone rewrites it, so no trailing barrier is needed.
template <typename V, class Op, class F>
__device__ __forceinline__ auto block_reduce_broadcast(V v, Op op, F&& finish) {
  using P = decltype(finish(v));
  BNEXT_SHARED(V, scratch, cuda::kWarpSize);
  BNEXT_SHARED(P, shared_pair, 1);
  v = cuda::block_reduce(v, op, scratch, V{});
  if (threadIdx.x == 0) *shared_pair = finish(v);
  __syncthreads();
  return static_cast<P>(*shared_pair);
}

// ------------------------------------------------------------------- forward

template <typename scalar_t>
struct ForwardArgs {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  Param<scalar_t> w;  // may be null
  Param<scalar_t> b;  // may be null (always for RMSNorm)
  T* mean;            // null for RMSNorm
  T* rstd;
  int64_t M;
  int64_t N;
  T eps;
};

// The lane's statistics over the vectors first, first + step, ... of row r.
template <bool kCentred, int VEC, typename scalar_t>
__device__ __forceinline__ StatsAcc<at::opmath_type<scalar_t>, kCentred> lane_stats(
    const ForwardArgs<scalar_t>& a, int64_t r, int64_t first, int64_t step) {
  using T = at::opmath_type<scalar_t>;
  StatsAcc<T, kCentred> acc{};
  const scalar_t* const in[1] = {a.x + r * a.N};
  visit_vectors<VEC>(in, a.N / VEC, first, step, [&](int64_t, const Vec<scalar_t, VEC>(&v)[1]) {
    T vals[VEC];
    to_opmath(v[0], vals);
    add_stats(acc, vals);
  });
  return acc;
}

// y = (x - mean) * (rstd * w) + b over the thread's vectors of row r, in the
// CPU kernel's order of operations.
template <int VEC, typename scalar_t>
__device__ __forceinline__ void normalize_row(const ForwardArgs<scalar_t>& a, int64_t r,
                                              const Pair<at::opmath_type<scalar_t>>& stats,
                                              int64_t first, int64_t step) {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* const in[1] = {a.x + r * a.N};
  scalar_t* const y = a.y + r * a.N;
  visit_vectors<VEC>(in, a.N / VEC, first, step, [&](int64_t j, const Vec<scalar_t, VEC>(&v)[1]) {
    const Vec<T, VEC> w = param_vec<VEC>(a.w, j * VEC, T(1));
    const Vec<T, VEC> b = param_vec<VEC>(a.b, j * VEC, T(0));
    Vec<scalar_t, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const T xmu = static_cast<T>(v[0].v[e]) - stats.a;
      out.v[e] = static_cast<scalar_t>(xmu * (stats.b * w.v[e]) + b.v[e]);
    }
    cuda::store_vec<VEC>(y + j * VEC, out);
  });
}

template <bool kCentred, typename scalar_t>
__device__ __forceinline__ void store_stats(const ForwardArgs<scalar_t>& a, int64_t r,
                                            const Pair<at::opmath_type<scalar_t>>& stats) {
  if constexpr (kCentred) a.mean[r] = stats.a;
  a.rstd[r] = stats.b;
}

// Short rows (for_each_row_of_group): the group's statistics by shuffles.
template <typename scalar_t, bool kCentred, int VEC>
__global__ void __launch_bounds__(kShortRowThreads)
    forward_short_kernel(ForwardArgs<scalar_t> a, int group) {
  using T = at::opmath_type<scalar_t>;
  for_each_row_of_group(a.M, group, [&](int64_t r, bool valid, int g) {
    StatsAcc<T, kCentred> acc{};
    if (valid) acc = lane_stats<kCentred, VEC>(a, r, g, group);
    acc = group_reduce(acc, StatsOp<kCentred>{}, group);
    Pair<T> stats{};
    if (g == 0) stats = row_stats(acc, a.N, a.eps);
    stats = group_broadcast<kCentred>(stats, group);
    if (valid) {
      if (g == 0) store_stats<kCentred>(a, r, stats);
      normalize_row<VEC>(a, r, stats, g, group);
    }
  });
}

// Long rows: a block per row, striding over the rows by the grid.
template <typename scalar_t, bool kCentred, int VEC>
__global__ void __launch_bounds__(kMaxLongRowThreads)
    forward_long_kernel(ForwardArgs<scalar_t> a, int /*group*/) {
  using T = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < a.M; r += gridDim.x) {
    const auto acc = lane_stats<kCentred, VEC>(a, r, threadIdx.x, blockDim.x);
    const Pair<T> stats = block_reduce_broadcast(
        acc, StatsOp<kCentred>{}, [&](const auto& total) { return row_stats(total, a.N, a.eps); });
    if (threadIdx.x == 0) store_stats<kCentred>(a, r, stats);
    normalize_row<VEC>(a, r, stats, threadIdx.x, blockDim.x);
  }
}

// ------------------------------------------------------------------ backward

// A thread's sums for its VEC columns: dw, then db (LayerNorm). One struct,
// so that both go through a single shared-memory tree.
template <typename T, int VEC, bool kCentred>
struct ColumnSums {
  static constexpr int kValues = kCentred ? 2 * VEC : VEC;
  T v[kValues];
};

struct ColumnSumsOp {
  template <typename T, int VEC, bool kCentred>
  __device__ __forceinline__ ColumnSums<T, VEC, kCentred> operator()(
      const ColumnSums<T, VEC, kCentred>& a, const ColumnSums<T, VEC, kCentred>& b) const {
    ColumnSums<T, VEC, kCentred> out;
#pragma unroll
    for (int i = 0; i < ColumnSums<T, VEC, kCentred>::kValues; ++i) out.v[i] = a.v[i] + b.v[i];
    return out;
  }
};

template <typename T, int VEC, bool kCentred>
__device__ __forceinline__ ColumnSums<T, VEC, kCentred> zero_sums() {
  ColumnSums<T, VEC, kCentred> s;
#pragma unroll
  for (int i = 0; i < ColumnSums<T, VEC, kCentred>::kValues; ++i) s.v[i] = T(0);
  return s;
}

// Row `part` of out_dw / out_db (leading dimension N) gets the VEC sums of
// columns c0, ..., rounded to O: opmath for partial rows, or the 16-bit
// parameters' dtype for the merged gradients.
template <typename T, int VEC, bool kCentred, typename O>
__device__ __forceinline__ void store_sums(const ColumnSums<T, VEC, kCentred>& s, O* out_dw,
                                           O* out_db, int64_t offset) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    out_dw[offset + e] = static_cast<O>(s.v[e]);
    if constexpr (kCentred) out_db[offset + e] = static_cast<O>(s.v[VEC + e]);
  }
}

template <typename scalar_t>
struct BackwardArgs {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const T* mean;  // null for RMSNorm
  const T* rstd;
  Param<scalar_t> w;  // may be null
  scalar_t* dx;
  int64_t M;
  int64_t N;
  // Fused column sums (the kernels' KV > 0): row blockIdx.x of these
  // [gridDim.x, N] buffers gets the block's dweight (and dbias) sums.
  T* dw_parts = nullptr;
  T* db_parts = nullptr;
};

template <bool kCentred, typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> row_mean(const BackwardArgs<scalar_t>& a,
                                                              int64_t r) {
  using T = at::opmath_type<scalar_t>;
  if constexpr (kCentred) {
    return a.mean[r];
  } else {
    return T(0);
  }
}

template <bool kCentred, int VEC, typename scalar_t>
__device__ __forceinline__ GradAcc<at::opmath_type<scalar_t>, kCentred> lane_grad_sums(
    const BackwardArgs<scalar_t>& a, int64_t r, int64_t first, int64_t step) {
  using T = at::opmath_type<scalar_t>;
  const T m = row_mean<kCentred>(a, r);
  GradAcc<T, kCentred> acc{};
  const scalar_t* const in[2] = {a.dy + r * a.N, a.x + r * a.N};
  visit_vectors<VEC>(in, a.N / VEC, first, step, [&](int64_t j, const Vec<scalar_t, VEC>(&v)[2]) {
    const Vec<T, VEC> w = param_vec<VEC>(a.w, j * VEC, T(1));
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      add_grad(acc, static_cast<T>(v[0].v[e]) * w.v[e], static_cast<T>(v[1].v[e]) - m);
    }
  });
  return acc;
}

// A thread's column sums over the rows it visits, one ColumnSums per vector
// it takes (KV at most; none when KV == 0, the unfused kernels).
template <typename T, int VEC, bool kCentred, int KV>
struct LaneColumns {
  ColumnSums<T, VEC, kCentred> v[KV > 0 ? KV : 1];
};

// As visit_vectors for a thread that takes at most KV vectors of the row,
// with the loop unrolled completely: f's index k (j = first + k * step) is
// then a compile-time constant, so the LaneColumns it indexes stay in
// registers rather than local memory.
template <int VEC, int KV, int kInputs, typename scalar_t, class F>
__device__ __forceinline__ void visit_lane_vectors(const scalar_t* const (&in)[kInputs],
                                                   int64_t nvec, int64_t first, int64_t step,
                                                   F&& f) {
  constexpr int kUnroll = std::min(unroll_for<VEC>(), KV);
#pragma unroll
  for (int k0 = 0; k0 < KV; k0 += kUnroll) {
    Vec<scalar_t, VEC> buf[kUnroll][kInputs];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = first + (k0 + u) * step;
      if (k0 + u < KV && j < nvec) {
#pragma unroll
        for (int i = 0; i < kInputs; ++i) buf[u][i] = cuda::load_vec<VEC>(in[i] + j * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = first + (k0 + u) * step;
      if (k0 + u < KV && j < nvec) f(k0 + u, j, buf[u]);
    }
  }
}

// dx = a * (k * (x - mean) + (g + c)) over the thread's vectors of row r;
// with KV > 0 also the row's terms of the thread's column sums, from the same
// loaded dy and x.
template <bool kCentred, int VEC, int KV, typename scalar_t>
__device__ __forceinline__ void row_dx(
    const BackwardArgs<scalar_t>& a, int64_t r, const Pair<at::opmath_type<scalar_t>>& sums,
    int64_t first, int64_t step, LaneColumns<at::opmath_type<scalar_t>, VEC, kCentred, KV>& cols) {
  using T = at::opmath_type<scalar_t>;
  const T m = row_mean<kCentred>(a, r);
  const T rstd = a.rstd[r];
  const auto co = row_backward_coeffs(rstd, sums.a, sums.b, a.N, kCentred);
  const scalar_t* const in[2] = {a.dy + r * a.N, a.x + r * a.N};
  scalar_t* const dx = a.dx + r * a.N;
  const auto dx_vec = [&](int64_t j, const Vec<scalar_t, VEC>(&v)[2], auto&& column_terms) {
    const Vec<T, VEC> w = param_vec<VEC>(a.w, j * VEC, T(1));
    Vec<scalar_t, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const T d = static_cast<T>(v[0].v[e]);
      const T xmu = static_cast<T>(v[1].v[e]) - m;
      out.v[e] = static_cast<scalar_t>(row_backward_dx(co, d * w.v[e], xmu));
      column_terms(e, d, xmu);
    }
    cuda::store_vec<VEC>(dx + j * VEC, out);
  };
  if constexpr (KV == 0) {
    visit_vectors<VEC>(in, a.N / VEC, first, step, [&](int64_t j, const Vec<scalar_t, VEC>(&v)[2]) {
      dx_vec(j, v, [](int, T, T) {});
    });
  } else {
    visit_lane_vectors<VEC, KV>(in, a.N / VEC, first, step,
                                [&](int k, int64_t j, const Vec<scalar_t, VEC>(&v)[2]) {
                                  ColumnSums<T, VEC, kCentred>& s = cols.v[k];
                                  dx_vec(j, v, [&](int e, T d, T xmu) {
                                    // The CPU kernel's order: (dy * (x - mean)) * rstd.
                                    s.v[e] += d * xmu * rstd;
                                    if constexpr (kCentred) s.v[VEC + e] += d;
                                  });
                                });
  }
}

template <typename T, int VEC, bool kCentred, int KV>
__device__ __forceinline__ void zero_columns(LaneColumns<T, VEC, kCentred, KV>& cols) {
#pragma unroll
  for (int k = 0; k < KV; ++k) cols.v[k] = zero_sums<T, VEC, kCentred>();
}

// Short rows: lane g of every row group of the block holds the sums of the
// same columns (vectors g, g + G, ...). They merge in a fixed order: a
// shuffle tree over the row groups of a warp (none when G = 32, the only
// case with KV > 1), then the warps in order, through shared memory one
// vector k at a time to keep it small. Lane g of warp 0 writes row
// blockIdx.x of the partials.
template <typename T, int VEC, bool kCentred, int KV>
__device__ __forceinline__ void store_group_columns(const LaneColumns<T, VEC, kCentred, KV>& cols,
                                                    T* dw_row, T* db_row, int64_t nvec, int group) {
  using S = ColumnSums<T, VEC, kCentred>;
  constexpr int kWarps = kShortRowThreads / cuda::kWarpSize;
  BNEXT_SHARED(S, scratch, kWarps * cuda::kWarpSize);
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int warp = threadIdx.x / cuda::kWarpSize;
#pragma unroll
  for (int k = 0; k < KV; ++k) {
    S s = cols.v[k];
    for (int offset = cuda::kWarpSize / 2; offset >= group; offset >>= 1) {
#pragma unroll
      for (int i = 0; i < S::kValues; ++i) s.v[i] += cuda::shfl_down(s.v[i], offset);
    }
    scratch[warp * cuda::kWarpSize + lane] = s;
    __syncthreads();
    if (warp == 0 && lane < group) {
      for (int w = 1; w < kWarps; ++w) {
        s = ColumnSumsOp()(s, static_cast<S>(scratch[w * cuda::kWarpSize + lane]));
      }
      const int64_t j = lane + static_cast<int64_t>(k) * group;
      if (j < nvec) store_sums(s, dw_row, db_row, j * VEC);
    }
    __syncthreads();
  }
}

// KV: the most vectors of a row a thread takes, for the fused column sums
// (the LaneColumns it keeps in registers), or 0 without them.
template <typename scalar_t, bool kCentred, int VEC, int KV>
__global__ void __launch_bounds__(kShortRowThreads)
    backward_short_kernel(BackwardArgs<scalar_t> a, int group) {
  using T = at::opmath_type<scalar_t>;
  LaneColumns<T, VEC, kCentred, KV> cols;
  zero_columns(cols);
  for_each_row_of_group(a.M, group, [&](int64_t r, bool valid, int g) {
    GradAcc<T, kCentred> acc{};
    if (valid) acc = lane_grad_sums<kCentred, VEC>(a, r, g, group);
    acc = group_reduce(acc, GradOp<kCentred>{}, group);
    const Pair<T> sums = group_broadcast<kCentred>(grad_sums(acc), group);
    if (valid) row_dx<kCentred, VEC, KV>(a, r, sums, g, group, cols);
  });
  if constexpr (KV > 0) {
    store_group_columns(cols, a.dw_parts + blockIdx.x * a.N,
                        kCentred ? a.db_parts + blockIdx.x * a.N : nullptr, a.N / VEC, group);
  }
}

// Long rows: thread t takes vectors t, t + blockDim.x, ... of every row, so
// its column sums are the block's already.
template <typename scalar_t, bool kCentred, int VEC, int KV>
__global__ void __launch_bounds__(kMaxLongRowThreads)
    backward_long_kernel(BackwardArgs<scalar_t> a, int /*group*/) {
  using T = at::opmath_type<scalar_t>;
  LaneColumns<T, VEC, kCentred, KV> cols;
  zero_columns(cols);
  for (int64_t r = blockIdx.x; r < a.M; r += gridDim.x) {
    const auto acc = lane_grad_sums<kCentred, VEC>(a, r, threadIdx.x, blockDim.x);
    const Pair<T> sums = block_reduce_broadcast(acc, GradOp<kCentred>{},
                                                [](const auto& total) { return grad_sums(total); });
    row_dx<kCentred, VEC, KV>(a, r, sums, threadIdx.x, blockDim.x, cols);
  }
  if constexpr (KV > 0) {
    const int64_t nvec = a.N / VEC;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (j < nvec) {
        store_sums(cols.v[k], a.dw_parts + blockIdx.x * a.N,
                   kCentred ? a.db_parts + blockIdx.x * a.N : nullptr, j * VEC);
      }
    }
  }
}

// -------------------------------------------------------------- column sums
// dw[c] = sum_r dy[r, c] * (x[r, c] - mean[r]) * rstd[r], db[c] = sum_r dy[r, c].

template <typename scalar_t>
struct ColumnArgs {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const T* mean;  // null for RMSNorm
  const T* rstd;
  int64_t M;
  int64_t N;
};

// Block (tile, part): thread (tx, ty) owns columns c0 .. c0 + VEC - 1, c0 =
// (tile * 32 + tx) * VEC, and adds them over rows r0 + ty, r0 + ty + 8, ...
// of the part in order (kUnroll rows' loads in flight); the 8 row lanes merge
// by a fixed tree. Writes row `part` of out_dw / out_db.
template <typename scalar_t, bool kCentred, int VEC>
__global__ void __launch_bounds__(kColumnThreads)
    column_partials_kernel(ColumnArgs<scalar_t> a, int64_t rows_per_part,
                           at::opmath_type<scalar_t>* out_dw, at::opmath_type<scalar_t>* out_db) {
  using T = at::opmath_type<scalar_t>;
  using S = ColumnSums<T, VEC, kCentred>;
  BNEXT_SHARED(S, scratch, kColumnThreads);
  const int64_t part = blockIdx.y;
  const int64_t r0 = part * rows_per_part;
  const int64_t r1 = std::min(a.M, r0 + rows_per_part);
  constexpr int kUnroll = unroll_for<VEC>();
  const int64_t tiles = cuda::ceil_div(a.N, kColumnTile * VEC);
  // The tile loop's bound is uniform over the block: every thread reaches the barriers.
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t c0 = (tile * kColumnTile + threadIdx.x) * VEC;
    S sums = zero_sums<T, VEC, kCentred>();
    if (c0 < a.N) {  // N % VEC == 0 on vector paths
                     // Unrolled once already (kUnroll rows); more only costs registers.
#pragma unroll 1
      for (int64_t r = r0 + threadIdx.y; r < r1; r += kUnroll * kColumnLanes) {
        Vec<scalar_t, VEC> dy[kUnroll];
        Vec<scalar_t, VEC> x[kUnroll];
        T m[kUnroll];
        T s[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t row = r + u * kColumnLanes;
          if (row < r1) {
            dy[u] = cuda::load_vec<VEC>(a.dy + row * a.N + c0);
            x[u] = cuda::load_vec<VEC>(a.x + row * a.N + c0);
            m[u] = kCentred ? a.mean[row] : T(0);
            s[u] = a.rstd[row];
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (r + u * kColumnLanes < r1) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const T d = static_cast<T>(dy[u].v[e]);
              // The CPU kernel's order: (dy * (x - mean)) * rstd.
              sums.v[e] += d * (static_cast<T>(x[u].v[e]) - m[u]) * s[u];
              if constexpr (kCentred) sums.v[VEC + e] += d;
            }
          }
        }
      }
    }
    sums = cuda::column_reduce(sums, ColumnSumsOp(), scratch);
    if (threadIdx.y == 0 && c0 < a.N) store_sums(sums, out_dw, out_db, part * a.N + c0);
  }
}

// A block of kColumnThreads: thread (tx, ty) adds parts ty, ty + blockDim.y,
// ... of its VEC columns in order, and the blockDim.y lanes merge by a fixed
// tree (launch_merge picks the block's shape). The totals are stored as O.
template <typename T, bool kCentred, int VEC, typename O>
__global__ void __launch_bounds__(kColumnThreads)
    column_merge_kernel(const T* dw_parts, const T* db_parts, int64_t num_parts, int64_t N, O* dw,
                        O* db) {
  using S = ColumnSums<T, VEC, kCentred>;
  BNEXT_SHARED(S, scratch, kColumnThreads);
  const int64_t width = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t tiles = cuda::ceil_div(N, width);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t c0 = tile * width + static_cast<int64_t>(threadIdx.x) * VEC;
    S sums = zero_sums<T, VEC, kCentred>();
    if (c0 < N) {
      for (int64_t p = threadIdx.y; p < num_parts; p += blockDim.y) {
        const Vec<T, VEC> w = cuda::load_vec<VEC>(dw_parts + p * N + c0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sums.v[e] += w.v[e];
        if constexpr (kCentred) {
          const Vec<T, VEC> b = cuda::load_vec<VEC>(db_parts + p * N + c0);
#pragma unroll
          for (int e = 0; e < VEC; ++e) sums.v[VEC + e] += b.v[e];
        }
      }
    }
    sums = cuda::column_reduce(sums, ColumnSumsOp(), scratch);
    if (threadIdx.y == 0 && c0 < N) store_sums(sums, dw, db, c0);
  }
}

// ------------------------------------------------------------------ launches

// Merges `parts` partial rows of dw (and db) into dw (and db). Tiles narrower
// than a warp's row segment when the columns are few, so that the merge keeps
// a block per SM (tiles of 32 lanes made 16 blocks of 4096 columns), down to
// a 32-byte sector per row.
template <typename T, bool kCentred, int VEC, typename O>
void launch_merge(const T* dw_parts, const T* db_parts, int64_t parts, int64_t N, O* dw, O* db) {
  constexpr int kMinTile = std::max<int>(1, cuda::kSectorBytes / (VEC * sizeof(T)));
  int tile = kColumnTile;
  while (tile > kMinTile && cuda::ceil_div(N, tile * VEC) < cuda::num_sms()) tile /= 2;
  const int64_t grid_x = std::min(cuda::ceil_div(N, tile * VEC), cuda::max_grid_x());
  cuda::launch(column_merge_kernel<T, kCentred, VEC, O>, dim3(static_cast<unsigned>(grid_x)),
               dim3(static_cast<unsigned>(tile), static_cast<unsigned>(kColumnThreads / tile)),
               dw_parts, db_parts, parts, N, dw, db);
}

// Where a kernel of `parts` partial rows of N columns puts its column sums,
// and their merge. dw_col and db_col come in opmath or, for 16-bit
// parameters, in their dtype (composite.h's column_dtype), which the merge
// rounds to: no cast launch follows it. A kernel of one partial row writes
// opmath sums there directly; otherwise it writes [parts, N] opmath rows
// (every one of them), which merge() adds up into dw_col and db_col.
template <typename scalar_t, bool kCentred>
struct ColumnOut {
  using T = at::opmath_type<scalar_t>;
  static constexpr auto kOpmath = c10::CppTypeToScalarType<T>::value;
  ColumnOut(int64_t parts, int64_t N, Tensor& dw_col, Tensor& db_col)
      : parts(parts), N(N), dw_col(dw_col), db_col(db_col) {
    if (parts == 1 && dw_col.scalar_type() == kOpmath) {
      dw = dw_col.mutable_data_ptr<T>();
      db = kCentred ? db_col.mutable_data_ptr<T>() : nullptr;
      return;
    }
    const auto opts = dw_col.options().dtype(kOpmath);
    dw_parts = at::empty({parts, N}, opts);
    db_parts = kCentred ? at::empty({parts, N}, opts) : Tensor();
    dw = dw_parts.mutable_data_ptr<T>();
    db = kCentred ? db_parts.mutable_data_ptr<T>() : nullptr;
  }
  // After the kernel: the merge launch, where it wrote partial rows.
  template <int VEC>
  void merge() {
    if (!dw_parts.defined()) return;
    if (dw_col.scalar_type() == kOpmath) {
      launch_merge<T, kCentred, VEC>(dw, db, parts, N, dw_col.mutable_data_ptr<T>(),
                                     kCentred ? db_col.mutable_data_ptr<T>() : nullptr);
    } else {
      launch_merge<T, kCentred, VEC>(dw, db, parts, N, dw_col.mutable_data_ptr<scalar_t>(),
                                     kCentred ? db_col.mutable_data_ptr<scalar_t>() : nullptr);
    }
  }
  int64_t parts;
  int64_t N;
  Tensor& dw_col;
  Tensor& db_col;
  Tensor dw_parts;  // undefined where the kernel writes dw_col directly
  Tensor db_parts;
  T* dw = nullptr;  // where the kernel writes
  T* db = nullptr;
};

// Vector loads need rows of whole vectors starting 16-byte aligned, and
// parameters aligned to their vector (of opmath or 16-bit values).
template <typename scalar_t>
bool vectorizable(int64_t N, std::initializer_list<const void*> rows,
                  std::initializer_list<Param<scalar_t>> params) {
  constexpr int kVec = cuda::vec_size<scalar_t>();
  if (kVec == 1 || N % kVec != 0) return false;
  for (const void* p : rows) {
    if (!cuda::is_aligned(p, cuda::kVecBytes)) return false;
  }
  for (const Param<scalar_t>& p : params) {
    if (!cuda::is_aligned(p.data, p.vector_bytes(kVec))) return false;
  }
  return true;
}

struct RowPlan {
  bool short_rows;
  int group;       // lanes per row (short rows)
  int64_t blocks;  // blocks the rows need
  dim3 grid;       // set by fit_grid once the kernel is chosen
  dim3 block;
};

inline RowPlan row_plan(int64_t M, int64_t N, int64_t nvec) {
  RowPlan plan;
  plan.short_rows = N <= kMaxShortRow;
  int threads;
  if (plan.short_rows) {
    plan.group = cuda::pow2_at_least(nvec, cuda::kWarpSize);
    threads = kShortRowThreads;
    plan.blocks = cuda::ceil_div(M, threads / plan.group);
  } else {
    plan.group = 0;
    // About one unrolled batch of vectors per thread.
    threads = std::max(kMinLongRowThreads,
                       cuda::pow2_at_least(cuda::ceil_div(nvec, 4), kMaxLongRowThreads));
    plan.blocks = M;
  }
  plan.block = dim3(static_cast<unsigned>(threads));
  return plan;
}

// The blocks stride over the rows: as many as the SMs keep resident running
// `kernel` (its registers decide), so that none queue behind the others; the
// fused backward's partial rows, one per block, shrink with them.
template <typename Kernel>
RowPlan fit_grid(RowPlan plan, Kernel kernel) {
  const int64_t resident =
      cuda::num_sms() * cuda::resident_blocks(kernel, static_cast<int>(plan.block.x));
  plan.grid = dim3(static_cast<unsigned>(std::min({plan.blocks, resident, cuda::max_grid_x()})));
  return plan;
}

template <class Args>
void launch_rows(void (*short_kernel)(Args, int), void (*long_kernel)(Args, int), const Args& a,
                 int vec) {
  const RowPlan shape = row_plan(a.M, a.N, a.N / vec);
  const auto kernel = shape.short_rows ? short_kernel : long_kernel;
  const RowPlan plan = fit_grid(shape, kernel);
  cuda::launch(kernel, plan.grid, plan.block, a, plan.group);
}

template <typename scalar_t, bool kCentred>
void launch_forward(const ForwardArgs<scalar_t>& a) {
  constexpr int kVec = cuda::vec_size<scalar_t>();
  if (vectorizable<scalar_t>(a.N, {a.x, a.y}, {a.w, a.b})) {
    launch_rows(forward_short_kernel<scalar_t, kCentred, kVec>,
                forward_long_kernel<scalar_t, kCentred, kVec>, a, kVec);
  } else {
    launch_rows(forward_short_kernel<scalar_t, kCentred, 1>,
                forward_long_kernel<scalar_t, kCentred, 1>, a, 1);
  }
}

// Into dw_col (and db_col when kCentred): one launch when a single part of
// rows fills the GPU, else partials per part merged by a second launch.
template <typename scalar_t, bool kCentred, int VEC>
void column_sums_vec(const ColumnArgs<scalar_t>& a, Tensor& dw_col, Tensor& db_col) {
  const int64_t tiles = cuda::ceil_div(a.N, kColumnTile * VEC);
  const int64_t grid_x = std::min(tiles, cuda::max_grid_x());
  const int64_t target = 4 * cuda::num_sms();
  const int64_t max_parts =
      std::max<int64_t>(1, std::min(cuda::ceil_div(a.M, kMinRowsPerPart), cuda::max_grid_y()));
  const int64_t rows_per_part =
      cuda::ceil_div(a.M, std::clamp<int64_t>(cuda::ceil_div(target, grid_x), 1, max_parts));
  const int64_t parts = cuda::ceil_div(a.M, rows_per_part);
  const dim3 block(kColumnTile, kColumnLanes);
  // Block (tile, part) writes row `part` of the sums.
  ColumnOut<scalar_t, kCentred> out(parts, a.N, dw_col, db_col);
  cuda::launch(column_partials_kernel<scalar_t, kCentred, VEC>,
               dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(parts)), block, a,
               rows_per_part, out.dw, out.db);
  out.template merge<VEC>();
}

template <typename scalar_t, bool kCentred>
void column_sums(const ColumnArgs<scalar_t>& a, Tensor& dw_col, Tensor& db_col) {
  constexpr int kVec = cuda::vec_size<scalar_t>();
  // The partial buffers are fresh allocations, aligned for any vector.
  if (vectorizable<scalar_t>(a.N, {a.dy, a.x}, {})) {
    column_sums_vec<scalar_t, kCentred, kVec>(a, dw_col, db_col);
  } else {
    column_sums_vec<scalar_t, kCentred, 1>(a, dw_col, db_col);
  }
}

// ------------------------------------------------------- fused column sums
// The dx kernels add each thread's dweight / dbias terms while they have dy
// and x loaded (KV > 0), which saves the column kernels' second read of both:
// LayerNorm forward + backward then move 5 tensors instead of 7. The sums
// live in registers, so a thread may own at most this many values of dw (and
// as many of db): 32 floats each, 64 registers. float64 (twice the
// registers per value) and rows too long for the budget take the separate
// column kernels.
constexpr int kFusedColumnValues = 32;
// Each block of the fused backward writes a partial row of dw (and db) that
// the merge reads again: 16 bytes per column and block. Blocks for 256
// threads an SM (about 32 KB of loads in flight per SM, what a copy needs at
// an H100's bandwidth) keep that near 4% of the traffic at 16384 rows of 4096;
// as many blocks as the registers allow added a third.
constexpr int kFusedThreadsPerSm = 256;

// The gridDim.x partial rows merged into dw_col / db_col; with one block and
// opmath sums the kernel writes them directly, in a single launch.
template <typename scalar_t, bool kCentred, int VEC, int KV>
void launch_fused(void (*kernel)(BackwardArgs<scalar_t>, int), const RowPlan& shape,
                  BackwardArgs<scalar_t> a, Tensor& dw_col, Tensor& db_col) {
  RowPlan plan = fit_grid(shape, kernel);
  const int64_t fused = cuda::num_sms() * std::max<int64_t>(1, kFusedThreadsPerSm / plan.block.x);
  plan.grid.x = static_cast<unsigned>(std::min<int64_t>(plan.grid.x, fused));
  // Block b writes row b of the sums (blocks without rows write zeros).
  ColumnOut<scalar_t, kCentred> out(plan.grid.x, a.N, dw_col, db_col);
  a.dw_parts = out.dw;
  a.db_parts = out.db;
  cuda::launch(kernel, plan.grid, plan.block, a, plan.group);
  out.template merge<VEC>();
}

// dx with the fused column sums, if the thread's share of a row fits the
// budget; false (nothing launched) otherwise. A few bounds KV per kernel, so
// that short rows of a vector per lane (the common small N) do not pay the
// registers of the longest ones: short rows 1, a quarter and all of the
// budget's vectors; long rows 4 (the planner gives a thread about 4 vectors
// up to 512 threads) and all of the budget, at most 16 vectors.
template <typename scalar_t, bool kCentred, int VEC>
bool launch_backward_fused(const RowPlan& plan, const BackwardArgs<scalar_t>& a, Tensor& dw_col,
                           Tensor& db_col) {
  if constexpr (!std::is_same_v<at::opmath_type<scalar_t>, float>) {
    return false;
  } else {
    constexpr int kMaxKV = kFusedColumnValues / VEC;
    constexpr int kQuarterKV = std::max(1, kMaxKV / 4);
    constexpr int kLongKV = std::min(4, kMaxKV);
    // The long kernels have 128 registers (512 threads): 32 scalar loads
    // spilled there.
    constexpr int kLongMaxKV = std::min(16, kMaxKV);
    const int64_t nvec = a.N / VEC;
    if (plan.short_rows) {
      const int64_t kv = cuda::ceil_div(nvec, plan.group);
      if (kv <= 1) {
        launch_fused<scalar_t, kCentred, VEC, 1>(backward_short_kernel<scalar_t, kCentred, VEC, 1>,
                                                 plan, a, dw_col, db_col);
      } else if (kv <= kQuarterKV) {
        launch_fused<scalar_t, kCentred, VEC, kQuarterKV>(
            backward_short_kernel<scalar_t, kCentred, VEC, kQuarterKV>, plan, a, dw_col, db_col);
      } else if (kv <= kMaxKV) {
        launch_fused<scalar_t, kCentred, VEC, kMaxKV>(
            backward_short_kernel<scalar_t, kCentred, VEC, kMaxKV>, plan, a, dw_col, db_col);
      } else {
        return false;
      }
    } else {
      const int64_t kv = cuda::ceil_div(nvec, plan.block.x);
      if (kv <= kLongKV) {
        launch_fused<scalar_t, kCentred, VEC, kLongKV>(
            backward_long_kernel<scalar_t, kCentred, VEC, kLongKV>, plan, a, dw_col, db_col);
      } else if (kv <= kLongMaxKV) {
        launch_fused<scalar_t, kCentred, VEC, kLongMaxKV>(
            backward_long_kernel<scalar_t, kCentred, VEC, kLongMaxKV>, plan, a, dw_col, db_col);
      } else {
        return false;
      }
    }
    return true;
  }
}

// dx, and with `columns` dw_col (and db_col): fused where it fits, else the
// dx kernels alone and then the column kernels.
template <typename scalar_t, bool kCentred, int VEC>
void launch_backward_vec(const BackwardArgs<scalar_t>& a, bool columns, Tensor& dw_col,
                         Tensor& db_col) {
  const RowPlan shape = row_plan(a.M, a.N, a.N / VEC);
  if (columns && launch_backward_fused<scalar_t, kCentred, VEC>(shape, a, dw_col, db_col)) return;
  const auto kernel = shape.short_rows ? backward_short_kernel<scalar_t, kCentred, VEC, 0>
                                       : backward_long_kernel<scalar_t, kCentred, VEC, 0>;
  const RowPlan plan = fit_grid(shape, kernel);
  cuda::launch(kernel, plan.grid, plan.block, a, plan.group);
  if (columns)
    column_sums<scalar_t, kCentred>({a.dy, a.x, a.mean, a.rstd, a.M, a.N}, dw_col, db_col);
}

template <typename scalar_t, bool kCentred>
void launch_backward(const BackwardArgs<scalar_t>& a, bool columns, Tensor& dw_col,
                     Tensor& db_col) {
  constexpr int kVec = cuda::vec_size<scalar_t>();
  if (vectorizable<scalar_t>(a.N, {a.dy, a.x, a.dx}, {a.w})) {
    launch_backward_vec<scalar_t, kCentred, kVec>(a, columns, dw_col, db_col);
  } else {
    launch_backward_vec<scalar_t, kCentred, 1>(a, columns, dw_col, db_col);
  }
}

}  // namespace cuda_kernels

// ------------------------------------------------------------------- backend

namespace cuda_kernels {

// 16-bit parameters as they are where the vector kernels will read them,
// else cast to opmath (the scalar kernels read nothing else).
template <typename scalar_t>
std::pair<Tensor, Tensor> opmath_unless_vector(int64_t N, std::initializer_list<const void*> rows,
                                               const Tensor& w, const Tensor& b) {
  if (vectorizable<scalar_t>(N, rows, {Param<scalar_t>::of(w), Param<scalar_t>::of(b)})) {
    return {w, b};
  }
  const auto opmath = c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
  const auto cast = [&](const Tensor& t) { return t.defined() ? t.to(opmath) : t; };
  return {cast(w), cast(b)};
}

}  // namespace cuda_kernels

template <bool kCentred>
void CudaBackend::forward(const RowProblem& p, double eps, Tensor& out, Tensor& mean,
                          Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "bnext_norm_fwd_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        const auto [w, b] = cuda_kernels::opmath_unless_vector<scalar_t>(
            p.N, {p.x.const_data_ptr(), out.const_data_ptr()}, p.w, kCentred ? p.b : Tensor());
        const cuda_kernels::ForwardArgs<scalar_t> a{p.x.const_data_ptr<scalar_t>(),
                                                    out.mutable_data_ptr<scalar_t>(),
                                                    cuda_kernels::Param<scalar_t>::of(w),
                                                    cuda_kernels::Param<scalar_t>::of(b),
                                                    kCentred ? mean.mutable_data_ptr<T>() : nullptr,
                                                    rstd.mutable_data_ptr<T>(),
                                                    p.M,
                                                    p.N,
                                                    static_cast<T>(eps)};
        cuda_kernels::launch_forward<scalar_t, kCentred>(a);
      });
}

template <bool kCentred>
void CudaBackend::backward(const RowProblem& p, const Tensor& mean, const Tensor& rstd,
                           bool columns, Tensor& dx, Tensor& dw_col, Tensor& db_col) {
  // No rows (the column sums stay the zeros they come as) or rows of no
  // values (everything is empty): nothing to launch.
  if (p.M == 0 || p.N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "bnext_norm_bwd_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        const scalar_t* dy = p.dy.const_data_ptr<scalar_t>();
        const scalar_t* x = p.x.const_data_ptr<scalar_t>();
        const T* mean_p = kCentred ? mean.const_data_ptr<T>() : nullptr;
        const T* rstd_p = rstd.const_data_ptr<T>();
        const Tensor w = cuda_kernels::opmath_unless_vector<scalar_t>(
                             p.N, {dy, x, dx.const_data_ptr()}, p.w, Tensor())
                             .first;
        cuda_kernels::launch_backward<scalar_t, kCentred>(
            {dy, x, mean_p, rstd_p, cuda_kernels::Param<scalar_t>::of(w),
             dx.mutable_data_ptr<scalar_t>(), p.M, p.N},
            columns, dw_col, db_col);
      });
}

}  // namespace layer_norm
}  // namespace bnext

#include "layer_norm/cuda_channel_kernels.cuh"
