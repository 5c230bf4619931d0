// The extension module holds no Python functions: importing it runs the
// static registrations of the bnext operator library. Every kernel is
// reached through torch.ops.bnext.
//
// The CPU kernels are not in this library. They are compiled once per
// instruction set into torch_bnext/_cpu_<variant><suffix> (setup.py), and the
// loader below, run when this library is loaded, opens the best one the
// running CPU executes: the choice ATen makes for its own kernels
// (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY lowers). Loading it
// here rather than from Python keeps this library whole for C++ users
// (torch.ops.load_library, AOTInductor packages). BNEXT_CPU_VARIANT=<name>
// lowers the choice to one variant below it, as ATEN_CPU_CAPABILITY lowers
// ATen's (the tests use it to run each variant).
#include <ATen/Version.h>
#include <Python.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

TORCH_LIBRARY(bnext, m) {}

namespace bnext {
namespace {

// Best first; a variant runs only where every later one would too.
std::vector<std::string> usable_cpu_variants() {
  std::vector<std::string> names;
#if defined(__x86_64__)
  // "DEFAULT", "AVX2" or "AVX512": torch.backends.cpu.get_cpu_capability().
  const std::string aten = at::get_cpu_capability();
  if (aten == "AVX512") {
    // ATen has no capability for AVX512-BF16: ask the CPU, once ATen's own
    // choice (which ATEN_CPU_CAPABILITY lowers) allows AVX-512 at all.
    if (__builtin_cpu_supports("avx512bf16")) names.push_back("avx512_bf16");
    names.push_back("avx512");
  }
  if (aten == "AVX512" || aten == "AVX2") names.push_back("avx2");
#endif
  names.push_back("default");
  // Never raises the choice: a name the CPU cannot run is ignored.
  if (const char* wanted = std::getenv("BNEXT_CPU_VARIANT")) {
    const auto it = std::find(names.begin(), names.end(), std::string(wanted));
    if (it != names.end()) names.erase(names.begin(), it);
  }
  return names;
}

// The folder and file-name suffix of this library: the variants sit next to
// it and share its suffix (".cpython-311-x86_64-linux-gnu.so", ".abi3.so").
bool own_location(std::string* folder, std::string* suffix) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&own_location), &info) == 0 || info.dli_fname == nullptr) {
    return false;
  }
  const std::string path = info.dli_fname;
  const auto slash = path.rfind('/');
  const std::string name = path.substr(slash == std::string::npos ? 0 : slash + 1);
  const auto dot = name.find('.');
  *folder = slash == std::string::npos ? "." : path.substr(0, slash);
  *suffix = dot == std::string::npos ? "" : name.substr(dot);
  return true;
}

struct CpuVariant {
  std::string name;   // empty when none loaded
  std::string error;  // why, then
};

CpuVariant load_cpu_variant() {
  CpuVariant loaded;
  std::string folder, suffix;
  if (!own_location(&folder, &suffix)) {
    loaded.error = "cannot locate torch_bnext._C on disk (dladdr failed)";
    return loaded;
  }
  for (const auto& name : usable_cpu_variants()) {
    const std::string path = folder + "/_cpu_" + name + suffix;
    // RTLD_LOCAL: nothing loaded later may bind to the variant's symbols.
    if (dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL) != nullptr) {
      loaded.name = name;
      return loaded;
    }
    const char* why = dlerror();
    loaded.error += (loaded.error.empty() ? "" : "; ") + path + ": " + (why ? why : "?");
  }
  return loaded;
}

const CpuVariant& cpu_variant() {
  static const CpuVariant loaded = load_cpu_variant();
  return loaded;
}

// Loads the CPU kernels as soon as this library is, whoever loads it.
[[maybe_unused]] const bool cpu_kernels_loaded = !cpu_variant().name.empty();

}  // namespace
}  // namespace bnext

extern "C" {
PyObject* PyInit__C(void) {
  const auto& variant = bnext::cpu_variant();
  if (variant.name.empty()) {
    const std::string message = "torch_bnext: no CPU kernel library loads: " + variant.error;
    PyErr_SetString(PyExc_ImportError, message.c_str());
    return nullptr;
  }
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "CPU_CAPABILITY", variant.name.c_str()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
