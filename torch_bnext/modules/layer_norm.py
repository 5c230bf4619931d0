from torch import Tensor, nn

from ..functional.layer_norm import layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm: constructor, parameters, state_dict keys
    and reset_parameters are inherited; only the computation is ours."""

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm (subclass, forward only)."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels (dim 1) of (N, C, H, W) input, as timm's and
    torchvision's LayerNorm2d (ConvNeXt): ``LayerNorm2d(C)`` normalises each
    pixel's C values. Parameters and state_dict keys are nn.LayerNorm's.

    On channels_last input the channels are contiguous and the row kernel
    reads them in place; on NCHW input the permuted view is gathered first (as
    the zoos' permute -> layer_norm -> permute does)."""

    def forward(self, input: Tensor) -> Tensor:
        x = input.permute(0, 2, 3, 1)
        y = layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class RMSNorm2d(nn.RMSNorm):
    """RMSNorm over the channels (dim 1) of (N, C, H, W) input, as timm's
    RmsNorm2d. Parameters and state_dict keys are nn.RMSNorm's. A weight of
    another dtype than the input's multiplies last, as in timm (the result has
    their promoted dtype)."""

    def forward(self, input: Tensor) -> Tensor:
        x, w = input.permute(0, 2, 3, 1), self.weight
        if w is not None and w.dtype != input.dtype:
            return (rms_norm(x, self.normalized_shape, None, self.eps) * w).permute(0, 3, 1, 2)
        return rms_norm(x, self.normalized_shape, w, self.eps).permute(0, 3, 1, 2)
