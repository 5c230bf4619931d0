// Batch Norm CPU kernels: the statistics, and the functors that Batch Norm
// and Batch Norm + activation run through the shared passes (cpu_passes.h:
// the elementwise map and the backward sums). How each layout is walked:
// cpu_layout.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>
#include <vector>

#include "batch_norm/composite.h"
#include "batch_norm/cpu_backend.h"
#include "batch_norm/cpu_layout.h"
#include "batch_norm/cpu_passes.h"
#include "bnext/activation.h"
#include "bnext/welford.h"
#include "common/cpu_reduce.h"
#include "common/cpu_vec.h"
#include "common/layout.h"

namespace bnext {
namespace batch_norm {
namespace cpu_kernels {
namespace {

// ---------------------------------------------------------------- statistics

// Partial (mean, m2) of every channel, part-major (index part * C + c), and
// each part's count, which is the same for all channels of a part.
template <typename T>
struct ChannelParts {
  ChannelParts(int64_t parts, int64_t C) : mean(parts * C), m2(parts * C), count(parts) {}
  std::vector<T> mean;
  std::vector<T> m2;
  std::vector<int64_t> count;
};

// Merges each channel's parts in part order. The merge weights depend on the
// counts only, so the loop over channels has no division and vectorises.
template <typename T>
void write_stats(const ChannelParts<T>& parts, int64_t C, Tensor& mean, Tensor& var) {
  T* mean_p = mean.mutable_data_ptr<T>();
  T* var_p = var.mutable_data_ptr<T>();
  const auto num_parts = static_cast<int64_t>(parts.count.size());
  at::parallel_for(0, C, grain_for(num_parts), [&](int64_t c0, int64_t c1) {
    int64_t seen = 0;
    for (int64_t j = 0; j < num_parts; ++j) {
      const int64_t n = parts.count[j];
      const T* pm = parts.mean.data() + j * C;
      const T* pq = parts.m2.data() + j * C;
      cpu::merge_partials<T>(mean_p + c0, var_p + c0, pm + c0, pq + c0, c1 - c0, seen, n);
      seen += n;
    }
    for (int64_t c = c0; c < c1; ++c) var_p[c] = welford_var(Welford<T>{mean_p[c], var_p[c], seen});
  });
}

template <typename scalar_t>
void stats_channels_first(const Tensor& x, const ChannelView& v, Tensor& mean, Tensor& var) {
  using T = acc_t<scalar_t>;
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  ChannelParts<T> planes(v.N, v.C);  // plane n * C + c is part n of channel c
  std::fill(planes.count.begin(), planes.count.end(), v.S);
  at::parallel_for(0, v.N * v.C, grain_for(v.S), [&](int64_t begin, int64_t end) {
    // Four planes at a time: those of one block take their horizontal sums
    // together (measured on 32x256x14x14: 0.068 -> 0.060 ms in bfloat16).
    cpu::for_each_row_group<4>(begin, end, [&](auto rows, int64_t i) {
      cpu::moments<decltype(rows)::value>(x_p + i * v.S, v.S, v.S, planes.mean.data() + i,
                                          planes.m2.data() + i);
    });
  });
  write_stats(planes, v.C, mean, var);
}

// Vectorised across channels: blocks of kRowBlock rows are reduced in two
// sweeps (sum, then squared deviations from the block mean, re-read from L1)
// and merged into the tile's running (mean, m2) with Chan's formula. Every
// lane has seen the same rows, so the merge weights are scalars.
constexpr int64_t kRowBlock = 64;

// (mean, m2) of rows [r0, r1) of wide rows, per channel, into out_mean and
// out_m2; `scratch` holds 2 * C values.
template <typename scalar_t>
BNEXT_FLATTEN void stats_wide_rows(const scalar_t* x_p, int64_t C, int64_t r0, int64_t r1,
                                   acc_t<scalar_t>* out_mean, acc_t<scalar_t>* out_m2,
                                   acc_t<scalar_t>* scratch) {
  using T = acc_t<scalar_t>;
  T* bm = scratch;
  T* bq = scratch + C;
  int64_t seen = 0;
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    std::fill(bm, bm + 2 * C, T(0));
    for_each_row_group<scalar_t>(C, b0, b1, [&](auto rows, int64_t r, int64_t c, int64_t n) {
      auto acc = Vec<scalar_t>::loadu(bm + c, n);
      for (int j = 0; j < decltype(rows)::value; ++j) acc += load_acc(x_p + (r + j) * C + c, n);
      acc.store(bm + c, n);
    });
    const Vec<scalar_t> inv_len(T(1) / static_cast<T>(b1 - b0));
    for_each_vec<scalar_t>(C, [&](int64_t c, int64_t n) {
      (Vec<scalar_t>::loadu(bm + c, n) * inv_len).store(bm + c, n);
    });
    for_each_row_group<scalar_t>(C, b0, b1, [&](auto rows, int64_t r, int64_t c, int64_t n) {
      const auto m = Vec<scalar_t>::loadu(bm + c, n);
      auto acc = Vec<scalar_t>::loadu(bq + c, n);
      for (int j = 0; j < decltype(rows)::value; ++j) {
        const auto d = load_acc(x_p + (r + j) * C + c, n) - m;
        acc = at::vec::fmadd(d, d, acc);
      }
      acc.store(bq + c, n);
    });
    cpu::merge_partials<T>(out_mean, out_m2, bm, bq, C, seen, b1 - b0);
    seen += b1 - b0;
  }
}

// Per-chunk (mean, m2) of each of the C columns of `rows` rows at x_p.
template <typename scalar_t>
ChannelParts<acc_t<scalar_t>> channels_last_parts(const scalar_t* x_p, int64_t C, int64_t rows) {
  using T = acc_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t per_chunk = rows_per_chunk(C, sizeof(scalar_t));
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  ChannelParts<T> parts(chunks, C);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t r0 = ch * per_chunk;
      const int64_t r1 = std::min(rows, r0 + per_chunk);
      parts.count[ch] = r1 - r0;
      if (wide_rows<scalar_t>(C)) {
        std::vector<T> scratch(2 * C);
        stats_wide_rows(x_p, C, r0, r1, parts.mean.data() + ch * C, parts.m2.data() + ch * C,
                        scratch.data());
        continue;
      }
      for_each_tile<scalar_t>(C, [&](int64_t c0, const int64_t* counts) {
        Vec<scalar_t> m[kTileVecs], q[kTileVecs], bm[kTileVecs], bq[kTileVecs];
        for (int j = 0; j < kTileVecs; ++j) m[j] = q[j] = Vec<scalar_t>(T(0));
        int64_t seen = 0;
        for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
          const int64_t b1 = std::min(r1, b0 + kRowBlock);
          for (int j = 0; j < kTileVecs; ++j) bm[j] = bq[j] = Vec<scalar_t>(T(0));
          for (int64_t r = b0; r < b1; ++r) {
            for (int j = 0; j < kTileVecs; ++j)
              bm[j] += load_acc(x_p + r * C + c0 + j * L, counts[j]);
          }
          const Vec<scalar_t> inv_len(T(1) / static_cast<T>(b1 - b0));
          for (int j = 0; j < kTileVecs; ++j) bm[j] = bm[j] * inv_len;
          for (int64_t r = b0; r < b1; ++r) {
            for (int j = 0; j < kTileVecs; ++j) {
              const auto d = load_acc(x_p + r * C + c0 + j * L, counts[j]) - bm[j];
              bq[j] = at::vec::fmadd(d, d, bq[j]);
            }
          }
          // Every lane has seen the same rows: scalar merge weights.
          cpu::merge_partials<T>(m, q, bm, bq, kTileVecs, seen, b1 - b0);
          seen += b1 - b0;
        }
        for (int j = 0; j < kTileVecs; ++j) {
          if (counts[j] == 0) continue;
          m[j].store(parts.mean.data() + ch * C + c0 + j * L, counts[j]);
          q[j].store(parts.m2.data() + ch * C + c0 + j * L, counts[j]);
        }
      });
    }
  });
  return parts;
}

