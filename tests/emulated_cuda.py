"""Builds and loads `bnext_emu`: the CUDA kernels compiled for the CPU emulator
(csrc/emulator/), registered as CPU kernels of operators with the bnext
schemas. Tests call torch.ops.bnext_emu.<op> where they would call the CUDA
op, with CPU tensors; they get it from the `emu` fixture (conftest.py), and
the SM count it emulates from `num_sms`."""

import contextlib
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
# the runtime: LD_PRELOAD=$(gcc -print-file-name=libasan.so). UBSan comes with
# it, for what a GPU leaves undefined and x86 forgives: a signed index that
# overflows, a misaligned typed access, a shift past the width. A finding
# aborts (-fno-sanitize-recover), so no report scrolls past unnoticed. vptr is
# left out: with hidden visibility each library has its own type_info for
# torch's classes, which vptr would take for objects of the wrong type.
ASAN = os.environ.get("BNEXT_EMULATOR_ASAN") == "1"
UBSAN = ["-fsanitize=undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined"]
# BNEXT_EMULATOR_FMA=1 builds it contracting a*b+c into fused multiply-adds
# wherever the compiler can, as nvcc does by default (--fmad=true) and the host
# compiler in ISO C++ mode does not: the GPU's results differ from the default
# build's in their last bits, and this build bounds by how much
# (tests/test_emulator.py, tests/contraction_cases.py).
FMA = os.environ.get("BNEXT_EMULATOR_FMA") == "1"
# The traffic counter (csrc/emulator/traffic.cpp) needs every load and store
# instrumented, which makes the library's units slow to compile: with
# BNEXT_EMULATOR_TRAFFIC=0 (tools/mutate.py sets it) a build without it, whose
# traffic tests skip.
TRAFFIC = not ASAN and not FMA and os.environ.get("BNEXT_EMULATOR_TRAFFIC", "1") != "0"


@functools.cache
def load():
    """Compiles (ninja recompiles what a changed source or header touches) and
    loads the library; returns torch.ops.bnext_emu."""
    flavour = "-asan" if ASAN else "-fma" if FMA else "" if TRAFFIC else "-plain"
    build = os.path.join(ROOT, "build", f"emulator-torch{torch.__version__}{flavour}")
    os.makedirs(build, exist_ok=True)
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] + UBSAN if ASAN else []
    # Without ASan's runtime, its instrumentation serves the traffic counter
    # (csrc/emulator/traffic.cpp): every load and store the compiler leaves in
    # memory becomes a call, which returns at once unless a counted launch runs.
    traffic = (
        []
        if not TRAFFIC
        else [
            "-DBNEXT_EMULATOR_TRAFFIC",
            "-fsanitize=address",
            "--param=asan-instrumentation-with-call-threshold=0",
            "--param=asan-stack=0",
            "--param=asan-globals=0",
            "-fno-sanitize-address-use-after-scope",
        ]
    )
    contract = ["-ffp-contract=fast", "-mfma"] if FMA else []
    cpp_extension.load(
        name="bnext_emu_asan" if ASAN else "bnext_emu_fma" if FMA else "bnext_emu",
        sources=csrc_sources.unit_sources(
            csrc_sources.emulator_sources(), os.path.join(build, "units")
        ),
        extra_include_paths=[CSRC, os.path.join(CSRC, "include")],
        # Hidden symbols: this library repeats names of torch_bnext._C's.
        extra_cflags=["-O2", "-DBNEXT_EMULATE_CUDA", "-fvisibility=hidden"]
        + sanitize
        + traffic
        + contract,
        extra_ldflags=["-Wl,-Bsymbolic"] + sanitize,
        build_directory=build,
        is_python_module=False,
        verbose=bool(os.environ.get("BNEXT_VERBOSE_BUILD")),
    )
    return torch.ops.bnext_emu


@contextlib.contextmanager
def grid_caps(emu, x, y):
    """Launch plans capped at grids of x by y blocks (65535 each on a GPU),
    so that the loops that stride over a capped grid run on small shapes; the
    emulator refuses a launch beyond the y cap."""
    old = emu.grid_caps()
    emu.set_grid_caps(x, y)
    try:
        yield
    finally:
        emu.set_grid_caps(*old)
