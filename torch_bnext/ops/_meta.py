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


def channel_vector(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """A per-channel (C,) vector, float32 (float64 for float64 input) by default."""
    return x.new_empty((x.shape[1],), dtype=dtype or opmath_dtype(x.dtype))


def batch_norm_backward_outputs(input: torch.Tensor, weight):
    """(grad_input, grad_weight, grad_bias) of the Batch Norm and Batch Renorm
    backward ops: parameter gradients in the weight's dtype."""
    param_dtype = weight.dtype if weight is not None else opmath_dtype(input.dtype)
    return (
        empty_canonical(input),
        channel_vector(input, param_dtype),
        channel_vector(input, param_dtype),
    )
