// A CUDA emulator for testing the kernels on a machine without a GPU.
//
// The CUDA kernels (csrc/**/cuda_kernels.cuh) are written against a handful of
// CUDA built-ins. Compiled with BNEXT_EMULATE_CUDA by a host compiler, this
// header supplies those built-ins, and a launch runs the grid on the CPU: the
// blocks one after another, each block's threads as fibers on one OS thread
// that switch at every barrier and every warp shuffle. The semantics that the
// kernels rely on are kept:
//   - shared memory is per block: arrays declared with BNEXT_SHARED
//     (cuda_launch.cuh), as the kernels' are, live in a 48 KiB arena that
//     every block starts afresh, filled with 0xff, and every access to them
//     goes through SharedRef, which checks it (the CPU's compute-sanitizer
//     racecheck and initcheck): a read of a byte no thread of the block has
//     written, an access outside the array, and two threads touching a byte
//     between the same two barriers with at least one write are errors that
//     name the array, the byte and both threads;
//   - __syncthreads() waits for every live thread of the block, all at the same
//     call (source line);
//   - __shfl_*_sync exchange values between the 32 lanes of a warp, which must
//     all take part (as the full masks the kernels pass demand).
// What real hardware would hang on or leave undefined is an error here: a
// barrier that some threads skip (divergence), a shuffle whose source lane has
// exited or does not exist, a launch configuration CUDA refuses.
//
// A GPU promises no order among the threads of a block between barriers, nor
// among blocks: the schedule (set_schedule) runs the blocks of a launch, and
// the ready threads of a block at each step, in forward, reverse or seeded
// random order. A kernel that relies on an order (a missing __syncthreads()
// after one thread writes what others read) gives other results under
// another schedule; the tests run the kernels under several.
//
// Not emulated: memory-model races between blocks (blocks run one at a time,
// so a last-block-merges pattern always sees every partial), races through
// global memory within a block (beyond what the schedules show), timing. The
// GPU remains the judge of those; this is for the arithmetic, the indexing,
// the use of shared memory and the launch plans.
#pragma once

#ifndef BNEXT_EMULATE_CUDA
#error "cuda_emulator.h is for host builds with BNEXT_EMULATE_CUDA"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace bnext {
namespace emu {

constexpr int kWarpSize = 32;
// Largest value one shuffle moves (the kernels shuffle scalars).
constexpr std::size_t kMaxShuffleBytes = 16;

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
int lane_id();

// `file` and `line` name the call site: threads that wait at different
// __syncthreads() calls are an error even when their counts agree.
void syncthreads(const char* file, int line);
// Every live lane of the calling warp contributes `bytes` from `in` and receives
// the value of lane `src_lane` in `out`. `file` and `line` name the shuffle:
// lanes that reach different shuffles (divergent code) are an error.
void warp_exchange(const void* in, void* out, std::size_t bytes, int src_lane, unsigned mask,
                   const char* file, int line);

// A vector load or store of `bytes` at `p`: a GPU faults ("misaligned
// address") unless p is a multiple of `bytes`; x86 would not, so the emulator
// throws instead.
void check_vector_access(const void* p, std::size_t bytes);

// A load or store of `bytes` from `src` to `dst`, as one access (the traffic
// counter sees one access of `bytes`, however the host copies it); `wide`: of
// more than one element (a vector path's access, not a 1-wide fallback).
void vector_load(void* dst, const void* src, std::size_t bytes, bool wide);
void vector_store(void* dst, const void* src, std::size_t bytes, bool wide);

// Where a shared array is declared, for the error messages.
struct SharedSite {
  const char* name;
  const char* function;
  const char* file;
  int line;
};

// Shared memory. A thread of the running block reaches the declaration of
// `bytes` of shared memory identified by `key` (one per declaration and
// template instantiation): the first thread to do so in this block allocates
// them in the block's arena; the others get the same bytes.
void* block_shared(const void* key, std::size_t bytes, const SharedSite& site);
// The calling thread reads or writes `bytes` at `p`, inside a block_shared
// array: throws for an uninitialised read, an access outside the array or a
// race with another thread of the block since the last barrier.
void shared_access(const void* p, std::size_t bytes, bool write);

// A value in shared memory: reads and writes of it are checked.
template <typename T>
class SharedRef {
 public:
  explicit SharedRef(T* p) : p_(p) {}
  operator T() const {
    shared_access(p_, sizeof(T), false);
    T v;
    std::memcpy(static_cast<void*>(&v), p_, sizeof(T));
    return v;
  }
  const SharedRef& operator=(const T& v) const {
    shared_access(p_, sizeof(T), true);
    std::memcpy(static_cast<void*>(p_), &v, sizeof(T));
    return *this;
  }
  const SharedRef& operator=(const SharedRef& other) const { return *this = static_cast<T>(other); }

