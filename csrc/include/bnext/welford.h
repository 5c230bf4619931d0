// Mean/variance accumulation shared by every CPU and CUDA kernel.
//
// Partial results are (count, mean, m2) triples and are combined with Chan's
// parallel update, never with E[x^2] - E[x]^2: with mean 1e4 and std 1 that
// formula loses every significant bit of the variance in float32.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace bnext {

template <typename T>
struct Welford {
  T mean = T(0);
  T m2 = T(0);  // sum of squared deviations from `mean`
  int64_t count = 0;
};

// Adds one sample. The division is by the running count, so it is exact for
// every count a float can index.
template <typename T>
C10_HOST_DEVICE inline void welford_push(Welford<T>& s, T x) {
  s.count += 1;
  const T delta = x - s.mean;
  s.mean += delta / static_cast<T>(s.count);
  s.m2 += delta * (x - s.mean);
}

// The scalar weights of Chan et al.'s merge of a partial of b_count samples
// into one of a_count (both non-zero): the same for every pair of partials
// with those counts, e.g. all lanes of a reduction vectorised across channels.
template <typename T>
struct MergeWeights {
  T b_frac;    // b_count / (a_count + b_count)
  T m2_scale;  // a_count * b_count / (a_count + b_count)
};

template <typename T>
C10_HOST_DEVICE inline MergeWeights<T> merge_weights(int64_t a_count, int64_t b_count) {
  const T b_frac = static_cast<T>(b_count) / static_cast<T>(a_count + b_count);
  return {b_frac, static_cast<T>(a_count) * b_frac};
}

// (mean, m2) += (b_mean, b_m2) with the given weights; V is T or a vector of T.
template <typename V, typename T>
C10_HOST_DEVICE inline void merge_into(V& mean, V& m2, const V& b_mean, const V& b_m2,
                                       const MergeWeights<T>& w) {
  const V delta = b_mean - mean;
  mean = mean + delta * V(w.b_frac);
  m2 = m2 + b_m2 + delta * delta * V(w.m2_scale);
}

// Chan et al. merge of two partial results. Empty sides are handled
// explicitly so that padding lanes of a reduction never produce 0/0.
template <typename T>
C10_HOST_DEVICE inline Welford<T> welford_merge(const Welford<T>& a, const Welford<T>& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  Welford<T> out = a;
  merge_into(out.mean, out.m2, b.mean, b.m2, merge_weights<T>(a.count, b.count));
  out.count = a.count + b.count;
  return out;
}

// Adds K samples at once: their own mean and m2 (two passes over K values in
// registers), then one Chan merge, so a reduction pays one division per K
// samples instead of one per sample.
template <typename T, int K>
C10_HOST_DEVICE inline void welford_push_chunk(Welford<T>& s, const T (&x)[K]) {
  T sum = T(0);
  for (int i = 0; i < K; ++i) sum += x[i];
  const T mean = sum / static_cast<T>(K);
  T m2 = T(0);
  for (int i = 0; i < K; ++i) {
    const T d = x[i] - mean;
    m2 += d * d;
  }
  if (s.count == 0) {
    s.mean = mean;
    s.m2 = m2;
  } else {
    merge_into(s.mean, s.m2, mean, m2, merge_weights<T>(s.count, K));
  }
  s.count += K;
}

// Biased (population) variance; 0 for an empty or single-sample set.
template <typename T>
C10_HOST_DEVICE inline T welford_var(const Welford<T>& s) {
  return s.count > 0 ? s.m2 / static_cast<T>(s.count) : T(0);
}

}  // namespace bnext
