"""Functional API, mirroring torch.nn.functional."""

from .batch_norm import batch_norm
from .batch_renorm import batch_renorm

__all__ = ["batch_norm", "batch_renorm"]
