"""Fake kernels of the distributed Batch Norm steps (csrc/distributed/)."""

import torch


@torch.library.register_fake("bnext::batch_norm_gather_stats")
def _gather_stats_fake(
    means, vars, counts, dtype, weight, bias, eps, running_mean, running_var, r_max, d_max
):
    op = "bnext::batch_norm_gather_stats"
    torch._check(
        means.dim() == 2 and vars.shape == means.shape,
        lambda: f"{op}: expected means and vars of one shape (world size, channels)",
    )
    torch._check(
        counts.dim() == 1 and counts.shape[0] == means.shape[0],
        lambda: f"{op}: expected one count per row",
    )
    channels = means.shape[1]

    def vector():
        return means.new_empty((channels,), dtype=dtype)

    return (
        vector(),
        vector(),
        counts.new_empty((), dtype=torch.long),
        vector(),
        vector(),
        vector(),
        vector(),
    )


@torch.library.register_fake("bnext::batch_norm_backward_coeffs")
def _backward_coeffs_fake(sum_dy, sum_dy_xmu, var, weight, r, d, eps, count):
    return tuple(torch.empty_like(sum_dy) for _ in range(4))
