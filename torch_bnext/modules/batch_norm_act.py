"""Batch Norm fused with its activation: timm's BatchNormAct layers (same
constructor, attributes and state_dict keys) and mapillary/inplace_abn's
InPlaceABN / InPlaceABNSync API, on the batch_norm_act kernels."""

import warnings
from typing import Any, Optional

from torch import Tensor, nn

from ..functional.batch_norm_act import (
    ACTIVATIONS,
    activation_param_or_default,
    batch_norm_act,
    invertible,
)
from ..functional.sync_batch_norm import check_sync_input, sync_batch_norm_training, world_of

Spec = tuple[str, float]

# Activation modules the kernels compute, by exact class: torch.nn's, and
# timm's own classes for the same functions (timm.layers.activations and its
# memory-efficient variants), matched by name so timm stays optional.
_TORCH_ACTS = {
    nn.Identity: lambda m: ("identity", 0.0),
    nn.ReLU: lambda m: ("relu", 0.0),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope)),
    nn.ELU: lambda m: ("elu", float(m.alpha)),
    nn.SiLU: lambda m: ("silu", 0.0),
    nn.GELU: lambda m: ("gelu_tanh" if m.approximate == "tanh" else "gelu", 0.0),
    nn.Hardswish: lambda m: ("hardswish", 0.0),
    nn.ReLU6: lambda m: ("relu6", 0.0),
}
_TIMM_ACTS = {
    "GELU": ("gelu", 0.0),
    "GELUTanh": ("gelu_tanh", 0.0),
    "Swish": ("silu", 0.0),
    "SwishMe": ("silu", 0.0),
    "HardSwish": ("hardswish", 0.0),
    "HardSwishMe": ("hardswish", 0.0),
}
# Names for act_layer given as a string (timm's names where they differ).
_ACT_CLASSES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "hardswish": nn.Hardswish,
    "hard_swish": nn.Hardswish,
    "relu6": nn.ReLU6,
}


def fused_activation(act: nn.Module) -> Optional[Spec]:
    """(name, parameter) of the kernels' activation that computes ``act``,
    or None when they have none (the layer then calls the module)."""
    rule = _TORCH_ACTS.get(type(act))
    if rule is not None:
        return rule(act)
    if type(act).__module__.startswith("timm."):
        return _TIMM_ACTS.get(type(act).__name__)
    return None


_warned: set = set()  # activation classes already warned about


def _warn_unfused(act: nn.Module) -> None:
    key = type(act)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"torch_bnext: {type(act).__module__}.{type(act).__qualname__} has no fused kernel "
            f"(fused: {', '.join(ACTIVATIONS)}); these layers call it after the Batch Norm "
            "kernel (correct, unfused)",
            stacklevel=3,
        )


def create_act(
    act_layer: Any,
    act_kwargs: Optional[dict[str, Any]] = None,
    inplace: bool = True,
    apply_act: bool = True,
) -> nn.Module:
    """The activation module as timm's norm + act layers build it: a class, a
    name, or (with timm installed) anything timm.layers.create_act_layer takes;
    nn.Identity when ``apply_act`` is False or ``act_layer`` is None."""
    if not apply_act or act_layer is None:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    if isinstance(act_layer, nn.Module):
        return act_layer
    if isinstance(act_layer, str):
        name = act_layer
        if name == "gelu_tanh":
            return nn.GELU(approximate="tanh")
        if name in _ACT_CLASSES:
            act_layer = _ACT_CLASSES[name]
        else:
            try:
                from timm.layers import create_act_layer
            except ImportError:
                raise ValueError(
                    f"unknown act_layer {name!r}; expected a module class or one of "
                    f"{', '.join(sorted(_ACT_CLASSES))}, gelu_tanh (timm knows more names)"
                ) from None
            kwargs.setdefault("inplace", inplace)
            return create_act_layer(name, **kwargs)
    # Only the activations that take it get `inplace` (as timm's create_act_layer).
    try:
        return act_layer(inplace=inplace, **kwargs)
    except TypeError:
        return act_layer(**kwargs)


def fused_spec_of(drop: nn.Module, act: nn.Module) -> Optional[Spec]:
    """The fused activation of a norm + drop + act layer, or None when the
    kernels cannot compute it (an activation they lack, or a drop layer,
    which sits between the norm and the activation)."""
    return fused_activation(act) if isinstance(drop, nn.Identity) else None


