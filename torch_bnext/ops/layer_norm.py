"""Fake kernels and autograd for the LayerNorm / RMSNorm operators (csrc/layer_norm/)."""

import torch

from ._meta import opmath_dtype

_ops = torch.ops.bnext


def _check_shape(input, normalized_shape):
    # The same condition the kernels check, so that tracing fails where eager would.
    n = len(normalized_shape)
    torch._check(n >= 1, lambda: "Expected normalized_shape to be at least 1-dimensional")
    torch._check(
        input.dim() >= n and tuple(input.shape[input.dim() - n :]) == tuple(normalized_shape),
        lambda: f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
        f"[*, {', '.join(map(str, normalized_shape))}], but got input of size{list(input.shape)}",
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
    return torch.empty_like(input, memory_format=torch.contiguous_format), _row_stat(input, axis), _row_stat(input, axis)


@torch.library.register_fake("bnext::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, input, mean, rstd, weight, output_mask):
    axis = rstd.dim()
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        _param_grad(input, axis, output_mask[0], weight),
        _param_grad(input, axis, output_mask[1], weight),
    )


@torch.library.register_fake("bnext::rms_norm_fwd")
def _rms_norm_fwd_fake(input, normalized_shape, weight, eps):
    axis = _check_shape(input, normalized_shape)
    return torch.empty_like(input, memory_format=torch.contiguous_format), _row_stat(input, axis)


@torch.library.register_fake("bnext::rms_norm_bwd")
def _rms_norm_bwd_fake(grad_out, input, rstd, weight, weight_grad):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        _param_grad(input, rstd.dim(), weight_grad, weight),
    )


# ---------------------------------------------------------------- autograd
# Row statistics are outputs without gradient: the backward formulas already
# differentiate through them.


def _layer_norm_setup(ctx, inputs, output):
    input, _, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    input, weight, mean, rstd = ctx.saved_tensors
    mask = [ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    grad_input, grad_weight, grad_bias = _ops.layer_norm_bwd(grad_out, input, mean, rstd, weight, mask)
    if mask[1] and grad_bias.dtype != ctx.bias_dtype:
        # Only without a weight: the kernel then returns the input's dtype.
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return (
        grad_input if ctx.needs_input_grad[0] else None,
        None,
        grad_weight if mask[0] else None,
        grad_bias if mask[1] else None,
        None,
    )


def _rms_norm_setup(ctx, inputs, output):
    input, _, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(input, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, grad_out, _grad_rstd):
    input, weight, rstd = ctx.saved_tensors
    want_weight = ctx.needs_input_grad[2]
    grad_input, grad_weight = _ops.rms_norm_bwd(grad_out, input, rstd, weight, want_weight)
    return (
        grad_input if ctx.needs_input_grad[0] else None,
        None,
        grad_weight if want_weight else None,
        None,
    )


torch.library.register_autograd(
    "bnext::layer_norm_fwd", _layer_norm_backward, setup_context=_layer_norm_setup
)
torch.library.register_autograd("bnext::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup)
