"""Swapping torch.nn normalisation layers for torch_bnext ones in a model."""

from torch import nn

from . import zoo
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
from .modules.batch_norm_act import _BatchNormAct
from .modules.batch_renorm import _BatchRenorm

# A layer converted from a zoo's class keeps that module here (a plain
# attribute: no state_dict key, not a child) for revert_model.
_ORIGINAL = "_bnext_original"

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


# Built on "meta" and handed the very Parameter objects, as for Batch Norm; the
# zoos' LayerNorm and RMSNorm classes convert the same way.
_ROW_NORM = {nn.LayerNorm: zoo._layer_norm(LayerNorm), nn.RMSNorm: zoo._rms_norm(RMSNorm)}


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


def _zoo_target(module: nn.Module, norm: str, layernorm: bool, sync: bool):
    """(the registry's entry, our class) that converts `module` under these
    options, or None."""
    entry = zoo.lookup(module)
    if entry is None or entry.refuse(module) is not None:
        return None
    if entry.targets:
        cls = entry.targets.get((norm, sync))
    else:
        wanted = layernorm if entry.kind == "row" else norm == "batchnorm"
        cls = entry.ours if wanted else None
    return None if cls is None else (entry, cls)


def _zoo_batch_norm(module: nn.Module, cls, kwargs, process_group) -> nn.Module:
    """A zoo's subclass of torch's Batch Norm, converted as torch's is, then
    handed its own child modules (timm's drop and act)."""
    if issubclass(cls, (SyncBatchNorm, SyncBatchRenorm)):
        group = process_group
        if group is None:
            group = getattr(module, "process_group", None)
        kwargs = {**kwargs, "process_group": group}
    out = _swap_batch_norm(module, cls, kwargs)
    for name, child in module.named_children():
        out.add_module(name, child)
    return out


