"""Functional API, mirroring torch.nn.functional."""

from .batch_norm import batch_norm
from .layer_norm import layer_norm, rms_norm

__all__ = ["batch_norm", "layer_norm", "rms_norm"]
