"""Build torch_bnext._C: the bnext operator library (C++ CPU kernels, plus CUDA
kernels when a CUDA toolkit is present).

Environment:
  BNEXT_CUDA=1|0            force / forbid the CUDA build (default: when a CUDA toolkit
                            is found and torch sees a GPU; a CPU-only machine that merely
                            has nvcc builds the CPU kernels only, in a fraction of the time)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default: the visible GPUs, else "8.0;9.0")
  BNEXT_CPU_CAPABILITY      avx512 | avx2 | default (default: what this machine's CPU has)
  MAX_JOBS                  parallel compile jobs (ninja)
"""

import os
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The list of sources lives once, in tools/csrc_sources.py (the tests' emulator
# build reads it too); PEP 517 builds do not put the project on sys.path.
sys.path.insert(0, os.path.join(ROOT, "tools"))
import csrc_sources  # noqa: E402

DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_ARCH_LIST = "8.0;9.0"


def find_cuda_home():
    """The toolkit folder (holding bin/nvcc, include/, lib64/), or None."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [explicit] if explicit else []
    # nvcc on PATH may be a wrapper script outside the toolkit (/usr/local/bin/nvcc):
    # only a folder that also has the runtime headers is a toolkit.
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(on_path))))
    candidates.append(DEFAULT_CUDA_HOME)
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def want_cuda():
    flag = os.environ.get("BNEXT_CUDA")
    if flag == "0":
        return False
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if flag == "1":
            sys.exit("BNEXT_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return False
    if flag != "1":
        import torch

        if torch.version.cuda is None or not torch.cuda.is_available():
            print(
                "torch_bnext: no GPU visible, building the CPU kernels only "
                "(BNEXT_CUDA=1 compiles the CUDA kernels too)",
                file=sys.stderr,
            )
            return False
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    return True


WITH_CUDA = want_cuda()

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def cpu_capability_flags():
    """ATen's Vectorized<T> picks its instruction set from these macros; the
    compiler flags must match them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        flags = set()
    wanted = os.environ.get("BNEXT_CPU_CAPABILITY")
    if wanted is None:
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
            wanted = "avx512"
        elif {"avx2", "fma"} <= flags:
            wanted = "avx2"
        else:
            wanted = "default"
    # bfloat16 rounding in one instruction where the building CPU has it.
    bf16 = ["-mavx512bf16"] if wanted == "avx512" and "avx512_bf16" in flags else []
    return {
        "avx512": [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ]
        + bf16,
        "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
        "default": ["-DCPU_CAPABILITY=DEFAULT"],
    }[wanted]


def cuda_wheel_include_dirs():
    """ATen's CUDA headers include cusparse.h and friends; a bare nvcc toolkit
    may lack them while the nvidia-* wheels that torch depends on ship them."""
    toolkit_include = os.path.join(os.environ.get("CUDA_HOME", DEFAULT_CUDA_HOME), "include")
    if os.path.isfile(os.path.join(toolkit_include, "cusparse.h")):
        return []
    dirs = []
    for sp in site.getsitepackages() + [os.path.dirname(os.path.dirname(torch.__file__))]:
        for sub in ("cu13", "cu12"):
            d = os.path.join(sp, "nvidia", sub, "include")
            if os.path.isfile(os.path.join(d, "cusparse.h")) and d not in dirs:
                dirs.append(d)
    return dirs


def write_build_info(package_dir):
    """Records the torch this build compiles against: `import torch_bnext`
    compares it with the running torch (an extension built against another
    torch fails with an undefined C++ symbol otherwise)."""
    path = os.path.join(package_dir, "_build_info.py")
    text = (
        '"""Written by setup.py at build time: what torch_bnext._C was compiled against."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_KERNELS = {WITH_CUDA!r}\n"
    )
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # unchanged: leave its timestamp alone
        with open(path, "w") as f:
            f.write(text)


class Build(BuildExtension):
    """torch's BuildExtension with a build folder that outlives the build.

    pip's editable and wheel builds use a fresh temporary folder each time, so
    ninja would recompile every source on every `make test`. In a fixed folder
    per (python, torch, CUDA or not) ninja recompiles only what changed."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-" + (
            "cuda" if WITH_CUDA else "cpu"
        )
        self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")

    def build_extensions(self):
        super().build_extensions()
        # Next to the library: in the tree (in-place and editable builds) and
        # in the wheel's folder (build_py has already copied the package).
        write_build_info(os.path.join(ROOT, "torch_bnext"))
        if not self.inplace and os.path.isdir(os.path.join(self.build_lib, "torch_bnext")):
            write_build_info(os.path.join(self.build_lib, "torch_bnext"))


def headers():
    # setuptools rebuilds only when a source or one of `depends` is newer than
    # the library: a header-only change must count too, and so must a new
    # torch (its version.py is rewritten by every install).
    return [os.path.join("csrc", h) for h in csrc_sources.headers()] + [
        os.path.join(os.path.dirname(torch.__file__), "version.py")
    ]


def extension_sources(cuda):
    return [os.path.join("csrc", s) for s in csrc_sources.extension_sources(cuda)]


def extension():
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # at::parallel_for is inlined into our code: with torch built on OpenMP
    # (AT_PARALLEL_OPENMP), it runs on one thread unless we compile with -fopenmp.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"] + cpu_capability_flags()
    link_flags = ["-fopenmp"]
    if not WITH_CUDA:
        return CppExtension(
            "torch_bnext._C",
            extension_sources(cuda=False),
            include_dirs=include_dirs,
            depends=headers(),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=False,
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a visible GPU, torch would build for every architecture it knows.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    nvcc_flags = ["-O3", "--extended-lambda", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        "torch_bnext._C",
        extension_sources(cuda=True),
        depends=headers(),
        include_dirs=include_dirs + cuda_wheel_include_dirs(),
        define_macros=[("BNEXT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


# The package's metadata (name, version, dependencies) is pyproject.toml's
# [project] table; this file adds only the extension.
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