template <typename scalar_t>
void stats_channels_last(const Tensor& x, const ChannelView& v, Tensor& mean, Tensor& var) {
  write_stats(channels_last_parts(x.const_data_ptr<scalar_t>(), v.C, v.rows()), v.C, mean, var);
}

template <typename scalar_t>
void stats_tiny_planes(const Tensor& x, const ChannelView& v, Tensor& mean, Tensor& var) {
  using T = acc_t<scalar_t>;
  const auto vparts = channels_last_parts(x.const_data_ptr<scalar_t>(), v.C * v.S, v.N);
  const auto chunks = static_cast<int64_t>(vparts.count.size());
  ChannelParts<T> parts(chunks * v.S, v.C);
  parts.mean = real_channel_parts(vparts.mean, chunks, v.C, v.S);
  parts.m2 = real_channel_parts(vparts.m2, chunks, v.C, v.S);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    std::fill_n(parts.count.begin() + ch * v.S, v.S, vparts.count[ch]);
  }
  write_stats(parts, v.C, mean, var);
}

template <typename scalar_t>
void stats_narrow_rows(const Tensor& x, const ChannelView& v, int64_t R, Tensor& mean,
                       Tensor& var) {
  using T = acc_t<scalar_t>;
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const int64_t groups = v.rows() / R;
  const int64_t tail = v.rows() - groups * R;
  ChannelParts<T> parts(0, v.C);
  if (groups > 0) {
    const auto vp = channels_last_parts(x_p, R * v.C, groups);
    parts.mean = vp.mean;
    parts.m2 = vp.m2;
    for (const int64_t n : vp.count) parts.count.insert(parts.count.end(), R, n);
  }
  if (tail > 0) {
    const auto tp = channels_last_parts(x_p + groups * R * v.C, v.C, tail);
    append(parts.mean, tp.mean);
    append(parts.m2, tp.m2);
    append(parts.count, tp.count);
  }
  write_stats(parts, v.C, mean, var);
}

