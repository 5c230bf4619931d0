"""Fake kernels of the Batch Norm operators (csrc/batch_norm/)."""

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

# Autograd: csrc/batch_norm/autograd.cpp, in C++ because a Python
# autograd.Function costs as much as the kernels on small inputs.
