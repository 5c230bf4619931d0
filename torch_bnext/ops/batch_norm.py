"""Fake kernels and autograd for the Batch Norm operators (csrc/batch_norm/)."""

import torch

from ._meta import empty_canonical, opmath_dtype

_ops = torch.ops.bnext


def _check_devices(op, input, **tensors):
    # Mirrors common/checks.cpp: with tensors on the meta device mixed in, the
    # dispatcher picks the fake kernel, which must reject the mix as the real one would.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"{op}: expected {name} on device {input.device} (the input's device), got {t.device}"
            )


def _channel_vector(x, dtype=None):
    return x.new_empty((x.shape[1],), dtype=dtype or opmath_dtype(x.dtype))


@torch.library.register_fake("bnext::batch_norm_stats")
def _stats_fake(input):
    return _channel_vector(input), _channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_elemt")
def _elemt_fake(input, mean, scale, shift):
    return empty_canonical(input)


@torch.library.register_fake("bnext::batch_norm_backward_reduce")
def _backward_reduce_fake(grad_out, input, mean):
    return _channel_vector(input), _channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_backward_elemt")
def _backward_elemt_fake(grad_out, input, mean, a, k, c):
    return empty_canonical(input)


@torch.library.register_fake("bnext::batch_norm_train")
def _train_fake(input, weight, bias, eps):
    _check_devices("bnext::batch_norm_train", input, weight=weight, bias=bias)
    return empty_canonical(input), _channel_vector(input), _channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_infer")
def _infer_fake(input, mean, var, weight, bias, eps):
    _check_devices("bnext::batch_norm_infer", input, running_mean=mean, running_var=var,
                   weight=weight, bias=bias)
    return empty_canonical(input)


@torch.library.register_fake("bnext::batch_norm_backward")
def _backward_fake(grad_out, input, mean, var, weight, eps, training):
    param_dtype = weight.dtype if weight is not None else opmath_dtype(input.dtype)
    return (
        empty_canonical(input),
        _channel_vector(input, param_dtype),
        _channel_vector(input, param_dtype),
    )


@torch.library.register_fake("bnext::batch_norm_update_stats")
def _update_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    _check_devices("bnext::batch_norm_update_stats", mean, running_mean=running_mean,
                   running_var=running_var)
    return None


# ---------------------------------------------------------------- autograd
# Batch statistics returned by batch_norm_train are outputs without gradient:
# the training formula already differentiates through them.


def _train_setup(ctx, inputs, output):
    input, weight, bias, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(input, weight, mean, var)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var)


def _train_backward(ctx, grad_out, _grad_mean, _grad_var):
    input, weight, mean, var = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = _ops.batch_norm_backward(
        grad_out, input, mean, var, weight, ctx.eps, True
    )
    return (
        grad_input if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
        grad_bias if ctx.needs_input_grad[2] else None,
        None,
    )


def _infer_setup(ctx, inputs, output):
    input, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(input, mean, var, weight)
    ctx.eps = eps


def _infer_backward(ctx, grad_out):
    input, mean, var, weight = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = _ops.batch_norm_backward(
        grad_out, input, mean, var, weight, ctx.eps, False
    )
    return (
        grad_input if ctx.needs_input_grad[0] else None,
        None,
        None,
        grad_weight if ctx.needs_input_grad[3] else None,
        grad_bias if ctx.needs_input_grad[4] else None,
        None,
    )


torch.library.register_autograd("bnext::batch_norm_train", _train_backward, setup_context=_train_setup)
torch.library.register_autograd("bnext::batch_norm_infer", _infer_backward, setup_context=_infer_setup)
