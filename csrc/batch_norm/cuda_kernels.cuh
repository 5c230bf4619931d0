// Batch Norm CUDA kernels and the CudaBackend that launches them: the GPU
// counterpart of cpu_kernels.cpp. Included by the translation units that
// compile CudaBackend's kernels: cuda_kernels.cu, which defines
// BNEXT_DEFINE_BATCH_NORM_CUDA_BACKEND for Batch Norm's own functions (the
// other families link to them), and batch_norm_act/cuda_kernels.cu, which
// instantiates the activations' function templates (nvcc); or the CPU
// emulator's module (emulator/module.cpp), which does both and runs these same
// kernels in the tests.
//
// The activations (batch_norm_act) run in the same kernels: the elementwise
// map takes `Ends`, a prologue that centres the input (x - mean, or x - mean
// recomputed from an activation's output) and an epilogue that finishes the
// value (the activation, after adding a residual); the reductions take a
// prologue that turns the loaded inputs into the reducer's values (and may
// store one of them, g = dy * act'(u)). Batch Norm's own are the identities.
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
#include "bnext/activation.h"
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
// Lanes across the channels of a channels-last row in a reduction block.
constexpr int kRowLanes = 8;
constexpr int kUnroll = 4;  // vector loads in flight per thread and input

// Enough blocks to fill the GPU a few times over; more only adds partials.
inline int64_t reduce_target_blocks() { return 4 * cuda::num_sms(); }
inline int64_t elemt_target_blocks() { return 16 * cuda::num_sms(); }

// -------------------------------------------------------------------- reducers
// What a reduction accumulates: `add` takes K values of channel c from each of
// the kInputs values a prologue hands it per element, `finish` writes a
// channel's total. The kernels decide only which elements each thread visits.

template <typename scalar_t_>
struct StatsReducer {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  using V = Welford<T>;
  using Op = cuda::WelfordOp;
  static constexpr int kInputs = 1;
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

// sum dy and sum dy * (x - mean), from (dy, x); kCentred: from (dy, x - mean),
// which a prologue has computed (mean is not read).
template <typename scalar_t_, bool kCentred = false>
struct GradReducer {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  using V = Pair<T>;
  using Op = cuda::PairSumOp;
  static constexpr int kInputs = 2;
  const T* mean;
  T* sum_dy;
  T* sum_dy_xmu;
  template <int K>
  __device__ __forceinline__ void add(V& v, const T (&vals)[kInputs][K], int64_t c) const {
    const T m = kCentred ? T(0) : mean[c];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      v.a += vals[0][i];
      v.b += vals[0][i] * (kCentred ? vals[1][i] : vals[1][i] - m);
    }
  }
  __device__ __forceinline__ void finish(const V& v, int64_t c) const {
    sum_dy[c] = v.a;
    sum_dy_xmu[c] = v.b;
  }
};

// ------------------------------------------------------------------- prologues
// What a reduction loads and hands its reducer, per element: the kLoads inputs
// `in` are loaded alike (same offset, vector loads, kUnroll of each in flight),
// `map(co, loaded, vals)` turns them into the reducer's kValues values with
// the channel's coefficients `co` (read once per thread by `channel(c)`), and
// a prologue with kStores writes the value `map` returns to `out` at the
// element's offset.

// The activations' prologues keep their loaded vectors until the stores and
// evaluate act' per element: half Batch Norm's unroll (4 to 6 vector loads in
// flight per thread, against its 4 to 8) keeps them in registers, where 4
// spilled up to 368 bytes (float64 gelu, bfloat16 silu with a residual).
constexpr int kStoringUnroll = kUnroll / 2;

// The inputs as they are (Batch Norm).
template <typename scalar_t_, int N>
struct Inputs {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  static constexpr int kLoads = N;
  static constexpr int kValues = N;
  static constexpr bool kStores = false;
  static constexpr int kUnroll = cuda_kernels::kUnroll;
  struct Channel {};
  const scalar_t* in[N];
  scalar_t* out;  // unused
  __device__ __forceinline__ Channel channel(int64_t /*c*/) const { return {}; }
  __device__ __forceinline__ T map(const Channel& /*co*/, const T (&loaded)[N],
                                   T (&vals)[N]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) vals[i] = loaded[i];
    return T(0);
  }
};

template <typename T>
using ScalarMath = act::ScalarMath<T>;

// An activation's backward from its input: u = (x - mean) * scale + shift
// [+ residual] as the forward computes it, g = dy * act'(u), stored where
// kStore (without a residual the elementwise pass recomputes it: ActGradEnds);
// the reducer (GradReducer<., true>) gets (g, x - mean).
template <typename scalar_t_, act::Kind K, bool kResidual, bool kStore = true>
struct ActGradPrologue {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  static constexpr int kLoads = kResidual ? 3 : 2;  // dy, x, residual
  static constexpr int kValues = 2;
  static constexpr bool kStores = kStore;
  static constexpr int kUnroll = kStoringUnroll;
  struct Channel {
    T mean, scale, shift;
  };
  const scalar_t* in[kLoads];
  scalar_t* out;  // g
  const T* mean;
  const T* scale;
  const T* shift;
  T param;
  __device__ __forceinline__ Channel channel(int64_t c) const {
    return {mean[c], scale[c], shift[c]};
  }
  __device__ __forceinline__ T map(const Channel& co, const T (&loaded)[kLoads],
                                   T (&vals)[kValues]) const {
    const T xmu = loaded[1] - co.mean;
    T u = xmu * co.scale + co.shift;
    if constexpr (kResidual) u += loaded[2];
    const T g = loaded[0] * act::derivative<ScalarMath<T>>(act::KindTag<K>{}, u, param);
    vals[0] = g;
    vals[1] = xmu;
    return g;
  }
};

// A piecewise linear activation's backward from its output y (kept instead
// of the residual): g = dy * act'(u) from y, stored; (g, x - mean) to the reducer.
template <typename scalar_t_, act::Kind K>
struct OutputGradPrologue {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  static constexpr int kLoads = 3;  // dy, x, y
  static constexpr int kValues = 2;
  static constexpr bool kStores = true;
  static constexpr int kUnroll = kStoringUnroll;
  struct Channel {
    T mean;
  };
  const scalar_t* in[kLoads];
  scalar_t* out;  // g
  const T* mean;
  T param;
  __device__ __forceinline__ Channel channel(int64_t c) const { return {mean[c]}; }
  __device__ __forceinline__ T map(const Channel& co, const T (&loaded)[kLoads],
                                   T (&vals)[kValues]) const {
    const T g =
        loaded[0] * act::derivative_from_output<ScalarMath<T>>(act::KindTag<K>{}, loaded[2], param);
    vals[0] = g;
    vals[1] = loaded[1] - co.mean;
    return g;
  }
};

