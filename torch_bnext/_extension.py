"""Loads the compiled operator library (torch_bnext._C)."""

import torch  # first: _C links against libtorch, which importing torch loads

try:
    from . import _C  # noqa: F401  (registers torch.ops.bnext.* as a side effect)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "torch_bnext's compiled extension (torch_bnext._C) is not built or does not match "
        "the installed torch. Build it with `pip install --no-build-isolation -e .` "
        f"from the repository root. Original error: {exc}"
    ) from exc

# True when the kernels for CUDA tensors were compiled in.
HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key(
    "bnext::batch_norm_train", "CUDA"
)