// ------------------------------------------------------------------ functors
// What each elementwise map and backward reduce computes per value (interface:
// cpu_passes.h): values first, then the per-channel coefficients, in the
// order the backend passes them. V is a vector or a scalar of the policy M.

template <class M>
using V = typename M::V;

// Batch Norm's forward: (x - mean) * scale + shift.
struct Normalize {
  static constexpr int kCoeffs = 3;
  static constexpr bool kSecond = false;
  template <class M>
  V<M> operator()(M, V<M> x, V<M> /*none*/, V<M> mean, V<M> scale, V<M> shift) const {
    return muladd(x - mean, scale, shift);
  }
};

// Batch Norm's backward: a * dy + k * (x - mean) + c.
struct BackwardAffine {
  static constexpr int kCoeffs = 4;
  static constexpr bool kSecond = true;
  template <class M>
  V<M> operator()(M, V<M> x, V<M> dy, V<M> mean, V<M> a, V<M> k, V<M> c) const {
    return muladd(dy, a, muladd(x - mean, k, c));
  }
};

// Batch Norm's backward reduce: g = dy, xmu = x - mean.
struct PlainSums {
  static constexpr int kCoeffs = 1;
  static constexpr bool kThird = false;
  static constexpr bool kStoresG = false;
  template <class M>
  std::pair<V<M>, V<M>> operator()(M, V<M> dy, V<M> x, V<M> /*none*/, V<M> mean) const {
    return {dy, x - mean};
  }
};

// The activation's input u = xmu * scale + shift [+ residual], where
// kResidual. `param`: the activation's (bnext/activation.h).
template <typename T, bool kResidual>
struct ActInput {
  T param;
  template <class M>
  static V<M> input(V<M> xmu, V<M> scale, V<M> shift, V<M> residual) {
    const V<M> y = muladd(xmu, scale, shift);
    if constexpr (kResidual) {
      return y + residual;
    } else {
      return y;
    }
  }
};

// Forward: act(u); second input: the residual.
template <typename T, act::Kind K, bool kResidual>
struct NormalizeAct : ActInput<T, kResidual> {
  static constexpr int kCoeffs = 3;
  static constexpr bool kSecond = kResidual;
  template <class M>
  V<M> operator()(M, V<M> x, V<M> residual, V<M> mean, V<M> scale, V<M> shift) const {
    const V<M> u = this->template input<M>(x - mean, scale, shift, residual);
    return act::forward<M>(act::KindTag<K>{}, u, M::splat(this->param));
  }
};

