// Argument checks of the Batch Renorm operators, shared by the kernels
// (composite.h) and the reference path of autograd (autograd.cpp).
#pragma once

#include <c10/util/Exception.h>

namespace bnext {
namespace batch_renorm {

inline void check_limits(const char* op, double r_max, double d_max) {
  // Comparisons are false for NaN, so a NaN limit is rejected too.
  TORCH_CHECK_VALUE(r_max >= 1.0, op,
                    ": expected r_max >= 1 (r is clipped to [1/r_max, r_max]), got ", r_max);
  TORCH_CHECK_VALUE(d_max >= 0.0, op,
                    ": expected d_max >= 0 (d is clipped to [-d_max, d_max]), got ", d_max);
}

}  // namespace batch_renorm
}  // namespace bnext
