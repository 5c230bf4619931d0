// Batch Norm's two passes over the data after the statistics, written once
// over a small functor so that Batch Norm and Batch Norm + activation share
// their loops (layouts: cpu_layout.h); included by cpu_kernels.cpp only.
//
//   map_elementwise: out = f(per-channel coefficients, x [, second input]),
//     e.g. (x - mean) * scale + shift, or a * dy + k * (x - mean) + c.
//   backward_sums:   per channel sum(g) and sum(g * xmu), where the prologue
//     gives (g, xmu) from (dy, x [, third input]) and may store g.
//
// A functor is called as f(M{}, values..., coefficients...) with the math
// policy M of the values: cpu::VecMath<T> for vectors, act::ScalarMath<T> for
// the scalar head of a streamed plane. Functors are inlined into the loops, so
// that Batch Norm's own compile to the loops it had as plain code (with AVX2
// and AVX-512 the same instructions; over the default build's plain C++
// Vectorized, which GCC vectorises loop by loop, up to 20% more instructions
// in the elementwise pass over channels-first planes). The
// per-channel coefficients reach a functor as separate values (call), not as
// an array: GCC vectorised that Vectorized in some array forms and not in
// others, a different one for each functor.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "batch_norm/cpu_layout.h"
#include "bnext/activation.h"
#include "common/cpu_activation.h"
#include "common/cpu_cache.h"
#include "common/cpu_reduce.h"
#include "common/cpu_vec.h"
#include "common/layout.h"

