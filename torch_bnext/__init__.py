"""torch_bnext: Batch Norm, Batch Renorm, LayerNorm and RMSNorm with custom
C++ and CUDA kernels, registered as PyTorch operators (torch.ops.bnext.*)."""

from . import (
    _extension,  # noqa: F401  (loads the kernels first)
    functional,
    ops,  # noqa: F401  (fake kernels; autograd is registered in C++)
)
from ._extension import HAS_CUDA_KERNELS, cpu_capability
from .convert import conversion_report, convert_model, revert_model
from .fuse import fuse
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    InPlaceABN,
    InPlaceABNSync,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    RMSNorm2d,
    SyncBatchNorm,
    SyncBatchRenorm,
)
from .modules.zoo import SyncBatchNormAct
from .onnx import onnx_translations
from .schedule import LinearRamp, Schedule, renorm_schedule

__version__ = "0.1.0"

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
    "HAS_CUDA_KERNELS",
    "InPlaceABN",
    "InPlaceABNSync",
    "LayerNorm",
    "LayerNorm2d",
    "LinearRamp",
    "RMSNorm",
    "RMSNorm2d",
    "Schedule",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "SyncBatchRenorm",
    "conversion_report",
    "convert_model",
    "cpu_capability",
    "functional",
    "fuse",
    "onnx_translations",
    "renorm_schedule",
    "revert_model",
]