// Backward reduce: g = dy * act'(u), stored where kStore (the residual's
// gradient, read back by the elementwise pass; without a residual that pass
// recomputes it: ActBackwardAffine); xmu = x - mean; third input: the residual.
template <typename T, act::Kind K, bool kResidual, bool kStore = true>
struct ActSums : ActInput<T, kResidual> {
  static constexpr int kCoeffs = 3;
  static constexpr bool kThird = kResidual;
  static constexpr bool kStoresG = kStore;
  template <class M>
  std::pair<V<M>, V<M>> operator()(M, V<M> dy, V<M> x, V<M> residual, V<M> mean, V<M> scale,
                                   V<M> shift) const {
    const V<M> xmu = x - mean;
    const V<M> u = this->template input<M>(xmu, scale, shift, residual);
    return {dy * act::derivative<M>(act::KindTag<K>{}, u, M::splat(this->param)), xmu};
  }
};

// Backward elementwise without a stored g: a * g + k * xmu + c with
// g = dy * act'(u) recomputed as ActSums does (reading dy again costs what
// reading g would, and g is then never written); second input: dy.
template <typename T, act::Kind K>
struct ActBackwardAffine {
  static constexpr int kCoeffs = 6;
  static constexpr bool kSecond = true;
  T param;
  template <class M>
  V<M> operator()(M, V<M> x, V<M> dy, V<M> mean, V<M> scale, V<M> shift, V<M> a, V<M> k,
                  V<M> c) const {
    const V<M> xmu = x - mean;
    const V<M> u = muladd(xmu, scale, shift);
    const V<M> g = dy * act::derivative<M>(act::KindTag<K>{}, u, M::splat(param));
    return muladd(g, a, muladd(xmu, k, c));
  }
};

// Backward reduce of a piecewise linear activation from its output y (kept
// instead of the residual): g = dy * act'(u) from y, stored; xmu = x - mean;
// third input: y.
template <typename T, act::Kind K>
struct OutputSums {
  static constexpr int kCoeffs = 1;
  static constexpr bool kThird = true;
  static constexpr bool kStoresG = true;
  T param;
  template <class M>
  std::pair<V<M>, V<M>> operator()(M, V<M> dy, V<M> x, V<M> y, V<M> mean) const {
    const V<M> d = act::derivative_from_output<M>(act::KindTag<K>{}, y, M::splat(param));
    return {dy * d, x - mean};
  }
};

// In-place mode, from the output y = act(u) of an invertible activation:
// xmu = (act^-1(y) - shift) * inv_scale.
template <class M, act::Kind K, typename T>
V<M> xmu_from_output(V<M> y, V<M> shift, V<M> inv_scale, T param) {
  return (act::inverse<M>(act::KindTag<K>{}, y, M::splat(param)) - shift) * inv_scale;
}

// Backward reduce: g = dy * act'(u) from y, stored.
template <typename T, act::Kind K>
struct InplaceSums {
  static constexpr int kCoeffs = 2;
  static constexpr bool kThird = false;
  static constexpr bool kStoresG = true;
  T param;
  template <class M>
  std::pair<V<M>, V<M>> operator()(M, V<M> dy, V<M> y, V<M> /*none*/, V<M> shift,
                                   V<M> inv_scale) const {
    const V<M> d = act::derivative_from_output<M>(act::KindTag<K>{}, y, M::splat(param));
    return {dy * d, xmu_from_output<M, K>(y, shift, inv_scale, param)};
  }
};

// Backward elementwise: a * g + k * xmu + c, xmu from y.
template <typename T, act::Kind K>
struct InplaceBackwardAffine {
  static constexpr int kCoeffs = 5;
  static constexpr bool kSecond = true;
  T param;
  template <class M>
  V<M> operator()(M, V<M> y, V<M> g, V<M> shift, V<M> inv_scale, V<M> a, V<M> k, V<M> c) const {
    return muladd(g, a, muladd(xmu_from_output<M, K>(y, shift, inv_scale, param), k, c));
  }
};

// f(KindTag) for the activation `kind` if in-place mode supports it (the
// operators have checked that it does).
template <class F>
void dispatch_invertible(act::Kind kind, const F& f) {
  act::dispatch(kind, [&](auto tag) {
    constexpr act::Kind K = decltype(tag)::value;
    if constexpr (K == act::Kind::kIdentity || K == act::Kind::kLeakyRelu || K == act::Kind::kElu) {
      f(tag);
    } else {
      TORCH_CHECK(false, "bnext: in-place mode needs an invertible activation");
    }
  });
}

