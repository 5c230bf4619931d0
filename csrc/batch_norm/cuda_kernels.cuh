// Batch Norm CUDA kernels and the CudaBackend that launches them: the GPU
// counterpart of cpu_kernels.cpp. Included by exactly one translation unit of
// a binary: cuda_kernels.cu (nvcc), or the CPU emulator's module
// (emulator/module.cpp), which runs these same kernels in the tests.
//
// Layouts (common/layout.h):
//   channels-first (NCHW): a channel's values come in N planes of S contiguous
//     elements. Threads come in groups per plane (several planes per block when
//     planes are short), blocks split the planes and, when there are few, the
//     stripes of each plane.
//   channels-last (NHWC, and (N, C) input): rows of C contiguous channels. A
//     thread owns a vector of consecutive channels, so that a warp reads
//     consecutive addresses, and keeps their coefficients or accumulators in
//     registers while it walks the rows.
// Loads are 16 bytes wide where the layout and the alignment allow, with
// several in flight per thread. Statistics add a chunk of values at a time to a
// Welford accumulator (one division per chunk); blocks merge their threads with
// a fixed tree and leave one partial per (block, channel), which a second
// kernel merges, one warp per channel, again by a fixed tree (a single block
// row writes the result directly). The partition depends on the shape and the
// SM count only, so results are bitwise reproducible run to run on one GPU
// model; there are no atomics.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "batch_norm/composite.h"
#include "batch_norm/cuda_backend.cuh"
#include "bnext/welford.h"
#include "common/cuda_launch.cuh"
#include "common/cuda_reduce.cuh"
#include "common/cuda_vec.cuh"
#include "common/layout.h"

