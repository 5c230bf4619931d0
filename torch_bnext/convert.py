"""Swapping torch.nn normalisation layers for torch_bnext ones in a model."""

from torch import nn

from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    LayerNorm,
    RMSNorm,
    SyncBatchNorm,
    SyncBatchRenorm,
)
from .modules.batch_norm import adopt_tensors
from .modules.batch_renorm import _BatchRenorm

_BATCH_NORM = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
# Ours as well as torch's: a model already converted to our Batch Norm can
# still be moved to Batch Renorm.
_BATCH_RENORM = {
    nn.BatchNorm1d: BatchRenorm1d,
    nn.BatchNorm2d: BatchRenorm2d,
    nn.BatchNorm3d: BatchRenorm3d,
    BatchNorm1d: BatchRenorm1d,
    BatchNorm2d: BatchRenorm2d,
    BatchNorm3d: BatchRenorm3d,
}
_TARGETS = {"batchnorm": _BATCH_NORM, "batchrenorm": _BATCH_RENORM}


def _swap_batch_norm(module: nn.modules.batchnorm._BatchNorm, cls, kwargs) -> nn.Module:
    options = dict(eps=module.eps, momentum=module.momentum, affine=module.affine)
    if issubclass(cls, _BatchRenorm):
        if module.running_mean is None:
            raise ValueError(
                f"cannot convert {type(module).__name__} with track_running_stats=False to "
                "Batch Renorm: its r and d are computed from the running statistics"
            )
    else:
        options["track_running_stats"] = module.track_running_stats
    return adopt_tensors(cls(module.num_features, **{**options, **kwargs}, device="meta"), module)


def _swap_row_norm(module: nn.Module) -> nn.Module:
    # Built on "meta" and handed the very Parameter objects, as for Batch Norm.
    if type(module) is nn.LayerNorm:
        new = LayerNorm(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None or not module.elementwise_affine,
            device="meta",
        )
        new.weight, new.bias = module.weight, module.bias
    else:
        new = RMSNorm(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            device="meta",
        )
        new.weight = module.weight
    new.train(module.training)
    return new


_RENORM_ONLY = ("r_max", "d_max")


def _check_unconvertible(module: nn.Module) -> None:
    """Layers that look convertible but are not: say so instead of leaving
    them silently as torch's."""
    lazy = (nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
    if isinstance(module, lazy) and module.has_uninitialized_params():
        raise ValueError(
            f"convert_model: {type(module).__name__} has not inferred num_features yet; run one "
            "forward pass (or call the model on a sample input) before converting"
        )


# Layers that become synchronised ones: with sync=True every Batch Norm, and
# torch's SyncBatchNorm always (it is synchronised already).
_SYNC_SOURCES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    nn.SyncBatchNorm,
)
_SYNC_TARGETS = {"batchnorm": SyncBatchNorm, "batchrenorm": SyncBatchRenorm}


def _sync_target(module: nn.Module, norm: str, sync: bool):
    cls = _SYNC_TARGETS[norm]
    if type(module) is nn.SyncBatchNorm:
        return cls
    if not sync or type(module) is cls:
        return None
    sources = _SYNC_SOURCES + (
        (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, SyncBatchNorm)
        if norm == "batchrenorm"
        else ()
    )
    return cls if type(module) in sources else None


