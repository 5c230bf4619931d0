"""Swapping torch.nn normalisation layers for torch_bnext ones in a model."""

import torch
from torch import nn

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, LayerNorm, RMSNorm

_BATCH_NORM = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def _swap_batch_norm(module: nn.modules.batchnorm._BatchNorm, cls) -> nn.Module:
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",
    )
    # Reuse the very Parameter and buffer objects: optimisers and tied
    # references keep pointing at the live tensors, device and dtype kept.
    new.weight, new.bias = module.weight, module.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(module, name))
    new.train(module.training)
    return new


def _swap_row_norm(module: nn.Module) -> nn.Module:
    # Built on "meta" and handed the very Parameter objects, as for Batch Norm.
    if type(module) is nn.LayerNorm:
        new = LayerNorm(module.normalized_shape, eps=module.eps,
                        elementwise_affine=module.elementwise_affine,
                        bias=module.bias is not None or not module.elementwise_affine,
                        device="meta")
        new.weight, new.bias = module.weight, module.bias
    else:
        new = RMSNorm(module.normalized_shape, eps=module.eps,
                      elementwise_affine=module.elementwise_affine, device="meta")
        new.weight = module.weight
    new.train(module.training)
    return new


def convert_model(module: nn.Module, layernorm: bool = False) -> nn.Module:
    """Return `module` with every torch.nn.BatchNorm1d/2d/3d replaced by the
    torch_bnext equivalent (parameters, buffers, train/eval mode, device and
    dtype preserved), in the manner of nn.SyncBatchNorm.convert_sync_batchnorm.
    With layernorm=True, torch.nn.LayerNorm and torch.nn.RMSNorm are replaced
    too. Layers that are already torch_bnext ones are left as they are."""
    cls = _BATCH_NORM.get(type(module))
    if cls is not None:
        out = _swap_batch_norm(module, cls)
    elif layernorm and type(module) in (nn.LayerNorm, nn.RMSNorm):
        out = _swap_row_norm(module)
    else:
        out = module
    for name, child in module.named_children():
        new_child = convert_model(child, layernorm)
        if new_child is not child:
            out.add_module(name, new_child)
    return out
