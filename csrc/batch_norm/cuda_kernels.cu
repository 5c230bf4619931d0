// Batch Norm CUDA kernels, the GPU counterpart of cpu_kernels.cpp. Layouts:
//   channels-first (NCHW): a channel's values come in N planes of S contiguous
//     elements. One block column per channel; blocks stride over planes (and,
//     when there are few planes, over stripes of each plane).
//   channels-last (NHWC, and (N, C) input): rows of C contiguous channels.
//     Threads run along channels so that a warp reads consecutive addresses;
//     rows are split across blockDim.y and across blocks.
// Reductions leave one partial result per (block, channel) in a staging buffer
// that a second kernel merges in a fixed order. The partition depends on the
// shape and the GPU's SM count only, and every merge is a fixed tree or loop,
// so results are bitwise reproducible from run to run (no atomics).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "batch_norm/composite.h"
#include "batch_norm/cuda_backend.cuh"
#include "bnext/welford.h"
#include "common/cuda_reduce.cuh"
#include "common/layout.h"

namespace bnext {
namespace batch_norm {
namespace {

using cuda::Pair;

constexpr int kReduceThreads = 512;  // a multiple of 32 and a power of two
constexpr int kElemtThreads = 256;
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Enough blocks to fill the GPU a few times over; more only adds partials.
int64_t target_blocks() { return 4 * num_sms(); }

int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p <<= 1;
  return p;
}

// Shared memory for `n` values of V: Welford and Pair are not trivially
// default-constructible, which __shared__ arrays require; doubles give them
// the 8-byte alignment they need.
template <typename V, int n>
struct SharedScratch {
  static constexpr int kDoubles = static_cast<int>((n * sizeof(V) + sizeof(double) - 1) / sizeof(double));
};

// ------------------------------------------------------------- reducers
// What a reduction accumulates per element; the kernels below only decide
// which elements each thread visits.

template <typename scalar_t>
struct StatsReducer {
  using T = at::opmath_type<scalar_t>;
  using V = Welford<T>;
  using Op = cuda::WelfordOp;
  const scalar_t* x;
  __device__ __forceinline__ void push(V& v, int64_t i, int64_t /*c*/) const {
    welford_push(v, static_cast<T>(x[i]));
  }
};

template <typename scalar_t>
struct GradReducer {
  using T = at::opmath_type<scalar_t>;
  using V = Pair<T>;
  using Op = cuda::PairSumOp;
  const scalar_t* dy;
  const scalar_t* x;
  const T* mean;
  __device__ __forceinline__ void push(V& v, int64_t i, int64_t c) const {
    const T g = static_cast<T>(dy[i]);
    v.a += g;
    v.b += g * (static_cast<T>(x[i]) - mean[c]);
  }
};

// Block (c, p): channel c, partial p = y * Z + z. Threads come in groups of
// `tpp` per plane; the group `slot` visits planes y * ppb + slot, stepping by
// Y * ppb, and within a plane the stripes z * tpp + lane, stepping by Z * tpp.
template <class R>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_channels_first_kernel(R r, int64_t N, int64_t C, int64_t S, int tpp, int64_t Y,
                                 int64_t Z, typename R::V* parts) {
  using V = typename R::V;
  __shared__ double raw[SharedScratch<V, cuda::kWarpSize>::kDoubles];
  V* scratch = reinterpret_cast<V*>(raw);
  const int64_t c = blockIdx.x;
  const int64_t y = blockIdx.y / Z;
  const int64_t z = blockIdx.y % Z;
  const int lane = threadIdx.x % tpp;
  const int slot = threadIdx.x / tpp;
  const int64_t ppb = blockDim.x / tpp;
  V v{};
  for (int64_t n = y * ppb + slot; n < N; n += Y * ppb) {
    const int64_t base = (n * C + c) * S;
    for (int64_t s = z * tpp + lane; s < S; s += Z * tpp) r.push(v, base + s, c);
  }
  v = cuda::block_reduce(v, typename R::Op{}, scratch, V{});
  if (threadIdx.x == 0) parts[static_cast<int64_t>(blockIdx.y) * C + c] = v;
}

// Block (tile, y): channels tile * blockDim.x + threadIdx.x, rows
// y * blockDim.y + threadIdx.y stepping by gridDim.y * blockDim.y.
template <class R>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_channels_last_kernel(R r, int64_t rows, int64_t C, typename R::V* parts) {
  using V = typename R::V;
  __shared__ double raw[SharedScratch<V, kReduceThreads>::kDoubles];
  V* scratch = reinterpret_cast<V*>(raw);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  V v{};
  if (c < C) {
    const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows;
         row += step) {
      r.push(v, row * C + c, c);
    }
  }
  v = cuda::column_reduce(v, typename R::Op{}, scratch);
  if (threadIdx.y == 0 && c < C) parts[static_cast<int64_t>(blockIdx.y) * C + c] = v;
}

// Launches the first pass of a reduction; returns the staging buffer of
// `num_parts` partial results per channel, laid out [part][channel].
template <class R>
Tensor reduce_partials(const R& r, const ChannelView& v, const Tensor& like, int64_t& num_parts) {
  using V = typename R::V;
  TORCH_CHECK(v.C <= std::numeric_limits<int32_t>::max(), "bnext: too many channels for the CUDA kernels: ", v.C);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t target = target_blocks();
  const auto staging = [&](int64_t parts) {
    num_parts = parts;
    return at::empty({parts * v.C * static_cast<int64_t>(sizeof(V))}, like.options().dtype(at::kByte));
  };
  if (v.layout == Layout::kChannelsFirst) {
    const int tpp = pow2_at_least(v.S, kReduceThreads);
    const int64_t ppb = kReduceThreads / tpp;
    const int64_t Y =
        std::max<int64_t>(1, std::min({ceil_div(target, v.C), ceil_div(v.N, ppb), kMaxGridY}));
    // Few channels and few planes: split the planes' stripes across blocks too.
    const int64_t Z = std::max<int64_t>(
        1, std::min({ceil_div(target, v.C * Y), ceil_div(v.S, tpp), kMaxGridY / Y}));
    Tensor buf = staging(Y * Z);
    const dim3 grid(static_cast<unsigned>(v.C), static_cast<unsigned>(Y * Z));
    reduce_channels_first_kernel<R><<<grid, kReduceThreads, 0, stream>>>(
        r, v.N, v.C, v.S, tpp, Y, Z, reinterpret_cast<V*>(buf.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return buf;
  }
  const int64_t rows = v.rows();
  const int bx = pow2_at_least(v.C, cuda::kWarpSize);
  const int by = kReduceThreads / bx;
  const int64_t tiles = ceil_div(v.C, bx);
  const int64_t Y =
      std::max<int64_t>(1, std::min({ceil_div(target, tiles), ceil_div(rows, by), kMaxGridY}));
  Tensor buf = staging(Y);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(Y));
  const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  reduce_channels_last_kernel<R><<<grid, block, 0, stream>>>(
      r, rows, v.C, reinterpret_cast<V*>(buf.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return buf;
}

// Second pass: one thread per channel merges its partials in index order.
template <typename T>
__global__ void stats_finalize_kernel(const Welford<T>* parts, int64_t num_parts, int64_t C,
                                      T* mean, T* var) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += stride) {
    Welford<T> acc;
    for (int64_t p = 0; p < num_parts; ++p) acc = welford_merge(acc, parts[p * C + c]);
    mean[c] = acc.mean;
    var[c] = welford_var(acc);
  }
}

template <typename T>
__global__ void sums_finalize_kernel(const Pair<T>* parts, int64_t num_parts, int64_t C,
                                     T* sum_a, T* sum_b) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += stride) {
    T a = T(0);
    T b = T(0);
    for (int64_t p = 0; p < num_parts; ++p) {
      a += parts[p * C + c].a;
      b += parts[p * C + c].b;
    }
    sum_a[c] = a;
    sum_b[c] = b;
  }
}