namespace bnext {
namespace batch_norm {
namespace cuda_kernels {

using cuda::Pair;
using cuda::Vec;

constexpr int kReduceThreads = 512;  // a multiple of 32 and a power of two
constexpr int kElemtThreads = 256;
constexpr int kUnroll = 4;  // vector loads in flight per thread
constexpr int64_t kMaxGridY = 65535;

// Enough blocks to fill the GPU a few times over; more only adds partials.
inline int64_t reduce_target_blocks() { return 4 * cuda::num_sms(); }
inline int64_t elemt_target_blocks() { return 16 * cuda::num_sms(); }

// -------------------------------------------------------------------- reducers
// What a reduction accumulates: `add` takes K values of channel c from each of
// the kInputs inputs, `finish` writes a channel's total. The kernels decide
// only which elements each thread visits.

template <typename scalar_t_>
struct StatsReducer {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  using V = Welford<T>;
  using Op = cuda::WelfordOp;
  static constexpr int kInputs = 1;
  const scalar_t* in[kInputs];
  T* mean;
  T* var;
  template <int K>
  __device__ __forceinline__ void add(V& v, const T (&vals)[kInputs][K], int64_t /*c*/) const {
    welford_push_chunk(v, vals[0]);
  }
  __device__ __forceinline__ void finish(const V& v, int64_t c) const {
    mean[c] = v.mean;
    var[c] = welford_var(v);
  }
};

// sum dy and sum dy * (x - mean).
template <typename scalar_t_>
struct GradReducer {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  using V = Pair<T>;
  using Op = cuda::PairSumOp;
  static constexpr int kInputs = 2;
  const scalar_t* in[kInputs];  // dy, x
  const T* mean;
  T* sum_dy;
  T* sum_dy_xmu;
  template <int K>
  __device__ __forceinline__ void add(V& v, const T (&vals)[kInputs][K], int64_t c) const {
    const T m = mean[c];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      v.a += vals[0][i];
      v.b += vals[0][i] * (vals[1][i] - m);
    }
  }
  __device__ __forceinline__ void finish(const V& v, int64_t c) const {
    sum_dy[c] = v.a;
    sum_dy_xmu[c] = v.b;
  }
};

template <class R>
bool inputs_aligned(const R& r) {
  for (int i = 0; i < R::kInputs; ++i) {
    if (!cuda::is_aligned(r.in[i], cuda::kVecBytes)) return false;
  }
  return true;
}

// ------------------------------------------------------- channels-first reduce
// Block (c, p): channel c, partial p = y * Z + z. Threads come in groups of
// `tpp` per plane; group `slot` visits planes y * ppb + slot, stepping by
// Y * ppb, and in each plane the vectors z * tpp + lane, stepping by Z * tpp.
template <class R, int VEC>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_planes_kernel(R r, int64_t N, int64_t C, int64_t S, int tpp, int64_t Y, int64_t Z,
                         typename R::V* parts) {
  using scalar_t = typename R::scalar_t;
  using T = typename R::T;
  using V = typename R::V;
  __shared__ __align__(16) unsigned char raw[cuda::SharedSlots<V, cuda::kWarpSize>::kBytes];
  const int64_t c = blockIdx.x;
  const int64_t y = blockIdx.y / Z;
  const int64_t z = blockIdx.y % Z;
  const int lane = threadIdx.x % tpp;
  const int slot = threadIdx.x / tpp;
  const int64_t ppb = blockDim.x / tpp;
  const int64_t nvec = S / VEC;
  const int64_t step = Z * tpp;
  V v{};
  for (int64_t n = y * ppb + slot; n < N; n += Y * ppb) {
    const int64_t base = (n * C + c) * S;
    for (int64_t j0 = z * tpp + lane; j0 < nvec; j0 += kUnroll * step) {
      Vec<scalar_t, VEC> buf[R::kInputs][kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * step;
        if (j < nvec) {
#pragma unroll
          for (int i = 0; i < R::kInputs; ++i)
            buf[i][u] = cuda::load_vec<VEC>(r.in[i] + base + j * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (j0 + u * step < nvec) {
          T vals[R::kInputs][VEC];
#pragma unroll
          for (int i = 0; i < R::kInputs; ++i) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) vals[i][e] = static_cast<T>(buf[i][u].v[e]);
          }
          r.template add<VEC>(v, vals, c);
        }
      }
    }
  }
  v = cuda::block_reduce(v, typename R::Op{}, reinterpret_cast<V*>(raw), V{});
  if (threadIdx.x == 0) {
    if (gridDim.y == 1) {
      r.finish(v, c);
    } else {
      parts[static_cast<int64_t>(blockIdx.y) * C + c] = v;
    }
  }
}

// -------------------------------------------------------- channels-last reduce
// Block (tile, p): thread (tx, ty) owns channels c0 .. c0 + VEC - 1 with
// c0 = (tile * blockDim.x + tx) * VEC, and visits rows p * blockDim.y + ty,
// stepping by gridDim.y * blockDim.y, kUnroll rows at a time.
template <class R, int VEC>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_rows_kernel(R r, int64_t rows, int64_t C, typename R::V* parts) {
  using scalar_t = typename R::scalar_t;
  using T = typename R::T;
  using V = typename R::V;
  __shared__ __align__(16) unsigned char raw[cuda::SharedSlots<V, kReduceThreads>::kBytes];
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;  // C % VEC == 0 on vector paths
  V v[VEC] = {};
  if (active) {
    const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
    int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    for (; row + (kUnroll - 1) * step < rows; row += kUnroll * step) {
      Vec<scalar_t, VEC> buf[R::kInputs][kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < R::kInputs; ++i)
          buf[i][u] = cuda::load_vec<VEC>(r.in[i] + (row + u * step) * C + c0);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        T vals[R::kInputs][kUnroll];
#pragma unroll
        for (int i = 0; i < R::kInputs; ++i) {
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) vals[i][u] = static_cast<T>(buf[i][u].v[e]);
        }
        r.template add<kUnroll>(v[e], vals, c0 + e);
      }
    }
    for (; row < rows; row += step) {
      Vec<scalar_t, VEC> buf[R::kInputs];
#pragma unroll
      for (int i = 0; i < R::kInputs; ++i) buf[i] = cuda::load_vec<VEC>(r.in[i] + row * C + c0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        T vals[R::kInputs][1];
#pragma unroll
        for (int i = 0; i < R::kInputs; ++i) vals[i][0] = static_cast<T>(buf[i].v[e]);
        r.template add<1>(v[e], vals, c0 + e);
      }
    }
  }
  V* scratch = reinterpret_cast<V*>(raw);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const V total = cuda::column_reduce(v[e], typename R::Op{}, scratch);
    if (threadIdx.y == 0 && active) {
      if (gridDim.y == 1) {
        r.finish(total, c0 + e);
      } else {
        parts[static_cast<int64_t>(blockIdx.y) * C + c0 + e] = total;
      }
    }
  }
}

