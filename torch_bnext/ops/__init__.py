"""Fake kernels and autograd formulas of the bnext operators.

The kernels themselves live in csrc/ and are registered with TORCH_LIBRARY;
this package adds what torch.compile and autograd need on top of them.
"""

from . import batch_norm  # noqa: F401
from . import batch_renorm  # noqa: F401
from . import layer_norm  # noqa: F401
