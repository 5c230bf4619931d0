// The fiber scheduler behind cuda_emulator.h. One launch runs its blocks one
// at a time, in the order the schedule gives (forward: x fastest, as blockIdx
// enumerates them); inside a block every thread is a ucontext fiber with its
// own stack. A fiber runs until it reaches a barrier (__syncthreads, or the
// two halves of a warp shuffle) or returns; at each step the ready fibers run
// in the schedule's order. The scheduler releases a barrier once every live
// thread that must reach it has, and reports an error when the threads wait at
// different barriers.
#include "emulator/cuda_emulator.h"
#include "emulator/traffic.h"

#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace bnext {
namespace emu {
namespace {

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridYZ = 65535;
constexpr std::size_t kStackBytes = 256 * 1024;
// CUDA's limit on a block's static shared memory.
constexpr std::size_t kMaxSharedBytes = 48 * 1024;
constexpr std::size_t kSharedAlign = 16;
constexpr int kSeveralThreads = -1;

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  uint3 idx;
  int linear = 0;
  State state = State::kReady;
  uint64_t block_barriers = 0;  // __syncthreads passed, to catch divergence
  uint64_t warp_barriers = 0;
  const char* file = nullptr;  // the __syncthreads() or shuffle it waits at
  int line = 0;
  unsigned mask = 0;
};

// A shared array of the running block.
struct SharedArray {
  const void* key;
  std::size_t offset;
  std::size_t bytes;
  SharedSite site;
};

// What the block has done to one byte of its shared memory. Intervals are
// counted from 1 (0: never); a barrier ends one.
struct SharedByte {
  uint64_t written = 0;  // the interval of the last write
  int writer = 0;
  uint64_t read = 0;  // the interval of the last reads
  int reader = 0;     // the one thread that read it then, or kSeveralThreads
};

struct Block {
  dim3 grid;
  dim3 block;
  uint3 block_idx;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<unsigned char> slots;  // kWarpSize * kMaxShuffleBytes per warp
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::exception_ptr error;
  uint64_t interval = 1;  // barrier intervals begun in this block
  std::vector<SharedArray> shared;
  std::size_t shared_used = 0;
};

Block* g_block = nullptr;
Schedule g_schedule = Schedule::kForward;
std::mt19937_64 g_rng;
int64_t g_num_sms = 4;
int64_t g_launches = 0;
alignas(kSharedAlign) unsigned char g_shared[kMaxSharedBytes];
SharedByte g_shared_bytes[kMaxSharedBytes];
int64_t g_max_grid_x = 65535;
int64_t g_max_grid_y = kMaxGridYZ;
std::vector<std::unique_ptr<char[]>> g_stacks;

Fiber& self() {
  if (g_block == nullptr || g_block->current == nullptr) {
    throw std::runtime_error("bnext emulator: a CUDA built-in was used outside a kernel launch");
  }
  return *g_block->current;
}

void yield_to_scheduler(State state) {
  Fiber& f = self();
  f.state = state;
  swapcontext(&f.context, &g_block->scheduler);
}

void fiber_main() {
  Fiber& f = *g_block->current;
  try {
    (*g_block->body)();
  } catch (...) {
    if (!g_block->error) g_block->error = std::current_exception();
  }
  f.state = State::kDone;
  // uc_link returns to the scheduler.
}

std::string describe(const Block& b, const char* what) {
  std::ostringstream os;
  os << "bnext emulator: " << what << " in block (" << b.block_idx.x << ", " << b.block_idx.y
     << ", " << b.block_idx.z << ") of a (" << b.block.x << ", " << b.block.y << ", " << b.block.z
     << ") block";
  return os.str();
}

// Releases the warps whose live lanes all wait at the same shuffle barrier.
bool release_warps(Block& b) {
  bool released = false;
  const int n = static_cast<int>(b.fibers.size());
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    const int w1 = std::min(n, w0 + kWarpSize);
    int waiting = 0;
    int live = 0;
    for (int i = w0; i < w1; ++i) {
      if (b.fibers[i].state == State::kDone) continue;
      ++live;
      if (b.fibers[i].state == State::kAtWarpBarrier) ++waiting;
    }
    if (live == 0 || waiting != live) continue;
    const Fiber* first = nullptr;
    for (int i = w0; i < w1; ++i) {
      Fiber& f = b.fibers[i];
      if (f.state == State::kDone) continue;
      if (first == nullptr) first = &f;
      if (f.warp_barriers != first->warp_barriers) {
        throw std::runtime_error(describe(b, "lanes of a warp shuffle at different points"));
      }
      // Lanes that diverged and shuffle in their own branches: CUDA leaves the
      // result undefined (all lanes a mask names must run the same shuffle).
      if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
        std::ostringstream os;
        os << "lanes of a warp shuffle at different calls (" << first->file << ":" << first->line
           << " and " << f.file << ":" << f.line << "): a shuffle in divergent code";
        throw std::runtime_error(describe(b, os.str().c_str()));
      }
      f.state = State::kReady;
    }
    released = true;
  }
  return released;
}

