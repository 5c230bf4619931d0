from torch import Tensor, nn

from ..functional.layer_norm import layer_norm, layer_norm_2d, rms_norm, rms_norm_2d


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

    Our kernels normalise over dim 1 in place of permuting: NCHW input is read
    as C strided planes, channels_last input as rows of contiguous channels;
    the output keeps the input's layout."""

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm_2d(input, self.weight, self.bias, self.eps)


class RMSNorm2d(nn.RMSNorm):
    """RMSNorm over the channels (dim 1) of (N, C, H, W) input, as timm's
    RmsNorm2d. Parameters and state_dict keys are nn.RMSNorm's. A weight of
    another dtype than the input's multiplies last, as in timm (the result has
    their promoted dtype)."""

    def forward(self, input: Tensor) -> Tensor:
        w = self.weight
        if w is not None and w.dtype != input.dtype:
            return rms_norm_2d(input, None, self.eps) * w.view(-1, *([1] * (input.dim() - 2)))
        return rms_norm_2d(input, w, self.eps)
