"""The norm classes of model zoos that convert_model knows, each with the
semantics torch_bnext reproduces for it.

A class is recognised by its qualified name (``module.QualName``), so nothing
from timm, torchvision or transformers is imported here: a model that holds
one of their classes has imported it already. A class not listed is left
alone, however much it looks like a norm (a subclass too: its forward may
differ). tests/test_zoo.py holds each entry to the zoo's own class, on random
inputs in float32 and bfloat16, and converts whole models from the zoos.
"""

import dataclasses
from typing import Callable, Optional

from torch import nn

from .modules import LayerNorm, RMSNorm
from .modules.batch_norm_act import BatchNormAct2d
from .modules.layer_norm import LayerNorm2d, RMSNorm2d
from .modules.zoo import (
    BatchRenormAct2d,
    CastingRMSNorm,
    FrozenBatchNorm2d,
    FrozenBatchNormAct2d,
    LayerNormAct,
    LayerNormAct2d,
    RMSNormAct,
    RMSNormAct2d,
    SyncBatchNormAct,
    SyncBatchRenormAct,
)


def _never_refused(m: nn.Module) -> Optional[str]:
    return None


@dataclasses.dataclass(frozen=True)
class ZooNorm:
    """One known class: what it computes, our class that reproduces it, how
    to build that from an instance, and which instances it cannot reproduce."""

    kind: str  # "row" (converted with layernorm=True) or "batch" (with norm="batchnorm")
    semantics: str
    ours: type
    # Builds `ours` from an instance; None where `targets` is given.
    convert: Optional[Callable[[nn.Module], nn.Module]] = None
    # Why this instance is left alone (a configuration not reproduced), or None.
    refuse: Callable[[nn.Module], Optional[str]] = _never_refused
    # For a subclass of torch's Batch Norm (timm's BatchNormAct2d): our class
    # for each (norm, sync) of convert_model, which builds it as it builds ours
    # from torch's Batch Norm (eps, momentum, affine, track_running_stats, its
    # kwargs, the process group) and hands it the zoo layer's own child
    # modules; `ours` is the one for ("batchnorm", False). A pair not listed
    # leaves the layer alone.
    targets: dict[tuple[str, bool], type] = dataclasses.field(default_factory=dict)


def _shared_affine(new: nn.Module, old: nn.Module) -> nn.Module:
    # The very Parameter objects: optimisers and tied weights keep working.
    new.weight = old.weight
    if hasattr(new, "bias"):
        new.bias = old.bias
    new.train(old.training)
    return new


def _layer_norm(cls):
    def convert(m):
        new = cls(
            m.normalized_shape,
            eps=m.eps,
            elementwise_affine=m.elementwise_affine,
            bias=m.bias is not None or not m.elementwise_affine,
            device="meta",
        )
        return _shared_affine(new, m)

    return convert


def _rms_norm(cls):
    def convert(m):
        new = cls(
            m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, device="meta"
        )
        return _shared_affine(new, m)

    return convert


def _then_act(convert):
    """`convert`, handing over timm's drop and act modules themselves: any
    activation (and apply_act=False, timm's nn.Identity act) behaves as there."""

    def convert_with_act(m):
        new = convert(m)
        new.drop, new.act = m.drop, m.act
        return new

    return convert_with_act


def _timm_fast_norm(m: nn.Module) -> Optional[str]:
    if getattr(m, "_fast_norm", False):
        return (
            "timm's fast_norm is on (timm.layers.set_fast_norm): it normalises in the autocast "
            "dtype or with apex's kernels, which torch_bnext does not reproduce"
        )
    return None


def _casting_rms_norm(style: str, eps_attr: str):
    def convert(m):
        new = CastingRMSNorm(m.weight, getattr(m, eps_attr), style, eps_attr)
        new.train(m.training)
        return new

    return convert


def _frozen_batch_norm(cls):
    def convert(m):
        new = cls(m.weight.shape[0], eps=m.eps, device="meta")
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(new, name, getattr(m, name))
        new.train(m.training)
        return new

    return convert


