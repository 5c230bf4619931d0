"""Layers that reproduce the semantics of norm classes from model zoos
(transformers, torchvision, timm) that torch.nn has no class for. What each
stands in for, and how exactly, is in torch_bnext/zoo.py."""

from typing import Optional

import torch
from torch import Tensor, nn

from ..functional.batch_norm import batch_norm
from ..functional.layer_norm import rms_norm
from ..functional.sync_batch_norm import world_of
from .batch_norm_act import fused_spec_of, normalise_act
from .batch_renorm import BatchRenorm2d
from .layer_norm import LayerNorm, LayerNorm2d, RMSNorm, RMSNorm2d
from .sync_batch_norm import SyncBatchNorm, SyncBatchRenorm

_HALF = (torch.float16, torch.bfloat16)


class CastingRMSNorm(nn.Module):
    """RMSNorm over the last dimension with the dtype rules of a transformers
    RMSNorm class (statistics always in float32):

    - ``"llama"`` (LlamaRMSNorm, MistralRMSNorm, Qwen2/Qwen3RMSNorm, ...):
      normalise in float32, cast to the input dtype, then multiply by the
      weight (the result has the promoted dtype of input and weight);
    - ``"gemma"`` (GemmaRMSNorm, ...): ``(normalised * (1 + weight)).type_as(x)``
      in float32, one rounding at the end;
    - ``"t5"`` (T5LayerNorm): normalise in float32, cast to the weight's dtype
      when it is half or bfloat16, then multiply by the weight.

    ``weight`` is the converted layer's very Parameter; the epsilon is kept
    under the original attribute name too (``variance_epsilon`` or ``eps``)."""

    def __init__(self, weight: nn.Parameter, eps: float, style: str, eps_attr: str = "eps"):
        super().__init__()
        if style not in ("llama", "gemma", "t5"):
            raise ValueError(f"unknown style {style!r}; expected 'llama', 'gemma' or 't5'")
        self.weight = weight
        self.eps = float(eps)
        self.style = style
        self.eps_attr = eps_attr
        if eps_attr != "eps":
            setattr(self, eps_attr, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        w, shape = self.weight, self.weight.shape
        if self.style == "gemma":
            return rms_norm(x, shape, 1.0 + w.float(), self.eps)
        if x.dtype == w.dtype == torch.float32:
            # No cast on the way: the fused kernel computes exactly this.
            return rms_norm(x, shape, w, self.eps)
        if self.style == "llama":
            return w * rms_norm(x, shape, None, self.eps)
        # t5: the float32 result is cast to a half weight's dtype, else kept.
        if w.dtype in _HALF:
            return w * rms_norm(x, shape, None, self.eps).to(w.dtype)
        return w * rms_norm(x.float(), shape, None, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, style={self.style!r}"


class FrozenBatchNorm2d(nn.Module):
    """Batch Norm with fixed statistics and affine parameters, all buffers, as
    torchvision.ops.FrozenBatchNorm2d (detection backbones): always the eval
    computation, in training mode too; no num_batches_tracked. As there, the
    result has the promoted dtype of input and buffers (bfloat16 activations
    with float32 buffers give float32)."""

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, self.weight.dtype))
        return batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # As torchvision's and timm's: a Batch Norm checkpoint (frozen for
        # fine-tuning) loads strictly, its step count dropped.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _ThenAct:
    """The norm's result goes through ``drop`` then ``act``, as in timm's
    norm + activation layers (timm.layers.norm_act). Converted from one of
    those, they are timm's very modules, so any activation (one with
    parameters too) and any drop layer behave as there; both default to
    nn.Identity, which is also what timm's ``apply_act=False`` holds."""

    def __init__(
        self, *args, drop: Optional[nn.Module] = None, act: Optional[nn.Module] = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        # In timm's order: the state_dict keys of an act with parameters (PReLU)
        # come in the same order.
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class LayerNormAct(_ThenAct, LayerNorm):
    """torch_bnext.LayerNorm, then ``drop`` and ``act``: timm's LayerNormAct."""


class LayerNormAct2d(_ThenAct, LayerNorm2d):
    """torch_bnext.LayerNorm2d (over dim 1 of NCHW), then ``drop`` and ``act``:
    timm's LayerNormAct2d."""


class RMSNormAct(_ThenAct, RMSNorm):
    """torch_bnext.RMSNorm, then ``drop`` and ``act``: timm's RmsNormAct."""


class RMSNormAct2d(_ThenAct, RMSNorm2d):
    """torch_bnext.RMSNorm2d (over dim 1 of NCHW), then ``drop`` and ``act``:
    timm's RmsNormAct2d."""


# timm's Batch Norm + activation layers converted to Batch Renorm or
# synchronised Batch Norm: our Batch Norm kernel, then timm's act module
# (unfused). The plain Batch Norm form is fused: modules/batch_norm_act.py.


class BatchRenormAct2d(_ThenAct, BatchRenorm2d):
    """torch_bnext.BatchRenorm2d, then ``drop`` and ``act``: what
    convert_model(norm="batchrenorm") makes of timm's BatchNormAct2d."""


class SyncBatchNormAct(_ThenAct, SyncBatchNorm):
    """torch_bnext.SyncBatchNorm, then ``drop`` and ``act``: timm's
    SyncBatchNormAct (what timm.layers.convert_sync_batchnorm makes of a
    BatchNormAct2d), and what convert_model(sync=True) makes of a BatchNormAct2d.
    An activation the kernels fuse (and no drop layer) runs in the
    normalisation's elementwise pass, over the process group or not."""

    def forward(self, x: Tensor) -> Tensor:
        spec = fused_spec_of(self.drop, self.act)
        if spec is None:
            return super().forward(x)
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        world = world_of(self.process_group) if self.training else None
        if world is None:
            return normalise_act(self, x, *spec)
        return self._sync_step(x, world, *spec)


class SyncBatchRenormAct(_ThenAct, SyncBatchRenorm):
    """torch_bnext.SyncBatchRenorm, then ``drop`` and ``act``."""


class FrozenBatchNormAct2d(_ThenAct, FrozenBatchNorm2d):
    """FrozenBatchNorm2d (above), then ``drop`` and ``act``: timm's
    FrozenBatchNormAct2d (what timm.layers.freeze_batch_norm_2d makes of a
    BatchNormAct2d)."""
