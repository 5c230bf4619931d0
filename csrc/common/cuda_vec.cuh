// 16-byte vector loads and stores: one instruction moves 4 floats, 8 halves or
// 2 doubles, which is what keeps memory-bound kernels near the copy bandwidth.
#pragma once

#include <cstdint>

#include "common/cuda_launch.cuh"

namespace bnext {
namespace cuda {

constexpr int kVecBytes = 16;
// What DRAM and L2 move per access: a warp's access costs its distinct sectors.
constexpr int kSectorBytes = 32;

template <typename scalar_t>
constexpr int vec_size() {
  return kVecBytes / static_cast<int>(sizeof(scalar_t)) > 0
             ? kVecBytes / static_cast<int>(sizeof(scalar_t))
             : 1;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// One access of the whole vector (load_vector / store_vector, cuda_launch.cuh),
// whose alignment the emulator checks: a GPU requires it (it faults), x86 not.
template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return load_vector(reinterpret_cast<const Vec<T, N>*>(p));
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  store_vector(reinterpret_cast<Vec<T, N>*>(p), v);
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace cuda
}  // namespace bnext
