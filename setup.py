"""Build torch_bnext._C, the bnext operator library (plus its CUDA kernels when
a CUDA toolkit is present), and torch_bnext._cpu_<variant>: the CPU kernels
once per instruction set, of which _C loads the best the running CPU has
(tools/csrc_sources.py lists the sources and the variants).

Environment:
  BNEXT_CUDA=1|0            force / forbid the CUDA build (default: when a CUDA toolkit
                            is found and torch sees a GPU; a CPU-only machine that merely
                            has nvcc builds the CPU kernels only, in a fraction of the time)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default: the visible GPUs, else "8.0;9.0")
  BNEXT_CPU_VARIANTS        CPU variants to build, comma-separated (default: every one
                            the compiler accepts on x86-64, `default` alone elsewhere;
                            `default` is always built)
  MAX_JOBS                  parallel compile jobs (ninja)
"""

import os
import shlex
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
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def compiler_accepts(flags):
    """Whether the C++ compiler accepts `flags` (an older one may lack
    -mavx512bf16)."""
    import subprocess
    import tempfile

    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    cxx = os.environ.get("CXX") or compiler.compiler_so[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        flags = [f for f in flags if not f.startswith("-D")]
        cmd = [cxx, *flags, "-c", src, "-o", os.path.join(tmp, "probe.o")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def cpu_variants():
    """The CPU variants to build (names from csrc_sources.CPU_VARIANTS)."""
    import platform

    wanted = os.environ.get("BNEXT_CPU_VARIANTS")
    if wanted:
        names = {w.strip() for w in wanted.split(",") if w.strip()} | {"default"}
        unknown = names - set(csrc_sources.CPU_VARIANTS)
        if unknown:
            sys.exit(
                f"BNEXT_CPU_VARIANTS: unknown variant(s) {sorted(unknown)}; "
                f"known: {list(csrc_sources.CPU_VARIANTS)}"
            )
    elif platform.machine().lower() in ("x86_64", "amd64"):
        names = set(csrc_sources.CPU_VARIANTS)
    else:
        names = {"default"}
    return [
        n
        for n in csrc_sources.CPU_VARIANTS
        if n in names and (n == "default" or compiler_accepts(csrc_sources.CPU_VARIANTS[n]))
    ]


CPU_VARIANTS = cpu_variants()


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
        f"CPU_VARIANTS = {tuple(CPU_VARIANTS)!r}\n"
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
        if self.inplace:
            self.remove_stale_libraries()
        # Next to the library: in the tree (in-place and editable builds) and
        # in the wheel's folder (build_py has already copied the package).
        write_build_info(os.path.join(ROOT, "torch_bnext"))
        if not self.inplace and os.path.isdir(os.path.join(self.build_lib, "torch_bnext")):
            write_build_info(os.path.join(self.build_lib, "torch_bnext"))

    def remove_stale_libraries(self):
        """Python prefers _C.cpython-311-*.so to _C.abi3.so: a library left by
        an older build (or of a variant no longer built) would shadow or join
        the new ones."""
        built = {os.path.basename(self.get_ext_fullpath(e.name)) for e in self.extensions}
        package = os.path.join(ROOT, "torch_bnext")
        for name in os.listdir(package):
            ours = name.startswith(("_C.", "_cpu_")) and name.endswith(".so")
            if ours and name not in built:
                os.remove(os.path.join(package, name))


def headers():
    # setuptools rebuilds only when a source or one of `depends` is newer than
    # the library: a header-only change must count too, and so must a new
    # torch (its version.py is rewritten by every install).
    return [os.path.join("csrc", h) for h in csrc_sources.headers()] + [
        os.path.join(os.path.dirname(torch.__file__), "version.py")
    ]


def extension_sources(cuda):
    return [os.path.join("csrc", s) for s in csrc_sources.extension_sources(cuda)]


INCLUDE_DIRS = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
# at::parallel_for is inlined into our code: with torch built on OpenMP
# (AT_PARALLEL_OPENMP), it runs on one thread unless we compile with -fopenmp.
# Py_LIMITED_API: module.cpp, the only file that includes Python.h, keeps to the
# stable ABI, so one build serves every later Python (an abi3 wheel:
# torch_bnext/_C.abi3.so, tagged cp310-abi3 with torch 2.14). torch >= 2.6
# defines the macro itself for py_limited_api extensions, at the oldest Python
# it supports; older ones leave it to us.
PY_LIMITED_API = getattr(cpp_extension, "min_supported_cpython", None)
LIMITED_API_FLAGS = [] if PY_LIMITED_API else ["-DPy_LIMITED_API=0x03090000"]
PY_LIMITED_API = PY_LIMITED_API or "0x03090000"
ABI3_TAG = f"cp{int(PY_LIMITED_API[2:4], 16)}{int(PY_LIMITED_API[4:6], 16)}"
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp"] + LIMITED_API_FLAGS
LINK_FLAGS = ["-fopenmp"]


def cpu_variant_extension(variant):
    """torch_bnext._cpu_<variant>: the CPU kernels for one instruction set.
    Its symbols are hidden and bound inside it (-Bsymbolic): the variants and
    _C each hold a copy of the same inline functions, compiled for different
    instruction sets, and no copy may stand in for another."""
    units = csrc_sources.unit_sources(
        csrc_sources.cpu_kernel_sources(), os.path.join(ROOT, "build", "cpu_variants", variant)
    )
    return CppExtension(
        f"torch_bnext._cpu_{variant}",
        [os.path.relpath(u, ROOT) for u in units],
        include_dirs=INCLUDE_DIRS,
        depends=headers(),
        extra_compile_args={
            "cxx": CXX_FLAGS + ["-fvisibility=hidden"] + csrc_sources.CPU_VARIANTS[variant]
        },
        # -z defs: every symbol resolved at link time (a host source missing
        # from csrc_sources.CPU_KERNEL_HOST_SOURCES fails the build here).
        extra_link_args=LINK_FLAGS + ["-Wl,-Bsymbolic", "-Wl,-z,defs"],
        py_limited_api=True,
    )


def record_resource_usage():
    """Puts tools/nvcc_resources.py in front of nvcc (torch's ninja build reads
    PYTORCH_NVCC), so that every CUDA build writes ptxas's registers and spills
    per kernel to build/resource-usage/ for tests/test_resource_usage.py."""
    nvcc = os.environ.get("PYTORCH_NVCC") or shlex.quote(
        os.path.join(os.environ.get("CUDA_HOME", DEFAULT_CUDA_HOME), "bin", "nvcc")
    )
    if "nvcc_resources.py" in nvcc:
        return
    wrapper = os.path.join(ROOT, "tools", "nvcc_resources.py")
    report_dir = os.path.join(ROOT, "build", "resource-usage")
    os.environ["PYTORCH_NVCC"] = " ".join(
        [shlex.quote(sys.executable), shlex.quote(wrapper), shlex.quote(report_dir), nvcc, "--"]
    )


def operator_library():
    """torch_bnext._C: schemas, autograd, CUDA kernels, and the loader of the
    CPU variants (csrc/module.cpp). No -m flag: it runs on any CPU of the
    target architecture."""
    if not WITH_CUDA:
        return CppExtension(
            "torch_bnext._C",
            extension_sources(cuda=False),
            include_dirs=INCLUDE_DIRS,
            depends=headers(),
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS + ["-ldl"],
            py_limited_api=True,
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a visible GPU, torch would build for every architecture it knows.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    nvcc_flags = ["-O3", "--extended-lambda", "--expt-relaxed-constexpr", "-lineinfo"]
    record_resource_usage()
    return CUDAExtension(
        "torch_bnext._C",
        extension_sources(cuda=True),
        depends=headers(),
        include_dirs=INCLUDE_DIRS + cuda_wheel_include_dirs(),
        define_macros=[("BNEXT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags},
        extra_link_args=LINK_FLAGS + ["-ldl"],
        py_limited_api=True,
    )


# The package's metadata (name, version, dependencies) is pyproject.toml's
# [project] table; this file adds only the extension.
setup(
    ext_modules=[operator_library()] + [cpu_variant_extension(v) for v in CPU_VARIANTS],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": ABI3_TAG}},
)
