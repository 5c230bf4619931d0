from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .layer_norm import LayerNorm, RMSNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "RMSNorm"]
