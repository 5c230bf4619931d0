// The choice between cached and streaming stores, from the size of the
// last-level cache.
#include "common/cpu_cache.h"

#include <cstdlib>
#include <fstream>
#include <string>

#include "common/cpu_vec.h"

namespace bnext {
namespace cpu {
namespace {

// One instance of the L3 (what one core sees), from sysfs: sysconf reports the
// sum over every instance of the package on some machines (384 MB on a
// 32 MB-per-core-complex EPYC VM).
int64_t read_last_level_cache_bytes() {
  std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index3/size");
  std::string text;
  if (f >> text && !text.empty()) {
    const char unit = text.back();
    const int64_t value = std::strtoll(text.c_str(), nullptr, 10);
    const int64_t scale = unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1;
    if (value > 0) return value * scale;
  }
  return int64_t{32} << 20;
}

int64_t stream_threshold_bytes() {
  if (const char* env = std::getenv("BNEXT_STREAM_MIN_BYTES"))
    return std::strtoll(env, nullptr, 10);
  return read_last_level_cache_bytes() / 2;
}

}  // namespace

bool should_stream_bytes(int64_t bytes) {
  static const int64_t threshold = stream_threshold_bytes();
  return kStreamAlign > 1 && bytes >= threshold;
}

}  // namespace cpu
}  // namespace bnext
