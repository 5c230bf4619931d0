// Kernels that check the emulator itself (tests/test_emulator.py): the
// built-ins the real kernels rely on give CUDA's results, and the mistakes a
// GPU would hang on or leave undefined are reported as errors.
#ifndef BNEXT_EMULATE_CUDA
#error "build with -DBNEXT_EMULATE_CUDA"
#endif

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "common/cuda_launch.cuh"
#include "common/cuda_reduce.cuh"
#include "common/cuda_vec.cuh"

// Outside bnext::emu, whose code the traffic counter leaves out as the
// emulator's own.
namespace bnext {
namespace selftest {

// Each thread copies one float (or four, with `vector`), the threads' loads
// `stride` elements apart: what the traffic counter must see as one 128-byte
// line per warp (stride 1), or a sector per lane (stride 8).
__global__ void strided_copy_kernel(const float* in, float* out, int64_t stride, bool vector) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (vector) {
    cuda::store_vec<4>(out + 4 * t, cuda::load_vec<4>(in + 4 * t * stride));
  } else {
    out[t] = in[t * stride];
  }
}

}  // namespace selftest
}  // namespace bnext

namespace bnext {
namespace emu {
namespace {

// out[0] = sum over the block by block_reduce, out[1 + w] = warp w's butterfly
// sum (__shfl_xor_sync), read back by every lane; out[4] the sum of squares,
// by a second block_reduce on the same scratch right after the first (the
// reuse its closing barrier promises).
__global__ void reductions_kernel(double* out) {
  BNEXT_SHARED(double, scratch, cuda::kWarpSize);
  const double v = threadIdx.x + 1.0;
  double all = v;
  for (int m = 16; m > 0; m >>= 1) all += __shfl_xor_sync(0xffffffffu, all, m);
  if (threadIdx.x % cuda::kWarpSize == 0) out[1 + threadIdx.x / cuda::kWarpSize] = all;
  const double total = cuda::block_reduce(v, cuda::SumOp(), scratch, 0.0);
  const double squares = cuda::block_reduce(v * v, cuda::SumOp(), scratch, 0.0);
  if (threadIdx.x == 0) {
    out[0] = total;
    out[4] = squares;
  }
}

// out[x] = sum over threadIdx.y of (x + 1) * (y + 1), for a (4, 8) block, and
// out[4 + x] that of its square, by a second column_reduce on the same scratch;
// then the scratch is reused at once in another layout (column x's values at
// x * 8 + y), whose sum must give the total again (NaN otherwise).
__global__ void column_kernel(double* out) {
  BNEXT_SHARED(double, scratch, 32);
  const double v = (threadIdx.x + 1.0) * (threadIdx.y + 1.0);
  const double total = cuda::column_reduce(v, cuda::SumOp(), scratch);
  const double squares = cuda::column_reduce(v * v, cuda::SumOp(), scratch);
  scratch[threadIdx.x * blockDim.y + threadIdx.y] = v;
  __syncthreads();
  if (threadIdx.y == 0) {
    double again = 0;
    for (unsigned y = 0; y < blockDim.y; ++y) {
      again += static_cast<double>(scratch[threadIdx.x * blockDim.y + y]);
    }
    out[threadIdx.x] = again == total ? total : std::nan("");
    out[4 + threadIdx.x] = squares;
  }
}

// Blocks run one after another, as the last-block patterns assume.
__global__ void block_order_kernel(double* out) {
  if (threadIdx.x == 0) out[blockIdx.y * gridDim.x + blockIdx.x] = atomicAdd(out + 6, 1.0);
}

// Thread 0 publishes a value without the barrier the readers need after it:
// right only when thread 0 happens to run first (the forward schedule). A
// plain static, unchecked, to show what the schedules alone find.
__global__ void missing_barrier_kernel(double* out) {
  __shared__ double published;
  if (threadIdx.x == 0) published = 0;
  __syncthreads();
  if (threadIdx.x == 0) published = 42;
  // (the __syncthreads() that belongs here is missing)
  out[threadIdx.x] = published;
}

// The same kernel with the value in checked shared memory: a race under
// every schedule (read after write in the forward one, write after read in
// the reverse one).
__global__ void racy_publish_kernel(double* out) {
  BNEXT_SHARED(double, published, 1);
  if (threadIdx.x == 0) *published = 0;
  __syncthreads();
  if (threadIdx.x == 0) *published = 42;
  out[threadIdx.x] = *published;
}

// Every thread adds its index into one slot between two barriers.
__global__ void racy_sum_kernel(double* out) {
  BNEXT_SHARED(double, sum, 1);
  if (threadIdx.x == 0) *sum = 0;
  __syncthreads();
  *sum = *sum + threadIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = *sum;
}

// Block 0 writes shared memory that every block reads: block 1 reads memory
// that no thread of its own wrote (garbage on a GPU).
__global__ void uninitialised_shared_kernel(double* out) {
  BNEXT_SHARED(double, value, 1);
  if (blockIdx.x == 0 && threadIdx.x == 0) value[0] = 7;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = value[0];
}

// Writes one value past the end of a 32-value array.
__global__ void shared_out_of_bounds_kernel(double* out) {
  BNEXT_SHARED(double, values, cuda::kWarpSize);
  values[threadIdx.x + 1] = 1;
  __syncthreads();
  out[0] = values[0];
}

// Declares more than the 48 KiB of static shared memory a block may have.
__global__ void too_much_shared_kernel(double* out) {
  BNEXT_SHARED(double, values, 6200);
  values[threadIdx.x] = 1;
  out[0] = values[threadIdx.x];
}

// Both halves pass one barrier each, but not the same one: undefined on a GPU.
__global__ void divergent_barrier_kernel(double* out) {
  if (threadIdx.x < 16) {
    out[1] = 1;
    __syncthreads();
    out[2] = 1;
  } else {
    __syncthreads();
  }
}

__global__ void exited_lane_kernel(double* out) {
  if (threadIdx.x >= 16) return;
  out[0] = __shfl_down_sync(0xffffffffu, 1.0, 16);
}

// The two halves of a warp shuffle in their own branches. The same number of
// shuffles, so only the call sites tell: undefined on a GPU (a full mask names
// lanes that run another shuffle), so an error here.
__global__ void divergent_shuffle_kernel(double* out) {
  const double v = threadIdx.x;
  double got;
  if (threadIdx.x < 16) {
    got = __shfl_xor_sync(0xffffffffu, v, 16);
  } else {
    got = __shfl_xor_sync(0xffffffffu, v, 16);
  }
  if (threadIdx.x == 0) out[0] = got;
}

// Half of each warp waits at the barrier, the other half for a shuffle that
// needs the first half: a hang on a GPU.
__global__ void barrier_or_shuffle_kernel(double* out) {
  if (threadIdx.x % cuda::kWarpSize < 16) {
    __syncthreads();
  } else {
    out[0] = __shfl_down_sync(0xffffffffu, 1.0, 1);
  }
}

// Reads one element past the end of `out` (8 values): only an AddressSanitizer
// build of the emulator sees it.
__global__ void out_of_bounds_kernel(double* out) {
  volatile double* p = out;
  if (threadIdx.x == 0) out[0] = p[8];
}

// A 16-byte vector load one double past an aligned address: a GPU faults.
__global__ void misaligned_vector_kernel(double* out) {
  if (threadIdx.x == 0) out[0] = cuda::load_vec<2>(out + 1).v[0];
}

// A 32-bit element offset that overflows: 65536 rows of 32768 values make
// 2**31. Undefined, seen only by UBSan's build; volatile keeps the compiler
// from folding it (or from widening it to unsigned, which UBSan would miss).
__global__ void signed_overflow_kernel(double* out) {
  volatile int rows = 65536;
  volatile int width = 32768;
  const int offset = rows * width;
  if (threadIdx.x == 0) out[0] = offset;
}

// A float read through a pointer one byte past an aligned address: x86 reads
// it, a GPU faults, UBSan's alignment check reports it.
__global__ void misaligned_scalar_kernel(double* out) {
  volatile std::uintptr_t address = reinterpret_cast<std::uintptr_t>(out) + 1;
  if (threadIdx.x == 0) out[1] = *reinterpret_cast<const float*>(address);
}

// Two blocks of 64 threads copy `input` (at least 128 * stride floats, or 4x
// that with `vector`) to a new tensor.
at::Tensor strided_copy(const at::Tensor& input, int64_t stride, bool vector) {
  const int64_t threads = 128;
  const int64_t width = vector ? 4 : 1;
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.is_contiguous(),
              "strided_copy: expected a contiguous float32 tensor");
  TORCH_CHECK(stride >= 1 && input.numel() >= threads * width * stride,
              "strided_copy: expected at least ", threads * width * stride, " elements, got ",
              input.numel());
  at::Tensor out = at::empty({threads * width}, input.options());
  cuda::launch(selftest::strided_copy_kernel, dim3(2), dim3(64), input.data_ptr<float>(),
               out.data_ptr<float>(), stride, vector);
  return out;
}

at::Tensor selftest(const std::string& name) {
  at::Tensor out = at::zeros({8}, at::kDouble);
  double* p = out.data_ptr<double>();
  if (name == "reductions") {
    cuda::launch(reductions_kernel, dim3(1), dim3(96), p);
  } else if (name == "column") {
    cuda::launch(column_kernel, dim3(1), dim3(4, 8), p);
  } else if (name == "block_order") {
    cuda::launch(block_order_kernel, dim3(3, 2), dim3(32), p);
  } else if (name == "missing_barrier") {
    cuda::launch(missing_barrier_kernel, dim3(1), dim3(8), p);
  } else if (name == "divergent_barrier") {
    cuda::launch(divergent_barrier_kernel, dim3(1), dim3(64), p);
  } else if (name == "exited_lane") {
    cuda::launch(exited_lane_kernel, dim3(1), dim3(32), p);
  } else if (name == "divergent_shuffle") {
    cuda::launch(divergent_shuffle_kernel, dim3(1), dim3(32), p);
  } else if (name == "barrier_or_shuffle") {
    cuda::launch(barrier_or_shuffle_kernel, dim3(1), dim3(64), p);
  } else if (name == "out_of_bounds") {
    cuda::launch(out_of_bounds_kernel, dim3(1), dim3(32), p);
  } else if (name == "racy_publish") {
    cuda::launch(racy_publish_kernel, dim3(1), dim3(8), p);
  } else if (name == "racy_sum") {
    cuda::launch(racy_sum_kernel, dim3(1), dim3(8), p);
  } else if (name == "shared_out_of_bounds") {
    cuda::launch(shared_out_of_bounds_kernel, dim3(1), dim3(32), p);
  } else if (name == "too_much_shared") {
    cuda::launch(too_much_shared_kernel, dim3(1), dim3(32), p);
  } else if (name == "uninitialised_shared") {
    cuda::launch(uninitialised_shared_kernel, dim3(2), dim3(32), p);
  } else if (name == "misaligned_vector") {
    cuda::launch(misaligned_vector_kernel, dim3(1), dim3(32), p);
  } else if (name == "signed_overflow") {
    cuda::launch(signed_overflow_kernel, dim3(1), dim3(32), p);
  } else if (name == "misaligned_scalar") {
    cuda::launch(misaligned_scalar_kernel, dim3(1), dim3(32), p);
  } else if (name == "too_many_threads") {
    cuda::launch(reductions_kernel, dim3(1), dim3(2048), p);
  } else if (name == "grid_y_too_large") {
    cuda::launch(block_order_kernel, dim3(1, 65536), dim3(32), p);
  } else if (name == "grid_y_of_3") {  // refused under a y cap below 3 (set_grid_caps)
    cuda::launch(block_order_kernel, dim3(1, 3), dim3(32), p);
  } else {
    TORCH_CHECK(false, "unknown emulator self-test '", name, "'");
  }
  return out;
}

}  // namespace
}  // namespace emu
}  // namespace bnext

TORCH_LIBRARY_FRAGMENT(bnext_emu, m) {
  m.def("selftest(str name) -> Tensor", &bnext::emu::selftest);
  m.def("strided_copy(Tensor input, int stride, bool vector) -> Tensor", &bnext::emu::strided_copy);
}