// ---------------------------------------------------------------- finalize
// One warp per channel: lane l merges partials l, l + 32, ... in order, then
// the lanes merge by a fixed tree.
constexpr int kFinalizeThreads = 256;

template <class R>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(R r, const typename R::V* parts, int64_t num_parts, int64_t C) {
  using V = typename R::V;
  const typename R::Op op{};
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int64_t warps_per_block = blockDim.x / cuda::kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * warps_per_block;
  // c is the same for all lanes of a warp, so every lane reaches the shuffles.
  for (int64_t c = blockIdx.x * warps_per_block + threadIdx.x / cuda::kWarpSize; c < C;
       c += warps) {
    V v{};
    for (int64_t p = lane; p < num_parts; p += cuda::kWarpSize) v = op(v, parts[p * C + c]);
    v = cuda::warp_reduce(v, op);
    if (lane == 0) r.finish(v, c);
  }
}

// Runs the reduction `r` over the canonical tensor viewed as `v`: one launch,
// or two when blocks leave partials.
template <class R>
void reduce(const R& r, const ChannelView& v, const Tensor& like) {
  using V = typename R::V;
  constexpr int kVec = cuda::vec_size<typename R::scalar_t>();
  const int64_t target = reduce_target_blocks();
  const bool aligned = inputs_aligned(r);
  int64_t num_parts = 1;
  Tensor staging;
  V* parts = nullptr;  // [part][channel], when there is more than one part
  const auto make_parts = [&](int64_t n) {
    num_parts = n;
    if (n == 1) return;
    staging =
        at::empty({n * v.C * static_cast<int64_t>(sizeof(V))}, like.options().dtype(at::kByte));
    parts = reinterpret_cast<V*>(staging.mutable_data_ptr());
  };
  if (v.layout == Layout::kChannelsFirst) {
    TORCH_CHECK(v.C <= std::numeric_limits<int32_t>::max(),
                "bnext: too many channels for the CUDA kernels: ", v.C);
    const int vec = aligned && v.S % kVec == 0 ? kVec : 1;
    const int64_t nvec = v.S / vec;
    const int tpp = cuda::pow2_at_least(nvec, kReduceThreads);
    const int64_t ppb = kReduceThreads / tpp;
    const int64_t Y = std::max<int64_t>(
        1, std::min({cuda::ceil_div(target, v.C), cuda::ceil_div(v.N, ppb), kMaxGridY}));
    // Few channels and few planes: split the planes' stripes across blocks too.
    const int64_t Z =
        std::max<int64_t>(1, std::min({cuda::ceil_div(target, v.C * Y),
                                       cuda::ceil_div(nvec, tpp * kUnroll), kMaxGridY / Y}));
    make_parts(Y * Z);
    const dim3 grid(static_cast<unsigned>(v.C), static_cast<unsigned>(Y * Z));
    if (vec == kVec) {
      cuda::launch(reduce_planes_kernel<R, kVec>, grid, dim3(kReduceThreads), r, v.N, v.C, v.S, tpp,
                   Y, Z, parts);
    } else {
      cuda::launch(reduce_planes_kernel<R, 1>, grid, dim3(kReduceThreads), r, v.N, v.C, v.S, tpp, Y,
                   Z, parts);
    }
  } else {
    const int vec = aligned && v.C % kVec == 0 ? kVec : 1;
    const int64_t cols = v.C / vec;
    const int bx = cuda::pow2_at_least(cols, cuda::kWarpSize);
    const int by = kReduceThreads / bx;
    const int64_t tiles = cuda::ceil_div(cols, bx);
    TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(),
                "bnext: too many channels for the CUDA kernels: ", v.C);
    const int64_t rows = v.rows();
    const int64_t Y = std::max<int64_t>(
        1,
        std::min({cuda::ceil_div(target, tiles), cuda::ceil_div(rows, by * kUnroll), kMaxGridY}));
    make_parts(Y);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(Y));
    const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
    if (vec == kVec) {
      cuda::launch(reduce_rows_kernel<R, kVec>, grid, block, r, rows, v.C, parts);
    } else {
      cuda::launch(reduce_rows_kernel<R, 1>, grid, block, r, rows, v.C, parts);
    }
  }
  if (num_parts > 1) {
    const int64_t per_block = kFinalizeThreads / cuda::kWarpSize;
    const int64_t blocks = std::min<int64_t>(cuda::ceil_div(v.C, per_block), kMaxGridY);
    cuda::launch(finalize_kernel<R>, dim3(static_cast<unsigned>(blocks)), dim3(kFinalizeThreads), r,
                 parts, num_parts, v.C);
  }
}