_TIMM_LN = "nn.LayerNorm's computation (F.layer_norm)"
_FROZEN = (
    "x * (w * rsqrt(running_var + eps)) + (b - running_mean * scale); all buffers, train or "
    "eval; the result has the promoted dtype of input and buffers; a checkpoint's "
    "num_batches_tracked is dropped on loading, as there"
)
_BN_ACT = (
    "nn.BatchNorm2d's computation, which timm's forward copies: in training, or in eval without "
    "running statistics (track_running_stats=False), the batch's statistics, else the running "
    "ones; in training with track_running_stats, running_mean/running_var updated with momentum "
    "(None: the cumulative average over num_batches_tracked) and num_batches_tracked counted; "
    "4D input only (timm asserts, ours raises ValueError). Then timm's own drop and act modules, "
    "the very objects: an act the kernels fuse (identity, relu, leaky_relu, elu, silu, gelu, "
    "gelu_tanh, hardswish, relu6, as torch.nn's or timm's class; its inplace flag is moot) is "
    "applied in the normalisation's own pass, in float32 for half/bfloat16 input, and its "
    "derivative recomputed from the input in backward (torch_bnext.BatchNormAct2d); any other act "
    "(or a drop layer) runs as timm's module on our Batch Norm's result; apply_act=False is an "
    "nn.Identity act. With sync=True our SyncBatchNorm instead (timm's convert_sync_batchnorm "
    "makes SyncBatchNormAct of it): see SyncBatchNormAct. "
)
_SYNC_BN_ACT = (
    "nn.SyncBatchNorm's computation (timm's SyncBatchNormAct is nn.SyncBatchNorm, then drop and "
    "act where it has them) by our SyncBatchNorm: in training over a process group of more than "
    "one rank the statistics of all ranks' batches (on the CPU with gloo too, where torch's "
    "refuses), otherwise as BatchNormAct2d; the process group kept unless convert_model is "
    "given one. Then timm's own drop and act modules, the very objects, unfused, as for "
    "BatchNormAct2d; one without them (built directly, not by convert_sync_batchnorm) gets "
    "nn.Identity ones. "
)
_RENORM_ACT = (
    "With norm='batchrenorm' our Batch Renorm instead (BatchRenorm2d, or SyncBatchRenorm), then "
    "the same drop and act: a deliberate replacement, as convert_model makes of nn.BatchNorm2d; "
    "track_running_stats=False raises ValueError there, as for nn.BatchNorm2d"
)
_LN2D = (
    "LayerNorm over dim 1 of NCHW: permute -> F.layer_norm -> permute; ours returns the input's "
    "memory layout, where that leaves NCHW input's result channels_last-strided (equal values; "
    "a dropout after it draws its mask in another order)"
)
_F_RMS = (
    "F.rms_norm: float32 statistics and product, rounded once to the input dtype (a float32 "
    "weight included), as torch 2.14 computes it"
)
_TIMM_RMS2D = (
    "over dim 1 of NCHW, x * rsqrt(mean(x^2) + eps) * weight computed in the input dtype; ours "
    "accumulates in float32 and rounds once (equal in float32, closer to exact in bfloat16); a "
    "weight of another dtype multiplies last, as there (the result has the promoted dtype)"
)
_ACT = (
    "; then timm's own drop and act modules, the very objects: any activation, and "
    "apply_act=False (an nn.Identity act), behave as there"
)
_TIMM = (
    " (eps: eps). timm's fast_norm path (set_fast_norm: the autocast dtype, or apex) is not "
    "reproduced: such a layer is left alone"
)
_LLAMA = (
    "float32 x * rsqrt(mean(x^2) + eps), cast to the input dtype, then weight * it "
    "(eps: variance_epsilon)"
)
_GEMMA = "(float32 normalised * (1 + weight.float())).type_as(x), one rounding (eps: eps)"
_T5 = (
    "float32 statistics; the normalised input is cast to the weight's dtype when that is "
    "half/bfloat16, then weight * it (eps: variance_epsilon)"
)


def _timm(semantics: str, ours: type, build, act: bool = False) -> ZooNorm:
    convert = _then_act(build(ours)) if act else build(ours)
    return ZooNorm("row", semantics + (_ACT if act else "") + _TIMM, ours, convert, _timm_fast_norm)


_llama = _casting_rms_norm("llama", "variance_epsilon")
_gemma = _casting_rms_norm("gemma", "eps")
_t5 = _casting_rms_norm("t5", "variance_epsilon")