namespace bnext {
namespace batch_norm {
namespace cpu_kernels {

using at::Tensor;
using cpu::grain_for;
using cpu::hsum;
using cpu::load_acc;
using cpu::load_acc2;
using cpu::should_stream;
using cpu::store_acc;
using cpu::store_acc2;
using cpu::stream_acc2;
using cpu::stream_fence;
using cpu::stream_head;

// Where GCC's own choices regressed once the passes took a functor, the
// choice is made here, checked on the generated loops against the plain code
// they replace. It differs with the vectors: registers (AVX2, AVX-512), or the
// default build's plain C++ Vectorized, which GCC vectorises (or scalarises)
// anew in every loop.
//  - A lambda that maps vectors is inlined (out of line, the default build
//    called it per pair of vectors).
//  - plane_sums is inlined into the loop over planes with register vectors
//    (out of line, each plane paid a call); with plain C++ ones, GCC then
//    scalarised the loop, so it decides.
//  - A plane's coefficients come by value with register vectors: behind a
//    reference they might alias the output, and were reloaded and broadcast
//    after every store. With plain C++ ones, by value made GCC scalarise a
//    loop; by reference it vectorised them all.
#if defined(__GNUC__)
#define BNEXT_INLINE_LAMBDA __attribute__((always_inline))
#else
#define BNEXT_INLINE_LAMBDA
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kRegisterVectors = true;
#define BNEXT_INLINE_PLANE C10_ALWAYS_INLINE
#else
constexpr bool kRegisterVectors = false;
#define BNEXT_INLINE_PLANE
#endif

template <typename T, std::size_t P>
using PlaneCoeffs =
    std::conditional_t<kRegisterVectors, const std::array<T, P>, const std::array<T, P>&>;

// a * b + c, fused, for both math policies' values (functors write it once).
template <typename T>
inline T muladd(T a, T b, T c) {
  return std::fma(a, b, c);
}
template <typename T>
inline at::vec::Vectorized<T> muladd(const at::vec::Vectorized<T>& a,
                                     const at::vec::Vectorized<T>& b,
                                     const at::vec::Vectorized<T>& c) {
  return at::vec::fmadd(a, b, c);
}

// The P per-channel opmath vectors a functor reads, in its order.
template <typename T, std::size_t P>
using Coeffs = std::array<const T*, P>;

// std::array{f(0), ..., f(P - 1)}, written without a loop: with a loop in
// load_coeffs, GCC 12 kept the vectors it filled, and the tile accumulators
// beside them, in memory, storing them on every row of channels_last_sums.
template <class F, std::size_t... I>
auto make_array(const F& f, std::index_sequence<I...>) {
  return std::array<decltype(f(std::size_t{0})), sizeof...(I)>{{f(I)...}};
}

// The coefficients' values at channel ch.
template <typename T, std::size_t P>
std::array<T, P> coeffs_at(const Coeffs<T, P>& co, int64_t ch) {
  return make_array([&](std::size_t i) { return co[i][ch]; }, std::make_index_sequence<P>{});
}

// The vectors of channels [c, c + n) (lanes past n are zero).
template <typename T, std::size_t P>
std::array<at::vec::Vectorized<T>, P> load_coeffs(const Coeffs<T, P>& co, int64_t c,
                                                  int64_t n = at::vec::Vectorized<T>::size()) {
  return make_array([&](std::size_t i) { return at::vec::Vectorized<T>::loadu(co[i] + c, n); },
                    std::make_index_sequence<P>{});
}

// f(m, values..., get(0), ..., get(P - 1)): a functor called with its values
// and its P coefficients.
template <class F, class M, class Get, std::size_t... I, class... V>
C10_ALWAYS_INLINE auto call_impl(const F& f, M m, const Get& get, std::index_sequence<I...>,
                                 const V&... values) {
  return f(m, values..., get(I)...);
}

template <std::size_t P, class F, class M, class Get, class... V>
C10_ALWAYS_INLINE auto call(const F& f, M m, const Get& get, const V&... values) {
  return call_impl(f, m, get, std::make_index_sequence<P>{}, values...);
}

// Coefficients of virtual channels: each one expanded (repeat_each or
// repeat_whole), kept alive by `store`.
template <typename T, std::size_t P>
struct ExpandedCoeffs {
  std::array<std::vector<T>, P> store;
  Coeffs<T, P> ptrs() const {
    Coeffs<T, P> out;
    for (std::size_t i = 0; i < P; ++i) out[i] = store[i].data();
    return out;
  }
};

template <typename T, std::size_t P, class E>
ExpandedCoeffs<T, P> expand(const Coeffs<T, P>& co, const E& expand_one) {
  ExpandedCoeffs<T, P> out;
  for (std::size_t i = 0; i < P; ++i) out.store[i] = expand_one(co[i]);
  return out;
}

// ---------------------------------------------------------------- elementwise
// F provides kCoeffs, kSecond (whether it reads a second input) and
//   V operator()(M, V x, V second, V coefficient...) const
// with kCoeffs coefficients; `second` is zero when kSecond is false.

// One plane of S contiguous values; `stream`: with non-temporal stores
// (cpu_vec.h), from the first aligned element.
template <typename scalar_t, class F>
void map_plane(const F& f, const scalar_t* x, const scalar_t* s, scalar_t* out, int64_t S,
               PlaneCoeffs<acc_t<scalar_t>, F::kCoeffs> co, bool stream) {
  using T = acc_t<scalar_t>;
  using VM = cpu::VecMath<T>;
  constexpr std::size_t P = F::kCoeffs;
  constexpr int64_t L = kLanes<scalar_t>;
  const auto scalar = [&](std::size_t i) { return co[i]; };
  const auto vector = [&](std::size_t i) { return Vec<scalar_t>(co[i]); };
  const Vec<scalar_t> zero(T(0));
  const auto one = [&](int64_t j) {
    // The scalar policy does what the vector one does, fused multiply-adds
    // included, so that where a plane splits into scalar and vector parts
    // changes no bit of Batch Norm's output (with an activation, at most the
    // last bit of a library function).
    const T sj = F::kSecond ? static_cast<T>(s[j]) : T(0);
    const T y = call<P>(f, act::ScalarMath<T>{}, scalar, static_cast<T>(x[j]), sj);
    out[j] = static_cast<scalar_t>(y);
  };
  const auto two = [&](int64_t j) BNEXT_INLINE_LAMBDA {
    const auto [x0, x1] = load_acc2(x + j);
    if constexpr (F::kSecond) {
      const auto [s0, s1] = load_acc2(s + j);
      return std::pair{call<P>(f, VM{}, vector, x0, s0), call<P>(f, VM{}, vector, x1, s1)};
    } else {
      return std::pair{call<P>(f, VM{}, vector, x0, zero), call<P>(f, VM{}, vector, x1, zero)};
    }
  };
  int64_t j = 0;
  if (stream) {
    for (const int64_t head = std::min(S, stream_head(out)); j < head; ++j) one(j);
    for (; j + 2 * L <= S; j += 2 * L) {
      const auto [y0, y1] = two(j);
      stream_acc2(out + j, y0, y1);
    }
  } else {
    for (; j + 2 * L <= S; j += 2 * L) {
      const auto [y0, y1] = two(j);
      store_acc2(out + j, y0, y1);
    }
  }
  // The rest as (at most two) vectors, the last one partial.
  for (; j < S; j += L) {
    const int64_t n = std::min(L, S - j);
    const auto sv = F::kSecond ? load_acc(s + j, n) : zero;
    store_acc(out + j, call<P>(f, VM{}, vector, load_acc(x + j, n), sv), n);
  }
}

template <typename scalar_t, class F>
void map_channels_first(const F& f, const scalar_t* x_p, const scalar_t* s_p, scalar_t* o_p,
                        const Tensor& out, const ChannelView& v,
                        const Coeffs<acc_t<scalar_t>, F::kCoeffs>& co) {
  const int64_t S = v.S;
  const bool stream = should_stream(out);
  at::parallel_for(0, v.N * v.C, grain_for(S), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      map_plane(f, x_p + i * S, F::kSecond ? s_p + i * S : nullptr, o_p + i * S, S,
                coeffs_at(co, i % v.C), stream);
    }
    if (stream) stream_fence();
  });
}

// Rows [begin, end) of the channels-last map. Pointers and sizes arrive as
// scalars by value and every call in here is inlined (BNEXT_FLATTEN): left as
// references to the caller's frame they were reloaded after every vector
// store, since vector types may alias anything.
template <typename scalar_t, class F>
BNEXT_FLATTEN void map_rows(const F f, const scalar_t* x_p, const scalar_t* s_p, scalar_t* o_p,
                            const Coeffs<acc_t<scalar_t>, F::kCoeffs> co, int64_t C, int64_t begin,
                            int64_t end, bool stream) {
  using T = acc_t<scalar_t>;
  using VM = cpu::VecMath<T>;
  constexpr std::size_t P = F::kCoeffs;
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t vec_end = C - C % L;
  const Vec<scalar_t> zero(T(0));
  // The coefficients of channels [c, c + n).
  const auto at = [&](int64_t c, int64_t n = kLanes<scalar_t>) {
    return [&co, c, n](std::size_t i) { return Vec<scalar_t>::loadu(co[i] + c, n); };
  };
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* xr = x_p + r * C;
    const scalar_t* sr = F::kSecond ? s_p + r * C : nullptr;
    scalar_t* orow = o_p + r * C;
    int64_t c = 0;
    for (; c + 2 * L <= vec_end; c += 2 * L) {
      const auto [x0, x1] = load_acc2(xr + c);
      auto s0 = zero;
      auto s1 = zero;
      if constexpr (F::kSecond) std::tie(s0, s1) = load_acc2(sr + c);
      const auto y0 = call<P>(f, VM{}, at(c), x0, s0);
      const auto y1 = call<P>(f, VM{}, at(c + L), x1, s1);
      if (stream) {
        stream_acc2(orow + c, y0, y1);
      } else {
        store_acc2(orow + c, y0, y1);
      }
    }
    for (; c < vec_end; c += L) {
      const auto sv = F::kSecond ? load_acc(sr + c) : zero;
      store_acc(orow + c, call<P>(f, VM{}, at(c), load_acc(xr + c), sv));
    }
    if (c < C) {  // the last C - c channels, as one partial vector
      const int64_t n = C - c;
      const auto sv = F::kSecond ? load_acc(sr + c, n) : zero;
      store_acc(orow + c, call<P>(f, VM{}, at(c, n), load_acc(xr + c, n), sv), n);
    }
  }
  if (stream) stream_fence();
}