def convert_model(
    module: nn.Module,
    norm: str = "batchnorm",
    layernorm: bool = False,
    sync: bool = False,
    process_group=None,
    *,
    in_place: bool = False,
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
    by torch_bnext.LayerNorm and RMSNorm too, and so are the zoos' LayerNorm
    and RMSNorm classes that torch_bnext.zoo.REGISTRY lists (timm's LayerNorm,
    LayerNorm2d, RmsNorm, RmsNorm2d and their norm + activation forms
    LayerNormAct, LayerNormAct2d, RmsNormAct, RmsNormAct2d; torchvision's
    LayerNorm2d; transformers' Llama, Mistral, Qwen, Phi-3, Gemma and T5
    RMSNorms), each by a layer of the same semantics; an instance in a
    configuration not reproduced (timm's fast_norm) is left alone.
    torchvision's FrozenBatchNorm2d and timm's FrozenBatchNormAct2d convert
    with norm="batchnorm"; timm's BatchNormAct2d and SyncBatchNormAct follow
    `norm`, `sync`, `process_group` and `kwargs` as torch's Batch Norm does
    (our Batch Norm or Batch Renorm, synchronised or not, then timm's own drop
    and act modules).
    conversion_report(model) lists what was converted and what was left, and
    why.
    With sync=True the Batch Norm layers become torch_bnext.SyncBatchNorm
    (norm="batchrenorm": SyncBatchRenorm) on `process_group` (None: the
    default group); torch's nn.SyncBatchNorm layers become ours in any case,
    keeping their process group unless one is given.
    Layers that are already of the target kind are left as they are.
    Lazy Batch Norm layers convert once initialised (ValueError before).
    With in_place=True every converted Batch Norm + activation layer whose
    activation is invertible (identity, leaky_relu with a positive slope, elu)
    runs In-Place ABN: its output overwrites its input, and backward needs only
    the output (one feature map kept instead of two). As with any in-place
    operation the model must not use a layer's input after the layer: autograd
    raises if that input was saved for backward, but a forward that reads it
    again would read the output."""
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
    elif layernorm and type(module) in _ROW_NORM:
        out = _ROW_NORM[type(module)](module)
    elif (found := _zoo_target(module, norm, layernorm, sync)) is not None:
        entry, target = found
        if entry.targets:
            out = _zoo_batch_norm(module, target, kwargs, process_group)
        else:
            out = entry.convert(module)
        object.__setattr__(out, _ORIGINAL, module)
    else:
        out = module
    if in_place and isinstance(out, _BatchNormAct) and out.in_place_possible():
        out.set_in_place(True)
    for name, child in module.named_children():
        new_child = convert_model(
            child, norm, layernorm, sync, process_group, in_place=in_place, **kwargs
        )
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


# _ROW_NORM's inverse, built alike.
_REVERT_ROW_NORM = {LayerNorm: zoo._layer_norm(nn.LayerNorm), RMSNorm: zoo._rms_norm(nn.RMSNorm)}


def _revert_to_original(module: nn.Module) -> nn.Module:
    """The zoo's module that was converted, holding our layer's current
    Parameter, buffer and child module objects (a .to() may have replaced
    buffers; timm's activation is a child) and mode."""
    original = getattr(module, _ORIGINAL)
    # Settings that convert_model's kwargs or process_group, or the user since,
    # may have changed on ours.
    for name in ("eps", "momentum", "process_group"):
        if name in vars(original) and hasattr(module, name):
            setattr(original, name, getattr(module, name))
    for slots, ours in (
        (original._parameters, module._parameters),
        (original._buffers, module._buffers),
        (original._modules, module._modules),
    ):
        for name in slots:
            slots[name] = ours.get(name, slots[name])
    original.train(module.training)
    return original


def revert_model(module: nn.Module) -> nn.Module:
    """The inverse of convert_model: return `module` with every torch_bnext
    layer replaced by the torch.nn layer it stands in for, in place on the
    children (the root is returned replaced if it is ours):

    BatchNorm1d/2d/3d -> nn.BatchNorm1d/2d/3d; BatchRenorm1d/2d/3d ->
    nn.BatchNorm1d/2d/3d with the same buffers and momentum (exactly its eval
    computation; in training torch's layer is Batch Norm, without r and d);
    SyncBatchNorm and SyncBatchRenorm -> nn.SyncBatchNorm (process_group
    kept; the same caveat for Renorm); LayerNorm -> nn.LayerNorm; RMSNorm ->
    nn.RMSNorm; a layer converted from a zoo's class -> that class.

    The very Parameter and buffer objects are kept (optimisers, tied weights
    and the state_dict keys are unchanged), as are train/eval mode, device and
    dtype. Useful to hand a trained model to tools that know only torch's
    layers, or to a deployment without torch_bnext's operators."""
    cls = _REVERT_BATCH_NORM.get(type(module))
    if hasattr(module, _ORIGINAL):
        out = _revert_to_original(module)
    elif cls is not None:
        out = _revert_batch_norm(module, cls)
    elif type(module) in _REVERT_ROW_NORM:
        out = _REVERT_ROW_NORM[type(module)](module)
    else:
        out = module
    for name, child in module.named_children():
        new_child = revert_model(child)
        if new_child is not child:
            out.add_module(name, new_child)
    return out


# torch.nn's norms with no torch_bnext counterpart, and why.
_NO_KERNEL = (
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_TORCH_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
_TORCH_CONVERTIBLE = {
    nn.BatchNorm1d: "convert_model converts it",
    nn.BatchNorm2d: "convert_model converts it",
    nn.BatchNorm3d: "convert_model converts it",
    nn.SyncBatchNorm: "convert_model converts it",
    nn.LayerNorm: "convert_model(..., layernorm=True) converts it",
    nn.RMSNorm: "convert_model(..., layernorm=True) converts it",
}


class ConversionReport(list):
    """Rows of (class, converted, left, note), one per norm class met in the
    model, as conversion_report returns them; str() is a table."""

    def __str__(self) -> str:
        header = ("class", "converted", "left", "note")
        rows = [header] + [(c, str(n), str(k), note) for c, n, k, note in self]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows
        )


def _norm_like(module: nn.Module) -> bool:
    # A leaf: blocks named after their norm (Conv2dNormActivation) are not one.
    return "norm" in type(module).__name__.lower() and next(module.children(), None) is None


_TORCH_SOURCE = {
    **_REVERT_BATCH_NORM,
    LayerNorm: nn.LayerNorm,
    RMSNorm: nn.RMSNorm,
}
# Every layer class of ours, which the report counts as converted.
_OURS = tuple(
    {
        *_TORCH_SOURCE,
        *(entry.ours for entry in zoo.REGISTRY.values()),
        *(cls for entry in zoo.REGISTRY.values() for cls in entry.targets.values()),
    }
)


def conversion_report(model: nn.Module) -> ConversionReport:
    """What convert_model did to `model` (or would leave): one row per norm
    class found, counting layers converted to torch_bnext and layers left, with
    the reason they were left. A class is reported by the name of the class
    the model held before conversion. "Norm-like" means a class whose name
    contains "norm": such a layer unknown to torch_bnext.zoo.REGISTRY is left
    alone, since its semantics are not verified."""
    counts: dict[str, list] = {}

    def count(name: str, converted: bool, note: str) -> None:
        row = counts.setdefault(name, [0, 0, note])
        row[0 if converted else 1] += 1
        if converted and not row[1]:
            row[2] = note
        elif not converted:
            row[2] = note

    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            original = type(getattr(module, _ORIGINAL))
            count(zoo.qualified_name(original), True, f"-> torch_bnext.{type(module).__name__}")
        elif isinstance(module, _OURS):
            ours = f"torch_bnext.{type(module).__name__}"
            source = _TORCH_SOURCE.get(type(module))
            if source is None:
                count(ours, True, "built as torch_bnext's")
            else:
                count(f"torch.nn.{source.__name__}", True, f"-> {ours}")
        elif (entry := zoo.lookup(module)) is not None:
            how = "layernorm=True" if entry.kind == "row" else "norm='batchnorm'"
            note = entry.refuse(module) or f"known: convert with {how}"
            count(zoo.qualified_name(type(module)), False, note)
        elif type(module) in _TORCH_CONVERTIBLE:
            count(f"torch.nn.{type(module).__name__}", False, _TORCH_CONVERTIBLE[type(module)])
        elif type(module).__module__.startswith("torch.nn.") and isinstance(module, _NO_KERNEL):
            count(f"torch.nn.{type(module).__name__}", False, "no torch_bnext kernel for it")
        elif isinstance(module, _TORCH_NORMS) and not type(module).__module__.startswith("torch."):
            base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn."))
            note = f"a subclass of torch.nn.{base.__name__}: its forward may differ, left alone"
            count(zoo.qualified_name(type(module)), False, note)
        elif _norm_like(module):
            count(
                zoo.qualified_name(type(module)),
                False,
                "not in torch_bnext.zoo.REGISTRY: semantics not verified, left alone",
            )
    return ConversionReport(sorted((name, *row) for name, row in counts.items()))