def _transformers(model: str, cls: str) -> str:
    return f"transformers.models.{model}.modeling_{model}.{cls}"


# Llama's forward, verbatim, in these (tests/test_zoo.py compares each with ours).
_LLAMA_LIKE = {
    "llama": "LlamaRMSNorm",
    "mistral": "MistralRMSNorm",
    "mixtral": "MixtralRMSNorm",
    "qwen2": "Qwen2RMSNorm",
    "qwen2_moe": "Qwen2MoeRMSNorm",
    "qwen3": "Qwen3RMSNorm",
    "qwen3_moe": "Qwen3MoeRMSNorm",
    "phi3": "Phi3RMSNorm",
}
_GEMMA_LIKE = {"gemma": "GemmaRMSNorm", "gemma2": "Gemma2RMSNorm", "gemma3": "Gemma3RMSNorm"}
_T5_LIKE = {"t5": "T5LayerNorm"}

REGISTRY: dict[str, ZooNorm] = {
    "timm.layers.norm.LayerNorm": _timm(_TIMM_LN, LayerNorm, _layer_norm),
    "timm.layers.norm.LayerNorm2d": _timm(_LN2D, LayerNorm2d, _layer_norm),
    "timm.layers.norm.RmsNorm": _timm(_F_RMS, RMSNorm, _rms_norm),
    "timm.layers.norm.RmsNorm2d": _timm(_TIMM_RMS2D, RMSNorm2d, _rms_norm),
    "timm.layers.norm_act.LayerNormAct": _timm(_TIMM_LN, LayerNormAct, _layer_norm, act=True),
    "timm.layers.norm_act.LayerNormAct2d": _timm(_LN2D, LayerNormAct2d, _layer_norm, act=True),
    "timm.layers.norm_act.RmsNormAct": _timm(_F_RMS, RMSNormAct, _rms_norm, act=True),
    "timm.layers.norm_act.RmsNormAct2d": _timm(_TIMM_RMS2D, RMSNormAct2d, _rms_norm, act=True),
    "torchvision.models.convnext.LayerNorm2d": ZooNorm(
        "row", _LN2D, LayerNorm2d, _layer_norm(LayerNorm2d)
    ),
    "timm.layers.norm_act.BatchNormAct2d": ZooNorm(
        "batch",
        _BN_ACT + _RENORM_ACT,
        BatchNormAct2d,
        targets={
            ("batchnorm", False): BatchNormAct2d,
            ("batchnorm", True): SyncBatchNormAct,
            ("batchrenorm", False): BatchRenormAct2d,
            ("batchrenorm", True): SyncBatchRenormAct,
        },
    ),
    "timm.layers.norm_act.SyncBatchNormAct": ZooNorm(
        "batch",
        _SYNC_BN_ACT + _RENORM_ACT,
        SyncBatchNormAct,
        targets={
            ("batchnorm", False): SyncBatchNormAct,
            ("batchnorm", True): SyncBatchNormAct,
            ("batchrenorm", False): SyncBatchRenormAct,
            ("batchrenorm", True): SyncBatchRenormAct,
        },
    ),
    "timm.layers.norm_act.FrozenBatchNormAct2d": ZooNorm(
        "batch",
        _FROZEN + _ACT,
        FrozenBatchNormAct2d,
        _then_act(_frozen_batch_norm(FrozenBatchNormAct2d)),
    ),
    # timm's too: timm.layers (create_norm, freeze_batch_norm_2d) uses this very class.
    "torchvision.ops.misc.FrozenBatchNorm2d": ZooNorm(
        "batch", _FROZEN, FrozenBatchNorm2d, _frozen_batch_norm(FrozenBatchNorm2d)
    ),
    **{
        _transformers(m, c): ZooNorm("row", _LLAMA, CastingRMSNorm, _llama)
        for m, c in _LLAMA_LIKE.items()
    },
    **{
        _transformers(m, c): ZooNorm("row", _GEMMA, CastingRMSNorm, _gemma)
        for m, c in _GEMMA_LIKE.items()
    },
    **{_transformers(m, c): ZooNorm("row", _T5, CastingRMSNorm, _t5) for m, c in _T5_LIKE.items()},
}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def lookup(module: nn.Module):
    """The registry's entry for the module's exact class, or None."""
    return REGISTRY.get(qualified_name(type(module)))
