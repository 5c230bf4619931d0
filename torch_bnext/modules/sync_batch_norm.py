"""SyncBatchNorm and SyncBatchRenorm: batch statistics over the ranks of a
torch.distributed process group (torch_bnext/functional/sync_batch_norm.py)."""

from torch import Tensor, nn

from ..functional.batch_renorm import limit_tensors
from ..functional.sync_batch_norm import check_sync_input, sync_batch_norm_training, world_of
from .batch_norm import _BatchNormForward, adopt_tensors
from .batch_renorm import Limit, _BatchRenorm


class SyncBatchNorm(_BatchNormForward, nn.modules.batchnorm._BatchNorm):
    """Drop-in for torch.nn.SyncBatchNorm, computed with torch_bnext's kernels,
    on CPU (gloo) as well as CUDA (NCCL).

    In training, with a process group of more than one rank, the forward equals
    our BatchNorm applied to the concatenation of all ranks' batches: outputs,
    running statistics (unbiased with the global count) and
    num_batches_tracked; grad_input is the whole-batch gradient; weight and bias
    gradients are this rank's share (DDP sums them over ranks, as with torch).
    Ranks may hold batches of different sizes, or none. Statistics are merged
    with Chan's formula in float32 (float64 for float64 input). One collective
    in the forward and one in the backward, on the input's device. Otherwise
    (eval, torch.distributed not initialised, a group of one) it is our
    BatchNorm. Inputs (N, C, *), any memory format.

    torch.nn.SyncBatchNorm's constructor, attributes (process_group), buffers,
    state_dict keys, input checks and convert_sync_batchnorm; but deliberately
    not a subclass of it: DistributedDataParallel refuses every module that
    is an instance of torch.nn.SyncBatchNorm on the CPU ("SyncBatchNorm layers
    only work with GPU modules"), which would rule out the CPU clusters this
    layer is for.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    # torch.nn.SyncBatchNorm's checks and messages.
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        world = world_of(self.process_group) if self.training else None
        if world is None:
            return super().forward(input)
        return self._sync_step(input, world)

    def _sync_step(self, input: Tensor, world: tuple, activation=None, activation_param=0.0):
        """The training step over `world` (group, size, rank), with the
        activation fused when one is named (SyncBatchNormAct)."""
        check_sync_input(input, self.num_features, self.weight, self.running_mean)
        running_mean, running_var, steps = self._updated_buffers()
        return sync_batch_norm_training(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            steps,
            world,
            activation=activation,
            activation_param=activation_param,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """torch's BatchNorm*d and SyncBatchNorm, and ours, become this class,
        recursively; the very Parameter and buffer objects are reused and
        mode, device and dtype kept (as torch's convert_sync_batchnorm)."""
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (cls, _BatchRenorm)
        ):
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                device="meta",
            )
            adopt_tensors(converted, module)
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


class SyncBatchRenorm(_BatchRenorm):
    """Batch Renorm (see torch_bnext.BatchRenorm2d) whose batch statistics are
    those of the global batch over a process group: r and d come from the
    global mean and variance and the (identical on every rank) running
    statistics; the semantics of the distributed step are SyncBatchNorm's.
    r_max and d_max are floats or schedules, evaluated on the device.
    Inputs (N, C, *), any memory format.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, r_max, d_max, device, dtype)
        self.process_group = process_group

    _check_input_dim = nn.SyncBatchNorm._check_input_dim

    def _train_step(self, input: Tensor, r_max, d_max) -> Tensor:
        world = world_of(self.process_group)
        if world is None:
            return super()._train_step(input, r_max, d_max)
        check_sync_input(input, self.num_features, self.weight, self.running_mean)
        return sync_batch_norm_training(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            self.num_batches_tracked,
            world,
            *limit_tensors(r_max, d_max, input.device),
        )

    @classmethod
    def convert_sync_batchrenorm(
        cls, module: nn.Module, process_group=None, r_max: Limit = 3.0, d_max: Limit = 5.0
    ) -> nn.Module:
        """torch's and our BatchNorm*d / SyncBatchNorm and our BatchRenorm*d
        become this class, recursively, reusing the Parameter and buffer objects."""
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            if module.running_mean is None:
                raise ValueError(
                    f"cannot convert {type(module).__name__} with track_running_stats=False to "
                    "Batch Renorm: its r and d are computed from the running statistics"
                )
            if isinstance(module, _BatchRenorm):
                r_max, d_max = module.r_max, module.d_max
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                r_max,
                d_max,
                process_group,
                device="meta",
            )
            adopt_tensors(converted, module)
        for name, child in module.named_children():
            converted.add_module(
                name, cls.convert_sync_batchrenorm(child, process_group, r_max, d_max)
            )
        return converted
