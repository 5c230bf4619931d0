"""Functional API, mirroring torch.nn.functional."""

from .batch_norm import batch_norm

__all__ = ["batch_norm"]
