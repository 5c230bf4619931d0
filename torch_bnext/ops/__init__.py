"""Fake kernels of the bnext operators, for torch.compile and opcheck.

The kernels live in csrc/ and are registered with TORCH_LIBRARY, and so is
autograd (csrc/*/autograd.cpp): a Python autograd.Function would cost as much
as the kernels on small inputs.
"""

from . import (
    batch_norm,  # noqa: F401
    batch_norm_act,  # noqa: F401
    batch_renorm,  # noqa: F401
    distributed,  # noqa: F401
    layer_norm,  # noqa: F401
    vmap,  # noqa: F401  (batching rules)
)
