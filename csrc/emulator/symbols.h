// This library's function symbols, read from its own ELF symbol table: the
// kernels are hidden symbols, which dladdr does not name, and the traffic
// counter must tell kernel code from the emulator's own.
#pragma once

#include <cstdint>
#include <string>

namespace bnext {
namespace emu {

// The symbol (mangled) of the function that starts at `address`, or "".
const std::string& symbol_at(uintptr_t address);
// The symbol of the function whose code holds `pc`, or "".
const std::string& symbol_containing(uintptr_t pc);

}  // namespace emu
}  // namespace bnext