def normalise_act(
    bn: nn.modules.batchnorm._BatchNorm,
    input: Tensor,
    activation: str,
    param: float,
    residual: Optional[Tensor] = None,
    in_place: bool = False,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """act(bn(input) + residual) with the buffers, mode and settings of a
    torch Batch Norm module `bn` (its weight unless `weight` is given), as
    nn.BatchNorm's forward uses them."""
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    tracked = bn.training and bn.track_running_stats and bn.running_mean is not None
    running = tracked or not batch_stats  # updated, or normalised with
    return batch_norm_act(
        input,
        bn.running_mean if running else None,
        bn.running_var if running else None,
        bn.weight if weight is None else weight,
        bn.bias,
        batch_stats,
        bn.momentum,
        bn.eps,
        activation,
        param,
        residual,
        in_place,
        bn.num_batches_tracked if tracked else None,
    )


class _BatchNormAct(nn.modules.batchnorm._BatchNorm):
    """Batch Norm + activation in one kernel pass (see BatchNormAct2d)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        act_kwargs: Optional[dict[str, Any]] = None,
        inplace: bool = True,
        drop_layer: Optional[type] = None,
        device=None,
        dtype=None,
        in_place: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = create_act(act_layer, act_kwargs, inplace, apply_act)
        self.in_place = False
        self.set_in_place(in_place)

    def in_place_possible(self) -> bool:
        """Whether set_in_place(True) would be accepted."""
        spec = self._fused_spec()
        return spec is not None and invertible(*spec)

    def set_in_place(self, in_place: bool) -> None:
        """In-Place ABN mode: the output overwrites the input and backward
        recomputes what it needs from the output (one feature map kept instead
        of two). Needs an invertible fused activation (identity, leaky_relu
        with a positive slope, elu) and no drop layer: ValueError otherwise."""
        if in_place and not self.in_place_possible():
            raise ValueError(
                f"in_place=True needs an invertible fused activation (identity, leaky_relu "
                f"with negative_slope > 0, elu with alpha > 0) and no drop layer; this layer "
                f"has act={self.act!r}, drop={self.drop!r}"
            )
        self.in_place = bool(in_place)

    def _fused_spec(self) -> Optional[Spec]:
        return fused_spec_of(self.drop, self.act)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``act(drop(bn(input)) + residual)``: timm's BatchNormAct2d with an
        optional residual added before the activation."""
        self._check_input_dim(input)
        spec = self._fused_spec()
        if spec is None:
            _warn_unfused(self.act if isinstance(self.drop, nn.Identity) else self.drop)
            y = self.drop(normalise_act(self, input, "identity", 0.0))
            return self.act(y if residual is None else y + residual)
        return normalise_act(self, input, *spec, residual, self.in_place)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", in_place=True" if self.in_place else "")


class BatchNormAct1d(_BatchNormAct):
    """BatchNormAct2d for (N, C) and (N, C, L) input."""

    def _check_input_dim(self, input):
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNormAct2d(_BatchNormAct):
    """Batch Norm + activation with timm.layers.BatchNormAct2d's constructor,
    attributes (``drop``, ``act``) and state_dict keys, in one kernel pass.

    ``act`` is built as timm builds it (``act_layer``: a class such as nn.SiLU,
    a name such as "silu", or with timm installed any name timm knows;
    ``act_kwargs``, ``inplace``, ``apply_act``). The kernels fuse identity,
    relu, leaky_relu, elu, silu, gelu (erf and tanh), hardswish and relu6,
    from torch.nn's modules or timm's own classes: the activation is applied
    as the normalisation's output is written, and its derivative in backward
    is recomputed from the input, so the layer keeps one tensor for backward
    where BN + activation keep two. Any other activation, or a drop layer,
    runs unfused after our Batch Norm (with a warning, once per class).

    ``forward(input, residual=None)`` adds ``residual`` before the
    activation (ResNet's ``relu(bn(x) + identity)``, see torch_bnext.fuse).
    ``in_place=True`` (or set_in_place) is In-Place ABN mode."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNormAct3d(_BatchNormAct):
    """BatchNormAct2d for (N, C, D, H, W) input."""

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class InPlaceABN(nn.modules.batchnorm._BatchNorm):
    """In-Place Activated Batch Norm with mapillary/inplace_abn's API
    (``InPlaceABN(num_features, eps, momentum, affine, track_running_stats,
    activation, activation_param)``, same buffers and state_dict keys), so its
    users can switch: ``act(xhat * (|weight| + eps) + bias)`` written over the
    input, which is returned. As there, the effective weight ``|weight| + eps``
    keeps the normalised input recoverable from the output (backward needs
    only the output). Activations: identity, leaky_relu, elu (invertible), on
    any input of 2 or more dimensions."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        if not invertible(activation, activation_param):
            raise ValueError(
                f"InPlaceABN needs an invertible activation (identity, leaky_relu with "
                f"activation_param > 0, elu with activation_param > 0); got {activation!r} with "
                f"activation_param={activation_param}"
            )
        self.activation = activation
        self.activation_param = activation_param

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected 2D or higher input (got {input.dim()}D input)")

    def _weight(self) -> Optional[Tensor]:
        return None if self.weight is None else self.weight.abs() + self.eps

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return normalise_act(
            self, input, self.activation, self.activation_param, None, True, self._weight()
        )

    def extra_repr(self) -> str:
        rep = super().extra_repr() + f", activation={self.activation}"
        if self.activation in ("leaky_relu", "elu"):
            rep += f"[{self.activation_param}]"
        return rep


class InPlaceABNSync(InPlaceABN):
    """InPlaceABN whose batch statistics are those of every process of
    ``group`` (inplace_abn's InPlaceABNSync API, ``set_group``). In training
    over more than one process the step is SyncBatchNorm's (one all-gather of
    the statistics, one all-reduce of the backward sums) with the activation
    fused, but out of place for now: the output is a new tensor, so the
    memory saving of in-place mode is not had there. Otherwise (eval, one
    process, torch.distributed not initialised) it is InPlaceABN."""

    def __init__(self, *args, group: Optional[Any] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def set_group(self, group: Optional[Any]) -> None:
        self.group = group

    def forward(self, input: Tensor) -> Tensor:
        world = world_of(self.group) if self.training else None
        if world is None:
            return super().forward(input)
        self._check_input_dim(input)
        check_sync_input(input, self.num_features, self.weight, self.running_mean)
        tracked = self.track_running_stats and self.running_mean is not None
        return sync_batch_norm_training(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self._weight(),
            self.bias,
            self.momentum,
            self.eps,
            self.num_batches_tracked if tracked else None,
            world,
            activation=self.activation,
            activation_param=activation_param_or_default(self.activation, self.activation_param),
        )
