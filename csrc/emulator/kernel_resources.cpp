// What the emulated GPU knows of each kernel's resources, and the launch log.
//
// On a GPU the launch plans ask the runtime how many blocks of a kernel one SM
// keeps resident (cudaOccupancyMaxActiveBlocksPerMultiprocessor): the
// registers and shared memory ptxas gave the kernel decide. Here the tests
// hand in ptxas's figures from the CUDA build's report
// (build/resource-usage/, tests/test_resource_usage.py) by kernel symbol, and
// the same arithmetic as CUDA's occupancy calculator (sm_90) gives the
// answer; a kernel without figures gets the thread limit alone.
#include <algorithm>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "emulator/cuda_emulator.h"
#include "emulator/symbols.h"

namespace bnext {
namespace emu {
namespace {

// sm_90 (H100/H200): what one SM holds.
constexpr int64_t kRegistersPerSm = 65536;
constexpr int64_t kRegisterUnit = 256;  // registers are given to a warp in these
constexpr int64_t kMaxWarpsPerSm = 64;
constexpr int64_t kMaxBlocksPerSm = 32;
constexpr int64_t kSharedPerSm = 233472;  // 228 KiB
constexpr int64_t kSharedReservedPerBlock = 1024;

std::map<std::string, KernelResources> g_resources;
bool g_logging = false;
std::vector<std::string> g_log;

}  // namespace

std::string kernel_symbol(const void* kernel) {
  return symbol_at(reinterpret_cast<uintptr_t>(kernel));
}

void set_kernel_resources(std::map<std::string, KernelResources> resources) {
  g_resources = std::move(resources);
}

int64_t resident_blocks(const void* kernel, int threads, const KernelResources* r) {
  const int64_t warps = (threads + kWarpSize - 1) / kWarpSize;
  int64_t blocks = std::min(kMaxWarpsPerSm / warps, kMaxBlocksPerSm);
  if (r == nullptr && !g_resources.empty()) {
    const auto it = g_resources.find(kernel_symbol(kernel));
    if (it != g_resources.end()) r = &it->second;
  }
  if (r != nullptr) {
    const int64_t per_warp =
        (r->registers * kWarpSize + kRegisterUnit - 1) / kRegisterUnit * kRegisterUnit;
    if (per_warp > 0) blocks = std::min(blocks, kRegistersPerSm / per_warp / warps);
    blocks = std::min(blocks, kSharedPerSm / (r->shared_bytes + kSharedReservedPerBlock));
  }
  return std::max<int64_t>(blocks, 0);
}

void set_launch_logging(bool on) {
  g_logging = on;
  g_log.clear();
}

void log_launch(const void* kernel, dim3 grid, dim3 block) {
  if (!g_logging) return;
  std::ostringstream os;
  os << kernel_symbol(kernel) << ' ' << grid.x << ' ' << grid.y << ' ' << grid.z << ' ' << block.x
     << ' ' << block.y << ' ' << block.z;
  g_log.push_back(os.str());
}

std::vector<std::string> take_launch_log() {
  std::vector<std::string> log;
  log.swap(g_log);
  return log;
}

}  // namespace emu
}  // namespace bnext