// Rows of C values (C * S virtual channels for tiny planes), per-channel
// vectors of C values.
template <typename scalar_t, class F>
void map_rows_parallel(const F& f, const scalar_t* x_p, const scalar_t* s_p, scalar_t* o_p,
                       const Tensor& out, const Coeffs<acc_t<scalar_t>, F::kCoeffs>& co, int64_t C,
                       int64_t rows) {
  // Streaming needs every row to start aligned.
  const bool stream = should_stream(out) && stream_head(o_p) == 0 &&
                      (C * static_cast<int64_t>(sizeof(scalar_t))) % cpu::kStreamAlign == 0;
  at::parallel_for(0, rows, grain_for(C), [=](int64_t begin, int64_t end) {
    map_rows<scalar_t>(f, x_p, s_p, o_p, co, C, begin, end, stream);
  });
}

// out = f(co, x [, second]) over a canonical x; second (when F reads one) and
// out are laid out as x, and out may be x itself: every element is read
// before it is written.
template <typename scalar_t, class F>
void map_elementwise(const F& f, const Tensor& x, const Tensor& second, const Tensor& out,
                     const Coeffs<acc_t<scalar_t>, F::kCoeffs>& co) {
  using T = acc_t<scalar_t>;
  if (x.numel() == 0) return;
  const ChannelView v = channel_view(x);
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const scalar_t* s_p = F::kSecond ? second.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
  // Rows of `width` virtual channels whose coefficients are expand(p) for
  // each real one.
  const auto virtual_rows = [&](int64_t width, int64_t rows, const auto& expand_one) {
    const auto vco = expand(co, expand_one);
    map_rows_parallel(f, x_p, s_p, o_p, out, vco.ptrs(), width, rows);
  };
  if (tiny_planes<scalar_t>(v)) {
    virtual_rows(v.C * v.S, v.N, [&](const T* p) { return repeat_each(p, v.C, v.S); });
  } else if (v.layout == Layout::kChannelsFirst) {
    map_channels_first(f, x_p, s_p, o_p, out, v, co);
  } else if (const int64_t R = narrow_row_group<scalar_t>(v); R > 1) {
    const int64_t groups = v.rows() / R;
    virtual_rows(R * v.C, groups, [&](const T* p) { return repeat_whole(p, v.C, R); });
    const int64_t off = groups * R * v.C;  // the rows after the last group
    map_rows_parallel(f, x_p + off, F::kSecond ? s_p + off : nullptr, o_p + off, out, co, v.C,
                      v.rows() - groups * R);
  } else {
    map_rows_parallel(f, x_p, s_p, o_p, out, co, v.C, v.rows());
  }
}

