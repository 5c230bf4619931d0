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
from typing import Callable

from torch import nn

from .modules import LayerNorm, RMSNorm
from .modules.layer_norm import LayerNorm2d, RMSNorm2d
from .modules.zoo import CastingRMSNorm, FrozenBatchNorm2d


@dataclasses.dataclass(frozen=True)
class ZooNorm:
    """One known class: what it computes, and how to build ours from it."""

    kind: str  # "row" (converted with layernorm=True) or "batch" (with norm="batchnorm")
    semantics: str
    convert: Callable[[nn.Module], nn.Module]


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
        new = cls(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine)
        new.to("meta")
        return _shared_affine(new, m)

    return convert


def _casting_rms_norm(style: str, eps_attr: str):
    def convert(m):
        new = CastingRMSNorm(m.weight, getattr(m, eps_attr), style, eps_attr)
        new.train(m.training)
        return new

    return convert


def _frozen_batch_norm(m):
    new = FrozenBatchNorm2d(m.weight.shape[0], eps=m.eps, device="meta")
    for name in ("weight", "bias", "running_mean", "running_var"):
        setattr(new, name, getattr(m, name))
    new.train(m.training)
    return new


_TIMM_LN = "timm.layers.norm.LayerNorm: nn.LayerNorm's computation (its fast_norm option off)"
_LN2D = "LayerNorm over dim 1 of NCHW: permute -> F.layer_norm -> permute"
_TIMM_RMS = (
    "x * rsqrt(mean(x^2) + eps) * weight computed in the input dtype; ours accumulates in "
    "float32 and rounds once (equal in float32, closer to exact in bfloat16)"
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
    "timm.layers.norm.LayerNorm": ZooNorm("row", _TIMM_LN, _layer_norm(LayerNorm)),
    "timm.layers.norm.LayerNorm2d": ZooNorm("row", _LN2D, _layer_norm(LayerNorm2d)),
    "timm.layers.norm.RmsNorm": ZooNorm("row", _TIMM_RMS, _rms_norm(RMSNorm)),
    "timm.layers.norm.RmsNorm2d": ZooNorm("row", _TIMM_RMS + ", over dim 1", _rms_norm(RMSNorm2d)),
    "torchvision.models.convnext.LayerNorm2d": ZooNorm("row", _LN2D, _layer_norm(LayerNorm2d)),
    "torchvision.ops.misc.FrozenBatchNorm2d": ZooNorm(
        "batch",
        "x * (w * rsqrt(running_var + eps)) + (b - running_mean * scale); all buffers, "
        "train or eval",
        _frozen_batch_norm,
    ),
    **{_transformers(m, c): ZooNorm("row", _LLAMA, _llama) for m, c in _LLAMA_LIKE.items()},
    **{_transformers(m, c): ZooNorm("row", _GEMMA, _gemma) for m, c in _GEMMA_LIKE.items()},
    **{_transformers(m, c): ZooNorm("row", _T5, _t5) for m, c in _T5_LIKE.items()},
}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def lookup(module: nn.Module):
    """The registry's entry for the module's exact class, or None."""
    return REGISTRY.get(qualified_name(type(module)))
