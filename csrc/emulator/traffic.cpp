// A model of a launch's global-memory traffic. Built with BNEXT_EMULATOR_TRAFFIC
// (and -fsanitize=address with every check an out-of-line call, but no ASan
// runtime: tests/emulated_cuda.py), every load and store the compiler could
// not keep in a register calls __asan_load<N> / __asan_store<N>, defined here.
// While a counted launch runs a thread, an access counts when it is not to
// that thread's stack, the launching thread's stack or the block's shared
// memory, and its code is not the emulator's own. Per launch:
//   - bytes the threads load and store;
//   - the 32-byte sectors of each warp-wide access: the k-th access a lane
//     makes at one instruction meets the other lanes' k-th there, as the
//     warp's instruction would (requested bytes / (sectors * 32) is the
//     coalescing efficiency);
//   - the distinct sectors loaded and stored: the DRAM traffic of a GPU whose
//     caches keep what one launch re-reads (a model: a GPU's L2 holds 50 MB,
//     not every tensor).
#include "emulator/traffic.h"

#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include "emulator/symbols.h"

namespace bnext {
namespace emu {
namespace traffic {
namespace {

constexpr uint64_t kSector = 32;

// One warp-wide access: the lanes' byte ranges, and whether the instruction
// is a vector load or store (cuda::load_vector / store_vector).
struct Group {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  bool vector = false;
};

struct Totals {
  uint64_t bytes[2] = {0, 0};     // load, store: what the threads asked for
  uint64_t requests[2] = {0, 0};  // warp-wide accesses
  uint64_t sectors[2] = {0, 0};   // their 32-byte sectors
  uint64_t useful[2] = {0, 0};    // their distinct bytes (lanes reading one value count it once)
  // The same two of the vector accesses alone.
  uint64_t vector_sectors[2] = {0, 0};
  uint64_t vector_useful[2] = {0, 0};
};

// One warp-wide access: the k-th a lane of `warp` makes at instruction `pc`.
struct Key {
  int warp;
  bool store;
  uint32_t k;
  uintptr_t pc;
  bool operator==(const Key& o) const {
    return warp == o.warp && store == o.store && k == o.k && pc == o.pc;
  }
};
struct KeyHash {
  std::size_t operator()(const Key& key) const {
    uint64_t h = key.pc * 0x9E3779B97F4A7C15ull;
    h ^= (static_cast<uint64_t>(key.k) << 20) ^ (static_cast<uint64_t>(key.warp) << 1) ^ key.store;
    return static_cast<std::size_t>(h ^ (h >> 29));
  }
};

struct Launch {
  std::string symbol;
  dim3 grid, block;
  Totals totals;
  std::unordered_set<uint64_t> distinct[2];
  std::unordered_map<Key, Group, KeyHash> groups;  // the block's
  // Per thread of the block: accesses so far at each pc.
  std::vector<std::unordered_map<uintptr_t, uint32_t>> seen;
};

bool g_counting = false;
Launch* g_launch = nullptr;
std::vector<std::string> g_records;
// The running thread (set only while a counted launch runs one).
bool g_active = false;
int g_thread = 0;
uintptr_t g_stack_lo = 0, g_stack_hi = 0;
uintptr_t g_shared_lo = 0, g_shared_hi = 0;
uintptr_t g_host_stack_lo = 0, g_host_stack_hi = 0;
// The emulator's threads (threadIdx reads their records).
uintptr_t g_threads_lo = 0, g_threads_hi = 0;
std::unordered_map<uintptr_t, bool> g_counted_pc;

__attribute__((no_sanitize_address)) bool counted_pc(uintptr_t pc) {
  const auto it = g_counted_pc.find(pc);
  if (it != g_counted_pc.end()) return it->second;
  // The emulator's code (its fibers, shared-memory checks, this counter) and
  // the standard library's moving of launch arguments are not the kernel's.
  const std::string& name = symbol_containing(pc);
  const bool counted = !name.empty() && name.rfind("_ZN5bnext3emu", 0) != 0 &&
                       name.rfind("_ZNSt", 0) != 0 && name.rfind("_ZSt", 0) != 0;
  g_counted_pc.emplace(pc, counted);
  return counted;
}

// Set while an access is recorded: the containers below are instrumented code
// too, and their own accesses must not be recorded.
bool g_recording = false;

__attribute__((no_sanitize_address)) void record(uintptr_t addr, std::size_t bytes, bool store,
                                                 uintptr_t pc, bool vector = false) {
  if (!g_active || g_recording || bytes == 0) return;
  if (addr - g_stack_lo < g_stack_hi - g_stack_lo) return;
  if (addr - g_shared_lo < g_shared_hi - g_shared_lo) return;
  if (addr - g_host_stack_lo < g_host_stack_hi - g_host_stack_lo) return;
  if (addr - g_threads_lo < g_threads_hi - g_threads_lo) return;
  g_recording = true;
  if (!counted_pc(pc)) {
    g_recording = false;
    return;
  }
  Launch& l = *g_launch;
  const uint32_t k = l.seen[g_thread][pc]++;
  Group& group = l.groups[Key{g_thread / kWarpSize, store, k, pc}];
  group.ranges.emplace_back(addr, addr + bytes);
  group.vector = vector;
  for (uint64_t s = addr / kSector; s <= (addr + bytes - 1) / kSector; ++s) {
    l.distinct[store].insert(s);
  }
  l.totals.bytes[store] += bytes;
  g_recording = false;
}

void host_stack(uintptr_t& lo, uintptr_t& hi) {
  pthread_attr_t attr;
  void* base = nullptr;
  std::size_t size = 0;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    pthread_attr_getstack(&attr, &base, &size);
    pthread_attr_destroy(&attr);
  }
  lo = reinterpret_cast<uintptr_t>(base);
  hi = lo + size;
}

}  // namespace

#ifdef BNEXT_EMULATOR_TRAFFIC
bool available() { return true; }
#else
bool available() { return false; }
#endif

void set_counting(bool on) {
  if (on && !available()) {
    throw std::runtime_error(
        "bnext emulator: traffic counting needs the build with BNEXT_EMULATOR_TRAFFIC (not the "
        "AddressSanitizer build)");
  }
  g_counting = on;
  g_records.clear();
}
bool counting() { return g_counting; }

std::vector<std::string> take() {
  std::vector<std::string> out;
  out.swap(g_records);
  return out;
}

void begin_launch(const void* kernel, dim3 grid, dim3 block, const void* shared,
                  std::size_t shared_bytes) {
  delete g_launch;
  g_launch = new Launch();
  g_launch->symbol = symbol_at(reinterpret_cast<uintptr_t>(kernel));
  g_launch->grid = grid;
  g_launch->block = block;
  g_launch->seen.resize(std::size_t(block.x) * block.y * block.z);
  g_shared_lo = reinterpret_cast<uintptr_t>(shared);
  g_shared_hi = g_shared_lo + shared_bytes;
  host_stack(g_host_stack_lo, g_host_stack_hi);
}

void begin_block(const void* threads, std::size_t bytes) {
  g_threads_lo = reinterpret_cast<uintptr_t>(threads);
  g_threads_hi = g_threads_lo + bytes;
}

void enter_thread(int linear, const void* stack, std::size_t stack_bytes) {
  if (g_launch == nullptr) return;
  g_thread = linear;
  g_stack_lo = reinterpret_cast<uintptr_t>(stack);
  g_stack_hi = g_stack_lo + stack_bytes;
  g_active = true;
}

void leave_thread() { g_active = false; }

void end_block() {
  if (g_launch == nullptr) return;
  Launch& l = *g_launch;
  for (auto& [key, group] : l.groups) {
    const int store = key.store ? 1 : 0;
    auto& ranges = group.ranges;
    std::sort(ranges.begin(), ranges.end());
    // The union of the lanes' ranges, and the sectors it touches.
    uint64_t useful = 0, sectors = 0, last_sector = UINT64_MAX;
    uint64_t lo = ranges[0].first, hi = ranges[0].second;
    const auto close = [&](uint64_t a, uint64_t b) {
      useful += b - a;
      uint64_t first = a / kSector;
      const uint64_t end = (b - 1) / kSector;
      if (first == last_sector) ++first;
      if (end >= first) sectors += end - first + 1;
      last_sector = end;
    };
    for (const auto& [a, b] : ranges) {
      if (a > hi) {
        close(lo, hi);
        lo = a;
        hi = b;
      } else {
        hi = std::max(hi, b);
      }
    }
    close(lo, hi);
    l.totals.requests[store] += 1;
    l.totals.sectors[store] += sectors;
    l.totals.useful[store] += useful;
    if (group.vector) {
      l.totals.vector_sectors[store] += sectors;
      l.totals.vector_useful[store] += useful;
    }
  }
  l.groups.clear();
  for (auto& s : l.seen) s.clear();
}

void end_launch() {
  if (g_launch == nullptr) return;
  const Launch& l = *g_launch;
  std::ostringstream os;
  os << (l.symbol.empty() ? "?" : l.symbol) << ' ' << l.grid.x << ' ' << l.grid.y << ' ' << l.grid.z
     << ' ' << l.block.x << ' ' << l.block.y << ' ' << l.block.z;
  for (int s = 0; s < 2; ++s) {
    os << ' ' << l.totals.bytes[s] << ' ' << l.totals.requests[s] << ' ' << l.totals.sectors[s]
       << ' ' << l.totals.useful[s] << ' ' << l.distinct[s].size() << ' '
       << l.totals.vector_sectors[s] << ' ' << l.totals.vector_useful[s];
  }
  g_records.push_back(os.str());
  abandon_launch();
}

void abandon_launch() {
  g_active = false;
  delete g_launch;
  g_launch = nullptr;
}

}  // namespace traffic

// Not inlined: the return address is the kernel's instruction.
__attribute__((noinline, no_sanitize_address)) void vector_load(void* dst, const void* src,
                                                                std::size_t bytes, bool wide) {
  traffic::record(reinterpret_cast<uintptr_t>(src), bytes, false,
                  reinterpret_cast<uintptr_t>(__builtin_return_address(0)), wide);
  std::memcpy(dst, src, bytes);
}
__attribute__((noinline, no_sanitize_address)) void vector_store(void* dst, const void* src,
                                                                 std::size_t bytes, bool wide) {
  traffic::record(reinterpret_cast<uintptr_t>(dst), bytes, true,
                  reinterpret_cast<uintptr_t>(__builtin_return_address(0)), wide);
  std::memcpy(dst, src, bytes);
}

}  // namespace emu
}  // namespace bnext