def convert_model(
    module: nn.Module,
    norm: str = "batchnorm",
    layernorm: bool = False,
    sync: bool = False,
    process_group=None,
    **kwargs,
) -> nn.Module:
    """Return `module` with every torch.nn.BatchNorm1d/2d/3d replaced by the
    torch_bnext layer named by `norm` (parameters, buffers, train/eval mode,
    device and dtype preserved), in the manner of
    nn.SyncBatchNorm.convert_sync_batchnorm.

    norm="batchnorm": torch_bnext.BatchNorm*d. norm="batchrenorm":
    torch_bnext.BatchRenorm*d, from torch's or torch_bnext's Batch Norm layers.
    `kwargs` (e.g. r_max, d_max, momentum) go to the new layers' constructors;
    eps, momentum and affine are otherwise taken from the replaced layer.
    With layernorm=True, torch.nn.LayerNorm and torch.nn.RMSNorm are replaced
    by torch_bnext.LayerNorm and RMSNorm too.
    With sync=True the Batch Norm layers become torch_bnext.SyncBatchNorm
    (norm="batchrenorm": SyncBatchRenorm) on `process_group` (None: the
    default group); torch's nn.SyncBatchNorm layers become ours in any case,
    keeping their process group unless one is given.
    Layers that are already of the target kind are left as they are.
    Lazy Batch Norm layers convert once initialised (ValueError before)."""
    if norm not in _TARGETS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {sorted(_TARGETS)}")
    misplaced = [k for k in _RENORM_ONLY if k in kwargs and norm != "batchrenorm"]
    if misplaced:
        raise TypeError(
            f"convert_model: {', '.join(misplaced)} configure Batch Renorm; pass "
            f"norm='batchrenorm' to convert to it (got norm={norm!r})"
        )
    _check_unconvertible(module)
    sync_cls = _sync_target(module, norm, sync)
    cls = _TARGETS[norm].get(type(module))
    if sync_cls is not None:
        group = (
            process_group if process_group is not None else getattr(module, "process_group", None)
        )
        if isinstance(module, _BatchRenorm):
            kwargs = {"r_max": module.r_max, "d_max": module.d_max, **kwargs}
        out = _swap_batch_norm(module, sync_cls, {**kwargs, "process_group": group})
    elif cls is not None:
        out = _swap_batch_norm(module, cls, kwargs)
    elif layernorm and type(module) in (nn.LayerNorm, nn.RMSNorm):
        out = _swap_row_norm(module)
    else:
        out = module
    for name, child in module.named_children():
        new_child = convert_model(child, norm, layernorm, sync, process_group, **kwargs)
        if new_child is not child:
            out.add_module(name, new_child)
    return out


# Every layer of ours -> the torch.nn layer it stands in for. Batch Renorm
# becomes Batch Norm with the same buffers: exactly its eval computation (in
# training, torch's layer then normalises as Batch Norm does, without r and d).
_REVERT_BATCH_NORM = {
    BatchNorm1d: nn.BatchNorm1d,
    BatchNorm2d: nn.BatchNorm2d,
    BatchNorm3d: nn.BatchNorm3d,
    BatchRenorm1d: nn.BatchNorm1d,
    BatchRenorm2d: nn.BatchNorm2d,
    BatchRenorm3d: nn.BatchNorm3d,
    SyncBatchNorm: nn.SyncBatchNorm,
    SyncBatchRenorm: nn.SyncBatchNorm,
}


def _revert_batch_norm(module: nn.modules.batchnorm._BatchNorm, cls) -> nn.Module:
    extra = {"process_group": module.process_group} if cls is nn.SyncBatchNorm else {}
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",
        **extra,
    )
    return adopt_tensors(new, module)  # the very Parameter and buffer objects


def _revert_row_norm(module: nn.Module) -> nn.Module:
    if type(module) is LayerNorm:
        new = nn.LayerNorm(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None or not module.elementwise_affine,
            device="meta",
        )
        new.weight, new.bias = module.weight, module.bias
    else:
        new = nn.RMSNorm(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            device="meta",
        )
        new.weight = module.weight
    new.train(module.training)
    return new


def revert_model(module: nn.Module) -> nn.Module:
    """The inverse of convert_model: return `module` with every torch_bnext
    layer replaced by the torch.nn layer it stands in for, in place on the
    children (the root is returned replaced if it is ours):

    BatchNorm1d/2d/3d -> nn.BatchNorm1d/2d/3d; BatchRenorm1d/2d/3d ->
    nn.BatchNorm1d/2d/3d with the same buffers and momentum (exactly its eval
    computation; in training torch's layer is Batch Norm, without r and d);
    SyncBatchNorm and SyncBatchRenorm -> nn.SyncBatchNorm (process_group
    kept; the same caveat for Renorm); LayerNorm -> nn.LayerNorm; RMSNorm ->
    nn.RMSNorm.

    The very Parameter and buffer objects are kept (optimisers, tied weights
    and the state_dict keys are unchanged), as are train/eval mode, device and
    dtype. Useful to hand a trained model to tools that know only torch's
    layers, or to a deployment without torch_bnext's operators."""
    cls = _REVERT_BATCH_NORM.get(type(module))
    if cls is not None:
        out = _revert_batch_norm(module, cls)
    elif type(module) in (LayerNorm, RMSNorm):
        out = _revert_row_norm(module)
    else:
        out = module
    for name, child in module.named_children():
        new_child = revert_model(child)
        if new_child is not child:
            out.add_module(name, new_child)
    return out
