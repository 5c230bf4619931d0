#include "emulator/symbols.h"

#include <dlfcn.h>
#include <elf.h>

#include <fstream>
#include <iterator>
#include <map>
#include <mutex>

namespace bnext {
namespace emu {
namespace {

struct Function {
  uintptr_t end;
  std::string name;
};

const std::map<uintptr_t, Function>& functions() {
  static std::map<uintptr_t, Function> table;
  static std::once_flag once;
  std::call_once(once, [] {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&functions), &info) == 0 || info.dli_fname == nullptr) {
      return;
    }
    std::ifstream file(info.dli_fname, std::ios::binary);
    const std::string elf((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (elf.size() < sizeof(Elf64_Ehdr)) return;
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(elf.data());
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(elf.data() + eh->e_shoff);
    const auto base = reinterpret_cast<uintptr_t>(info.dli_fbase);
    for (int i = 0; i < eh->e_shnum; ++i) {
      if (sections[i].sh_type != SHT_SYMTAB) continue;
      const char* names = elf.data() + sections[sections[i].sh_link].sh_offset;
      const auto* sym = reinterpret_cast<const Elf64_Sym*>(elf.data() + sections[i].sh_offset);
      const std::size_t count = sections[i].sh_size / sizeof(Elf64_Sym);
      for (std::size_t k = 0; k < count; ++k) {
        if (ELF64_ST_TYPE(sym[k].st_info) != STT_FUNC || sym[k].st_value == 0) continue;
        const uintptr_t start = base + sym[k].st_value;
        table.emplace(start, Function{start + sym[k].st_size, names + sym[k].st_name});
      }
    }
  });
  return table;
}

const std::string kUnknown;

}  // namespace

const std::string& symbol_at(uintptr_t address) {
  const auto& table = functions();
  const auto it = table.find(address);
  return it == table.end() ? kUnknown : it->second.name;
}

const std::string& symbol_containing(uintptr_t pc) {
  const auto& table = functions();
  auto it = table.upper_bound(pc);
  if (it == table.begin()) return kUnknown;
  --it;
  return pc < it->second.end ? it->second.name : kUnknown;
}

}  // namespace emu
}  // namespace bnext