bool release_block(Block& b) {
  const Fiber* first = nullptr;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone) continue;
    if (f.state != State::kAtBlockBarrier) return false;
    if (first == nullptr) first = &f;
    if (f.block_barriers != first->block_barriers || f.line != first->line ||
        std::strcmp(f.file, first->file) != 0) {
      throw std::runtime_error(describe(b, "threads wait at different __syncthreads()"));
    }
  }
  if (first == nullptr) return false;
  for (Fiber& f : b.fibers) {
    if (f.state != State::kDone) f.state = State::kReady;
  }
  ++b.interval;
  return true;
}

// 0..n-1 in the schedule's order (a fresh permutation at each call when random).
const std::vector<int>& schedule_order(std::vector<int>& order, int n) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  if (g_schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
  if (g_schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), g_rng);
  return order;
}

void run_block(Block& b) {
  const unsigned threads = b.block.x * b.block.y * b.block.z;
  b.fibers.assign(threads, Fiber());
  b.interval = 1;
  b.shared.clear();
  b.shared_used = 0;
  b.slots.assign((threads + kWarpSize - 1) / kWarpSize * kWarpSize * kMaxShuffleBytes, 0);
  while (g_stacks.size() < threads) g_stacks.emplace_back(new char[kStackBytes]);
  traffic::begin_block(b.fibers.data(), b.fibers.size() * sizeof(Fiber));
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = static_cast<int>(i);
    f.idx = {i % b.block.x, i / b.block.x % b.block.y, i / (b.block.x * b.block.y)};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = g_stacks[i].get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, &fiber_main, 0);
  }
  std::vector<int> order;
  for (;;) {
    bool ran = false;
    for (const int i : schedule_order(order, static_cast<int>(threads))) {
      Fiber& f = b.fibers[i];
      if (f.state != State::kReady) continue;
      b.current = &f;
      traffic::enter_thread(i, g_stacks[i].get(), kStackBytes);
      swapcontext(&b.scheduler, &f.context);
      traffic::leave_thread();
      b.current = nullptr;
      ran = true;
      if (b.error) std::rethrow_exception(b.error);
    }
    const bool released = release_warps(b) || release_block(b);
    if (ran || released) continue;
    for (const Fiber& f : b.fibers) {
      if (f.state != State::kDone) {
        throw std::runtime_error(
            describe(b,
                     "deadlock: some threads wait at __syncthreads() while others wait in a warp "
                     "shuffle"));
      }
    }
    traffic::end_block();
    return;
  }
}

void check_config(dim3 grid, dim3 block) {
  std::ostringstream os;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64) {
    os << "block of (" << block.x << ", " << block.y << ", " << block.z << ") threads";
  } else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > g_max_grid_y ||
             grid.z > kMaxGridYZ || grid.x > 0x7fffffffu) {
    os << "grid of (" << grid.x << ", " << grid.y << ", " << grid.z << ") blocks";
  } else {
    return;
  }
  throw std::runtime_error("bnext emulator: invalid configuration argument: " + os.str());
}

}  // namespace

const uint3& thread_idx() { return self().idx; }
const uint3& block_idx() {
  self();
  return g_block->block_idx;
}
const dim3& block_dim() {
  self();
  return g_block->block;
}
const dim3& grid_dim() {
  self();
  return g_block->grid;
}
int lane_id() { return self().linear % kWarpSize; }

