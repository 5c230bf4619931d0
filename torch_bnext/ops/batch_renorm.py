"""Fake kernels and autograd for the Batch Renorm operators (csrc/batch_renorm/)."""

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


# ---------------------------------------------------------------- autograd
# r and d are stop-gradient (the paper treats them as constants), and the
# batch statistics are differentiated through by the training formula, so
# none of the per-channel outputs carries a gradient; neither do the running
# buffers, which only enter through r and d.


def _train_setup(ctx, inputs, output):
    input, _running_mean, _running_var, weight, _bias, eps, _r_max, _d_max = inputs
    _, mean, var, r, d = output
    ctx.save_for_backward(input, weight, mean, var, r, d)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var, r, d)


def _train_backward(ctx, grad_out, _grad_mean, _grad_var, _grad_r, _grad_d):
    input, weight, mean, var, r, d = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = _ops.batch_renorm_backward(
        grad_out, input, mean, var, weight, r, d, ctx.eps
    )
    return (
        grad_input if ctx.needs_input_grad[0] else None,
        None,
        None,
        grad_weight if ctx.needs_input_grad[3] else None,
        grad_bias if ctx.needs_input_grad[4] else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "bnext::batch_renorm_train", _train_backward, setup_context=_train_setup
)
