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

// Chan et al. merge of two partial results. Empty sides are handled
// explicitly so that padding lanes of a reduction never produce 0/0.
template <typename T>
C10_HOST_DEVICE inline Welford<T> welford_merge(const Welford<T>& a, const Welford<T>& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  Welford<T> out;
  out.count = a.count + b.count;
  const T b_frac = static_cast<T>(b.count) / static_cast<T>(out.count);
  const T delta = b.mean - a.mean;
  out.mean = a.mean + delta * b_frac;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<T>(a.count) * b_frac;
  return out;
}

// Biased (population) variance; 0 for an empty or single-sample set.
template <typename T>
C10_HOST_DEVICE inline T welford_var(const Welford<T>& s) {
  return s.count > 0 ? s.m2 / static_cast<T>(s.count) : T(0);
}

}  // namespace bnext