// -------------------------------------------------------------- backward sums
// P (the prologue) provides kCoeffs, kThird (whether it reads a third input),
// kStoresG (whether g is written out) and
//   std::pair<V, V> operator()(M, V dy, V x, V third, V coefficient...) const
// returning (g, xmu), with kCoeffs coefficients; `third` is zero when kThird
// is false.

// The streams of the backward reduce, all laid out alike: dy, x (the
// forward's input, or its output in in-place mode), the third input and g
// (null where the prologue does not use them).
template <typename scalar_t>
struct ReduceStreams {
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* third;
  scalar_t* g;
  ReduceStreams at(int64_t off) const {
    return {dy + off, x + off, third != nullptr ? third + off : nullptr,
            g != nullptr ? g + off : nullptr};
  }
};

// Sums each channel's parts in part order (the loop over channels vectorises).
template <typename T>
void write_sums(const std::vector<T>& sum_dy_parts, const std::vector<T>& sum_dyx_parts, int64_t C,
                int64_t parts_per_channel, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  T* a_p = sum_dy.mutable_data_ptr<T>();
  T* b_p = sum_dy_xmu.mutable_data_ptr<T>();
  at::parallel_for(0, C, grain_for(parts_per_channel), [&](int64_t c0, int64_t c1) {
    for (int64_t j = 0; j < parts_per_channel; ++j) {
      const T* pa = sum_dy_parts.data() + j * C;
      const T* pb = sum_dyx_parts.data() + j * C;
      for (int64_t c = c0; c < c1; ++c) {
        a_p[c] += pa[c];
        b_p[c] += pb[c];
      }
    }
  });
}

