// Per-row LayerNorm / RMSNorm arithmetic shared by the CPU and CUDA kernels,
// so that the CPU tests exercise the formulas the GPU runs.
//
// Both norms are written as one "centred" flag: RMSNorm is LayerNorm with the
// mean pinned to zero and no bias, which lets a single kernel template serve
// both. Elementwise passes use (x - mean) rather than folding the mean into a
// bias, which would cancel two large values when |mean| >> std.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "bnext/welford.h"

namespace bnext {

// 1 / sqrt(second_moment + eps), where second_moment is the biased variance
// (LayerNorm) or the mean square (RMSNorm).
template <typename T>
C10_HOST_DEVICE inline T row_rstd(T second_moment, T eps) {
  // Rounding in a Welford merge can leave m2 a hair below zero for constant rows.
  const T m = second_moment > T(0) ? second_moment : T(0);
  return T(1) / std::sqrt(m + eps);
}

template <typename T>
C10_HOST_DEVICE inline T layer_norm_rstd(const Welford<T>& s, T eps) {
  return row_rstd(welford_var(s), eps);
}

template <typename T>
C10_HOST_DEVICE inline T rms_norm_rstd(T sum_sq, int64_t n, T eps) {
  return row_rstd(n > 0 ? sum_sq / static_cast<T>(n) : T(0), eps);
}

// Backward of y = w * (x - mean) * rstd (+ b) with respect to x, per row of n
// values and g = dy * w:
//   dx = a * (g + k * (x - mean) + c)
//   LayerNorm: a = rstd, k = -rstd^2 * sum(g * (x - mean)) / n, c = -sum(g) / n
//   RMSNorm (mean = 0): the same without c, which comes from d(mean)/dx.
// rstd is applied last so that g + c, which cancels exactly for a row of one
// value (dx = 0), is formed before any rounding of g by rstd.
template <typename T>
struct RowBackwardCoeffs {
  T a;
  T k;
  T c;
};

template <typename T>
C10_HOST_DEVICE inline RowBackwardCoeffs<T> row_backward_coeffs(T rstd, T sum_g, T sum_g_xmu,
                                                                int64_t n, bool centred) {
  const T inv_n = T(1) / static_cast<T>(n);
  return {rstd, -rstd * rstd * sum_g_xmu * inv_n, centred ? -sum_g * inv_n : T(0)};
}

template <typename T>
C10_HOST_DEVICE inline T row_backward_dx(const RowBackwardCoeffs<T>& co, T g, T xmu) {
  return co.a * (co.k * xmu + (g + co.c));
}

}  // namespace bnext