// In-place mode: x - mean = (act^-1(y) - shift) * inv_scale from the output y.
template <typename T, act::Kind K>
__device__ __forceinline__ T xmu_from_output(T y, T shift, T inv_scale, T param) {
  return (act::inverse<ScalarMath<T>>(act::KindTag<K>{}, y, param) - shift) * inv_scale;
}

// The same from the output: (dy, y) -> (g, x - mean), g stored.
template <typename scalar_t_, act::Kind K>
struct InplaceGradPrologue {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  static constexpr int kLoads = 2;  // dy, y
  static constexpr int kValues = 2;
  static constexpr bool kStores = true;
  static constexpr int kUnroll = kStoringUnroll;
  struct Channel {
    T shift, inv_scale;
  };
  const scalar_t* in[kLoads];
  scalar_t* out;  // g
  const T* shift;
  const T* inv_scale;
  T param;
  __device__ __forceinline__ Channel channel(int64_t c) const { return {shift[c], inv_scale[c]}; }
  __device__ __forceinline__ T map(const Channel& co, const T (&loaded)[kLoads],
                                   T (&vals)[kValues]) const {
    const T y = loaded[1];
    const T g = loaded[0] * act::derivative_from_output<ScalarMath<T>>(act::KindTag<K>{}, y, param);
    vals[0] = g;
    vals[1] = xmu_from_output<T, K>(y, co.shift, co.inv_scale, param);
    return g;
  }
};

template <class P>
bool prologue_aligned(const P& p) {
  for (int i = 0; i < P::kLoads; ++i) {
    if (!cuda::is_aligned(p.in[i], cuda::kVecBytes)) return false;
  }
  return !P::kStores || cuda::is_aligned(p.out, cuda::kVecBytes);
}

// Element e of the loaded vectors `buf[i][u]` through the prologue: the
// reducer's values into vals[.][k]; a stored result replaces buf[0][u]'s
// element (that input is no longer needed), to be written back as a vector.
template <class R, class P, int VEC, int U, int K>
__device__ __forceinline__ void prologue_element(
    const P& p, const typename P::Channel& co,
    cuda::Vec<typename P::scalar_t, VEC> (&buf)[P::kLoads][U], int u, int e,
    typename R::T (&vals)[R::kInputs][K], int k) {
  static_assert(P::kValues == R::kInputs, "the prologue feeds the reducer's inputs");
  using scalar_t = typename P::scalar_t;
  using T = typename R::T;
  T loaded[P::kLoads];
#pragma unroll
  for (int i = 0; i < P::kLoads; ++i) loaded[i] = static_cast<T>(buf[i][u].v[e]);
  T mapped[R::kInputs];
  const T stored = p.map(co, loaded, mapped);
#pragma unroll
  for (int i = 0; i < R::kInputs; ++i) vals[i][k] = mapped[i];
  if constexpr (P::kStores) buf[0][u].v[e] = static_cast<scalar_t>(stored);
}

// A plane of S elements at element offset `start`, split for vector access: its
// first `head` elements, `nvec` whole vectors from start + head (16-byte aligned
// when the tensor is), and the `tail` after them. When S is not a multiple of
// VEC (7x7 and 14x14 maps of 16-bit types), the planes start at every offset
// from a 16-byte boundary: head and tail, at most VEC - 1 elements each, are
// read one element at a time, the rest as vectors.
template <int VEC>
struct RaggedPlane {
  int64_t head, nvec, tail;
  __device__ __forceinline__ RaggedPlane(int64_t start, int64_t S) {
    const int64_t lead = (VEC - start % VEC) % VEC;
    head = lead < S ? lead : S;
    nvec = (S - head) / VEC;
    tail = S - head - nvec * VEC;
  }
  // Element offset, from the plane's start, of the e-th of its head + tail elements.
  __device__ __forceinline__ int64_t edge(int64_t e) const { return e < head ? e : e + nvec * VEC; }
};

