"""Fake kernels of the Batch Renorm operators (csrc/batch_renorm/)."""

import torch

from ._meta import batch_norm_backward_outputs, channel_vector, empty_canonical


@torch.library.register_fake("bnext::batch_renorm_train")
def _train_fake(input, running_mean, running_var, weight, bias, eps, r_max, d_max):
    # Same rejection as the kernel, so that a traced graph fails where eager does.
    op = "bnext::batch_renorm_train"
    torch._check_value(r_max >= 1.0, lambda: f"{op}: expected r_max >= 1, got {r_max}")
    torch._check_value(d_max >= 0.0, lambda: f"{op}: expected d_max >= 0, got {d_max}")
    return (empty_canonical(input),) + tuple(channel_vector(input) for _ in range(4))


@torch.library.register_fake("bnext::batch_renorm_train_scheduled")
def _train_tensor_fake(input, running_mean, running_var, weight, bias, eps, r_max, d_max):
    # The values are on the device: the kernel checks them (CPU) or poisons
    # the output with NaN (GPU); here only what the shapes tell.
    op = "bnext::batch_renorm_train_scheduled"
    for name, t in (("r_max", r_max), ("d_max", d_max)):
        torch._check(t.dim() == 0, lambda name=name: f"{op}: expected {name} to be a 0-dim tensor")
    return (empty_canonical(input),) + tuple(channel_vector(input) for _ in range(4))


@torch.library.register_fake("bnext::batch_renorm_backward")
def _backward_fake(grad_out, input, mean, var, weight, r, d, eps):
    return batch_norm_backward_outputs(input, weight)


# Autograd: csrc/batch_renorm/autograd.cpp (r, d and the batch statistics are
# outputs without gradient).
