// The CUDA platform the kernels are written against: the real one under nvcc,
// or the CPU emulator (emulator/cuda_emulator.h) when the same kernels are
// compiled with BNEXT_EMULATE_CUDA for the tests of a machine without a GPU.
// Kernels are launched only through launch(), which checks every launch on
// the real device and runs it on the emulator otherwise.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

#ifdef BNEXT_EMULATE_CUDA
#include "emulator/cuda_emulator.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
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

#ifdef BNEXT_EMULATE_CUDA

// The backends' device guard: the emulator runs the kernels on CPU tensors.
struct EmulatedDeviceGuard {
  explicit EmulatedDeviceGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "bnext emulator: expected a CPU tensor, got ", device);
  }
};

inline int64_t num_sms() { return emu::num_sms(); }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  emu::launch(grid, block, [&] { kernel(static_cast<Params>(args)...); });
}

#else

inline int64_t num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// On the current stream of the current device (which the ops' device guards set).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(static_cast<Params>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

}  // namespace cuda
}  // namespace bnext