// g (stored where the prologue says) and its sums over one plane of S
// contiguous values, in one sweep: each vector of the inputs is loaded (and
// widened) once for both sums. Two accumulators per sum hide the add latency.
template <typename scalar_t, class P>
BNEXT_INLINE_PLANE std::pair<acc_t<scalar_t>, acc_t<scalar_t>> plane_sums(
    const P& pro, const ReduceStreams<scalar_t>& s, int64_t S,
    PlaneCoeffs<acc_t<scalar_t>, P::kCoeffs> co) {
  using T = acc_t<scalar_t>;
  using VM = cpu::VecMath<T>;
  constexpr int64_t L = kLanes<scalar_t>;
  const auto vector = [&](std::size_t i) { return Vec<scalar_t>(co[i]); };
  const Vec<scalar_t> zero(T(0));
  // Where g is only summed, the inputs may come in any lane order as long as
  // it is the same for all of them (the products pair up); a stored g needs
  // its own.
  const auto load2 = [](const scalar_t* p) {
    if constexpr (P::kStoresG) {
      return load_acc2(p);
    } else {
      return cpu::load_acc2_any_order(p);
    }
  };
  Vec<scalar_t> a0(T(0)), a1(T(0)), b0(T(0)), b1(T(0));
  // Adds one vector's g and g * xmu into (a, b); returns g.
  const auto step = [&](const Vec<scalar_t>& dy, const Vec<scalar_t>& x, const Vec<scalar_t>& r,
                        Vec<scalar_t>& a, Vec<scalar_t>& b) {
    const auto [g, xmu] = call<P::kCoeffs>(pro, VM{}, vector, dy, x, r);
    a += g;
    b = at::vec::fmadd(g, xmu, b);
    return g;
  };
  int64_t j = 0;
  for (; j + 2 * L <= S; j += 2 * L) {
    const auto [dy0, dy1] = load2(s.dy + j);
    const auto [x0, x1] = load2(s.x + j);
    auto r0 = zero;
    auto r1 = zero;
    if constexpr (P::kThird) std::tie(r0, r1) = load2(s.third + j);
    const auto g0 = step(dy0, x0, r0, a0, b0);
    const auto g1 = step(dy1, x1, r1, a1, b1);
    if constexpr (P::kStoresG) store_acc2(s.g + j, g0, g1);
  }
  // Up to two partial vectors; padding lanes load zeros and are not stored.
  const auto partial = [&](int64_t at, int64_t n, Vec<scalar_t>& a, Vec<scalar_t>& b) {
    const auto r = P::kThird ? load_acc(s.third + at, n) : zero;
    const auto g = step(load_acc(s.dy + at, n), load_acc(s.x + at, n), r, a, b);
    if constexpr (P::kStoresG) store_acc(s.g + at, g, n);
  };
  if (j < S) {
    partial(j, std::min(L, S - j), a0, b0);
    if (S - j > L) partial(j + L, S - j - L, a1, b1);
  }
  return {hsum<scalar_t>(a0 + a1), hsum<scalar_t>(b0 + b1)};
}

template <typename scalar_t, class P>
void sums_channels_first(const P& pro, const ReduceStreams<scalar_t>& s, const ChannelView& v,
                         const Coeffs<acc_t<scalar_t>, P::kCoeffs>& co, Tensor& sum_dy,
                         Tensor& sum_dy_xmu) {
  using T = acc_t<scalar_t>;
  std::vector<T> part_dy(v.N * v.C);
  std::vector<T> part_dyx(v.N * v.C);
  at::parallel_for(0, v.N * v.C, grain_for(v.S), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::tie(part_dy[i], part_dyx[i]) =
          plane_sums(pro, s.at(i * v.S), v.S, coeffs_at(co, i % v.C));
    }
  });
  write_sums(part_dy, part_dyx, v.C, v.N, sum_dy, sum_dy_xmu);
}

