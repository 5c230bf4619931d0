"""Loads the compiled operator library (torch_bnext._C), after checking that
it was built against the running torch: a C++ extension built against another
torch fails with an undefined symbol, or worse, loads and misbehaves."""

import torch  # first: _C links against libtorch, which importing torch loads

REBUILD = (
    "Rebuild it against this torch: `pip install --no-build-isolation .` (or `make build` in a "
    "clone; `pip install .` without --no-build-isolation compiles against whatever torch pip "
    "downloads, not yours)"
)

try:
    from ._build_info import TORCH_VERSION as BUILT_AGAINST
except ImportError:  # a tree that was never built
    BUILT_AGAINST = None

if BUILT_AGAINST is not None and BUILT_AGAINST != torch.__version__:
    raise ImportError(
        f"torch_bnext was compiled against torch {BUILT_AGAINST}, but torch {torch.__version__} "
        f"is running. {REBUILD}."
    )

try:
    from . import _C  # registers torch.ops.bnext.* as a side effect
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "torch_bnext's compiled extension (torch_bnext._C) is not built or does not load "
        f"with torch {torch.__version__}. {REBUILD}. Original error: {exc}"
    ) from exc

# True when the kernels for CUDA tensors were compiled in.
HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("bnext::batch_norm_train", "CUDA")


def cpu_capability() -> str:
    """The instruction set the CPU kernels in use were compiled for:
    ``"avx512_bf16"``, ``"avx512"``, ``"avx2"`` or ``"default"``.

    Chosen when torch_bnext is imported, as ATen chooses its own kernels
    (``torch.backends.cpu.get_cpu_capability()``): the best variant that the
    CPU executes and that was built. ``ATEN_CPU_CAPABILITY=avx2`` (or
    ``default``) set before the import lowers both ATen's choice and ours;
    ``BNEXT_CPU_VARIANT`` lowers ours alone."""
    return _C.CPU_CAPABILITY