#ifdef BNEXT_EMULATOR_TRAFFIC
// The hooks the instrumented code calls. Only the accesses themselves
// matter: no shadow memory, no reports; the module constructor's calls are
// no-ops.
using bnext::emu::traffic::record;  // NOLINT

#define BNEXT_HOOK_NO_SANITIZE \
  extern "C" __attribute__((no_sanitize_address, visibility("default")))
#define BNEXT_ACCESS_HOOKS(N)                                    \
  BNEXT_HOOK_NO_SANITIZE void __asan_load##N(uintptr_t p) {      \
    record(p, N, false, (uintptr_t)__builtin_return_address(0)); \
  }                                                              \
  BNEXT_HOOK_NO_SANITIZE void __asan_store##N(uintptr_t p) {     \
    record(p, N, true, (uintptr_t)__builtin_return_address(0));  \
  }
BNEXT_ACCESS_HOOKS(1)
BNEXT_ACCESS_HOOKS(2)
BNEXT_ACCESS_HOOKS(4)
BNEXT_ACCESS_HOOKS(8)
BNEXT_ACCESS_HOOKS(16)

BNEXT_HOOK_NO_SANITIZE void __asan_loadN(uintptr_t p, std::size_t n) {
  record(p, n, false, (uintptr_t)__builtin_return_address(0));
}
BNEXT_HOOK_NO_SANITIZE void __asan_storeN(uintptr_t p, std::size_t n) {
  record(p, n, true, (uintptr_t)__builtin_return_address(0));
}
BNEXT_HOOK_NO_SANITIZE void* __asan_memcpy(void* dst, const void* src, std::size_t n) {
  record((uintptr_t)src, n, false, (uintptr_t)__builtin_return_address(0));
  record((uintptr_t)dst, n, true, (uintptr_t)__builtin_return_address(0));
  return std::memcpy(dst, src, n);
}
BNEXT_HOOK_NO_SANITIZE void* __asan_memmove(void* dst, const void* src, std::size_t n) {
  record((uintptr_t)src, n, false, (uintptr_t)__builtin_return_address(0));
  record((uintptr_t)dst, n, true, (uintptr_t)__builtin_return_address(0));
  return std::memmove(dst, src, n);
}
BNEXT_HOOK_NO_SANITIZE void* __asan_memset(void* dst, int c, std::size_t n) {
  record((uintptr_t)dst, n, true, (uintptr_t)__builtin_return_address(0));
  return std::memset(dst, c, n);
}
BNEXT_HOOK_NO_SANITIZE void __asan_init() {}
BNEXT_HOOK_NO_SANITIZE void __asan_version_mismatch_check_v8() {}
BNEXT_HOOK_NO_SANITIZE void __asan_handle_no_return() {}
BNEXT_HOOK_NO_SANITIZE void __asan_before_dynamic_init(const char*) {}
BNEXT_HOOK_NO_SANITIZE void __asan_after_dynamic_init() {}
#endif
