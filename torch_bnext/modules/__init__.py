from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batch_norm_act import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    InPlaceABN,
    InPlaceABNSync,
)
from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .layer_norm import LayerNorm, LayerNorm2d, RMSNorm, RMSNorm2d
from .sync_batch_norm import SyncBatchNorm, SyncBatchRenorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "InPlaceABN",
    "InPlaceABNSync",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "RMSNorm2d",
    "SyncBatchNorm",
    "SyncBatchRenorm",
]
