// Per-channel Batch Norm / Batch Renorm arithmetic, shared by the CPU and CUDA
// kernels so that the CPU tests exercise exactly what the GPU computes.
//
// Every elementwise pass is written as a function of (x - mean) rather than of
// x: with mean 1e4 and std 1, folding the mean into a bias (x * s + t) cancels
// two values of size 1e4 and leaves ~1e-3 absolute error in float32.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace bnext {

template <typename T>
C10_HOST_DEVICE inline T inv_std(T var, T eps) {
  return T(1) / std::sqrt(var + eps);
}

template <typename T>
C10_HOST_DEVICE inline T clamp(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Forward: y = (x - mean) * scale + shift.
template <typename T>
struct AffineCoeffs {
  T scale;
  T shift;
};

template <typename T>
C10_HOST_DEVICE inline AffineCoeffs<T> forward_coeffs(T invstd, T weight, T bias) {
  return {weight * invstd, bias};
}

// Batch Renorm (Ioffe 2017): r and d correct the batch statistics towards the
// running ones. They are constants for autograd, so the layer is Batch Norm
// with weight' = weight * r and bias' = bias + weight * d.
template <typename T>
struct RenormCorrection {
  T r;
  T d;
};

template <typename T>
C10_HOST_DEVICE inline RenormCorrection<T> renorm_correction(T batch_mean, T batch_var,
                                                             T running_mean, T running_var, T eps,
                                                             T r_max, T d_max) {
  // Limits that come from a tensor on the GPU cannot be checked on the host
  // without a synchronisation: an invalid one (r_max < 1, d_max < 0, NaN)
  // poisons r and d so the output is NaN instead of silently mis-clipped.
  if (!(r_max >= T(1)) || !(d_max >= T(0))) return {T(NAN), T(NAN)};
  const T sigma = std::sqrt(running_var + eps);
  const T sigma_batch = std::sqrt(batch_var + eps);
  return {clamp(sigma_batch / sigma, T(1) / r_max, r_max),
          clamp((batch_mean - running_mean) / sigma, -d_max, d_max)};
}

// Backward: dx = a * dy + k * (x - mean) + c, with
//   training: a = w*invstd, k = -a*invstd^2*sum(dy*(x-mean))/n, c = -a*sum(dy)/n
//   eval:     a = w*invstd, k = c = 0 (the statistics are constants).
template <typename T>
struct BackwardCoeffs {
  T a;
  T k;
  T c;
};

template <typename T>
C10_HOST_DEVICE inline BackwardCoeffs<T> backward_coeffs(T invstd, T weight, T sum_dy, T sum_dy_xmu,
                                                         int64_t count, bool training) {
  const T a = weight * invstd;
  if (!training) return {a, T(0), T(0)};
  const T inv_n = T(1) / static_cast<T>(count);
  return {a, -a * invstd * invstd * sum_dy_xmu * inv_n, -a * sum_dy * inv_n};
}

// Running statistics, written as torch writes them so that parity is exact up
// to the last rounding: new = momentum * batch + (1 - momentum) * old, with the
// unbiased batch variance.
template <typename T>
C10_HOST_DEVICE inline T running_update(T old, T batch, T momentum) {
  return momentum * batch + (T(1) - momentum) * old;
}

template <typename T>
C10_HOST_DEVICE inline T unbiased_var(T biased_var, int64_t count) {
  return count > 1 ? biased_var * static_cast<T>(count) / static_cast<T>(count - 1)
                   : static_cast<T>(NAN);
}

}  // namespace bnext