// ------------------------------------------------------- channels-first reduce
// Block (c, p): channel c, partial p = y * Z + z. Threads come in groups of
// `tpp` per plane; group `slot` visits planes y * ppb + slot, stepping by
// Y * ppb, and in each plane the vectors z * tpp + lane, stepping by Z * tpp;
// the plane's ragged edges go to the lanes of stripe z = 0.
template <class R, class P, int VEC>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_planes_kernel(R r, P p, int64_t N, int64_t C, int64_t S, int tpp, int64_t Y, int64_t Z,
                         typename R::V* parts) {
  using scalar_t = typename P::scalar_t;
  using T = typename R::T;
  using V = typename R::V;
  BNEXT_SHARED(V, scratch, cuda::kWarpSize);
  const int64_t c = blockIdx.x;
  const int64_t y = blockIdx.y / Z;
  const int64_t z = blockIdx.y % Z;
  const int lane = threadIdx.x % tpp;
  const int slot = threadIdx.x / tpp;
  const int64_t ppb = blockDim.x / tpp;
  const int64_t step = Z * tpp;
  const typename P::Channel co = p.channel(c);
  V v{};
  for (int64_t n = y * ppb + slot; n < N; n += Y * ppb) {
    const int64_t start = (n * C + c) * S;
    const RaggedPlane<VEC> ragged(start, S);
    const int64_t base = start + ragged.head;
    const int64_t nvec = ragged.nvec;
    if (VEC > 1 && z == 0) {
      for (int64_t e = lane; e < ragged.head + ragged.tail; e += tpp) {
        const int64_t at = start + ragged.edge(e);
        Vec<scalar_t, 1> one[P::kLoads][1];
#pragma unroll
        for (int i = 0; i < P::kLoads; ++i) one[i][0] = cuda::load_vec<1>(p.in[i] + at);
        T vals[R::kInputs][1];
        prologue_element<R>(p, co, one, 0, 0, vals, 0);
        if constexpr (P::kStores) cuda::store_vec<1>(p.out + at, one[0][0]);
        r.template add<1>(v, vals, c);
      }
    }
    for (int64_t j0 = z * tpp + lane; j0 < nvec; j0 += P::kUnroll * step) {
      Vec<scalar_t, VEC> buf[P::kLoads][P::kUnroll];
#pragma unroll
      for (int u = 0; u < P::kUnroll; ++u) {
        const int64_t j = j0 + u * step;
        if (j < nvec) {
#pragma unroll
          for (int i = 0; i < P::kLoads; ++i)
            buf[i][u] = cuda::load_vec<VEC>(p.in[i] + base + j * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < P::kUnroll; ++u) {
        const int64_t j = j0 + u * step;
        if (j < nvec) {
          T vals[R::kInputs][VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) prologue_element<R>(p, co, buf, u, e, vals, e);
          if constexpr (P::kStores) cuda::store_vec<VEC>(p.out + base + j * VEC, buf[0][u]);
          r.template add<VEC>(v, vals, c);
        }
      }
    }
  }
  v = cuda::block_reduce(v, typename R::Op{}, scratch, V{});
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
// stepping by gridDim.y * blockDim.y, P::kUnroll rows at a time.
template <class R, class P, int VEC>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_rows_kernel(R r, P p, int64_t rows, int64_t C, typename R::V* parts) {
  using scalar_t = typename P::scalar_t;
  using T = typename R::T;
  using V = typename R::V;
  BNEXT_SHARED(V, scratch, kReduceThreads);
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;  // C % VEC == 0 on vector paths
  V v[VEC] = {};
  if (active) {
    typename P::Channel co[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) co[e] = p.channel(c0 + e);
    const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
    int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    for (; row + (P::kUnroll - 1) * step < rows; row += P::kUnroll * step) {
      Vec<scalar_t, VEC> buf[P::kLoads][P::kUnroll];
#pragma unroll
      for (int u = 0; u < P::kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < P::kLoads; ++i)
          buf[i][u] = cuda::load_vec<VEC>(p.in[i] + (row + u * step) * C + c0);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        T vals[R::kInputs][P::kUnroll];
#pragma unroll
        for (int u = 0; u < P::kUnroll; ++u) prologue_element<R>(p, co[e], buf, u, e, vals, u);
        r.template add<P::kUnroll>(v[e], vals, c0 + e);
      }
      if constexpr (P::kStores) {
#pragma unroll
        for (int u = 0; u < P::kUnroll; ++u)
          cuda::store_vec<VEC>(p.out + (row + u * step) * C + c0, buf[0][u]);
      }
    }
    for (; row < rows; row += step) {
      Vec<scalar_t, VEC> buf[P::kLoads][1];
#pragma unroll
      for (int i = 0; i < P::kLoads; ++i) buf[i][0] = cuda::load_vec<VEC>(p.in[i] + row * C + c0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        T vals[R::kInputs][1];
        prologue_element<R>(p, co[e], buf, 0, e, vals, 0);
        r.template add<1>(v[e], vals, c0 + e);
      }
      if constexpr (P::kStores) cuda::store_vec<VEC>(p.out + row * C + c0, buf[0][0]);
    }
  }
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

// Runs the reduction `r` of the values prologue `p` makes of the canonical
// tensors viewed as `v`: one launch, or two when blocks leave partials.
template <class R, class P>
void reduce(const R& r, const P& p, const ChannelView& v, const Tensor& like) {
  static_assert(std::is_same_v<typename R::scalar_t, typename P::scalar_t>);
  using V = typename R::V;
  constexpr int kVec = cuda::vec_size<typename R::scalar_t>();
  const int64_t target = reduce_target_blocks();
  const bool aligned = prologue_aligned(p);
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
    // Vectors whenever a plane holds one (RaggedPlane reads the edges).
    const int vec = aligned && v.S >= kVec ? kVec : 1;
    const int64_t nvec = v.S / vec;
    const int tpp = cuda::pow2_at_least(nvec, kReduceThreads);
    const int64_t ppb = kReduceThreads / tpp;
    const int64_t Y = std::max<int64_t>(
        1, std::min({cuda::ceil_div(target, v.C), cuda::ceil_div(v.N, ppb), cuda::max_grid_y()}));
    // Few channels and few planes: split the planes' stripes across blocks too.
    const int64_t Z = std::max<int64_t>(
        1, std::min({cuda::ceil_div(target, v.C * Y), cuda::ceil_div(nvec, tpp * P::kUnroll),
                     cuda::max_grid_y() / Y}));
    make_parts(Y * Z);
    const dim3 grid(static_cast<unsigned>(v.C), static_cast<unsigned>(Y * Z));
    if (vec == kVec) {
      cuda::launch(reduce_planes_kernel<R, P, kVec>, grid, dim3(kReduceThreads), r, p, v.N, v.C,
                   v.S, tpp, Y, Z, parts);
    } else {
      cuda::launch(reduce_planes_kernel<R, P, 1>, grid, dim3(kReduceThreads), r, p, v.N, v.C, v.S,
                   tpp, Y, Z, parts);
    }
  } else {
    const int vec = aligned && v.C % kVec == 0 ? kVec : 1;
    const int64_t cols = v.C / vec;
    // Narrow tiles: every block leaves a partial per channel of its tile, and
    // the GPU needs a block per SM, so a tile of fewer channels needs fewer
    // partials per channel (a tile of all 256 channels of a ResNet layer left
    // 98 partials, 8% of the forward's traffic, on fewer blocks than SMs).
    // 8 lanes of 16 bytes still read whole 128-byte lines.
    const int bx = cuda::pow2_at_least(cols, kRowLanes);
    const int by = kReduceThreads / bx;
    const int64_t tiles = cuda::ceil_div(cols, bx);
    TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(),
                "bnext: too many channels for the CUDA kernels: ", v.C);
    const int64_t rows = v.rows();
    // kUnroll rows a thread at a time, but a block per SM first.
    const int64_t fill = std::min(cuda::ceil_div(cuda::num_sms(), tiles), cuda::ceil_div(rows, by));
    const int64_t Y = std::max<int64_t>(
        1, std::min({cuda::ceil_div(target, tiles),
                     std::max(fill, cuda::ceil_div(rows, by * P::kUnroll)), cuda::max_grid_y()}));
    make_parts(Y);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(Y));
    const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
    if (vec == kVec) {
      cuda::launch(reduce_rows_kernel<R, P, kVec>, grid, block, r, p, rows, v.C, parts);
    } else {
      cuda::launch(reduce_rows_kernel<R, P, 1>, grid, block, r, p, rows, v.C, parts);
    }
  }
  if (num_parts > 1) {
    const int64_t per_block = kFinalizeThreads / cuda::kWarpSize;
    const int64_t blocks = std::min<int64_t>(cuda::ceil_div(v.C, per_block), cuda::max_grid_y());
    cuda::launch(finalize_kernel<R>, dim3(static_cast<unsigned>(blocks)), dim3(kFinalizeThreads), r,
                 parts, num_parts, v.C);
  }
}

