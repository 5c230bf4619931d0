import numbers
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

_ops = torch.ops.bnext

_Shape = Union[int, Sequence[int], torch.Size]


def _as_shape(normalized_shape: _Shape) -> list[int]:
    # nn.LayerNorm accepts a bare int; the ops take a list of ints.
    if isinstance(normalized_shape, numbers.Integral):
        return [int(normalized_shape)]
    return [int(d) for d in normalized_shape]


def _default_rms_eps(dtype: torch.dtype) -> float:
    # torch uses the epsilon of the accumulation type: float32's for
    # half/bfloat16 input, float64's for float64.
    double = dtype in (torch.float64, torch.complex128)
    return torch.finfo(torch.float64 if double else torch.float32).eps


def layer_norm(
    input: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer Normalization over the trailing `normalized_shape` dimensions, with
    the signature and semantics of torch.nn.functional.layer_norm."""
    return _ops.layer_norm_fwd(input, _as_shape(normalized_shape), weight, bias, eps)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """Root Mean Square Layer Normalization, with the signature and semantics of
    torch.nn.functional.rms_norm (eps=None: the epsilon of the accumulation dtype)."""
    shape = _as_shape(normalized_shape)
    if input.dim() < len(shape):
        # torch raises this one as a ValueError before its shape check.
        raise ValueError(
            f"Input tensor must have at least {len(shape)} dimensions, but got {input.dim()}"
        )
    if eps is None:
        eps = _default_rms_eps(input.dtype)
    return _ops.rms_norm_fwd(input, shape, weight, eps)[0]


def layer_norm_2d(
    input: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> Tensor:
    """Layer Normalization over dim 1 (the channels) of an (N, C, *) input, as
    the LayerNorm2d of timm and torchvision (ConvNeXt) computes with
    permute -> layer_norm -> permute, but without the copies. weight and bias
    are (C,). The output keeps a channels_last input's layout."""
    return _ops.layer_norm_2d_fwd(input, weight, bias, eps)[0]


def rms_norm_2d(
    input: Tensor,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """RMS Normalization over dim 1 (the channels) of an (N, C, *) input, as
    timm's RmsNorm2d (eps=None: the epsilon of the accumulation dtype, as
    rms_norm)."""
    if eps is None:
        eps = _default_rms_eps(input.dtype)
    return _ops.rms_norm_2d_fwd(input, weight, eps)[0]
