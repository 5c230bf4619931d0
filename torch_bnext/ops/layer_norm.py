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
    # Contiguous whatever the input's layout, as torch's layer_norm gives it.
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    return out, _row_stat(input, axis), _row_stat(input, axis)


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


# The _2d ops normalise over dim 1 of (N, C, *). An input whose channels are
# innermost is read as rows of C and its outputs keep that layout; any other
# layout gives contiguous outputs (csrc/layer_norm/composite.h).


def _check_2d(input):
    torch._check(
        input.dim() >= 2,
        lambda: f"expected an input with at least 2 dimensions, got {input.dim()}D input",
    )


def _channel_rows(t):
    return t.permute(0, *range(2, t.dim()), 1)


def _like_kernel_output(input):
    rows = _channel_rows(input)
    if rows.is_contiguous():
        inverse = (0, input.dim() - 1, *range(1, input.dim() - 1))
        return input.new_empty(rows.shape).permute(inverse)
    return input.new_empty(input.shape)


def _channel_stat(input):
    return input.new_empty((input.shape[0], *input.shape[2:]), dtype=opmath_dtype(input.dtype))


def _channel_grad(input, requested, weight):
    dtype = weight.dtype if weight is not None else input.dtype
    return input.new_empty((input.shape[1],) if requested else (0,), dtype=dtype)


@torch.library.register_fake("bnext::layer_norm_2d_fwd")
def _layer_norm_2d_fwd_fake(input, weight, bias, eps):
    _check_2d(input)
    return _like_kernel_output(input), _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("bnext::layer_norm_2d_bwd")
def _layer_norm_2d_bwd_fake(grad_out, input, mean, rstd, weight, eps, output_mask):
    return (
        _like_kernel_output(input),
        _channel_grad(input, output_mask[0], weight),
        _channel_grad(input, output_mask[1], weight),
    )


@torch.library.register_fake("bnext::rms_norm_2d_fwd")
def _rms_norm_2d_fwd_fake(input, weight, eps):
    _check_2d(input)
    return _like_kernel_output(input), _channel_stat(input)


@torch.library.register_fake("bnext::rms_norm_2d_bwd")
def _rms_norm_2d_bwd_fake(grad_out, input, rstd, weight, eps, weight_grad):
    return _like_kernel_output(input), _channel_grad(input, weight_grad, weight)


# Autograd: csrc/layer_norm/autograd.cpp.
