"""Fake kernels of the LayerNorm / RMSNorm operators (csrc/layer_norm/)."""

import torch

from ._meta import opmath_dtype


def _check_shape(input, normalized_shape):
    # The same condition the kernels check, so that tracing fails where eager would.
    n = len(normalized_shape)
    torch._check(n >= 1, lambda: "Expected normalized_shape to be at least 1-dimensional")
    torch._check(
        input.dim() >= n and tuple(input.shape[input.dim() - n :]) == tuple(normalized_shape),
        lambda: (
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(map(str, normalized_shape))}], "
            f"but got input of size{list(input.shape)}"
        ),
    )
    return input.dim() - n


def _row_stat(input, axis):
    return input.new_empty(input.shape[:axis], dtype=opmath_dtype(input.dtype))


def _param_grad(input, axis, requested, weight):
    dtype = weight.dtype if weight is not None else input.dtype
    shape = input.shape[axis:] if requested else (0,)
    return input.new_empty(shape, dtype=dtype)


@torch.library.register_fake("bnext::layer_norm_fwd")
def _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps):
    axis = _check_shape(input, normalized_shape)
    # RMSNorm keeps the input's memory format, as torch's does; LayerNorm's is contiguous.
    return torch.empty_like(input), _row_stat(input, axis), _row_stat(input, axis)


@torch.library.register_fake("bnext::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, input, mean, rstd, weight, eps, output_mask):
    axis = rstd.dim()
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        _param_grad(input, axis, output_mask[0], weight),
        _param_grad(input, axis, output_mask[1], weight),
    )


@torch.library.register_fake("bnext::rms_norm_fwd")
def _rms_norm_fwd_fake(input, normalized_shape, weight, eps):
    axis = _check_shape(input, normalized_shape)
    # RMSNorm keeps the input's memory format, as torch's does; LayerNorm's is contiguous.
    return torch.empty_like(input), _row_stat(input, axis)


@torch.library.register_fake("bnext::rms_norm_bwd")
def _rms_norm_bwd_fake(grad_out, input, rstd, weight, eps, weight_grad):
    return torch.empty_like(input), _param_grad(input, rstd.dim(), weight_grad, weight)


# Autograd: csrc/layer_norm/autograd.cpp.
