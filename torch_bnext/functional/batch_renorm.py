from typing import Optional, Union

import torch
from torch import Tensor

from .batch_norm import (
    batch_norm_eval,
    check_channel_dim,
    check_eps,
    update_running_stats,
    verify_batch_size,
)

_ops = torch.ops.bnext


Limit = Union[float, Tensor]


def check_renorm_limits(r_max: Limit, d_max: Limit) -> None:
    """Rejects limits known on the host. Tensor limits (a schedule's values on
    the device) are checked by the operator: on the CPU it raises the same
    ValueError; on the GPU an invalid limit makes the output NaN, since
    reading it here would synchronise."""
    for name, value in (("r_max", r_max), ("d_max", d_max)):
        if isinstance(value, Tensor):
            if value.dim() != 0 or not value.is_floating_point():
                raise ValueError(
                    f"{name} must be a float or a 0-dim floating-point tensor, got a "
                    f"{value.dtype} tensor of shape {tuple(value.shape)}"
                )
        elif not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float or a 0-dim tensor, got {value!r}")
    if isinstance(r_max, Tensor) or isinstance(d_max, Tensor):
        return
    # `not (x >= lo)` so that NaN is rejected too.
    if not r_max >= 1.0:
        raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
    if not d_max >= 0.0:
        raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")


def limit_tensors(r_max: Limit, d_max: Limit, device) -> tuple:
    """Both limits as 0-dim tensors, for batch_renorm_train_scheduled (and the
    distributed step): a float becomes a float64 tensor on `device`."""
    return tuple(
        v if isinstance(v, Tensor) else torch.full((), v, dtype=torch.float64, device=device)
        for v in (r_max, d_max)
    )


def check_renorm_training(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    r_max: Limit,
    d_max: Limit,
    num_batches_tracked: Optional[Tensor],
) -> None:
    """Training-mode Batch Renorm's checks, before anything is computed."""
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_renorm needs running_mean and running_var in training: r and d are "
            "computed from them"
        )
    check_renorm_limits(r_max, d_max)
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    verify_batch_size(input)
    check_eps(eps, True)


def batch_renorm_training(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    r_max: Limit,
    d_max: Limit,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Training-mode Batch Renorm. r and d are computed from the running buffers
    as they are before this step; the buffers (and num_batches_tracked) are then
    updated with Batch Norm's operator, only after every check has passed."""
    check_channel_dim(input)
    check_renorm_training(
        input, running_mean, running_var, momentum, eps, r_max, d_max, num_batches_tracked
    )
    if isinstance(r_max, Tensor) or isinstance(d_max, Tensor):
        out, mean, var, _r, _d = _ops.batch_renorm_train_scheduled(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            eps,
            *limit_tensors(r_max, d_max, input.device),
        )
    else:
        out, mean, var, _r, _d = _ops.batch_renorm_train.default(
            input, running_mean, running_var, weight, bias, eps, float(r_max), float(d_max)
        )
    update_running_stats(input, running_mean, running_var, num_batches_tracked, mean, var, momentum)
    return out


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    r_max: Limit = 3.0,
    d_max: Limit = 5.0,
) -> Tensor:
    """Batch Renormalization (Ioffe, 2017).

    In training, with the batch mean mu_B and biased variance var_B, and the
    running statistics as they are before this call (sigma = sqrt(running_var
    + eps), sigma_B = sqrt(var_B + eps)):

        r = clamp(sigma_B / sigma, 1 / r_max, r_max)
        d = clamp((mu_B - running_mean) / sigma, -d_max, d_max)
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias

    with r and d constants for autograd; then running_mean and running_var are
    updated in place exactly as torch.nn.functional.batch_norm does (running_var
    receives the unbiased batch variance). In eval, y is Batch Norm's eval output.

    Unlike the paper, the running statistic is the variance, as in torch's
    Batch Norm, not a moving average of sigma_B: sigma is derived from it, and
    Batch Norm checkpoints load unchanged. The two differ by Jensen's gap
    (E[sigma_B] <= sqrt(E[var_B])) plus the unbiased-variance factor.

    The running buffers are required in training (they define r and d); r_max
    must be >= 1 and d_max >= 0 (ValueError otherwise). r_max = 1, d_max = 0 is
    Batch Norm.

    r_max and d_max are floats, or 0-dim floating-point tensors such as a
    schedule's value ``torch_bnext.renorm_schedule()[0](num_batches_tracked)``:
    a tensor stays on the device (no host synchronisation, no graph break
    under torch.compile). The paper relaxes them from Batch Norm (1, 0) to
    (3, 5) over the first tens of thousands of steps; the modules
    (BatchRenorm*d) evaluate such a schedule from their num_batches_tracked.
    A tensor limit is checked on the CPU (ValueError); on the GPU an invalid
    one makes the output NaN, since checking it would synchronise.
    """
    if training:
        return batch_renorm_training(
            input, running_mean, running_var, weight, bias, momentum, eps, r_max, d_max
        )
    check_renorm_limits(r_max, d_max)
    return batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
