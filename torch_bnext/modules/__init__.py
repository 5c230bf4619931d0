from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .layer_norm import LayerNorm, RMSNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "LayerNorm",
    "RMSNorm",
]
