"""Batch Norm and Batch Renorm whose batch statistics are those of the global
batch over the ranks of a torch.distributed process group.

Per step, one collective in the forward and one in the backward, between our
operators (csrc/distributed/ops.cpp):

    forward:  batch_norm_stats -> all-gather of every rank's (mean, var, count)
              -> batch_norm_gather_stats (Chan's merge in rank order, the
              coefficients, Batch Renorm's r and d) -> batch_norm_elemt
              -> batch_norm_update_stats_global (with the global count)
    backward: batch_norm_backward_reduce -> all-reduce of (sum dy, sum dy*(x-mean))
              -> batch_norm_backward_coeffs -> batch_norm_backward_elemt

With an activation (SyncBatchNormAct, InPlaceABNSync) the forward's
elementwise pass is batch_norm_act_elemt and the backward's passes
batch_norm_act_backward_sums and batch_norm_act_backward_elemt, both of which
recompute g = dy * act'(u) from dy and the input.

The all-gather is an all-reduce of a (world, 2C + 1) float64 table in which
each rank fills its own row: every backend has all-reduce, zeros add exactly,
float64 holds counts exactly, and every rank then merges the same rows in the
same order, so all ranks compute the same bits. Nothing is read on the host.

The autograd function is Python (torch's SyncBatchNorm is too): the
collectives are torch.distributed calls. Its backward is once-differentiable:
a double backward raises instead of returning zeros.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops._meta import opmath_dtype
from .batch_norm import check_eps

_ops = torch.ops.bnext


def _local_stats(input: Tensor, opmath: torch.dtype):
    if input.numel() > 0:
        return _ops.batch_norm_stats(input)
    zeros = input.new_zeros((input.shape[1],), dtype=opmath)
    return zeros, zeros


def _local_sums(grad_out: Tensor, input: Tensor, mean: Tensor):
    if input.numel() > 0:
        return _ops.batch_norm_backward_reduce(grad_out, input, mean)
    zeros = torch.zeros_like(mean)
    return zeros, zeros


class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        eps,
        momentum,
        r_max,
        d_max,
        group,
        world_size,
        rank,
        activation=None,
        activation_param=0.0,
    ):
        channels = input.shape[1]
        opmath = opmath_dtype(input.dtype)
        mean, var = _local_stats(input, opmath)
        table = input.new_zeros((world_size, 2 * channels + 1), dtype=torch.float64)
        table[rank, :channels] = mean
        table[rank, channels:-1] = var
        table[rank, -1] = input.numel() // channels
        dist.all_reduce(table, group=group)
        renorm = r_max is not None
        mean, var, count, scale, shift, r, d = _ops.batch_norm_gather_stats(
            table[:, :channels],
            table[:, channels:-1],
            table[:, -1],
            opmath,
            weight,
            bias,
            eps,
            running_mean if renorm else None,
            running_var if renorm else None,
            r_max,
            d_max,
        )
        if input.numel() == 0:
            out = torch.empty_like(input)
        elif activation is None:
            out = _ops.batch_norm_elemt(input, mean, scale, shift)
        else:
            out = _ops.batch_norm_act_elemt(
                input, mean, scale, shift, None, activation, activation_param
            )
        if running_mean is not None:
            _ops.batch_norm_update_stats_global(
                running_mean, running_var, num_batches_tracked, mean, var, momentum, count
            )
        ctx.save_for_backward(
            input,
            weight,
            mean,
            var,
            count,
            r if renorm else None,
            d if renorm else None,
            scale if activation is not None else None,
            shift if activation is not None else None,
        )
        ctx.eps, ctx.group = eps, group
        ctx.activation = (activation, activation_param)
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight, mean, var, count, r, d, scale, shift = ctx.saved_tensors
        channels = input.shape[1]
        activation, activation_param = ctx.activation
        fused = activation is not None and input.numel() > 0
        if fused:
            # Batch Norm's backward of g = dy * act'(u), which both passes
            # recompute from dy and the input (it is never stored).
            sum_dy, sum_dy_xmu = _ops.batch_norm_act_backward_sums(
                grad_out, input, mean, scale, shift, activation, activation_param
            )
        else:
            sum_dy, sum_dy_xmu = _local_sums(grad_out, input, mean)
        total = torch.cat([sum_dy, sum_dy_xmu])  # a new tensor: the local sums stay
        dist.all_reduce(total, group=ctx.group)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            a, k, c, _ = _ops.batch_norm_backward_coeffs(
                total[:channels], total[channels:], var, weight, r, d, ctx.eps, count
            )
            if fused:
                grad_input = _ops.batch_norm_act_backward_elemt(
                    grad_out, input, mean, scale, shift, a, k, c, activation, activation_param
                )
            elif input.numel() > 0:
                grad_input = _ops.batch_norm_backward_elemt(grad_out, input, mean, a, k, c)
            else:
                grad_input = torch.zeros_like(input)
        # Parameter gradients are this rank's share (DDP sums them over ranks).
        if ctx.needs_input_grad[1]:
            _, _, _, grad_weight = _ops.batch_norm_backward_coeffs(
                sum_dy, sum_dy_xmu, var, weight, r, d, ctx.eps, count
            )
            grad_weight = grad_weight.to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.param_dtypes[1])
        return (grad_input, grad_weight, grad_bias) + (None,) * 12


def world_of(group) -> Optional[tuple]:
    """(group, world size, rank) when batches must be synchronised, else None
    (torch.distributed absent or not initialised, or a group of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group if group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    if world_size <= 1:
        return None
    return group, world_size, dist.get_rank(group)


def check_sync_input(
    input: Tensor, num_features: int, weight: Optional[Tensor], running_mean: Optional[Tensor]
) -> None:
    """What one rank can see wrong on its own, raised before any collective so
    that the other ranks are not left waiting in it (the layers have checked
    the number of dimensions already, with torch.nn.SyncBatchNorm's check)."""
    if input.shape[1] != num_features:
        raise RuntimeError(
            f"running_mean should contain {input.shape[1]} elements not {num_features}"
        )
    if not input.is_floating_point():
        raise RuntimeError(f"expected a floating-point input, got {input.dtype}")
    for name, t in (("weight", weight), ("running_mean", running_mean)):
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"expected {name} on device {input.device} (the input's device), got {t.device}"
            )


def sync_batch_norm_training(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor],
    world: tuple,
    r_max: Optional[Tensor] = None,
    d_max: Optional[Tensor] = None,
    activation: Optional[str] = None,
    activation_param: float = 0.0,
) -> Tensor:
    """Training-mode Batch Norm (Batch Renorm with r_max/d_max as 0-dim
    tensors) over the global batch of `world` = (group, world size, rank),
    followed, in the same elementwise pass, by `activation` (a name of
    functional.batch_norm_act.ACTIVATIONS) when given."""
    check_eps(eps, True)
    group, world_size, rank = world
    return SyncBatchNormFunction.apply(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        eps,
        momentum,
        r_max,
        d_max,
        group,
        world_size,
        rank,
        activation,
        activation_param,
    )
