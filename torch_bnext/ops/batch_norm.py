"""Fake kernels of the Batch Norm operators (csrc/batch_norm/)."""

import torch

from ._meta import batch_norm_backward_outputs, channel_vector, empty_canonical


def _check_devices(op, input, **tensors):
    # Mirrors common/checks.cpp: with tensors on the meta device mixed in, the
    # dispatcher picks the fake kernel, which must reject the mix as the real one would.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"{op}: expected {name} on device {input.device} (the input's device), "
                f"got {t.device}"
            )


@torch.library.register_fake("bnext::batch_norm_stats")
def _stats_fake(input):
    return channel_vector(input), channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_elemt")
def _elemt_fake(input, mean, scale, shift):
    return empty_canonical(input)


@torch.library.register_fake("bnext::batch_norm_backward_reduce")
def _backward_reduce_fake(grad_out, input, mean):
    return channel_vector(input), channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_backward_elemt")
def _backward_elemt_fake(grad_out, input, mean, a, k, c):
    return empty_canonical(input)


@torch.library.register_fake("bnext::batch_norm_train")
def _train_fake(input, weight, bias, eps):
    _check_devices("bnext::batch_norm_train", input, weight=weight, bias=bias)
    return empty_canonical(input), channel_vector(input), channel_vector(input)


@torch.library.register_fake("bnext::batch_norm_infer")
def _infer_fake(input, mean, var, weight, bias, eps):
    _check_devices(
        "bnext::batch_norm_infer",
        input,
        running_mean=mean,
        running_var=var,
        weight=weight,
        bias=bias,
    )
    return empty_canonical(input)


@torch.library.register_fake("bnext::batch_norm_backward")
def _backward_fake(grad_out, input, mean, var, weight, eps, training):
    return batch_norm_backward_outputs(input, weight)


@torch.library.register_fake("bnext::batch_norm_update_stats")
def _update_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    _check_devices(
        "bnext::batch_norm_update_stats", mean, running_mean=running_mean, running_var=running_var
    )
    return None


@torch.library.register_fake("bnext::batch_norm_update_stats_global")
def _update_stats_tensor_fake(
    running_mean, running_var, num_batches_tracked, mean, var, momentum, count
):
    _check_devices(
        "bnext::batch_norm_update_stats_global",
        mean,
        running_mean=running_mean,
        running_var=running_var,
        count=count,
    )
    return None


# Autograd: csrc/batch_norm/autograd.cpp, in C++ because a Python
# autograd.Function costs as much as the kernels on small inputs.
