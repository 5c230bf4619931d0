from typing import Callable, Union

from torch import Tensor, nn

from ..functional.batch_norm import batch_norm_eval
from ..functional.batch_renorm import batch_renorm_training, check_renorm_limits


Limit = Union[float, Callable[[int], float]]


class _BatchRenorm(nn.modules.batchnorm._BatchNorm):
    """Batch Renormalization (Ioffe, 2017); see torch_bnext.functional.batch_renorm
    for the formulas.

    A subclass of torch's _BatchNorm with running statistics always tracked, so
    parameters and buffers (weight, bias, running_mean, running_var,
    num_batches_tracked) have Batch Norm's names: Batch Norm checkpoints load
    into it and back. Eval is exactly Batch Norm's eval.

    The running statistic is the variance, as in torch's Batch Norm, not the
    paper's moving average of sigma_B; sigma = sqrt(running_var + eps).

    r_max and d_max are floats, or callables of the step count
    (num_batches_tracked as an int) such as those of torch_bnext.renorm_schedule.
    A callable is evaluated at every training step and needs the step count on
    the host, which synchronises with the device (and breaks a torch.compile
    graph); floats do not.
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
        check_renorm_limits(
            r_max if not callable(r_max) else 1.0, d_max if not callable(d_max) else 0.0
        )
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.r_max = r_max
        self.d_max = d_max

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def _limits(self):
        r_max, d_max = self.r_max, self.d_max
        if callable(r_max) or callable(d_max):
            step = int(self.num_batches_tracked.item())
            r_max = r_max(step) if callable(r_max) else r_max
            d_max = d_max(step) if callable(d_max) else d_max
        return float(r_max), float(d_max)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return batch_norm_eval(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        r_max, d_max = self._limits()
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
    """Batch Renorm on (N, C) or (N, C, L) input."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm on (N, C, H, W) input, NCHW or channels_last."""

    _check_input_dim = nn.BatchNorm2d._check_input_dim


class BatchRenorm3d(_BatchRenorm):
    """Batch Renorm on (N, C, D, H, W) input, NCDHW or channels_last_3d."""

    _check_input_dim = nn.BatchNorm3d._check_input_dim
