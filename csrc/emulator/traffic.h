// The global-memory traffic of emulated launches (traffic.cpp): the emulator
// tells the counter which launch, block and thread runs; the kernels' loads and
// stores reach it through the compiler's AddressSanitizer hooks, which the
// emulator build turns into calls (BNEXT_EMULATOR_TRAFFIC).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "emulator/cuda_emulator.h"

namespace bnext {
namespace emu {
namespace traffic {

// Whether this build has the hooks (not the AddressSanitizer build, whose
// runtime owns them).
bool available();
void set_counting(bool on);
bool counting();
// One record per counted launch (see take_traffic in module.cpp).
std::vector<std::string> take();

void begin_launch(const void* kernel, dim3 grid, dim3 block, const void* shared,
                  std::size_t shared_bytes);
// The block's thread records (threadIdx and friends read them): not traffic.
void begin_block(const void* threads, std::size_t bytes);
void enter_thread(int linear, const void* stack, std::size_t stack_bytes);
void leave_thread();
void end_block();
void end_launch();
void abandon_launch();

}  // namespace traffic
}  // namespace emu
}  // namespace bnext
