// Vector loads and stores in the accumulation type: half/bfloat16 are widened
// to float on load and narrowed on store, so kernels are written once.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

namespace bnext {
namespace cpu {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// On a kernel's per-range function: inline every call in it (its lambdas
// included), so that the pointers and sizes its loops use become registers.
// Left in memory, they are reloaded after every vector store, since vector
// types may alias anything.
#if defined(__GNUC__)
#define BNEXT_FLATTEN __attribute__((flatten))
#else
#define BNEXT_FLATTEN
#endif

// at::parallel_for grain: enough elements per task (`elements_per_item` each)
// that scheduling costs stay below ~1%.
inline int64_t grain_for(int64_t elements_per_item) {
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_item, 1));
}

template <typename scalar_t>
using Vec = at::vec::Vectorized<acc_t<scalar_t>>;

template <typename scalar_t>
constexpr int64_t kLanes = Vec<scalar_t>::size();

// Two float vectors narrowed to one vector of half/bfloat16. With AVX512-BF16
// one instruction rounds both to bfloat16 (to nearest even, as ATen's
// conversion does; its inputs and outputs below 2^-126 flush to zero).
template <typename scalar_t>
inline at::vec::Vectorized<scalar_t> narrow(const Vec<scalar_t>& lo, const Vec<scalar_t>& hi) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return at::vec::Vectorized<scalar_t>(reinterpret_cast<__m512i>(
        _mm512_cvtne2ps_pbh(static_cast<__m512>(hi), static_cast<__m512>(lo))));
  }
#endif
  return at::vec::convert_from_float<scalar_t>(lo, hi);
}

// Loads `n` <= kLanes values (the rest of the lanes are zero).
template <typename scalar_t>
inline Vec<scalar_t> load_acc(const scalar_t* p, int64_t n = kLanes<scalar_t>) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return Vec<scalar_t>::loadu(p, n);
  } else {
    if (n == kLanes<scalar_t>) {
      Vec<scalar_t> out;
      at::vec::load_to_float(p, out);
      return out;
    }
    // A masked load of the reduced type (it holds twice kLanes values), widened.
    return std::get<0>(
        at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, n)));
  }
}

template <typename scalar_t>
inline void store_acc(scalar_t* p, const Vec<scalar_t>& v, int64_t n = kLanes<scalar_t>) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    v.store(p, n);
  } else {
    narrow<scalar_t>(v, v).store(p, n);
  }
}

// Two vectors (2 * kLanes values) at a time: for half/bfloat16 one full-width
// load or store of the reduced type instead of two half-filled ones.
template <typename scalar_t>
inline std::pair<Vec<scalar_t>, Vec<scalar_t>> load_acc2(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return {Vec<scalar_t>::loadu(p), Vec<scalar_t>::loadu(p + kLanes<scalar_t>)};
  } else {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
    return {lo, hi};
  }
}

template <typename scalar_t>
inline void store_acc2(scalar_t* p, const Vec<scalar_t>& lo, const Vec<scalar_t>& hi) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    lo.store(p);
    hi.store(p + kLanes<scalar_t>);
  } else {
    narrow<scalar_t>(lo, hi).store(p);
  }
}

// Non-temporal stores: an output too large to stay in the last-level cache
// would otherwise cost a read-for-ownership per line and evict the input that
// the next pass re-reads. p must be aligned to kStreamAlign bytes; threads
// that streamed call stream_fence() before their results are handed on.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kStreamAlign = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kStreamAlign = 32;
#else
constexpr int64_t kStreamAlign = 1;
#endif

namespace detail {
#if defined(CPU_CAPABILITY_AVX512)
inline void stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream(double* p, __m512d v) { _mm512_stream_pd(p, v); }
inline void stream(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
inline void stream_half_width(void* p, __m512i v) {
  _mm256_stream_si256(static_cast<__m256i*>(p), _mm512_castsi512_si256(v));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
inline void stream(double* p, __m256d v) { _mm256_stream_pd(p, v); }
inline void stream(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
inline void stream_half_width(void* p, __m256i v) {
  _mm_stream_si128(static_cast<__m128i*>(p), _mm256_castsi256_si128(v));
}
#endif
}  // namespace detail

// store_acc2 with streaming stores.
template <typename scalar_t>
inline void stream_acc2(scalar_t* p, const Vec<scalar_t>& lo, const Vec<scalar_t>& hi) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    detail::stream(p, lo);
    detail::stream(p + kLanes<scalar_t>, hi);
  } else {
    detail::stream(static_cast<void*>(p), narrow<scalar_t>(lo, hi));
  }
#else
  store_acc2(p, lo, hi);
#endif
}

// store_acc of a whole vector with a streaming store; a half/bfloat16 vector
// is half a register wide, so p needs only kStreamAlign / 2 alignment.
template <typename scalar_t>
inline void stream_acc(scalar_t* p, const Vec<scalar_t>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    detail::stream(p, v);
  } else {
    detail::stream_half_width(p, narrow<scalar_t>(v, v));
  }
#else
  store_acc(p, v);
#endif
}