// ------------------------------------------- elementwise: (x-mean)*k + c + a*g
// The forward pass is the same map without g: y = (x - mean) * scale + shift.
// Input, output, dy (and a residual) share one dense layout, so one offset
// addresses the same element in all of them. The output may be the input
// itself (in-place mode): each element is read and then written by one thread.
//
// The map's ends: `center(co, x)` is the prologue, x - mean from the loaded
// value with the channel's coefficients `co` (read once per plane or thread by
// `channel(c)`); `grad(co, xmu, dy)` the gradient that a multiplies (dy as
// loaded, or g = dy * act'(u) recomputed); `epilogue(y, residual)` turns the
// affine result into the stored value. With kResidual, `residual` is loaded
// like x.

// Batch Norm's own ends, whatever the channel holds besides its mean: x - mean,
// dy as loaded, the result stored as it is.
template <typename scalar_t_>
struct PlainMap {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  static constexpr bool kResidual = false;
  template <class Channel>
  __device__ __forceinline__ T center(const Channel& co, T x) const {
    return x - co.mean;
  }
  template <class Channel>
  __device__ __forceinline__ T grad(const Channel& /*co*/, T /*xmu*/, T dy) const {
    return dy;
  }
  __device__ __forceinline__ T epilogue(T y, T /*residual*/) const { return y; }
};

// Batch Norm with the coefficients as given (a, k, c vectors).
template <typename scalar_t_>
struct PlainEnds : PlainMap<scalar_t_> {
  using T = typename PlainMap<scalar_t_>::T;
  struct Channel {
    T mean;
  };
  const T* mean;
  __device__ __forceinline__ Channel channel(int64_t c) const { return {mean[c]}; }
};

// Ends that work out the channel's coefficients where they are used, once
// per plane or thread, instead of reading those of a launch of their own
// before the map: their Channel holds (mean, a, k, c) and coeffs_at takes them.
template <typename scalar_t_>
struct OwnCoeffsMap : PlainMap<scalar_t_> {
  using T = typename PlainMap<scalar_t_>::T;
  struct Channel {
    T mean, a, k, c;
  };
};
template <class E>
constexpr bool kOwnCoeffs = std::is_base_of_v<OwnCoeffsMap<typename E::scalar_t>, E>;
// Ends with write_weight_grad(c), which one thread per channel calls.
template <class E, class = void>
constexpr bool kWritesWeightGrad = false;
template <class E>
constexpr bool kWritesWeightGrad<E, std::void_t<decltype(&E::write_weight_grad)>> = true;

// Batch Norm's forward from the statistics (ForwardStep's arithmetic).
template <typename scalar_t_>
struct StatsEnds : OwnCoeffsMap<scalar_t_> {
  using T = typename PlainMap<scalar_t_>::T;
  using Channel = typename OwnCoeffsMap<scalar_t_>::Channel;
  const T* mean;
  const T* var;
  const T* weight;  // null: 1
  const T* bias;    // null: 0
  T eps;
  __device__ __forceinline__ Channel channel(int64_t c) const {
    const auto co =
        forward_coeffs(inv_std(var[c], eps), load_or(weight, c, T(1)), load_or(bias, c, T(0)));
    return {mean[c], T(0), co.scale, co.shift};
  }
};

// Batch Norm's (and Renorm's) backward from the two sums (BackwardStep's
// arithmetic), and the weight gradient.
template <typename scalar_t_>
struct StepGradEnds : OwnCoeffsMap<scalar_t_> {
  using T = typename PlainMap<scalar_t_>::T;
  using Channel = typename OwnCoeffsMap<scalar_t_>::Channel;
  const T* mean;
  const T* sum_dy;
  const T* sum_dy_xmu;
  BackwardStep<T> step;
  int64_t count;
  __device__ __forceinline__ Channel channel(int64_t c) const {
    const auto co = step.coeffs(c, sum_dy[c], sum_dy_xmu[c], count);
    return {mean[c], co.a, co.k, co.c};
  }
  __device__ __forceinline__ void write_weight_grad(int64_t c) const {
    step.grad_weight[c] = step.weight_grad(c, sum_dy[c], sum_dy_xmu[c]);
  }
};

// The backward of an activation without a residual: g = dy * act'(u)
// recomputed from x as ActGradPrologue computes it (never stored).
template <typename scalar_t_, act::Kind K>
struct ActGradEnds {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  static constexpr bool kResidual = false;
  struct Channel {
    T mean, scale, shift;
  };
  const T* mean;
  const T* scale;
  const T* shift;
  T param;
  __device__ __forceinline__ Channel channel(int64_t c) const {
    return {mean[c], scale[c], shift[c]};
  }
  __device__ __forceinline__ T center(const Channel& co, T x) const { return x - co.mean; }
  __device__ __forceinline__ T grad(const Channel& co, T xmu, T dy) const {
    const T u = xmu * co.scale + co.shift;
    return dy * act::derivative<ScalarMath<T>>(act::KindTag<K>{}, u, param);
  }
  __device__ __forceinline__ T epilogue(T y, T /*residual*/) const { return y; }
};

// The forward with an activation: act(y [+ residual]).
template <typename scalar_t_, act::Kind K, bool kResidual_>
struct ActEnds {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  static constexpr bool kResidual = kResidual_;
  struct Channel {
    T mean;
  };
  const T* mean;
  const scalar_t* residual;  // null without kResidual
  T param;
  __device__ __forceinline__ Channel channel(int64_t c) const { return {mean[c]}; }
  __device__ __forceinline__ T center(const Channel& co, T x) const { return x - co.mean; }
  __device__ __forceinline__ T grad(const Channel& /*co*/, T /*xmu*/, T dy) const { return dy; }
  __device__ __forceinline__ T epilogue(T y, T residual_value) const {
    if constexpr (kResidual) y += residual_value;
    return act::forward<ScalarMath<T>>(act::KindTag<K>{}, y, param);
  }
};

