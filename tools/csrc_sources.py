"""The one list of the extension's sources, for setup.py and for the tests'
emulator build (tests/emulated_cuda.py).

The CPU kernels (every family's cpu_kernels.cpp) are compiled once per
instruction set in CPU_VARIANTS, each into its own small library
(torch_bnext._cpu_<variant>); csrc/module.cpp loads the one the running CPU
can execute, as ATen's DispatchStub picks its kernels. torch_bnext._C itself
is compiled for the baseline x86-64 (or aarch64) instruction set.

Every op family under csrc/ names its files alike (README, "Layout of the
code"). The translation units that register something with the dispatcher
have fixed names: ops.cpp (schemas), cpu_kernels.cpp and cuda_kernels.cu
(kernels), autograd.cpp, and csrc/module.cpp (the library itself). Every other
.cpp is host code that those call. The emulator's test library registers the
CUDA kernels under its own namespace, so it takes the host code and none of
the registering units, which would register the bnext operators twice.
"""

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
REGISTERING = frozenset(
    {"module.cpp", "ops.cpp", "autograd.cpp", "cpu_kernels.cpp", "cuda_kernels.cu"}
)


def _under_csrc(pattern):
    """Paths relative to csrc/, sorted, without the emulator (test-only)."""
    found = glob.glob(os.path.join(CSRC, "**", pattern), recursive=True)
    rel = (os.path.relpath(p, CSRC) for p in found)
    return sorted(p for p in rel if not p.startswith("emulator" + os.sep))


# Flags per CPU variant, best first. They must match the CPU_CAPABILITY macros:
# ATen's Vectorized<T> picks its instruction set from the macros, the compiler
# emits instructions from the flags. The set of each is what ATen compiles its
# own kernels with (cmake/Codegen.cmake), so that a variant runs wherever
# at::get_cpu_capability() reports it.
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
_AVX512_MACROS = ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
CPU_VARIANTS = {
    # AVX-512 plus one-instruction bfloat16 rounding (Cooper Lake, Zen 4 and newer).
    "avx512_bf16": _AVX512 + ["-mavx512bf16"] + _AVX512_MACROS,
    "avx512": _AVX512 + _AVX512_MACROS,
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    # Plain C++ for the baseline instruction set of the target: SSE2 on x86-64,
    # NEON on aarch64 (ATen's Vectorized<T> has a NEON path of its own).
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def extension_sources(cuda):
    """What torch_bnext._C compiles, relative to csrc/: everything but the
    CPU kernels, which live in the CPU variant libraries."""
    sources = [p for p in _under_csrc("*.cpp") if os.path.basename(p) != "cpu_kernels.cpp"]
    return sources + (_under_csrc("*.cu") if cuda else [])


# The host code the CPU kernels call (a variant library keeps its own copy;
# it links with -z defs, so a file missing here is a link error, not a load
# failure).
CPU_KERNEL_HOST_SOURCES = [
    "common/checks.cpp",
    "common/cpu_cache.cpp",
    "common/layout.cpp",
    "layer_norm/reference.cpp",  # complex RMSNorm inputs take the composite formula
]


def cpu_kernel_sources():
    """What each CPU variant compiles, relative to csrc/."""
    return _under_csrc("cpu_kernels.cpp") + CPU_KERNEL_HOST_SOURCES


def host_sources():
    """The extension's .cpp files that register nothing: what the CUDA
    backends call on the host."""
    return [p for p in extension_sources(cuda=False) if os.path.basename(p) not in REGISTERING]


def emulator_sources():
    """What the emulator's test library compiles, relative to csrc/."""
    return (
        sorted(os.path.relpath(p, CSRC) for p in glob.glob(os.path.join(CSRC, "emulator", "*.cpp")))
        + host_sources()
    )


def unit_sources(sources, folder):
    """One-line translation units in `folder`, each including one source (a
    path relative to csrc/) and named after its path. setuptools and
    cpp_extension name an object after its source's path or file name: the
    units keep objects of one source compiled with different flags (one per
    CPU variant, or for the emulator) apart, and several families each have
    a reference.cpp."""
    units = []
    os.makedirs(folder, exist_ok=True)
    for rel in sources:
        unit = os.path.join(folder, rel.replace(os.sep, "__"))
        text = f'#include "{os.path.join(CSRC, rel)}"\n'
        if not os.path.exists(unit) or open(unit).read() != text:  # keep ninja's timestamps
            with open(unit, "w") as f:
                f.write(text)
        units.append(unit)
    return units


def headers():
    """Every header under csrc/, relative to csrc/."""
    return _under_csrc("*.h") + _under_csrc("*.cuh")
