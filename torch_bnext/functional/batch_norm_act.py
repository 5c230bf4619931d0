"""Batch Norm (and Batch Renorm) fused with an activation and an optional
residual: ``act(batch_norm(x) + residual)`` in one elementwise pass, and
In-Place ABN's in-place mode."""

from typing import Optional

import torch
from torch import Tensor

from .batch_norm import (
    check_channel_dim,
    check_eps,
    check_eval_stats,
    check_running_pair,
    update_running_stats,
    verify_batch_size,
)
from .batch_renorm import Limit, check_renorm_limits, check_renorm_training, limit_tensors

_ops = torch.ops.bnext

#: The activations the kernels fuse, by torch.nn.functional name.
ACTIVATIONS = (
    "identity",
    "relu",
    "leaky_relu",
    "elu",
    "silu",
    "gelu",
    "gelu_tanh",
    "hardswish",
    "relu6",
)

# The parameter's default where torch.nn.functional has one.
_DEFAULT_PARAM = {"leaky_relu": 0.01, "elu": 1.0}


def activation_param_or_default(activation: str, activation_param: Optional[float]) -> float:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    if activation_param is None:
        return _DEFAULT_PARAM.get(activation, 0.0)
    return float(activation_param)


def invertible(activation: str, activation_param: Optional[float] = None) -> bool:
    """Whether in-place mode can recompute the activation's input from its
    output: identity, leaky_relu with negative_slope > 0, elu with alpha > 0."""
    param = activation_param_or_default(activation, activation_param)
    return activation == "identity" or (activation in ("leaky_relu", "elu") and param > 0)


def _check_in_place(activation: str, param: float, residual: Optional[Tensor]) -> None:
    if not invertible(activation, param):
        raise ValueError(
            "in_place=True recomputes the activation's input from its output, so it needs an "
            "invertible activation (identity, leaky_relu with negative_slope > 0, elu with "
            f"alpha > 0); got {activation!r} with parameter {param}"
        )
    if residual is not None:
        raise ValueError(
            "in_place=True takes no residual: the output alone could not give back the "
            "normalised input"
        )


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    activation_param: Optional[float] = None,
    residual: Optional[Tensor] = None,
    in_place: bool = False,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``act(batch_norm(input) + residual)``, with torch.nn.functional.batch_norm's
    arguments and semantics for the normalisation (running statistics updated in
    place in training, after every check has passed) and the activation
    computed in the same pass, in float32 for half/bfloat16 input.

    ``activation`` is one of :data:`ACTIVATIONS` (torch.nn.functional names;
    ``gelu_tanh`` is ``F.gelu(approximate="tanh")``); ``activation_param`` is
    leaky_relu's negative_slope (default 0.01) or elu's alpha (default 1.0).
    ``residual`` (the input's shape and dtype) is added before the activation,
    as in a ResNet block's ``relu(bn(conv(x)) + identity)``.

    Backward keeps only the input (not the normalised values nor the output)
    and recomputes the activation's derivative from it.

    ``in_place=True`` (In-Place ABN, Rota Bulo et al. 2018) writes the output
    over ``input`` and returns it; backward recomputes what it needs from the
    output alone, so the layer keeps one tensor instead of two. It needs an
    invertible activation and no residual (ValueError otherwise), and, as any
    in-place operation, an input that nothing else saved for backward (autograd
    raises otherwise). x - mean is recovered as (act^-1(y) - bias) / (weight *
    invstd): a weight near 0 loses it (a weight of exactly 0 gives NaN
    gradients); InPlaceABN therefore uses ``|weight| + eps`` as inplace_abn does.
    """
    check_channel_dim(input)
    param = activation_param_or_default(activation, activation_param)
    if in_place:
        _check_in_place(activation, param, residual)
    if training:
        verify_batch_size(input)
        check_eps(eps, True)
        check_running_pair(running_mean, running_var)
        if in_place:
            mean, var = _ops.batch_norm_act_train_(input, weight, bias, eps, activation, param)
            out = input
        else:
            out, mean, var = _ops.batch_norm_act_train(
                input, weight, bias, residual, eps, activation, param
            )
        if running_mean is not None:
            update_running_stats(
                input, running_mean, running_var, num_batches_tracked, mean, var, momentum
            )
        return out
    check_eval_stats(running_mean, running_var, eps)
    # An exported graph has no in-place operator to hand a runtime: the same
    # values out of place.
    if in_place and not torch.onnx.is_in_onnx_export():
        _ops.batch_norm_act_infer_(
            input, running_mean, running_var, weight, bias, eps, activation, param
        )
        return input
    return _ops.batch_norm_act_infer(
        input, running_mean, running_var, weight, bias, residual, eps, activation, param
    )


def batch_renorm_act(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.01,
    eps: float = 1e-5,
    r_max: Limit = 3.0,
    d_max: Limit = 5.0,
    activation: str = "relu",
    activation_param: Optional[float] = None,
    residual: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``act(batch_renorm(input) + residual)``: Batch Renorm
    (torch_bnext.functional.batch_renorm, whose docstring gives r and d) with
    the activation fused as in :func:`batch_norm_act`. In eval it is
    :func:`batch_norm_act`'s eval."""
    check_channel_dim(input)
    param = activation_param_or_default(activation, activation_param)
    if not training:
        check_renorm_limits(r_max, d_max)
        return batch_norm_act(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            False,
            momentum,
            eps,
            activation,
            param,
            residual,
        )
    check_renorm_training(
        input, running_mean, running_var, momentum, eps, r_max, d_max, num_batches_tracked
    )
    out, mean, var, _r, _d = _ops.batch_renorm_act_train(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        residual,
        eps,
        *limit_tensors(r_max, d_max, input.device),
        activation,
        param,
    )
    update_running_stats(input, running_mean, running_var, num_batches_tracked, mean, var, momentum)
    return out