// ------------------------------------------- elementwise: (x-mean)*k + c + a*g
// The forward pass is the same map without g: y = (x - mean) * scale + shift.
// Input, output and dy share one dense layout, so one offset addresses the
// same element in all three.

template <typename scalar_t>
struct AffineArgs {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* g;  // dy, or null in the forward pass
  const scalar_t* x;
  scalar_t* out;
  const T* mean;
  const T* a;
  const T* k;
  const T* c;
};

template <typename T>
struct ChannelCoeffs {
  T mean, a, k, c;
};

template <bool kWithGrad, typename scalar_t>
__device__ __forceinline__ ChannelCoeffs<at::opmath_type<scalar_t>> coeffs_at(
    const AffineArgs<scalar_t>& p, int64_t ch) {
  using T = at::opmath_type<scalar_t>;
  return {p.mean[ch], kWithGrad ? p.a[ch] : T(0), p.k[ch], p.c[ch]};
}

template <bool kWithGrad, typename T>
__device__ __forceinline__ T affine(const ChannelCoeffs<T>& co, T x, T g) {
  T y = (x - co.mean) * co.k + co.c;
  if constexpr (kWithGrad) y += co.a * g;
  return y;
}

// VEC elements of one channel at `offset` (channels-first).
template <bool kWithGrad, int VEC, typename scalar_t>
__device__ __forceinline__ void affine_vec(const AffineArgs<scalar_t>& p,
                                           const ChannelCoeffs<at::opmath_type<scalar_t>>& co,
                                           int64_t offset) {
  using T = at::opmath_type<scalar_t>;
  const Vec<scalar_t, VEC> xv = cuda::load_vec<VEC>(p.x + offset);
  Vec<scalar_t, VEC> gv{};
  if constexpr (kWithGrad) gv = cuda::load_vec<VEC>(p.g + offset);
  Vec<scalar_t, VEC> out;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    out.v[e] = static_cast<scalar_t>(
        affine<kWithGrad>(co, static_cast<T>(xv.v[e]), static_cast<T>(gv.v[e])));
  }
  cuda::store_vec<VEC>(p.out + offset, out);
}