// In-place mode's backward: x - mean recomputed from the output y.
template <typename scalar_t_, act::Kind K>
struct FromOutputEnds {
  using scalar_t = scalar_t_;
  using T = at::opmath_type<scalar_t>;
  static constexpr bool kResidual = false;
  struct Channel {
    T shift, inv_scale;
  };
  const T* shift;
  const T* inv_scale;
  T param;
  __device__ __forceinline__ Channel channel(int64_t c) const { return {shift[c], inv_scale[c]}; }
  __device__ __forceinline__ T center(const Channel& co, T y) const {
    return xmu_from_output<T, K>(y, co.shift, co.inv_scale, param);
  }
  __device__ __forceinline__ T grad(const Channel& /*co*/, T /*xmu*/, T g) const { return g; }
  __device__ __forceinline__ T epilogue(T y, T /*residual*/) const { return y; }
};

template <class E>
struct AffineArgs {
  using scalar_t = typename E::scalar_t;
  using T = at::opmath_type<scalar_t>;
  const scalar_t* g;  // dy, or null in the forward pass
  const scalar_t* x;
  scalar_t* out;
  const T* a;
  const T* k;
  const T* c;
  E ends;
};

template <class E>
struct ChannelCoeffs {
  using T = typename E::T;
  typename E::Channel center;
  T a, k, c;
};

template <bool kWithGrad, class E>
__device__ __forceinline__ ChannelCoeffs<E> coeffs_at(const AffineArgs<E>& p, int64_t ch) {
  using T = typename E::T;
  if constexpr (kOwnCoeffs<E>) {
    const auto own = p.ends.channel(ch);
    return {own, own.a, own.k, own.c};
  } else {
    return {p.ends.channel(ch), kWithGrad ? p.a[ch] : T(0), p.k[ch], p.c[ch]};
  }
}

template <bool kWithGrad, class E, typename T>
__device__ __forceinline__ T affine(const E& ends, const ChannelCoeffs<E>& co, T x, T g, T res) {
  const T xmu = ends.center(co.center, x);
  T y = xmu * co.k + co.c;
  if constexpr (kWithGrad) y += co.a * ends.grad(co.center, xmu, g);
  return ends.epilogue(y, res);
}

// Loads x (and dy, the residual) at `offset` and stores the map of its VEC
// elements: of one channel, co[0] (channels-first), or of VEC channels, co[e].
template <bool kWithGrad, int VEC, bool kOneChannel, class E>
__device__ __forceinline__ void affine_vec(const AffineArgs<E>& p, const ChannelCoeffs<E>* co,
                                           int64_t offset) {
  using scalar_t = typename E::scalar_t;
  using T = typename E::T;
  const Vec<scalar_t, VEC> xv = cuda::load_vec<VEC>(p.x + offset);
  Vec<scalar_t, VEC> gv{};
  if constexpr (kWithGrad) gv = cuda::load_vec<VEC>(p.g + offset);
  Vec<scalar_t, VEC> rv{};
  if constexpr (E::kResidual) rv = cuda::load_vec<VEC>(p.ends.residual + offset);
  Vec<scalar_t, VEC> out;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    out.v[e] = static_cast<scalar_t>(
        affine<kWithGrad>(p.ends, co[kOneChannel ? 0 : e], static_cast<T>(xv.v[e]),
                          static_cast<T>(gv.v[e]), static_cast<T>(rv.v[e])));
  }
  cuda::store_vec<VEC>(p.out + offset, out);
}

// Groups of `tpp` threads per plane (plane = n * C + c), `blockDim.x / tpp`
// planes per block row; blockIdx.x splits long planes, and the lanes of
// blockIdx.x = 0 take the ragged edges (RaggedPlane). The channel is worked
// out once per plane, not per element.
template <class E, bool kWithGrad, int VEC>
__global__ void __launch_bounds__(kElemtThreads)
    affine_planes_kernel(AffineArgs<E> p, int64_t planes, int64_t C, int64_t S, int tpp) {
  const int lane = threadIdx.x % tpp;
  const int64_t ppb = blockDim.x / tpp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * tpp;
  for (int64_t plane = blockIdx.y * ppb + threadIdx.x / tpp; plane < planes;
       plane += gridDim.y * ppb) {
    const auto co = coeffs_at<kWithGrad>(p, plane % C);
    if constexpr (kWritesWeightGrad<E>) {
      if (plane < C && blockIdx.x == 0 && lane == 0) p.ends.write_weight_grad(plane);
    }
    const int64_t start = plane * S;
    const RaggedPlane<VEC> ragged(start, S);
    const int64_t base = start + ragged.head;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * tpp + lane; j < ragged.nvec; j += step) {
      affine_vec<kWithGrad, VEC, true>(p, &co, base + j * VEC);
    }
    if (VEC > 1 && blockIdx.x == 0) {
      for (int64_t e = lane; e < ragged.head + ragged.tail; e += tpp) {
        affine_vec<kWithGrad, 1, true>(p, &co, start + ragged.edge(e));
      }
    }
  }
}

// Thread (tx, ty) owns channels c0 .. c0 + VEC - 1 and keeps their
// coefficients in registers while it walks rows ty + blockDim.y * blockIdx.y,
// stepping by gridDim.y * blockDim.y.
template <class E, bool kWithGrad, int VEC>
__global__ void __launch_bounds__(kElemtThreads)
    affine_rows_kernel(AffineArgs<E> p, int64_t rows, int64_t C) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  ChannelCoeffs<E> co[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) co[e] = coeffs_at<kWithGrad>(p, c0 + e);
  if constexpr (kWritesWeightGrad<E>) {
    if (blockIdx.y == 0 && threadIdx.y == 0) {
      for (int e = 0; e < VEC; ++e) p.ends.write_weight_grad(c0 + e);
    }
  }
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows;
       row += step) {
    affine_vec<kWithGrad, VEC, false>(p, co, row * C + c0);
  }
}

