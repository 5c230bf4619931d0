// The CUDA platform the kernels are written against: the real one under nvcc,
// or the CPU emulator (emulator/cuda_emulator.h) when the same kernels are
// compiled with BNEXT_EMULATE_CUDA for the tests of a machine without a GPU.
// This header is the emulator's only seam into product code: kernels are
// launched only through launch(), which checks every launch on the real
// device and runs it on the emulator otherwise, and the backends make the
// input's device current only through DeviceGuard.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#ifdef BNEXT_EMULATE_CUDA
#include "emulator/cuda_emulator.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

// BNEXT_SHARED(T, name, count...): `name` points to `count` values of T in
// the block's shared memory, the only way kernels declare it. Under nvcc they
// are raw bytes (a __shared__ T may not have default member initialisers, as
// Welford has); in the emulator every access to them is checked (races,
// uninitialised reads, bounds: emu::SharedRef), so kernels index `name` and
// pass it on as a template parameter, never as a raw T*.
#ifdef BNEXT_EMULATE_CUDA
#define BNEXT_SHARED(T, name, ...)                                       \
  static const char name##_site = 0;                                     \
  const ::bnext::emu::SharedPtr<T> name = ::bnext::emu::shared_array<T>( \
      &name##_site, __VA_ARGS__, ::bnext::emu::SharedSite{#name, __func__, __FILE__, __LINE__})
#else
#define BNEXT_SHARED(T, name, ...)                                                \
  __shared__ __align__(16) unsigned char name##_bytes[sizeof(T) * (__VA_ARGS__)]; \
  T* const name = reinterpret_cast<T*>(name##_bytes)
#endif

namespace bnext {
namespace cuda {

constexpr int kWarpSize = 32;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= v, at most `cap` (a power of two).
inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p <<= 1;
  return p;
}

// The dispatcher picks a CUDA kernel when any argument is on CUDA, so the
// input itself may be elsewhere: its data pointer would then reach a kernel as
// a host address. Every CUDA backend refuses that here, and makes the input's
// device current (kernels launch on its current stream). The emulator runs the kernels on CPU
// tensors, so there the input must be on the CPU.
inline void check_kernel_device(c10::Device device, c10::DeviceType expected) {
  TORCH_CHECK(device.type() == expected, "bnext: expected the input on a ",
              c10::DeviceTypeName(expected), " device like the other arguments, got ", device);
}

#ifdef BNEXT_EMULATE_CUDA

struct DeviceGuard {
  explicit DeviceGuard(c10::Device device) { check_kernel_device(device, c10::DeviceType::CPU); }
};

inline int64_t num_sms() { return emu::num_sms(); }
// The grid limits the launch plans cap at; the loops stride over the rest.
// The emulator's tests lower them to run those loops on small shapes.
inline int64_t max_grid_x() { return emu::max_grid_x(); }
inline int64_t max_grid_y() { return emu::max_grid_y(); }

// A vector access of `bytes` at `p`: an error unless aligned, as on a GPU.
inline void check_vector_access(const void* p, std::size_t bytes) {
  emu::check_vector_access(p, bytes);
}

// One access of the whole vector, as the GPU's 16-byte load or store (a host
// compiler would split the copy of a struct of 8 halves into two 8-byte moves,
// which the traffic counter would take for two half-coalesced accesses).
template <typename V>
__attribute__((always_inline)) inline V load_vector(const V* p) {
  check_vector_access(p, sizeof(V));
  V v;
  emu::vector_load(&v, p, sizeof(V), sizeof(V) > sizeof(p->v[0]));
  return v;
}
template <typename V>
__attribute__((always_inline)) inline void store_vector(V* p, const V& v) {
  check_vector_access(p, sizeof(V));
  emu::vector_store(p, &v, sizeof(V), sizeof(V) > sizeof(p->v[0]));
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  emu::launch(reinterpret_cast<const void*>(kernel), grid, block,
              [&] { kernel(static_cast<Params>(args)...); });
}

// resident_blocks(kernel, threads): blocks of `threads` that one SM keeps
// resident running `kernel`, at least 1. Its registers and shared memory
// decide, not the thread count alone (at 128 registers a thread, an SM keeps
// 512 of its 2048 threads), so plans whose blocks stride over the work size
// their grids with it: more blocks would only queue, fewer leave SMs idle.
// The emulator answers from ptxas's figures when the tests give them.
template <typename... Params>
int64_t resident_blocks(void (*kernel)(Params...), int threads) {
  return std::max<int64_t>(1, emu::resident_blocks(reinterpret_cast<const void*>(kernel), threads));
}

#else

struct DeviceGuard {
  explicit DeviceGuard(c10::Device device) : guard_(checked(device)) {}

 private:
  static c10::Device checked(c10::Device device) {
    check_kernel_device(device, c10::DeviceType::CUDA);
    return device;
  }
  c10::cuda::CUDAGuard guard_;
};

inline int64_t num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
// The grid limits the launch plans cap at: y's is the hardware's; x's is the
// portable one the LayerNorm plans keep to. The loops stride over the rest.
constexpr int64_t max_grid_x() { return 65535; }
constexpr int64_t max_grid_y() { return 65535; }

// The hardware itself faults on a misaligned vector access.
__device__ __forceinline__ void check_vector_access(const void* /*p*/, std::size_t /*bytes*/) {}

template <typename V>
__device__ __forceinline__ V load_vector(const V* p) {
  return *p;
}
template <typename V>
__device__ __forceinline__ void store_vector(V* p, const V& v) {
  *p = v;
}

namespace detail {
// The runtime's answer depends on the device only through its architecture,
// but a process may hold different GPUs; the query costs a driver call, so
// once per device, kernel and block size.
inline int64_t resident_blocks(const void* kernel, int threads) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int>, int64_t> known;
  const auto key = std::make_tuple(static_cast<int>(c10::cuda::current_device()), kernel, threads);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
  return known[key] = std::max(blocks, 1);
}
}  // namespace detail

template <typename... Params>
int64_t resident_blocks(void (*kernel)(Params...), int threads) {
  return detail::resident_blocks(reinterpret_cast<const void*>(kernel), threads);
}

// On the current stream of the current device (which the ops' device guards set).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  // clang-format reads .cuh as C++ and would split the launch chevrons.
  // clang-format off
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(static_cast<Params>(args)...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

}  // namespace cuda
}  // namespace bnext
