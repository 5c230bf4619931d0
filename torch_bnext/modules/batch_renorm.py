from typing import Callable, Union

from torch import Tensor, nn

from ..functional.batch_norm import batch_norm_eval
from ..functional.batch_renorm import batch_renorm_training, check_renorm_limits
from ..schedule import LinearRamp, Schedule

Limit = Union[float, Schedule, Callable[[int], float]]


class _BatchRenorm(nn.modules.batchnorm._BatchNorm):
    r"""Batch Renormalization (Ioffe, 2017) over the channel dimension 1.

    In training, with the batch mean :math:`\mu_B` and biased variance
    :math:`\sigma_B^2` of each channel, and the running statistics as they
    are *before* this step (:math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}`):

    .. math::
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}
            \Big(\frac{\sqrt{\sigma_B^2 + \epsilon}}{\sigma}\Big), \qquad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}
            \Big(\frac{\mu_B - \mathrm{running\_mean}}{\sigma}\Big)

        y = \mathrm{weight} \cdot
            \Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\, r + d\Big) + \mathrm{bias}

    with r and d constants for autograd (the gradient flows through
    :math:`\mu_B` and :math:`\sigma_B` only, as in the paper). The running
    statistics are then updated exactly as ``torch.nn.BatchNorm`` updates them:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    batch variance, and ``num_batches_tracked`` grows by one. In eval the layer
    is Batch Norm's eval: ``(x - running_mean) / sigma * weight + bias``.
    ``r_max = 1, d_max = 0`` is Batch Norm.

    Args:
        num_features: C, the number of channels.
        eps: added to the variances (default 1e-5).
        momentum: of the running statistics (default 0.01, smaller than Batch
            Norm's 0.1: the running statistics define r and d, so they should
            be smooth); ``None`` is the cumulative average.
        affine: learnable weight and bias (default True).
        r_max: bound of r, a float >= 1, or a schedule of the step.
        d_max: bound of d, a float >= 0, or a schedule of the step.

    **Schedules.** The paper starts as Batch Norm and relaxes the bounds
    (``torch_bnext.renorm_schedule()``: r_max = 1, d_max = 0 for 5000 steps,
    then linear to 3 at 40k steps and 5 at 25k). A :class:`torch_bnext.Schedule`
    (such as those ``renorm_schedule`` returns) is evaluated from
    ``num_batches_tracked`` on its device, inside the graph: no host
    synchronisation, and ``torch.compile(fullgraph=True)`` traces it. Any other
    callable ``f(step: int) -> float`` works too, but reads the step on the host
    each training step (a GPU synchronisation and a graph break).

    **Deliberate difference from the paper.** The running statistic is the
    variance, as in ``torch.nn.BatchNorm``, not a moving average of
    :math:`\sigma_B`; :math:`\sigma` is derived from it. The two differ by
    Jensen's gap (:math:`E[\sigma_B] \le \sqrt{E[\sigma_B^2]}`) and the
    unbiased-variance factor. In exchange the parameters and buffers
    (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``) have Batch Norm's names and meaning: Batch Norm
    checkpoints load into Batch Renorm and back, and
    ``convert_model(model, norm="batchrenorm")`` converts a trained model.
    Running statistics are always tracked (they define r and d).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
        device=None,
        dtype=None,
    ) -> None:
        for name, value in (("r_max", r_max), ("d_max", d_max)):
            if not callable(value) and not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float or a callable of the step, got {value!r}")
        # Ramps are checked at both ends (so everywhere); other schedules by
        # the operator when they are evaluated.
        ends = lambda v: (v.start, v.end) if isinstance(v, LinearRamp) else (v,)  # noqa: E731
        for r in ends(r_max):
            check_renorm_limits(r if not callable(r) else 1.0, 0.0)
        for d in ends(d_max):
            check_renorm_limits(1.0, d if not callable(d) else 0.0)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.r_max = r_max
        self.d_max = d_max

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def _limits(self):
        """r_max and d_max for this step, from the step count before it: a
        Schedule as a 0-dim tensor evaluated on the device (no synchronisation),
        any other callable of the step count read once on the host."""
        step = self.num_batches_tracked
        limits = (self.r_max, self.d_max)
        host_step = (
            int(step.item())
            if any([callable(v) and not isinstance(v, Schedule) for v in limits])
            else None
        )
        return tuple(
            v(step) if isinstance(v, Schedule) else float(v(host_step)) if callable(v) else float(v)
            for v in limits
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return batch_norm_eval(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        return self._train_step(input, *self._limits())

    def _train_step(self, input: Tensor, r_max, d_max) -> Tensor:
        return batch_renorm_training(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            r_max,
            d_max,
            self.num_batches_tracked,
        )


class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm on (N, C) or (N, C, L) input; see :class:`_BatchRenorm` above
    for the formulas, schedules and the difference from the paper.

    Example::

        >>> r_max, d_max = torch_bnext.renorm_schedule()
        >>> layer = torch_bnext.BatchRenorm1d(64, r_max=r_max, d_max=d_max)
        >>> y = layer(torch.randn(32, 64))
    """

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm on (N, C, H, W) input, NCHW or channels_last (kept); see
    :class:`_BatchRenorm` above for the formulas, schedules and the difference
    from the paper.

    Example::

        >>> r_max, d_max = torch_bnext.renorm_schedule()
        >>> layer = torch_bnext.BatchRenorm2d(64, r_max=r_max, d_max=d_max)
        >>> y = layer(torch.randn(8, 64, 32, 32))
    """

    _check_input_dim = nn.BatchNorm2d._check_input_dim


class BatchRenorm3d(_BatchRenorm):
    """Batch Renorm on (N, C, D, H, W) input, NCDHW or channels_last_3d (kept);
    see :class:`_BatchRenorm` above for the formulas, schedules and the
    difference from the paper."""

    _check_input_dim = nn.BatchNorm3d._check_input_dim
