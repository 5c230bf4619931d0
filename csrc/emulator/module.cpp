// The test library `bnext_emu`: every bnext operator (the same schemas), with
// the CUDA kernels compiled for the CPU emulator (cuda_emulator.h) as its
// kernels for CPU tensors. tests/test_cuda_emulated_*.py compare it with the
// CPU kernels, so the CUDA kernels' indexing, launch plans and arithmetic are
// tested on machines without a GPU. Built on demand by tests/emulated_cuda.py,
// never part of torch_bnext._C.
#ifndef BNEXT_EMULATE_CUDA
#error "build with -DBNEXT_EMULATE_CUDA"
#endif

// This library's only unit: it defines CudaBackend's Batch Norm functions
// too (cuda_kernels.cuh).
#define BNEXT_DEFINE_BATCH_NORM_CUDA_BACKEND
#include <torch/library.h>

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "batch_norm/cuda_kernels.cuh"
#include "batch_norm/schemas.h"
#include "batch_norm_act/composite.h"
#include "batch_norm_act/schemas.h"
#include "batch_renorm/composite.h"
#include "batch_renorm/schemas.h"
#include "distributed/composite.h"
#include "distributed/schemas.h"
#include "emulator/cuda_emulator.h"
#include "emulator/traffic.h"
#include "layer_norm/composite.h"
#include "layer_norm/cuda_kernels.cuh"
#include "layer_norm/schemas.h"

namespace bnext {
namespace emu {
namespace {

void set_num_sms_op(int64_t n) { set_num_sms(n); }
int64_t num_sms_op() { return num_sms(); }
int64_t launch_count_op() { return launch_count(); }
void set_grid_caps_op(int64_t x, int64_t y) { set_grid_caps(x, y); }
std::vector<int64_t> grid_caps_op() { return {max_grid_x(), max_grid_y()}; }

void set_kernel_resources_op(const std::vector<std::string>& symbols,
                             const std::vector<int64_t>& registers,
                             const std::vector<int64_t>& shared_bytes) {
  TORCH_CHECK(symbols.size() == registers.size() && symbols.size() == shared_bytes.size(),
              "bnext emulator: one register count and one shared size per kernel");
  std::map<std::string, KernelResources> table;
  for (std::size_t i = 0; i < symbols.size(); ++i) {
    table[symbols[i]] = KernelResources{registers[i], shared_bytes[i]};
  }
  set_kernel_resources(std::move(table));
}
int64_t resident_blocks_op(int64_t registers, int64_t shared_bytes, int64_t threads) {
  const KernelResources r{registers, shared_bytes};
  return resident_blocks(nullptr, static_cast<int>(threads), &r);
}
void set_launch_logging_op(bool on) { set_launch_logging(on); }
std::vector<std::string> take_launch_log_op() { return take_launch_log(); }

void set_traffic_counting_op(bool on) { traffic::set_counting(on); }
std::vector<std::string> take_traffic_op() { return traffic::take(); }
bool traffic_available_op() { return traffic::available(); }

void set_schedule_op(const std::string& name, int64_t seed) {
  const Schedule kind = name == "forward"   ? Schedule::kForward
                        : name == "reverse" ? Schedule::kReverse
                        : name == "random"  ? Schedule::kRandom
                                            : throw std::invalid_argument(
                                                  "bnext emulator: schedule is forward, reverse or "
                                                  "random, got " +
                                                  name);
  set_schedule(kind, static_cast<uint64_t>(seed));
}
std::string schedule_op() {
  switch (schedule()) {
    case Schedule::kReverse:
      return "reverse";
    case Schedule::kRandom:
      return "random";
    default:
      return "forward";
  }
}

}  // namespace
}  // namespace emu
}  // namespace bnext

TORCH_LIBRARY(bnext_emu, m) {
  bnext::batch_norm::define_schemas(m);
  bnext::batch_norm_act::define_schemas(m);
  bnext::batch_renorm::define_schemas(m);
  bnext::distributed::define_schemas(m);
  bnext::layer_norm::define_schemas(m);
  // The emulated GPU's SM count sets the launch plans (how many partials).
  m.def("set_num_sms(int n) -> ()", &bnext::emu::set_num_sms_op);
  m.def("num_sms() -> int", &bnext::emu::num_sms_op);
  m.def("launch_count() -> int", &bnext::emu::launch_count_op);
  // The grid limits the launch plans cap at (65535 each, lowered by tests).
  m.def("set_grid_caps(int x, int y) -> ()", &bnext::emu::set_grid_caps_op);
  m.def("grid_caps() -> int[]", &bnext::emu::grid_caps_op);
  // ptxas's registers and shared memory per kernel symbol, from the CUDA
  // build's report: the launch plans then size their grids as on a GPU.
  m.def("set_kernel_resources(str[] symbols, int[] registers, int[] shared_bytes) -> ()",
        &bnext::emu::set_kernel_resources_op);
  m.def("resident_blocks(int registers, int shared_bytes, int threads) -> int",
        &bnext::emu::resident_blocks_op);
  // Every launch as "symbol gx gy gz bx by bz" while logging is on.
  m.def("set_launch_logging(bool on) -> ()", &bnext::emu::set_launch_logging_op);
  m.def("take_launch_log() -> str[]", &bnext::emu::take_launch_log_op);
  // Global-memory traffic per launch (traffic.cpp), as "symbol gx gy gz bx by
  // bz" and, for loads then stores: bytes, warp-wide accesses, their 32-byte
  // sectors, the distinct bytes they asked for, distinct sectors, and the
  // sectors and bytes of the vector accesses among them.
  m.def("traffic_available() -> bool", &bnext::emu::traffic_available_op);
  m.def("set_traffic_counting(bool on) -> ()", &bnext::emu::set_traffic_counting_op);
  m.def("take_traffic() -> str[]", &bnext::emu::take_traffic_op);
  // The order of blocks and of a block's ready threads (cuda_emulator.h).
  m.def("set_schedule(str name, int seed=0) -> ()", &bnext::emu::set_schedule_op);
  m.def("schedule() -> str", &bnext::emu::schedule_op);
}

TORCH_LIBRARY_IMPL(bnext_emu, CPU, m) {
  bnext::batch_norm::register_kernels<bnext::batch_norm::CudaBackend>(m);
  bnext::batch_norm_act::register_kernels<bnext::batch_norm::CudaBackend>(m);
  bnext::batch_renorm::register_kernels<bnext::batch_norm::CudaBackend>(m);
  bnext::distributed::register_kernels<bnext::batch_norm::CudaBackend>(m);
  bnext::layer_norm::register_kernels<bnext::layer_norm::CudaBackend>(m);
}
