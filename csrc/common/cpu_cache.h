// What the CPU kernels ask of the cache hierarchy (cpu_cache.cpp).
#pragma once

#include <cstdint>

namespace bnext {
namespace cpu {

// Whether an output of `bytes` should be written with streaming stores
// (cpu_vec.h): when it would not fit in the last-level cache beside an input
// of the same size. BNEXT_STREAM_MIN_BYTES overrides the threshold.
bool should_stream_bytes(int64_t bytes);

template <class TensorT>
inline bool should_stream(const TensorT& out) {
  return should_stream_bytes(out.numel() * static_cast<int64_t>(out.element_size()));
}

}  // namespace cpu
}  // namespace bnext