template <class E, bool kWithGrad>
void launch_affine(const AffineArgs<E>& p, const ChannelView& v) {
  using scalar_t = typename E::scalar_t;
  constexpr int kVec = cuda::vec_size<scalar_t>();
  bool aligned = cuda::is_aligned(p.x, cuda::kVecBytes) &&
                 cuda::is_aligned(p.out, cuda::kVecBytes) && cuda::is_aligned(p.g, cuda::kVecBytes);
  if constexpr (E::kResidual)
    aligned = aligned && cuda::is_aligned(p.ends.residual, cuda::kVecBytes);
  const int64_t target = elemt_target_blocks();
  if (v.layout == Layout::kChannelsFirst) {
    const int vec = aligned && v.S >= kVec ? kVec : 1;  // RaggedPlane reads the edges
    const int64_t nvec = v.S / vec;
    const int tpp = cuda::pow2_at_least(nvec, kElemtThreads);
    const int64_t planes = v.N * v.C;
    const int64_t gy = std::min(cuda::ceil_div(planes, kElemtThreads / tpp), cuda::max_grid_y());
    const int64_t gx =
        std::max<int64_t>(1, std::min(cuda::ceil_div(nvec, tpp), cuda::ceil_div(target, gy)));
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    if (vec == kVec) {
      cuda::launch(affine_planes_kernel<E, kWithGrad, kVec>, grid, dim3(kElemtThreads), p, planes,
                   v.C, v.S, tpp);
    } else {
      cuda::launch(affine_planes_kernel<E, kWithGrad, 1>, grid, dim3(kElemtThreads), p, planes, v.C,
                   v.S, tpp);
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
      1,
      std::min({cuda::ceil_div(v.rows(), by), cuda::ceil_div(target, tiles), cuda::max_grid_y()}));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(gy));
  const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  if (vec == kVec) {
    cuda::launch(affine_rows_kernel<E, kWithGrad, kVec>, grid, block, p, v.rows(), v.C);
  } else {
    cuda::launch(affine_rows_kernel<E, kWithGrad, 1>, grid, block, p, v.rows(), v.C);
  }
}

// out = epilogue(a * g + k * center(x) + c) elementwise (no a, g without
// kWithGrad); x, g and out canonical in one layout. Ends that work out their
// own coefficients (kOwnCoeffs) take undefined a, k and c.
template <bool kWithGrad, class E>
void affine_into(const Tensor& g, const Tensor& x, const Tensor& out, const E& ends,
                 const Tensor& a, const Tensor& k, const Tensor& c) {
  using scalar_t = typename E::scalar_t;
  using T = typename E::T;
  constexpr bool kGiven = !kOwnCoeffs<E>;
  const AffineArgs<E> p{kWithGrad ? g.const_data_ptr<scalar_t>() : nullptr,
                        x.const_data_ptr<scalar_t>(),
                        out.mutable_data_ptr<scalar_t>(),
                        kWithGrad && kGiven ? a.const_data_ptr<T>() : nullptr,
                        kGiven ? k.const_data_ptr<T>() : nullptr,
                        kGiven ? c.const_data_ptr<T>() : nullptr,
                        ends};
  launch_affine<E, kWithGrad>(p, channel_view(x));
}

template <bool kWithGrad>
Tensor affine_map(const Tensor& g, const Tensor& x, const Tensor& mean, const Tensor& a,
                  const Tensor& k, const Tensor& c) {
  Tensor out = empty_same_layout(x, x.scalar_type());
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_affine_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        affine_into<kWithGrad>(g, x, out, PlainEnds<scalar_t>{{}, mean.const_data_ptr<T>()}, a, k,
                               c);
      });
  return out;
}

inline void check_same_device(const char* op, const Tensor& dy, const Tensor& x) {
  TORCH_CHECK(dy.device() == x.device(), op, ": expected grad_out on ", x.device(), ", got ",
              dy.device());
}

// Runs f(KindTag<K>{}) for the invertible activations (in-place mode); the
// composite ops have refused the others already.
template <class F>
void dispatch_invertible(act::Kind kind, const char* op, F&& f) {
  act::dispatch(kind, [&](auto tag) {
    constexpr act::Kind K = decltype(tag)::value;
    if constexpr (K == act::Kind::kIdentity || K == act::Kind::kLeakyRelu || K == act::Kind::kElu) {
      f(tag);
    } else {
      TORCH_CHECK(false, op, ": in-place mode needs an invertible activation");
    }
  });
}

// f(KindTag) for the piecewise linear activations (act::piecewise_linear),
// the only ones whose layers keep their output for backward.
template <class F>
void dispatch_piecewise_linear(act::Kind kind, const char* op, F&& f) {
  act::dispatch(kind, [&](auto tag) {
    constexpr act::Kind K = decltype(tag)::value;
    if constexpr (K == act::Kind::kIdentity || K == act::Kind::kRelu ||
                  K == act::Kind::kLeakyRelu || K == act::Kind::kRelu6) {
      f(tag);
    } else {
      TORCH_CHECK(false, op,
                  ": the derivative from the output needs a piecewise linear "
                  "activation (identity, relu, leaky_relu, relu6)");
    }
  });
}

// f(std::true_type{}) with a residual, f(std::false_type{}) without.
template <class F>
void dispatch_residual(const Tensor& residual, F&& f) {
  if (residual.defined()) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The backward reduce's per-channel (sum g, sum g * (x - mean)): opmath
// vectors like `like`, zeros (nothing launched) for an empty x. For x's dtype
// (dispatched here), launch(r) runs reduce() with r = GradReducer<scalar_t,
// kCentred> writing them (`mean` read by the reducer unless kCentred).
template <bool kCentred, class F>
std::tuple<Tensor, Tensor> grad_sums(const Tensor& x, const Tensor& mean, const Tensor& like,
                                     const F& launch) {
  if (x.numel() == 0)
    return {at::zeros({x.size(1)}, like.options()), at::zeros({x.size(1)}, like.options())};
  // Every channel is written by the kernels.
  Tensor sum = at::empty({x.size(1)}, like.options());
  Tensor sum_xmu = at::empty({x.size(1)}, like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_grad_sums_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        launch(GradReducer<scalar_t, kCentred>{kCentred ? nullptr : mean.const_data_ptr<T>(),
                                               sum.mutable_data_ptr<T>(),
                                               sum_xmu.mutable_data_ptr<T>()});
      });
  return {sum, sum_xmu};
}

