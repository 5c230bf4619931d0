"""Builds and loads `bnext_emu`: the CUDA kernels compiled for the CPU emulator
(csrc/emulator/), registered as CPU kernels of operators with the bnext
schemas. Tests call torch.ops.bnext_emu.<op> where they would call the CUDA
op, with CPU tensors; they get it from the `emu` fixture (conftest.py), and
the SM count it emulates from `num_sms`."""

import functools
import os
import sys

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import csrc_sources  # noqa: E402  (the extension's source list, shared with setup.py)

# BNEXT_EMULATOR_ASAN=1 builds the library with AddressSanitizer: the kernels'
# loads and stores are then checked against the bounds of every tensor (the
# CPU's counterpart of compute-sanitizer's memcheck). The process must preload
# the runtime: LD_PRELOAD=$(gcc -print-file-name=libasan.so).
ASAN = os.environ.get("BNEXT_EMULATOR_ASAN") == "1"


def unit_sources(build):
    """The emulator's sources, each through a one-line unit named after its
    path: cpp_extension names objects by file name alone, and several op
    families have a reference.cpp."""
    units = []
    for rel in csrc_sources.emulator_sources():
        unit = os.path.join(build, "units", rel.replace(os.sep, "__"))
        text = f'#include "{os.path.join(CSRC, rel)}"\n'
        os.makedirs(os.path.dirname(unit), exist_ok=True)
        if not os.path.exists(unit) or open(unit).read() != text:  # keep ninja's timestamps
            with open(unit, "w") as f:
                f.write(text)
        units.append(unit)
    return units


@functools.cache
def load():
    """Compiles (ninja recompiles what a changed source or header touches) and
    loads the library; returns torch.ops.bnext_emu."""
    build = os.path.join(
        ROOT, "build", f"emulator-torch{torch.__version__}" + ("-asan" if ASAN else "")
    )
    os.makedirs(build, exist_ok=True)
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else []
    cpp_extension.load(
        name="bnext_emu_asan" if ASAN else "bnext_emu",
        sources=unit_sources(build),
        extra_include_paths=[CSRC, os.path.join(CSRC, "include")],
        # Hidden symbols: this library repeats names of torch_bnext._C's.
        extra_cflags=["-O2", "-DBNEXT_EMULATE_CUDA", "-fvisibility=hidden"] + sanitize,
        extra_ldflags=["-Wl,-Bsymbolic"] + sanitize,
        build_directory=build,
        is_python_module=False,
        verbose=bool(os.environ.get("BNEXT_VERBOSE_BUILD")),
    )
    return torch.ops.bnext_emu