dim3 per_channel_grid(int64_t C) {
  return dim3(static_cast<unsigned>(std::min<int64_t>(ceil_div(C, 256), 1024)));
}

// ------------------------------------------- elementwise: a*g + k*(x-mean) + c
// The forward pass is the same map without g: y = scale * (x - mean) + shift.
// Input and output share one dense layout, so the flat index i addresses the
// same element in both, and in dy.

// The channel of flat index i is (i / S) % C (channels-first) or i % C
// (channels-last). 64-bit division costs dozens of instructions per element,
// so tensors under 2^31 elements index with 32-bit magic-number division.
template <typename scalar_t, bool kWithGrad, bool kChannelsLast, typename Index>
__global__ void affine_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                              scalar_t* __restrict__ out, const at::opmath_type<scalar_t>* mean,
                              const at::opmath_type<scalar_t>* a,
                              const at::opmath_type<scalar_t>* k,
                              const at::opmath_type<scalar_t>* cc, Index numel,
                              at::cuda::detail::IntDivider<Index> by_s,
                              at::cuda::detail::IntDivider<Index> by_c) {
  using T = at::opmath_type<scalar_t>;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const Index c = kChannelsLast ? by_c.mod(i) : by_c.mod(by_s.div(i));
    T y = (static_cast<T>(x[i]) - mean[c]) * k[c] + cc[c];
    if constexpr (kWithGrad) y += a[c] * static_cast<T>(g[i]);
    out[i] = static_cast<scalar_t>(y);
  }
}

