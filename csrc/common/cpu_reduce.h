// Reductions over contiguous runs of values, shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "bnext/welford.h"
#include "common/cpu_vec.h"

namespace bnext {
namespace cpu {

// Elements of one block of a two-sweep reduction: the second sweep reads the
// block from L1 (two 16 KB float32 inputs fit the 32-48 KB of current cores).
constexpr int64_t kBlock = 4096;

// Merges n partial (mean, m2) pairs, each over `count` values, into running
// ones over `seen` values: a copy for the first block, then Chan's merge with
// weights shared by all n (V is T or a vector of T).
template <typename T, typename V>
void merge_partials(V* mean, V* m2, const V* b_mean, const V* b_m2, int64_t n, int64_t seen,
                    int64_t count) {
  if (seen == 0) {
    std::copy(b_mean, b_mean + n, mean);
    std::copy(b_m2, b_m2 + n, m2);
    return;
  }
  const auto w = merge_weights<T>(seen, count);
  for (int64_t i = 0; i < n; ++i) merge_into(mean[i], m2[i], b_mean[i], b_m2[i], w);
}

// Mean and m2 of R runs of len <= kBlock values, run j at p + j * stride,
// each in two sweeps (sum, then squared deviations re-read from L1) over its
// values in any order (sum_any_order). The R runs' horizontal sums are taken
// together (hsums), so that short runs do not each wait on a chain of
// shuffles; a run's result does not depend on R.
template <int R, typename scalar_t>
void run_moments(const scalar_t* p, int64_t stride, int64_t len, acc_t<scalar_t>* mean,
                 acc_t<scalar_t>* m2) {
  using T = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  V acc[R];
  for (int j = 0; j < R; ++j) {
    acc[j] =
        sum_any_order(p + j * stride, len, [](const V& a, const V& v, int64_t) { return a + v; });
  }
  hsums<scalar_t>(acc, R, mean);
  for (int j = 0; j < R; ++j) {
    mean[j] /= static_cast<T>(len);
    const V vmean(mean[j]);
    acc[j] = sum_any_order(p + j * stride, len, [vmean](const V& a, const V& v, int64_t valid) {
      // Padding lanes load 0, whose deviation is not: they are zeroed.
      const auto d = valid < L ? V::set(V(T(0)), v - vmean, valid) : v - vmean;
      return at::vec::fmadd(d, d, a);
    });
  }
  hsums<scalar_t>(acc, R, m2);
}

// Mean and m2 of n contiguous values: L1-sized blocks (run_moments) merged
// with Chan's formula.
template <typename scalar_t>
Welford<acc_t<scalar_t>> contiguous_welford(const scalar_t* p, int64_t n) {
  using T = acc_t<scalar_t>;
  Welford<T> acc;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    T mean, m2;
    run_moments<1>(p + b0, 0, len, &mean, &m2);
    acc = welford_merge(acc, Welford<T>{mean, m2, len});
  }
  return acc;
}

// Mean and m2 of R runs of len values, run j at p + j * stride: runs of one
// block together (run_moments), longer ones one by one (contiguous_welford).
template <int R, typename scalar_t>
void moments(const scalar_t* p, int64_t stride, int64_t len, acc_t<scalar_t>* mean,
             acc_t<scalar_t>* m2) {
  if (len <= kBlock) {
    run_moments<R>(p, stride, len, mean, m2);
    return;
  }
  for (int j = 0; j < R; ++j) {
    const auto w = contiguous_welford(p + j * stride, len);
    mean[j] = w.mean;
    m2[j] = w.m2;
  }
}

}  // namespace cpu
}  // namespace bnext
