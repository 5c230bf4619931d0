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
