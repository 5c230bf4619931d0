"""Fake kernels of the Batch Norm + activation operators (csrc/batch_norm_act/)."""

import torch

from ._meta import batch_norm_backward_outputs, channel_vector, empty_canonical
from .batch_norm import _check_devices


@torch.library.register_fake("bnext::batch_norm_act_elemt")
def _elemt_fake(input, mean, scale, shift, residual, activation, activation_param):
    return empty_canonical(input)


@torch.library.register_fake("bnext::batch_norm_act_backward_reduce")
def _backward_reduce_fake(
    grad_out, input, mean, scale, shift, residual, activation, activation_param
):
    return empty_canonical(input), channel_vector(input), channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_act_backward_sums")
def _backward_sums_fake(grad_out, input, mean, scale, shift, activation, activation_param):
    return channel_vector(input), channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_act_backward_elemt")
def _backward_elemt_fake(
    grad_out, input, mean, scale, shift, a, k, c, activation, activation_param
):
    return empty_canonical(input)


@torch.library.register_fake("bnext::batch_norm_act_backward_reduce_from_output")
def _backward_reduce_from_output_fake(grad_out, input, output, mean, activation, param):
    return empty_canonical(input), channel_vector(input), channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_act_inplace_backward_reduce")
def _inplace_backward_reduce_fake(grad_out, output, shift, inv_scale, activation, param):
    return empty_canonical(output), channel_vector(output), channel_vector(output)


@torch.library.register_fake("bnext::batch_norm_act_inplace_backward_elemt")
def _inplace_backward_elemt_fake(grad_pre, output, shift, inv_scale, a, k, c, activation, param):
    return empty_canonical(output)


@torch.library.register_fake("bnext::batch_norm_act_train")
def _train_fake(input, weight, bias, residual, eps, activation, activation_param):
    _check_devices(
        "bnext::batch_norm_act_train", input, weight=weight, bias=bias, residual=residual
    )
    return empty_canonical(input), channel_vector(input), channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_act_infer")
def _infer_fake(input, mean, var, weight, bias, residual, eps, activation, activation_param):
    _check_devices(
        "bnext::batch_norm_act_infer",
        input,
        running_mean=mean,
        running_var=var,
        weight=weight,
        bias=bias,
        residual=residual,
    )
    return empty_canonical(input)


@torch.library.register_fake("bnext::batch_renorm_act_train")
def _renorm_train_fake(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    residual,
    eps,
    r_max,
    d_max,
    activation,
    activation_param,
):
    _check_devices(
        "bnext::batch_renorm_act_train",
        input,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
        residual=residual,
    )
    return (empty_canonical(input),) + tuple(channel_vector(input) for _ in range(4))


@torch.library.register_fake("bnext::batch_norm_act_backward")
def _backward_fake(
    grad_out,
    input,
    mean,
    var,
    weight,
    bias,
    residual,
    r,
    d,
    eps,
    activation,
    activation_param,
    training,
    output=None,
):
    # grad_pre is stored only with a residual (its gradient), or with the
    # output kept in the residual's stead.
    stored = residual is not None or output is not None
    grad_pre = empty_canonical(input) if stored else input.new_empty((0,))
    return batch_norm_backward_outputs(input, weight) + (grad_pre,)


@torch.library.register_fake("bnext::batch_norm_act_train_")
def _train_inplace_fake(input, weight, bias, eps, activation, activation_param):
    _check_devices("bnext::batch_norm_act_train_", input, weight=weight, bias=bias)
    return channel_vector(input), channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_act_infer_")
def _infer_inplace_fake(input, mean, var, weight, bias, eps, activation, activation_param):
    _check_devices(
        "bnext::batch_norm_act_infer_",
        input,
        running_mean=mean,
        running_var=var,
        weight=weight,
        bias=bias,
    )
    return None


@torch.library.register_fake("bnext::batch_norm_act_inplace_backward")
def _inplace_backward_fake(
    grad_out, output, var, weight, bias, eps, activation, activation_param, training
):
    return batch_norm_backward_outputs(output, weight)


# Autograd: csrc/batch_norm_act/autograd.cpp.