 private:
  T* p_;
};

// What BNEXT_SHARED declares in emulator builds: a pointer whose elements are
// SharedRefs (under nvcc, a plain pointer into __shared__ memory).
template <typename T>
class SharedPtr {
 public:
  explicit SharedPtr(T* p) : p_(p) {}
  SharedRef<T> operator[](std::ptrdiff_t i) const { return SharedRef<T>(p_ + i); }
  SharedRef<T> operator*() const { return SharedRef<T>(p_); }
  SharedPtr operator+(std::ptrdiff_t i) const { return SharedPtr(p_ + i); }

 private:
  T* p_;
};

template <typename T>
SharedPtr<T> shared_array(const void* key, std::size_t count, const SharedSite& site) {
  static_assert(std::is_trivially_copyable<T>::value, "shared memory holds plain values");
  static_assert(alignof(T) <= 16, "the arena aligns arrays to 16 bytes");
  return SharedPtr<T>(static_cast<T*>(block_shared(key, sizeof(T) * count, site)));
}

// Runs `body` (a launch of `kernel`) once per thread of the grid; throws
// std::runtime_error for a configuration CUDA would refuse, a divergent
// barrier, a bad shuffle or a shared-memory error.
void launch(const void* kernel, dim3 grid, dim3 block, const std::function<void()>& body);

// What ptxas gave a kernel (kernel_resources.cpp): set by the tests from the
// CUDA build's report, by kernel symbol.
struct KernelResources {
  int64_t registers = 0;  // per thread
  int64_t shared_bytes = 0;
};
void set_kernel_resources(std::map<std::string, KernelResources> resources);
// Blocks of `threads` that one SM (sm_90) keeps resident running `kernel`, as
// cudaOccupancyMaxActiveBlocksPerMultiprocessor answers on a GPU: from `r`, or
// the figures set for the kernel, or the thread limits alone without them.
int64_t resident_blocks(const void* kernel, int threads, const KernelResources* r = nullptr);
// The kernel's symbol (mangled, as ptxas names it), or "" if unknown.
std::string kernel_symbol(const void* kernel);
// With logging on, every launch is recorded as "symbol gx gy gz bx by bz";
// take_launch_log returns the records so far and forgets them.
void set_launch_logging(bool on);
void log_launch(const void* kernel, dim3 grid, dim3 block);
std::vector<std::string> take_launch_log();

// The order in which blocks, and the ready threads of a block, are run.
enum class Schedule { kForward, kReverse, kRandom };
void set_schedule(Schedule schedule, uint64_t seed);
Schedule schedule();

// The emulated device's multiprocessor count, which launch plans read.
int64_t num_sms();
void set_num_sms(int64_t n);
// Launches so far (tests check that a path takes the launches it should).
int64_t launch_count();
// The grid limits the launch plans cap their grids at (cuda::max_grid_x/y):
// 65535 as on the GPU, lowered by tests so that the loops that stride over a
// capped grid run on small shapes. A launch whose grid exceeds the y limit is
// refused, as a GPU refuses one beyond 65535.
int64_t max_grid_x();
int64_t max_grid_y();
void set_grid_caps(int64_t x, int64_t y);

template <typename T>
T shuffle(T v, int src_lane, unsigned mask, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= kMaxShuffleBytes,
                "shuffles move scalars");
  T out = v;
  warp_exchange(&v, &out, sizeof(T), src_lane, mask, file, line);
  return out;
}

}  // namespace emu
}  // namespace bnext

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define threadIdx (::bnext::emu::thread_idx())
#define blockIdx (::bnext::emu::block_idx())
#define blockDim (::bnext::emu::block_dim())
#define gridDim (::bnext::emu::grid_dim())

#define __syncthreads() ::bnext::emu::syncthreads(__FILE__, __LINE__)
inline void __threadfence() {}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const int lane = ::bnext::emu::lane_id();
  const int end = lane / width * width + width;
  const int src = lane + static_cast<int>(delta) < end ? lane + static_cast<int>(delta) : lane;
  return ::bnext::emu::shuffle(v, src, mask, file, line);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const int lane = ::bnext::emu::lane_id();
  const int src = lane ^ lane_mask;
  return ::bnext::emu::shuffle(v, src / width == lane / width ? src : lane, mask, file, line);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  const int lane = ::bnext::emu::lane_id();
  return ::bnext::emu::shuffle(v, lane / width * width + src_lane % width, mask, file, line);
}

// Blocks run one at a time, so read-modify-write is atomic already.
template <typename T>
T atomicAdd(T* address, T v) {
  const T old = *address;
  *address = old + v;
  return old;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}
