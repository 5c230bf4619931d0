"""Functional API, mirroring torch.nn.functional."""

from .batch_norm import batch_norm
from .batch_norm_act import batch_norm_act, batch_renorm_act
from .batch_renorm import batch_renorm
from .layer_norm import layer_norm, layer_norm_2d, rms_norm, rms_norm_2d

__all__ = [
    "batch_norm",
    "batch_norm_act",
    "batch_renorm",
    "batch_renorm_act",
    "layer_norm",
    "layer_norm_2d",
    "rms_norm",
    "rms_norm_2d",
]
