from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.bnext


def verify_batch_size(input: Tensor) -> None:
    # Same check and message as torch.nn.functional.batch_norm.
    size = input.shape
    values_per_channel = size[0]
    for d in range(2, len(size)):  # a plain loop: dynamo cannot trace math.prod(<genexpr>)
        values_per_channel *= size[d]
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )


def check_eps(eps: float, training: bool) -> None:
    # torch.nn.functional.batch_norm's checks and messages.
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_channel_dim(input: Tensor) -> None:
    # torch indexes dimension 1 and fails with an IndexError (the modules'
    # _check_input_dim catch this earlier, with a ValueError).
    if input.dim() < 2:
        raise IndexError(f"Expected 2D or higher input (got {input.dim()}D input)")


def batch_norm_training(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Training-mode Batch Norm; updates the running buffers (and counts the step
    in num_batches_tracked) only after every argument has been checked."""
    check_channel_dim(input)
    verify_batch_size(input)
    check_eps(eps, True)
    out, mean, var = _ops.batch_norm_train(input, weight, bias, eps)
    check_running_pair(running_mean, running_var)
    if running_mean is not None:
        update_running_stats(
            input, running_mean, running_var, num_batches_tracked, mean, var, momentum
        )
    return out


def check_running_pair(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")


def check_eval_stats(
    running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float
) -> None:
    """Eval mode's checks: the running statistics present (torch's message and
    type, its C++ check), eps non-negative."""
    if running_mean is None or running_var is None:
        raise RuntimeError(
            f"running_{'mean' if running_mean is None else 'var'} must be defined "
            "in evaluation mode"
        )
    check_eps(eps, False)


def update_running_stats(
    input, running_mean, running_var, num_batches_tracked, mean, var, momentum
) -> None:
    """Folds this batch's statistics into the running buffers (in place)."""
    if input.numel() > 0:
        count = input.numel() // input.shape[1]
        _ops.batch_norm_update_stats(
            running_mean, running_var, num_batches_tracked, mean, var, momentum, count
        )
    elif num_batches_tracked is not None:
        # torch counts an empty batch as a step but leaves the statistics alone.
        num_batches_tracked.add_(1)


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch Normalization, with the signature and semantics of
    torch.nn.functional.batch_norm.

    In training, normalises with the batch statistics and, when given, updates
    running_mean and running_var in place (running_var receives the unbiased
    batch variance). In eval, normalises with the running statistics.
    """
    if input.dim() < 2 and input.numel() == 0:
        return input.clone()  # torch returns the empty input as it is, in either mode
    if training:
        return batch_norm_training(input, running_mean, running_var, weight, bias, momentum, eps)
    return batch_norm_eval(input, running_mean, running_var, weight, bias, eps)


def batch_norm_eval(input, running_mean, running_var, weight, bias, eps) -> Tensor:
    """Eval-mode Batch Norm with the running statistics, after torch's checks."""
    check_eval_stats(running_mean, running_var, eps)
    return _ops.batch_norm_infer(input, running_mean, running_var, weight, bias, eps)