// The scalar type of a reducer handed to grad_sums' launch.
template <class R>
using scalar_of = typename std::decay_t<R>::scalar_t;

}  // namespace cuda_kernels

// ------------------------------------------------------------------- backend

#ifdef BNEXT_DEFINE_BATCH_NORM_CUDA_BACKEND

std::tuple<Tensor, Tensor> CudaBackend::stats(const Tensor& x) {
  const auto options = x.options().dtype(opmath_dtype(x.scalar_type()));
  if (x.numel() == 0) return {at::zeros({x.size(1)}, options), at::zeros({x.size(1)}, options)};
  // Every channel is written by the kernels.
  Tensor mean = at::empty({x.size(1)}, options);
  Tensor var = at::empty({x.size(1)}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_stats_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        const cuda_kernels::StatsReducer<scalar_t> r{mean.mutable_data_ptr<T>(),
                                                     var.mutable_data_ptr<T>()};
        const cuda_kernels::Inputs<scalar_t, 1> p{{x.const_data_ptr<scalar_t>()}, nullptr};
        cuda_kernels::reduce(r, p, channel_view(x), x);
      });
  return {mean, var};
}

Tensor CudaBackend::elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                          const Tensor& shift) {
  return cuda_kernels::affine_map<false>(Tensor(), x, mean, Tensor(), scale, shift);
}

Tensor CudaBackend::normalize(const Tensor& x, const Tensor& mean, const Tensor& var,
                              const Tensor& weight, const Tensor& bias, double eps) {
  Tensor out = empty_same_layout(x, x.scalar_type());
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_normalize_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        using E = cuda_kernels::StatsEnds<scalar_t>;
        const E ends{{},
                     mean.const_data_ptr<T>(),
                     var.const_data_ptr<T>(),
                     data_or_null<T>(weight),
                     data_or_null<T>(bias),
                     static_cast<T>(eps)};
        cuda_kernels::affine_into<false>(Tensor(), x, out, ends, Tensor(), Tensor(), Tensor());
      });
  return out;
}

std::tuple<Tensor, Tensor> CudaBackend::backward_reduce(const Tensor& dy, const Tensor& x,
                                                        const Tensor& mean) {
  cuda_kernels::check_same_device("bnext::batch_norm_backward_reduce", dy, x);
  return cuda_kernels::grad_sums<false>(x, mean, mean, [&](const auto& r) {
    using scalar_t = cuda_kernels::scalar_of<decltype(r)>;
    const cuda_kernels::Inputs<scalar_t, 2> p{
        {dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>()}, nullptr};
    cuda_kernels::reduce(r, p, channel_view(x), x);
  });
}

Tensor CudaBackend::backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                   const Tensor& a, const Tensor& k, const Tensor& c) {
  cuda_kernels::check_same_device("bnext::batch_norm_backward_elemt", dy, x);
  return cuda_kernels::affine_map<true>(dy, x, mean, a, k, c);
}

std::tuple<Tensor, Tensor> CudaBackend::backward_normalize(const Tensor& dy, const Tensor& x,
                                                           const Tensor& mean, const Tensor& var,
                                                           const Tensor& weight, const Tensor& r,
                                                           const Tensor& d, const Tensor& sum_dy,
                                                           const Tensor& sum_dy_xmu, double eps,
                                                           bool training, int64_t count) {
  // No element, no thread to write the weight gradient.
  if (x.numel() == 0) {
    return backward_in_two_passes<CudaBackend>(dy, x, mean, var, weight, r, d, sum_dy, sum_dy_xmu,
                                               eps, training, count);
  }
  cuda_kernels::check_same_device("bnext::batch_norm_backward", dy, x);
  Tensor dx = empty_same_layout(x, x.scalar_type());
  Tensor grad_weight = at::empty({var.numel()}, var.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_backward_normalize_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        using E = cuda_kernels::StepGradEnds<scalar_t>;
        const BackwardStep<T> step{var.const_data_ptr<T>(),
                                   data_or_null<T>(weight),
                                   data_or_null<T>(r),
                                   data_or_null<T>(d),
                                   grad_weight.mutable_data_ptr<T>(),
                                   nullptr,
                                   nullptr,
                                   nullptr,
                                   static_cast<T>(eps),
                                   training};
        const E ends{{},
                     mean.const_data_ptr<T>(),
                     sum_dy.const_data_ptr<T>(),
                     sum_dy_xmu.const_data_ptr<T>(),
                     step,
                     count};
        cuda_kernels::affine_into<true>(dy, x, dx, ends, Tensor(), Tensor(), Tensor());
      });
  return {dx, grad_weight};
}

#endif  // BNEXT_DEFINE_BATCH_NORM_CUDA_BACKEND

// ------------------------------------------------------ with an activation
// Each activation (and residual or none) is its own instantiation of the
// kernels above: act::dispatch picks it on the host.

template <typename>
void CudaBackend::act_elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                            const Tensor& shift, const Tensor& residual, act::Kind kind,
                            double param, const Tensor& out) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_act_elemt_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        act::dispatch(kind, [&](auto tag) {
          constexpr act::Kind K = decltype(tag)::value;
          cuda_kernels::dispatch_residual(residual, [&](auto with_residual) {
            constexpr bool kResidual = decltype(with_residual)::value;
            const cuda_kernels::ActEnds<scalar_t, K, kResidual> ends{
                mean.const_data_ptr<T>(), kResidual ? residual.const_data_ptr<scalar_t>() : nullptr,
                static_cast<T>(param)};
            cuda_kernels::affine_into<false>(Tensor(), x, out, ends, Tensor(), scale, shift);
          });
        });
      });
}

