// The vector math policy of the shared activations (bnext/activation.h):
// the CPU kernels evaluate them over at::vec::Vectorized in the accumulation
// type, with ATen's vectorised exp/erf/tanh (Sleef where the build has it).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "bnext/activation.h"

namespace bnext {
namespace cpu {

template <typename T>
struct VecMath {
  using V = at::vec::Vectorized<T>;
  static V splat(T v) { return V(v); }
  static V exp(const V& v) { return v.exp(); }
  static V expm1(const V& v) { return v.expm1(); }
  static V log1p(const V& v) { return v.log1p(); }
  static V erf(const V& v) { return v.erf(); }
  static V tanh(const V& v) { return v.tanh(); }
  // a > b ? then : otherwise, per lane (false for NaN).
  static V if_gt(const V& a, const V& b, const V& then, const V& otherwise) {
    return V::blendv(otherwise, then, a > b);
  }
};

}  // namespace cpu
}  // namespace bnext