// sum(g) and sum(g * xmu) of wide rows [r0, r1), per channel, added into a
// and b (zeroed by the caller).
template <typename scalar_t, class P>
BNEXT_FLATTEN void sums_wide_rows(const P pro, const ReduceStreams<scalar_t> s,
                                  const Coeffs<acc_t<scalar_t>, P::kCoeffs> co, int64_t C,
                                  int64_t r0, int64_t r1, acc_t<scalar_t>* a, acc_t<scalar_t>* b) {
  using T = acc_t<scalar_t>;
  using VM = cpu::VecMath<T>;
  const Vec<scalar_t> zero(T(0));
  for_each_row_group<scalar_t>(C, r0, r1, [&](auto rows, int64_t r, int64_t c, int64_t n) {
    const auto vco = load_coeffs(co, c, n);
    const auto coeff = [&](std::size_t i) { return vco[i]; };
    auto sa = Vec<scalar_t>::loadu(a + c, n);
    auto sb = Vec<scalar_t>::loadu(b + c, n);
    for (int j = 0; j < decltype(rows)::value; ++j) {
      const int64_t off = (r + j) * C + c;
      const auto third = P::kThird ? load_acc(s.third + off, n) : zero;
      const auto [g, xmu] = call<P::kCoeffs>(pro, VM{}, coeff, load_acc(s.dy + off, n),
                                             load_acc(s.x + off, n), third);
      sa += g;
      sb = at::vec::fmadd(g, xmu, sb);
      if constexpr (P::kStoresG) store_acc(s.g + off, g, n);
    }
    sa.store(a + c, n);
    sb.store(b + c, n);
  });
}

// Per-chunk sum(g) and sum(g * xmu) of each of the C columns of `rows` rows,
// chunk-major; returns the number of chunks.
template <typename scalar_t, class P>
int64_t channels_last_sums(const P& pro, const ReduceStreams<scalar_t>& s,
                           const Coeffs<acc_t<scalar_t>, P::kCoeffs>& co, int64_t C, int64_t rows,
                           std::vector<acc_t<scalar_t>>& part_dy,
                           std::vector<acc_t<scalar_t>>& part_dyx) {
  using T = acc_t<scalar_t>;
  using VM = cpu::VecMath<T>;
  constexpr int64_t L = kLanes<scalar_t>;
  constexpr int64_t kStreams = 2 + (P::kThird ? 1 : 0) + (P::kStoresG ? 1 : 0);
  const int64_t per_chunk = rows_per_chunk(C, kStreams * sizeof(scalar_t));
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  part_dy.assign(chunks * C, T(0));
  part_dyx.assign(chunks * C, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t r0 = ch * per_chunk;
      const int64_t r1 = std::min(rows, r0 + per_chunk);
      if (wide_rows<scalar_t>(C)) {
        sums_wide_rows(pro, s, co, C, r0, r1, part_dy.data() + ch * C, part_dyx.data() + ch * C);
        continue;
      }
      for_each_tile<scalar_t>(C, [&](int64_t c0, const int64_t* counts) {
        const Vec<scalar_t> zero(T(0));
        Vec<scalar_t> a[kTileVecs], b[kTileVecs];
        std::array<Vec<scalar_t>, P::kCoeffs> vco[kTileVecs];
        for (int j = 0; j < kTileVecs; ++j) {
          a[j] = b[j] = zero;
          vco[j] = load_coeffs(co, c0 + j * L, counts[j]);
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = r * C + c0;
          for (int j = 0; j < kTileVecs; ++j) {
            const int64_t o = off + j * L;
            const auto third = P::kThird ? load_acc(s.third + o, counts[j]) : zero;
            const auto coeff = [&](std::size_t i) { return vco[j][i]; };
            const auto [g, xmu] = call<P::kCoeffs>(pro, VM{}, coeff, load_acc(s.dy + o, counts[j]),
                                                   load_acc(s.x + o, counts[j]), third);
            a[j] += g;
            b[j] = at::vec::fmadd(g, xmu, b[j]);
            if constexpr (P::kStoresG) {
              if (counts[j] > 0) store_acc(s.g + o, g, counts[j]);
            }
          }
        }
        for (int j = 0; j < kTileVecs; ++j) {
          a[j].store(part_dy.data() + ch * C + c0 + j * L, counts[j]);
          b[j].store(part_dyx.data() + ch * C + c0 + j * L, counts[j]);
        }
      });
    }
  });
  return chunks;
}