template <typename>
std::tuple<Tensor, Tensor, Tensor> CudaBackend::act_backward_reduce(
    const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& scale, const Tensor& shift,
    const Tensor& residual, act::Kind kind, double param) {
  cuda_kernels::check_same_device("bnext::batch_norm_act_backward_reduce", dy, x);
  Tensor g = empty_same_layout(x, x.scalar_type());
  const auto [sum_g, sum_g_xmu] = cuda_kernels::grad_sums<true>(x, mean, mean, [&](const auto& r) {
    using scalar_t = cuda_kernels::scalar_of<decltype(r)>;
    using T = at::opmath_type<scalar_t>;
    act::dispatch(kind, [&](auto tag) {
      constexpr act::Kind K = decltype(tag)::value;
      cuda_kernels::dispatch_residual(residual, [&](auto with_residual) {
        constexpr bool kResidual = decltype(with_residual)::value;
        cuda_kernels::ActGradPrologue<scalar_t, K, kResidual> p{};
        p.in[0] = dy.const_data_ptr<scalar_t>();
        p.in[1] = x.const_data_ptr<scalar_t>();
        if constexpr (kResidual) p.in[2] = residual.const_data_ptr<scalar_t>();
        p.out = g.mutable_data_ptr<scalar_t>();
        p.mean = mean.const_data_ptr<T>();
        p.scale = scale.const_data_ptr<T>();
        p.shift = shift.const_data_ptr<T>();
        p.param = static_cast<T>(param);
        cuda_kernels::reduce(r, p, channel_view(x), x);
      });
    });
  });
  return {g, sum_g, sum_g_xmu};
}

template <typename>
std::tuple<Tensor, Tensor> CudaBackend::act_backward_sums(const Tensor& dy, const Tensor& x,
                                                          const Tensor& mean, const Tensor& scale,
                                                          const Tensor& shift, act::Kind kind,
                                                          double param) {
  cuda_kernels::check_same_device("bnext::batch_norm_act_backward_sums", dy, x);
  return cuda_kernels::grad_sums<true>(x, mean, mean, [&](const auto& r) {
    using scalar_t = cuda_kernels::scalar_of<decltype(r)>;
    using T = at::opmath_type<scalar_t>;
    act::dispatch(kind, [&](auto tag) {
      const cuda_kernels::ActGradPrologue<scalar_t, decltype(tag)::value, false, false> p{
          {dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>()},
          nullptr,
          mean.const_data_ptr<T>(),
          scale.const_data_ptr<T>(),
          shift.const_data_ptr<T>(),
          static_cast<T>(param)};
      cuda_kernels::reduce(r, p, channel_view(x), x);
    });
  });
}

template <typename>
Tensor CudaBackend::act_backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                       const Tensor& scale, const Tensor& shift, const Tensor& a,
                                       const Tensor& k, const Tensor& c, act::Kind kind,
                                       double param) {
  cuda_kernels::check_same_device("bnext::batch_norm_act_backward_elemt", dy, x);
  Tensor dx = empty_same_layout(x, x.scalar_type());
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_act_backward_elemt_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        act::dispatch(kind, [&](auto tag) {
          const cuda_kernels::ActGradEnds<scalar_t, decltype(tag)::value> ends{
              mean.const_data_ptr<T>(), scale.const_data_ptr<T>(), shift.const_data_ptr<T>(),
              static_cast<T>(param)};
          cuda_kernels::affine_into<true>(dy, x, dx, ends, a, k, c);
        });
      });
  return dx;
}

template <typename>
std::tuple<Tensor, Tensor, Tensor> CudaBackend::act_backward_reduce_from_output(
    const Tensor& dy, const Tensor& x, const Tensor& y, const Tensor& mean, act::Kind kind,
    double param) {
  const char* op = "bnext::batch_norm_act_backward_reduce_from_output";
  cuda_kernels::check_same_device(op, dy, x);
  cuda_kernels::check_same_device(op, y, x);
  Tensor g = empty_same_layout(x, x.scalar_type());
  const auto [sum_g, sum_g_xmu] = cuda_kernels::grad_sums<true>(x, mean, mean, [&](const auto& r) {
    using scalar_t = cuda_kernels::scalar_of<decltype(r)>;
    using T = at::opmath_type<scalar_t>;
    cuda_kernels::dispatch_piecewise_linear(kind, op, [&](auto tag) {
      const cuda_kernels::OutputGradPrologue<scalar_t, decltype(tag)::value> p{
          {dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
           y.const_data_ptr<scalar_t>()},
          g.mutable_data_ptr<scalar_t>(),
          mean.const_data_ptr<T>(),
          static_cast<T>(param)};
      cuda_kernels::reduce(r, p, channel_view(x), x);
    });
  });
  return {g, sum_g, sum_g_xmu};
}

template <typename>
std::tuple<Tensor, Tensor, Tensor> CudaBackend::inplace_backward_reduce(
    const Tensor& dy, const Tensor& y, const Tensor& shift, const Tensor& inv_scale, act::Kind kind,
    double param) {
  const char* op = "bnext::batch_norm_act_inplace_backward_reduce";
  cuda_kernels::check_same_device(op, dy, y);
  Tensor g = empty_same_layout(y, y.scalar_type());
  const auto [sum_g, sum_g_xmu] =
      cuda_kernels::grad_sums<true>(y, Tensor(), shift, [&](const auto& r) {
        using scalar_t = cuda_kernels::scalar_of<decltype(r)>;
        using T = at::opmath_type<scalar_t>;
        cuda_kernels::dispatch_invertible(kind, op, [&](auto tag) {
          const cuda_kernels::InplaceGradPrologue<scalar_t, decltype(tag)::value> p{
              {dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>()},
              g.mutable_data_ptr<scalar_t>(),
              shift.const_data_ptr<T>(),
              inv_scale.const_data_ptr<T>(),
              static_cast<T>(param)};
          cuda_kernels::reduce(r, p, channel_view(y), y);
        });
      });
  return {g, sum_g, sum_g_xmu};
}

template <typename>
Tensor CudaBackend::inplace_backward_elemt(const Tensor& g, const Tensor& y, const Tensor& shift,
                                           const Tensor& inv_scale, const Tensor& a,
                                           const Tensor& k, const Tensor& c, act::Kind kind,
                                           double param) {
  const char* op = "bnext::batch_norm_act_inplace_backward_elemt";
  cuda_kernels::check_same_device(op, g, y);
  Tensor dx = empty_same_layout(y, y.scalar_type());
  if (y.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "bnext_inplace_elemt_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        cuda_kernels::dispatch_invertible(kind, op, [&](auto tag) {
          constexpr act::Kind K = decltype(tag)::value;
          const cuda_kernels::FromOutputEnds<scalar_t, K> ends{
              shift.const_data_ptr<T>(), inv_scale.const_data_ptr<T>(), static_cast<T>(param)};
          cuda_kernels::affine_into<true>(g, y, dx, ends, a, k, c);
        });
      });
  return dx;
}

}  // namespace batch_norm
}  // namespace bnext