// f(KindTag) for the piecewise linear activations (act::piecewise_linear).
template <class F>
void dispatch_piecewise_linear(act::Kind kind, const F& f) {
  act::dispatch(kind, [&](auto tag) {
    constexpr act::Kind K = decltype(tag)::value;
    if constexpr (K == act::Kind::kIdentity || K == act::Kind::kRelu ||
                  K == act::Kind::kLeakyRelu || K == act::Kind::kRelu6) {
      f(tag);
    } else {
      TORCH_CHECK(false,
                  "bnext: the derivative from the output needs a piecewise linear "
                  "activation (identity, relu, leaky_relu, relu6)");
    }
  });
}

// f(std::bool_constant<t.defined()>).
template <class F>
void dispatch_defined(const Tensor& t, const F& f) {
  if (t.defined()) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T>
const T* ptr(const Tensor& t) {
  return t.const_data_ptr<T>();
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

}  // namespace
}  // namespace cpu_kernels

// ------------------------------------------------------------------- backend

using cpu_kernels::acc_t;
using cpu_kernels::backward_sums;
using cpu_kernels::map_elementwise;
using cpu_kernels::ptr;
using cpu_kernels::ptr_or_null;
using cpu_kernels::ReduceStreams;

// Every kernel below dispatches on the dtype once, then on the activation
// (and the residual) once, outside its loops: each combination is its own
// instantiation of the passes.
#define BNEXT_DISPATCH_CPU(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

std::tuple<Tensor, Tensor> CpuBackend::stats(const Tensor& x) {
  using cpu_kernels::narrow_row_group;
  using cpu_kernels::tiny_planes;
  const auto opmath = opmath_dtype(x.scalar_type());
  Tensor mean = at::zeros({x.size(1)}, x.options().dtype(opmath));
  Tensor var = at::zeros({x.size(1)}, x.options().dtype(opmath));
  if (x.numel() == 0) return {mean, var};
  const ChannelView v = channel_view(x);
  BNEXT_DISPATCH_CPU(x, "bnext_stats", [&] {
    if (tiny_planes<scalar_t>(v)) {
      cpu_kernels::stats_tiny_planes<scalar_t>(x, v, mean, var);
    } else if (v.layout == Layout::kChannelsFirst) {
      cpu_kernels::stats_channels_first<scalar_t>(x, v, mean, var);
    } else if (const int64_t R = narrow_row_group<scalar_t>(v); R > 1) {
      cpu_kernels::stats_narrow_rows<scalar_t>(x, v, R, mean, var);
    } else {
      cpu_kernels::stats_channels_last<scalar_t>(x, v, mean, var);
    }
  });
  return {mean, var};
}

Tensor CpuBackend::elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                         const Tensor& shift) {
  Tensor out = empty_same_layout(x, x.scalar_type());
  BNEXT_DISPATCH_CPU(x, "bnext_elemt", [&] {
    using T = acc_t<scalar_t>;
    map_elementwise<scalar_t>(cpu_kernels::Normalize{}, x, Tensor(), out,
                              {ptr<T>(mean), ptr<T>(scale), ptr<T>(shift)});
  });
  return out;
}

// The coefficients' passes are loops over the channels here, not launches.
Tensor CpuBackend::normalize(const Tensor& x, const Tensor& mean, const Tensor& var,
                             const Tensor& weight, const Tensor& bias, double eps) {
  return normalize_in_two_passes<CpuBackend>(x, mean, var, weight, bias, eps);
}

std::tuple<Tensor, Tensor> CpuBackend::backward_normalize(const Tensor& dy, const Tensor& x,
                                                          const Tensor& mean, const Tensor& var,
                                                          const Tensor& weight, const Tensor& r,
                                                          const Tensor& d, const Tensor& sum_dy,
                                                          const Tensor& sum_dy_xmu, double eps,
                                                          bool training, int64_t count) {
  return backward_in_two_passes<CpuBackend>(dy, x, mean, var, weight, r, d, sum_dy, sum_dy_xmu, eps,
                                            training, count);
}