template <typename scalar_t, class P>
void sums_narrow_rows(const P& pro, const ReduceStreams<scalar_t>& s, const ChannelView& v,
                      int64_t R, const Coeffs<acc_t<scalar_t>, P::kCoeffs>& co, Tensor& sum_dy,
                      Tensor& sum_dy_xmu) {
  using T = acc_t<scalar_t>;
  const int64_t groups = v.rows() / R;
  const int64_t tail = v.rows() - groups * R;
  std::vector<T> part_dy, part_dyx;
  int64_t parts = 0;
  if (groups > 0) {
    const auto vco = expand(co, [&](const T* p) { return repeat_whole(p, v.C, R); });
    parts += R * channels_last_sums(pro, s, vco.ptrs(), R * v.C, groups, part_dy, part_dyx);
  }
  if (tail > 0) {
    std::vector<T> tail_dy, tail_dyx;
    parts += channels_last_sums(pro, s.at(groups * R * v.C), co, v.C, tail, tail_dy, tail_dyx);
    append(part_dy, tail_dy);
    append(part_dyx, tail_dyx);
  }
  write_sums(part_dy, part_dyx, v.C, parts, sum_dy, sum_dy_xmu);
}

template <typename scalar_t, class P>
void sums_tiny_planes(const P& pro, const ReduceStreams<scalar_t>& s, const ChannelView& v,
                      const Coeffs<acc_t<scalar_t>, P::kCoeffs>& co, Tensor& sum_dy,
                      Tensor& sum_dy_xmu) {
  using T = acc_t<scalar_t>;
  const auto vco = expand(co, [&](const T* p) { return repeat_each(p, v.C, v.S); });
  std::vector<T> part_dy, part_dyx;
  const int64_t chunks = channels_last_sums(pro, s, vco.ptrs(), v.C * v.S, v.N, part_dy, part_dyx);
  write_sums(real_channel_parts(part_dy, chunks, v.C, v.S),
             real_channel_parts(part_dyx, chunks, v.C, v.S), v.C, chunks * v.S, sum_dy, sum_dy_xmu);
}

// Per channel sum(g) and sum(g * xmu) into the zeroed sum_dy and sum_dy_xmu,
// over the streams of a canonical tensor of view v (its g stored by the
// prologue where it stores one).
template <typename scalar_t, class P>
void backward_sums(const P& pro, const ReduceStreams<scalar_t>& s, const ChannelView& v,
                   const Coeffs<acc_t<scalar_t>, P::kCoeffs>& co, Tensor& sum_dy,
                   Tensor& sum_dy_xmu) {
  if (tiny_planes<scalar_t>(v)) {
    sums_tiny_planes(pro, s, v, co, sum_dy, sum_dy_xmu);
  } else if (v.layout == Layout::kChannelsFirst) {
    sums_channels_first(pro, s, v, co, sum_dy, sum_dy_xmu);
  } else if (const int64_t R = narrow_row_group<scalar_t>(v); R > 1) {
    sums_narrow_rows(pro, s, v, R, co, sum_dy, sum_dy_xmu);
  } else {
    std::vector<acc_t<scalar_t>> part_dy, part_dyx;
    const int64_t chunks = channels_last_sums(pro, s, co, v.C, v.rows(), part_dy, part_dyx);
    write_sums(part_dy, part_dyx, v.C, chunks, sum_dy, sum_dy_xmu);
  }
}

}  // namespace cpu_kernels
}  // namespace batch_norm
}  // namespace bnext