// Elements before the first kStreamAlign-aligned one at p.
template <typename scalar_t>
inline int64_t stream_head(const scalar_t* p) {
  const auto misalign = reinterpret_cast<std::uintptr_t>(p) % kStreamAlign;
  return misalign == 0 ? 0 : static_cast<int64_t>((kStreamAlign - misalign) / sizeof(scalar_t));
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename scalar_t>
inline acc_t<scalar_t> hsum(const Vec<scalar_t>& v) {
  return at::vec::vec_reduce_all<acc_t<scalar_t>>(
      [](const Vec<scalar_t>& a, const Vec<scalar_t>& b) { return a + b; }, v);
}

// The sums of the lanes of a, b, c and d, from one transposing tree instead of
// four separate reductions: on short runs (a 14x14 plane, a 1024-value row)
// the separate reductions' dependent shuffles were half of the time. Each sum's
// bits do not depend on its slot or on the other inputs (every slot goes
// through the same tree, and IEEE addition commutes), so a run reduced alone,
// zeros in the other slots, matches the same run reduced in a group.
template <typename scalar_t>
inline std::array<acc_t<scalar_t>, 4> hsum4(const Vec<scalar_t>& a, const Vec<scalar_t>& b,
                                            const Vec<scalar_t>& c, const Vec<scalar_t>& d) {
  using T = acc_t<scalar_t>;
  std::array<T, 4> out;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    // Per 128-bit block: [a, b, c, d] partial sums, then the blocks added.
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 va = a, vb = b, vc = c, vd = d;
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(va, vb), _mm512_unpackhi_ps(va, vb));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(vc, vd), _mm512_unpackhi_ps(vc, vd));
    const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
#else
    const __m256 va = a, vb = b, vc = c, vd = d;
    const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(va, vb), _mm256_unpackhi_ps(va, vb));
    const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(vc, vd), _mm256_unpackhi_ps(vc, vd));
    const __m256 h = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
#endif
    _mm_storeu_ps(out.data(), _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    return out;
  }
#endif
  out = {hsum<scalar_t>(a), hsum<scalar_t>(b), hsum<scalar_t>(c), hsum<scalar_t>(d)};
  return out;
}

// out[j] = the sum of the lanes of v[j], j < n, four at a time (hsum4).
template <typename scalar_t>
inline void hsums(const Vec<scalar_t>* v, int n, acc_t<scalar_t>* out) {
  const Vec<scalar_t> zero(acc_t<scalar_t>(0));
  for (int j = 0; j < n; j += 4) {
    const auto at = [&](int k) -> const Vec<scalar_t>& { return j + k < n ? v[j + k] : zero; };
    const auto s = hsum4<scalar_t>(at(0), at(1), at(2), at(3));
    for (int k = 0; k < 4 && j + k < n; ++k) out[j + k] = s[k];
  }
}

// f(rows, r) for the rows [r0, r1) in groups of R consecutive rows, then
// one at a time for the last (r1 - r0) mod R; `rows` is a
// std::integral_constant (R or 1), so that loops over a group's rows unroll
// and what each row needs stays in registers.
template <int R, class F>
inline void for_each_row_group(int64_t r0, int64_t r1, const F& f) {
  int64_t r = r0;
  for (; r + R <= r1; r += R) f(std::integral_constant<int, R>{}, r);
  for (; r < r1; ++r) f(std::integral_constant<int, 1>{}, r);
}

// Two vectors of the 2 * kLanes values at p, in an order that depends on the
// type only, not always p's: bfloat16 gives the even-indexed values, then the
// odd-indexed ones, from one load, a shift and a mask (a bfloat16 is the top
// half of a float), where widening each half in order takes two more
// shuffles. For sums over all lanes, and lane-wise products of two such loads.
template <typename scalar_t>
inline std::pair<Vec<scalar_t>, Vec<scalar_t>> load_acc2_any_order(const scalar_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const __m512i v = _mm512_loadu_si512(p);
    return {
        _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
        _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {
        _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
        _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
  }
#endif
  return load_acc2(p);
}

// The sum over the n values at p of step(acc, v, valid), where v holds values
// in some order (load_acc2_any_order) and `valid` lanes of it are real, the
// rest zero; step returns acc plus what those lanes add. Four independent
// accumulators, so that the latency of each add or FMA does not bound the loop.
template <typename scalar_t, class Step>
inline Vec<scalar_t> sum_any_order(const scalar_t* p, int64_t n, const Step& step) {
  constexpr int64_t L = kLanes<scalar_t>;
  using T = acc_t<scalar_t>;
  Vec<scalar_t> a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    const auto [x0, x1] = load_acc2_any_order(p + i);
    const auto [x2, x3] = load_acc2_any_order(p + i + 2 * L);
    a0 = step(a0, x0, L);
    a1 = step(a1, x1, L);
    a2 = step(a2, x2, L);
    a3 = step(a3, x3, L);
  }
  if (i + 2 * L <= n) {
    const auto [x0, x1] = load_acc2_any_order(p + i);
    a0 = step(a0, x0, L);
    a1 = step(a1, x1, L);
    i += 2 * L;
  }
  // The last (up to two) vectors in order, the last one zero-padded: short
  // runs (a 14x14 plane ends in 4 values) would otherwise spend much of their
  // time in scalar loops.
  for (; i < n; i += L) {
    const int64_t valid = std::min(L, n - i);
    a2 = step(a2, load_acc(p + i, valid), valid);
  }
  return (a0 + a1) + (a2 + a3);
}

}  // namespace cpu
}  // namespace bnext
