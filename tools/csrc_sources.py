"""The one list of the extension's sources, for setup.py and for the tests'
emulator build (tests/emulated_cuda.py).

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


def extension_sources(cuda):
    """What torch_bnext._C compiles, relative to csrc/."""
    return _under_csrc("*.cpp") + (_under_csrc("*.cu") if cuda else [])


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


def headers():
    """Every header under csrc/, relative to csrc/."""
    return _under_csrc("*.h") + _under_csrc("*.cuh")