// Groups of `tpp` threads per plane (plane = n * C + c), `blockDim.x / tpp`
// planes per block row; blockIdx.x splits long planes. The channel is worked
// out once per plane, not per element.
template <typename scalar_t, bool kWithGrad, int VEC>
__global__ void __launch_bounds__(kElemtThreads)
    affine_planes_kernel(AffineArgs<scalar_t> p, int64_t planes, int64_t C, int64_t S, int tpp) {
  const int lane = threadIdx.x % tpp;
  const int64_t ppb = blockDim.x / tpp;
  const int64_t nvec = S / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * tpp;
  for (int64_t plane = blockIdx.y * ppb + threadIdx.x / tpp; plane < planes;
       plane += gridDim.y * ppb) {
    const auto co = coeffs_at<kWithGrad>(p, plane % C);
    const int64_t base = plane * S;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * tpp + lane; j < nvec; j += step) {
      affine_vec<kWithGrad, VEC>(p, co, base + j * VEC);
    }
  }
}

// Thread (tx, ty) owns channels c0 .. c0 + VEC - 1 and keeps their
// coefficients in registers while it walks rows ty + blockDim.y * blockIdx.y,
// stepping by gridDim.y * blockDim.y.
template <typename scalar_t, bool kWithGrad, int VEC>
__global__ void __launch_bounds__(kElemtThreads)
    affine_rows_kernel(AffineArgs<scalar_t> p, int64_t rows, int64_t C) {
  using T = at::opmath_type<scalar_t>;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  ChannelCoeffs<T> co[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) co[e] = coeffs_at<kWithGrad>(p, c0 + e);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows;
       row += step) {
    const int64_t offset = row * C + c0;
    const Vec<scalar_t, VEC> xv = cuda::load_vec<VEC>(p.x + offset);
    Vec<scalar_t, VEC> gv{};
    if constexpr (kWithGrad) gv = cuda::load_vec<VEC>(p.g + offset);
    Vec<scalar_t, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      out.v[e] = static_cast<scalar_t>(
          affine<kWithGrad>(co[e], static_cast<T>(xv.v[e]), static_cast<T>(gv.v[e])));
    }
    cuda::store_vec<VEC>(p.out + offset, out);
  }
}

template <typename scalar_t, bool kWithGrad>
void launch_affine(const AffineArgs<scalar_t>& p, const ChannelView& v) {
  constexpr int kVec = cuda::vec_size<scalar_t>();
  const bool aligned = cuda::is_aligned(p.x, cuda::kVecBytes) &&
                       cuda::is_aligned(p.out, cuda::kVecBytes) &&
                       cuda::is_aligned(p.g, cuda::kVecBytes);
  const int64_t target = elemt_target_blocks();
  if (v.layout == Layout::kChannelsFirst) {
    const int vec = aligned && v.S % kVec == 0 ? kVec : 1;
    const int64_t nvec = v.S / vec;
    const int tpp = cuda::pow2_at_least(nvec, kElemtThreads);
    const int64_t planes = v.N * v.C;
    const int64_t gy = std::min(cuda::ceil_div(planes, kElemtThreads / tpp), kMaxGridY);
    const int64_t gx =
        std::max<int64_t>(1, std::min(cuda::ceil_div(nvec, tpp), cuda::ceil_div(target, gy)));
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    if (vec == kVec) {
      cuda::launch(affine_planes_kernel<scalar_t, kWithGrad, kVec>, grid, dim3(kElemtThreads), p,
                   planes, v.C, v.S, tpp);
    } else {
      cuda::launch(affine_planes_kernel<scalar_t, kWithGrad, 1>, grid, dim3(kElemtThreads), p,
                   planes, v.C, v.S, tpp);
    }
    return;
  }
  const int vec = aligned && v.C % kVec == 0 ? kVec : 1;
  const int64_t cols = v.C / vec;
  const int bx = cuda::pow2_at_least(cols, cuda::kWarpSize);
  const int by = kElemtThreads / bx;
  const int64_t tiles = cuda::ceil_div(cols, bx);
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(),
              "bnext: too many channels for the CUDA kernels: ", v.C);
  const int64_t gy = std::max<int64_t>(
      1, std::min({cuda::ceil_div(v.rows(), by), cuda::ceil_div(target, tiles), kMaxGridY}));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(gy));
  const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  if (vec == kVec) {
    cuda::launch(affine_rows_kernel<scalar_t, kWithGrad, kVec>, grid, block, p, v.rows(), v.C);
  } else {
    cuda::launch(affine_rows_kernel<scalar_t, kWithGrad, 1>, grid, block, p, v.rows(), v.C);
  }
}

