"""Shape/stride rules shared by the fake kernels (mirrors csrc/common/layout.cpp)."""

import torch


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_channels_last_dense(x: torch.Tensor) -> bool:
    sizes, strides = x.shape, x.stride()
    expected = 1
    if sizes[1] != 1 and strides[1] != expected:
        return False
    expected *= sizes[1]
    for d in range(x.dim() - 1, 1, -1):
        if sizes[d] != 1 and strides[d] != expected:
            return False
        expected *= sizes[d]
    return sizes[0] == 1 or strides[0] == expected


def empty_canonical(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An empty tensor laid out as the kernels lay out their output for input x:
    x's own strides when x is contiguous or channels-last dense, else contiguous."""
    dtype = dtype or x.dtype
    if x.is_contiguous() or _is_channels_last_dense(x):
        return torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=x.device)
    return torch.empty(x.shape, dtype=dtype, device=x.device)