std::tuple<Tensor, Tensor> CpuBackend::backward_reduce(const Tensor& dy, const Tensor& x,
                                                       const Tensor& mean) {
  Tensor sum_dy = at::zeros({x.size(1)}, mean.options());
  Tensor sum_dy_xmu = at::zeros({x.size(1)}, mean.options());
  if (x.numel() == 0) return {sum_dy, sum_dy_xmu};
  BNEXT_DISPATCH_CPU(x, "bnext_reduce", [&] {
    using T = acc_t<scalar_t>;
    const ReduceStreams<scalar_t> s{ptr<scalar_t>(dy), ptr<scalar_t>(x), nullptr, nullptr};
    backward_sums(cpu_kernels::PlainSums{}, s, channel_view(x), {ptr<T>(mean)}, sum_dy, sum_dy_xmu);
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor CpuBackend::backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                  const Tensor& a, const Tensor& k, const Tensor& c) {
  Tensor out = empty_same_layout(x, x.scalar_type());
  BNEXT_DISPATCH_CPU(x, "bnext_backward_elemt", [&] {
    using T = acc_t<scalar_t>;
    map_elementwise<scalar_t>(cpu_kernels::BackwardAffine{}, x, dy, out,
                              {ptr<T>(mean), ptr<T>(a), ptr<T>(k), ptr<T>(c)});
  });
  return out;
}

void CpuBackend::act_elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                           const Tensor& shift, const Tensor& residual, act::Kind kind,
                           double param, const Tensor& out) {
  BNEXT_DISPATCH_CPU(x, "bnext_act_elemt", [&] {
    using T = acc_t<scalar_t>;
    act::dispatch(kind, [&](auto tag) {
      cpu_kernels::dispatch_defined(residual, [&](auto with_residual) {
        const cpu_kernels::NormalizeAct<T, decltype(tag)::value, decltype(with_residual)::value> f{
            {static_cast<T>(param)}};
        map_elementwise<scalar_t>(f, x, residual, out,
                                  {ptr<T>(mean), ptr<T>(scale), ptr<T>(shift)});
      });
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> CpuBackend::act_backward_reduce(
    const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& scale, const Tensor& shift,
    const Tensor& residual, act::Kind kind, double param) {
  Tensor g = empty_same_layout(x, x.scalar_type());
  Tensor sum_g = at::zeros({x.size(1)}, mean.options());
  Tensor sum_g_xmu = at::zeros({x.size(1)}, mean.options());
  if (x.numel() == 0) return {g, sum_g, sum_g_xmu};
  BNEXT_DISPATCH_CPU(x, "bnext_act_backward_reduce", [&] {
    using T = acc_t<scalar_t>;
    const ReduceStreams<scalar_t> s{ptr<scalar_t>(dy), ptr<scalar_t>(x),
                                    ptr_or_null<scalar_t>(residual),
                                    g.mutable_data_ptr<scalar_t>()};
    act::dispatch(kind, [&](auto tag) {
      cpu_kernels::dispatch_defined(residual, [&](auto with_residual) {
        const cpu_kernels::ActSums<T, decltype(tag)::value, decltype(with_residual)::value> pro{
            {static_cast<T>(param)}};
        backward_sums(pro, s, channel_view(x), {ptr<T>(mean), ptr<T>(scale), ptr<T>(shift)}, sum_g,
                      sum_g_xmu);
      });
    });
  });
  return {g, sum_g, sum_g_xmu};
}

std::tuple<Tensor, Tensor> CpuBackend::act_backward_sums(const Tensor& dy, const Tensor& x,
                                                         const Tensor& mean, const Tensor& scale,
                                                         const Tensor& shift, act::Kind kind,
                                                         double param) {
  Tensor sum_g = at::zeros({x.size(1)}, mean.options());
  Tensor sum_g_xmu = at::zeros({x.size(1)}, mean.options());
  if (x.numel() == 0) return {sum_g, sum_g_xmu};
  BNEXT_DISPATCH_CPU(x, "bnext_act_backward_sums", [&] {
    using T = acc_t<scalar_t>;
    const ReduceStreams<scalar_t> s{ptr<scalar_t>(dy), ptr<scalar_t>(x), nullptr, nullptr};
    act::dispatch(kind, [&](auto tag) {
      const cpu_kernels::ActSums<T, decltype(tag)::value, false, false> pro{
          {static_cast<T>(param)}};
      backward_sums(pro, s, channel_view(x), {ptr<T>(mean), ptr<T>(scale), ptr<T>(shift)}, sum_g,
                    sum_g_xmu);
    });
  });
  return {sum_g, sum_g_xmu};
}

Tensor CpuBackend::act_backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                      const Tensor& scale, const Tensor& shift, const Tensor& a,
                                      const Tensor& k, const Tensor& c, act::Kind kind,
                                      double param) {
  Tensor out = empty_same_layout(x, x.scalar_type());
  BNEXT_DISPATCH_CPU(x, "bnext_act_backward_elemt", [&] {
    using T = acc_t<scalar_t>;
    act::dispatch(kind, [&](auto tag) {
      const cpu_kernels::ActBackwardAffine<T, decltype(tag)::value> f{static_cast<T>(param)};
      map_elementwise<scalar_t>(
          f, x, dy, out,
          {ptr<T>(mean), ptr<T>(scale), ptr<T>(shift), ptr<T>(a), ptr<T>(k), ptr<T>(c)});
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> CpuBackend::act_backward_reduce_from_output(
    const Tensor& dy, const Tensor& x, const Tensor& y, const Tensor& mean, act::Kind kind,
    double param) {
  Tensor g = empty_same_layout(x, x.scalar_type());
  Tensor sum_g = at::zeros({x.size(1)}, mean.options());
  Tensor sum_g_xmu = at::zeros({x.size(1)}, mean.options());
  if (x.numel() == 0) return {g, sum_g, sum_g_xmu};
  BNEXT_DISPATCH_CPU(x, "bnext_act_backward_reduce_from_output", [&] {
    using T = acc_t<scalar_t>;
    const ReduceStreams<scalar_t> s{ptr<scalar_t>(dy), ptr<scalar_t>(x), ptr<scalar_t>(y),
                                    g.mutable_data_ptr<scalar_t>()};
    cpu_kernels::dispatch_piecewise_linear(kind, [&](auto tag) {
      const cpu_kernels::OutputSums<T, decltype(tag)::value> pro{static_cast<T>(param)};
      backward_sums(pro, s, channel_view(x), {ptr<T>(mean)}, sum_g, sum_g_xmu);
    });
  });
  return {g, sum_g, sum_g_xmu};
}

std::tuple<Tensor, Tensor, Tensor> CpuBackend::inplace_backward_reduce(
    const Tensor& dy, const Tensor& y, const Tensor& shift, const Tensor& inv_scale, act::Kind kind,
    double param) {
  Tensor g = empty_same_layout(y, y.scalar_type());
  Tensor sum_g = at::zeros({y.size(1)}, shift.options());
  Tensor sum_g_xmu = at::zeros({y.size(1)}, shift.options());
  if (y.numel() == 0) return {g, sum_g, sum_g_xmu};
  BNEXT_DISPATCH_CPU(y, "bnext_inplace_backward_reduce", [&] {
    using T = acc_t<scalar_t>;
    const ReduceStreams<scalar_t> s{ptr<scalar_t>(dy), ptr<scalar_t>(y), nullptr,
                                    g.mutable_data_ptr<scalar_t>()};
    cpu_kernels::dispatch_invertible(kind, [&](auto tag) {
      const cpu_kernels::InplaceSums<T, decltype(tag)::value> pro{static_cast<T>(param)};
      backward_sums(pro, s, channel_view(y), {ptr<T>(shift), ptr<T>(inv_scale)}, sum_g, sum_g_xmu);
    });
  });
  return {g, sum_g, sum_g_xmu};
}

Tensor CpuBackend::inplace_backward_elemt(const Tensor& g, const Tensor& y, const Tensor& shift,
                                          const Tensor& inv_scale, const Tensor& a, const Tensor& k,
                                          const Tensor& c, act::Kind kind, double param) {
  Tensor out = empty_same_layout(y, y.scalar_type());
  BNEXT_DISPATCH_CPU(y, "bnext_inplace_backward_elemt", [&] {
    using T = acc_t<scalar_t>;
    cpu_kernels::dispatch_invertible(kind, [&](auto tag) {
      const cpu_kernels::InplaceBackwardAffine<T, decltype(tag)::value> f{static_cast<T>(param)};
      map_elementwise<scalar_t>(
          f, y, g, out, {ptr<T>(shift), ptr<T>(inv_scale), ptr<T>(a), ptr<T>(k), ptr<T>(c)});
    });
  });
  return out;
}

#undef BNEXT_DISPATCH_CPU

TORCH_LIBRARY_IMPL(bnext, CPU, m) { register_kernels<CpuBackend>(m); }

}  // namespace batch_norm
}  // namespace bnext
