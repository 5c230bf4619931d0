from torch import Tensor, nn

from ..functional.batch_norm import batch_norm_eval, batch_norm_training


class _BatchNormForward:
    """forward() for subclasses of torch.nn.modules.batchnorm._BatchNorm.

    Constructor, buffers, state_dict keys, reset_* and _check_input_dim are
    inherited unchanged; only the computation is ours. Unlike torch, a call
    that fails leaves num_batches_tracked untouched too.
    """

    def _use_batch_stats(self) -> bool:
        return self.training or (self.running_mean is None and self.running_var is None)

    def _updated_buffers(self):
        """(running_mean, running_var, num_batches_tracked) that this step
        updates, or Nones (eval with batch statistics, untracked)."""
        if self.training and self.track_running_stats and self.running_mean is not None:
            return self.running_mean, self.running_var, self.num_batches_tracked
        return None, None, None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self._use_batch_stats():
            return batch_norm_eval(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        running_mean, running_var, steps = self._updated_buffers()
        return batch_norm_training(
            input, running_mean, running_var, self.weight, self.bias, self.momentum, self.eps, steps
        )


def adopt_tensors(new: nn.Module, old: nn.Module) -> nn.Module:
    """Hands `old`'s very Parameter and buffer objects (and mode) to `new`, a
    Batch Norm built on the meta device: optimisers and tied references keep
    pointing at the live tensors, device and dtype kept."""
    new.weight, new.bias = old.weight, old.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d on (N, C) or (N, C, L) input."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d on (N, C, H, W) input, NCHW or channels_last."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d on (N, C, D, H, W) input, NCDHW or channels_last_3d."""