void syncthreads(const char* file, int line) {
  Fiber& f = self();
  f.file = file;
  f.line = line;
  ++f.block_barriers;
  yield_to_scheduler(State::kAtBlockBarrier);
}

void warp_exchange(const void* in, void* out, std::size_t bytes, int src_lane, unsigned mask,
                   const char* file, int line) {
  Fiber& f = self();
  f.file = file;
  f.line = line;
  Block& b = *g_block;
  const int lane = f.linear % kWarpSize;
  const int warp0 = f.linear - lane;
  if (mask != 0xffffffffu) {
    throw std::runtime_error(describe(b, "a shuffle with a partial mask (not emulated)"));
  }
  if (src_lane < 0 || src_lane >= kWarpSize ||
      warp0 + src_lane >= static_cast<int>(b.fibers.size())) {
    throw std::runtime_error(describe(b, "a shuffle reads a lane that does not exist"));
  }
  unsigned char* slots = b.slots.data() + static_cast<std::size_t>(warp0) * kMaxShuffleBytes;
  std::memcpy(slots + lane * kMaxShuffleBytes, in, bytes);
  f.mask = mask;
  ++f.warp_barriers;
  yield_to_scheduler(State::kAtWarpBarrier);
  if (b.fibers[warp0 + src_lane].state == State::kDone) {
    throw std::runtime_error(describe(b, "a shuffle reads a lane that has exited"));
  }
  std::memcpy(out, slots + src_lane * kMaxShuffleBytes, bytes);
  // Nobody may overwrite a slot before every lane has read its source.
  ++f.warp_barriers;
  yield_to_scheduler(State::kAtWarpBarrier);
}

void check_vector_access(const void* p, std::size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes == 0) return;
  self();
  const Fiber& f = *g_block->current;
  std::ostringstream os;
  os << "misaligned address: a " << bytes << "-byte vector access at " << p << " by thread ("
     << f.idx.x << ", " << f.idx.y << ", " << f.idx.z << ")";
  throw std::runtime_error(describe(*g_block, os.str().c_str()));
}

void* block_shared(const void* key, std::size_t bytes, const SharedSite& site) {
  self();
  Block& b = *g_block;
  for (const SharedArray& a : b.shared) {
    if (a.key == key) return g_shared + a.offset;
  }
  const std::size_t offset = (b.shared_used + kSharedAlign - 1) / kSharedAlign * kSharedAlign;
  if (offset + bytes > kMaxSharedBytes) {
    std::ostringstream os;
    os << "too much shared memory: `" << site.name << "` in " << site.function << " (" << site.file
       << ":" << site.line << ") needs " << bytes << " bytes after " << offset << " of the "
       << kMaxSharedBytes << " a block may declare";
    throw std::runtime_error(describe(b, os.str().c_str()));
  }
  b.shared.push_back({key, offset, bytes, site});
  b.shared_used = offset + bytes;
  // Garbage, as a GPU gives: NaN in every float type, -1 in every integer one.
  std::memset(g_shared + offset, 0xff, bytes);
  std::fill(g_shared_bytes + offset, g_shared_bytes + offset + bytes, SharedByte());
  return g_shared + offset;
}

namespace {

std::string thread_name(const Block& b, int linear) {
  if (linear == kSeveralThreads) return "several threads";
  const uint3& i = b.fibers[linear].idx;
  std::ostringstream os;
  os << "thread (" << i.x << ", " << i.y << ", " << i.z << ")";
  return os.str();
}

[[noreturn]] void shared_error(const Block& b, const SharedArray& a, std::size_t byte,
                               const std::string& what) {
  std::ostringstream os;
  os << "shared memory: " << what << " (byte " << byte << " of `" << a.site.name << "` in "
     << a.site.function << ", " << a.site.file << ":" << a.site.line << ")";
  throw std::runtime_error(describe(b, os.str().c_str()));
}

}  // namespace