template <typename scalar_t, bool kWithGrad, typename Index>
void launch_affine(const scalar_t* g, const scalar_t* x, scalar_t* out,
                   const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* a,
                   const at::opmath_type<scalar_t>* k, const at::opmath_type<scalar_t>* c,
                   const ChannelView& v, int64_t numel) {
  const int64_t blocks = std::min<int64_t>(ceil_div(numel, kElemtThreads), num_sms() * 16);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::cuda::detail::IntDivider<Index> by_s(static_cast<Index>(v.S));
  const at::cuda::detail::IntDivider<Index> by_c(static_cast<Index>(v.C));
  if (v.layout == Layout::kChannelsFirst) {
    affine_kernel<scalar_t, kWithGrad, false, Index>
        <<<static_cast<unsigned>(blocks), kElemtThreads, 0, stream>>>(
            g, x, out, mean, a, k, c, static_cast<Index>(numel), by_s, by_c);
  } else {
    affine_kernel<scalar_t, kWithGrad, true, Index>
        <<<static_cast<unsigned>(blocks), kElemtThreads, 0, stream>>>(
            g, x, out, mean, a, k, c, static_cast<Index>(numel), by_s, by_c);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kWithGrad>
Tensor affine(const Tensor& g, const Tensor& x, const Tensor& mean, const Tensor& a,
              const Tensor& k, const Tensor& c_) {
  Tensor out = empty_same_layout(x, x.scalar_type());
  if (x.numel() == 0) return out;
  const ChannelView v = channel_view(x);
  const int64_t numel = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_affine_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* g_p = kWithGrad ? g.const_data_ptr<scalar_t>() : nullptr;
    const T* a_p = kWithGrad ? a.const_data_ptr<T>() : nullptr;
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
    const T* m_p = mean.const_data_ptr<T>();
    const T* k_p = k.const_data_ptr<T>();
    const T* c_p = c_.const_data_ptr<T>();
    // Below 2^31, i + stride cannot wrap a 32-bit index.
    if (numel <= std::numeric_limits<int32_t>::max()) {
      launch_affine<scalar_t, kWithGrad, uint32_t>(g_p, x_p, o_p, m_p, a_p, k_p, c_p, v, numel);
    } else {
      launch_affine<scalar_t, kWithGrad, int64_t>(g_p, x_p, o_p, m_p, a_p, k_p, c_p, v, numel);
    }
  });
  return out;
}

void check_same_device(const char* op, const Tensor& dy, const Tensor& x) {
  TORCH_CHECK(dy.device() == x.device(), op, ": expected grad_out on ", x.device(), ", got ",
              dy.device());
}

}  // namespace

// ------------------------------------------------------------------- backend

std::tuple<Tensor, Tensor> CudaBackend::stats(const Tensor& x) {
  const auto opmath = opmath_dtype(x.scalar_type());
  Tensor mean = at::zeros({x.size(1)}, x.options().dtype(opmath));
  Tensor var = at::zeros({x.size(1)}, x.options().dtype(opmath));
  if (x.numel() == 0) return {mean, var};
  const ChannelView v = channel_view(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_stats_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    int64_t num_parts = 0;
    const Tensor parts =
        reduce_partials(StatsReducer<scalar_t>{x.const_data_ptr<scalar_t>()}, v, x, num_parts);
    stats_finalize_kernel<T><<<per_channel_grid(v.C), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const Welford<T>*>(parts.const_data_ptr()), num_parts, v.C,
        mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

Tensor CudaBackend::elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                          const Tensor& shift) {
  return affine<false>(Tensor(), x, mean, Tensor(), scale, shift);
}

std::tuple<Tensor, Tensor> CudaBackend::backward_reduce(const Tensor& dy, const Tensor& x,
                                                        const Tensor& mean) {
  check_same_device("bnext::batch_norm_backward_reduce", dy, x);
  Tensor sum_dy = at::zeros({x.size(1)}, mean.options());
  Tensor sum_dy_xmu = at::zeros({x.size(1)}, mean.options());
  if (x.numel() == 0) return {sum_dy, sum_dy_xmu};
  const ChannelView v = channel_view(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_reduce_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    int64_t num_parts = 0;
    const GradReducer<scalar_t> r{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  mean.const_data_ptr<T>()};
    const Tensor parts = reduce_partials(r, v, x, num_parts);
    sums_finalize_kernel<T><<<per_channel_grid(v.C), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const Pair<T>*>(parts.const_data_ptr()), num_parts, v.C,
        sum_dy.mutable_data_ptr<T>(), sum_dy_xmu.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor CudaBackend::backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                   const Tensor& a, const Tensor& k, const Tensor& c) {
  check_same_device("bnext::batch_norm_backward_elemt", dy, x);
  return affine<true>(dy, x, mean, a, k, c);
}

TORCH_LIBRARY_IMPL(bnext, CUDA, m) {
  register_kernels<CudaBackend>(m);
}

}  // namespace batch_norm
}  // namespace bnext
