"""Fake kernels of the Batch Renorm operators (csrc/batch_renorm/)."""

import torch

from ._meta import empty_canonical, opmath_dtype

_ops = torch.ops.bnext


def _channel_vector(x, dtype=None):
    return x.new_empty((x.shape[1],), dtype=dtype or opmath_dtype(x.dtype))


@torch.library.register_fake("bnext::batch_renorm_train")
def _train_fake(input, running_mean, running_var, weight, bias, eps, r_max, d_max):
    # Same rejection as the kernel, so that a traced graph fails where eager does.
    op = "bnext::batch_renorm_train"
    torch._check_value(r_max >= 1.0, lambda: f"{op}: expected r_max >= 1, got {r_max}")
    torch._check_value(d_max >= 0.0, lambda: f"{op}: expected d_max >= 0, got {d_max}")
    return (empty_canonical(input),) + tuple(_channel_vector(input) for _ in range(4))


@torch.library.register_fake("bnext::batch_renorm_backward")
def _backward_fake(grad_out, input, mean, var, weight, r, d, eps):
    param_dtype = weight.dtype if weight is not None else opmath_dtype(input.dtype)
    return (
        empty_canonical(input),
        _channel_vector(input, param_dtype),
        _channel_vector(input, param_dtype),
    )

# Autograd: csrc/batch_renorm/autograd.cpp (r, d and the batch statistics are
# outputs without gradient).