template <bool kWithGrad>
Tensor affine_map(const Tensor& g, const Tensor& x, const Tensor& mean, const Tensor& a,
                  const Tensor& k, const Tensor& c) {
  Tensor out = empty_same_layout(x, x.scalar_type());
  if (x.numel() == 0) return out;
  const ChannelView v = channel_view(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_affine_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        const AffineArgs<scalar_t> p{kWithGrad ? g.const_data_ptr<scalar_t>() : nullptr,
                                     x.const_data_ptr<scalar_t>(),
                                     out.mutable_data_ptr<scalar_t>(),
                                     mean.const_data_ptr<T>(),
                                     kWithGrad ? a.const_data_ptr<T>() : nullptr,
                                     k.const_data_ptr<T>(),
                                     c.const_data_ptr<T>()};
        launch_affine<scalar_t, kWithGrad>(p, v);
      });
  return out;
}

inline void check_same_device(const char* op, const Tensor& dy, const Tensor& x) {
  TORCH_CHECK(dy.device() == x.device(), op, ": expected grad_out on ", x.device(), ", got ",
              dy.device());
}

}  // namespace cuda_kernels

// ------------------------------------------------------------------- backend

std::tuple<Tensor, Tensor> CudaBackend::stats(const Tensor& x) {
  const auto options = x.options().dtype(opmath_dtype(x.scalar_type()));
  if (x.numel() == 0) return {at::zeros({x.size(1)}, options), at::zeros({x.size(1)}, options)};
  // Every channel is written by the kernels.
  Tensor mean = at::empty({x.size(1)}, options);
  Tensor var = at::empty({x.size(1)}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_stats_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        const cuda_kernels::StatsReducer<scalar_t> r{
            {x.const_data_ptr<scalar_t>()}, mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>()};
        cuda_kernels::reduce(r, channel_view(x), x);
      });
  return {mean, var};
}

Tensor CudaBackend::elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                          const Tensor& shift) {
  return cuda_kernels::affine_map<false>(Tensor(), x, mean, Tensor(), scale, shift);
}

std::tuple<Tensor, Tensor> CudaBackend::backward_reduce(const Tensor& dy, const Tensor& x,
                                                        const Tensor& mean) {
  cuda_kernels::check_same_device("bnext::batch_norm_backward_reduce", dy, x);
  if (x.numel() == 0)
    return {at::zeros({x.size(1)}, mean.options()), at::zeros({x.size(1)}, mean.options())};
  Tensor sum_dy = at::empty({x.size(1)}, mean.options());
  Tensor sum_dy_xmu = at::empty({x.size(1)}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_reduce_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        const cuda_kernels::GradReducer<scalar_t> r{
            {dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>()},
            mean.const_data_ptr<T>(),
            sum_dy.mutable_data_ptr<T>(),
            sum_dy_xmu.mutable_data_ptr<T>()};
        cuda_kernels::reduce(r, channel_view(x), x);
      });
  return {sum_dy, sum_dy_xmu};
}

Tensor CudaBackend::backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                   const Tensor& a, const Tensor& k, const Tensor& c) {
  cuda_kernels::check_same_device("bnext::batch_norm_backward_elemt", dy, x);
  return cuda_kernels::affine_map<true>(dy, x, mean, a, k, c);
}

}  // namespace batch_norm
}  // namespace bnext