void shared_access(const void* p, std::size_t bytes, bool write) {
  const Fiber& f = self();
  const Block& b = *g_block;
  const auto at = static_cast<const unsigned char*>(p) - g_shared;
  // The array the access starts in or, past every array's end, the last
  // array before it (the one an off-by-one overruns).
  const SharedArray* array = nullptr;
  for (const SharedArray& a : b.shared) {
    if (static_cast<std::ptrdiff_t>(a.offset) <= at &&
        (array == nullptr || a.offset > array->offset)) {
      array = &a;
    }
  }
  const auto me = [&] { return thread_name(b, f.linear); };
  if (array == nullptr || at + bytes > array->offset + array->bytes) {
    std::ostringstream os;
    os << me() << " " << (write ? "writes" : "reads") << " " << bytes << " bytes at offset " << at
       << " of the block's shared memory, outside its arrays";
    if (array == nullptr)
      throw std::runtime_error(describe(b, ("shared memory: " + os.str()).c_str()));
    os << " (`" << array->site.name << "` has " << array->bytes << ")";
    shared_error(b, *array, at - array->offset, os.str());
  }
  const uint64_t now = b.interval;
  for (std::size_t i = 0; i < bytes; ++i) {
    SharedByte& s = g_shared_bytes[at + i];
    const std::size_t byte = at + i - array->offset;
    if (write) {
      if (s.written == now && s.writer != f.linear) {
        shared_error(b, *array, byte,
                     me() + " writes what " + thread_name(b, s.writer) +
                         " wrote since the last barrier (a race)");
      }
      if (s.read == now && s.reader != f.linear) {
        shared_error(b, *array, byte,
                     me() + " writes what " + thread_name(b, s.reader) +
                         " read since the last barrier (a race)");
      }
      s.written = now;
      s.writer = f.linear;
    } else {
      if (s.written == 0) {
        shared_error(b, *array, byte, me() + " reads a byte no thread of its block has written");
      }
      if (s.written == now && s.writer != f.linear) {
        shared_error(b, *array, byte,
                     me() + " reads what " + thread_name(b, s.writer) +
                         " wrote since the last barrier (a race)");
      }
      if (s.read != now) {
        s.read = now;
        s.reader = f.linear;
      } else if (s.reader != f.linear) {
        s.reader = kSeveralThreads;
      }
    }
  }
}

void launch(const void* kernel, dim3 grid, dim3 block, const std::function<void()>& body) {
  check_config(grid, block);
  if (g_block != nullptr) throw std::runtime_error("bnext emulator: nested launch");
  ++g_launches;
  log_launch(kernel, grid, block);
  if (traffic::counting()) traffic::begin_launch(kernel, grid, block, g_shared, kMaxSharedBytes);
  Block b;
  b.grid = grid;
  b.block = block;
  b.body = &body;
  g_block = &b;
  try {
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    std::vector<uint64_t> order(blocks);
    std::iota(order.begin(), order.end(), uint64_t{0});
    if (g_schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
    if (g_schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), g_rng);
    for (const uint64_t i : order) {
      b.block_idx = {static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                     static_cast<unsigned>(i / (uint64_t(grid.x) * grid.y))};
      run_block(b);
    }
  } catch (...) {
    g_block = nullptr;
    traffic::abandon_launch();
    throw;
  }
  g_block = nullptr;
  traffic::end_launch();
}

void set_schedule(Schedule schedule, uint64_t seed) {
  g_schedule = schedule;
  g_rng.seed(seed);
}
Schedule schedule() { return g_schedule; }

int64_t num_sms() { return g_num_sms; }
void set_num_sms(int64_t n) {
  if (n < 1) throw std::invalid_argument("bnext emulator: num_sms must be positive");
  g_num_sms = n;
}
int64_t launch_count() { return g_launches; }

int64_t max_grid_x() { return g_max_grid_x; }
int64_t max_grid_y() { return g_max_grid_y; }
void set_grid_caps(int64_t x, int64_t y) {
  if (x < 1 || x > 65535 || y < 1 || y > kMaxGridYZ) {
    throw std::invalid_argument("bnext emulator: grid caps must be in [1, 65535]");
  }
  g_max_grid_x = x;
  g_max_grid_y = y;
}

}  // namespace emu
}  // namespace bnext
