"""What the suite measures: one Case per (op, shape, layout, dtype, pass), each
building our callable and PyTorch's native one on the same inputs."""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

PASSES = ("train fwd", "train fwd+bwd", "eval fwd")

# Tensor passes over memory a perfect kernel needs: forward reads x and
# writes y; backward reads dy and x and writes dx.
FLOOR_PASSES = {"train fwd": 2, "train fwd+bwd": 5, "eval fwd": 2}

# ResNet-50 BatchNorm shapes (batch 32 on the CPU, 128 on a GPU) and
# transformer LayerNorm / RMSNorm shapes.
BN_SHAPES = {
    "cpu": [(32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 28, 28), (8, 512, 7, 7), (64, 1024)],
    "cuda": [
        (128, 64, 112, 112),
        (128, 256, 56, 56),
        (128, 1024, 14, 14),
        (128, 2048, 7, 7),
        (8, 512, 7, 7),
        (64, 1024),
    ],
}
# ConvNeXt-T's LayerNorm2d stages (batch 32, and 128 on a GPU).
LN2D_SHAPES = {
    "cpu": [(32, 96, 56, 56), (32, 192, 28, 28), (32, 384, 14, 14), (32, 768, 7, 7)],
    "cuda": [(128, 96, 56, 56), (128, 192, 28, 28), (128, 384, 14, 14), (128, 768, 7, 7)],
}
LN_SHAPES = {
    "cpu": [(8192, 1024), (2048, 4096), (64, 1024)],
    "cuda": [(32768, 1024), (16384, 4096), (65536, 8192), (4096, 12288), (64, 1024)],
}

# The default run (without --full): a representative subset, about 2 minutes
# on 2 CPU cores. Batch Norm: the early large layer, a mid layer and a small
# late one, NCHW and channels_last; Batch Renorm: the large and the small one
# (with its cost over our Batch Norm); LayerNorm/RMSNorm: a large and a small
# row block. Training (forward + backward) and inference (eval forward).
SUBSET_PASSES = ("train fwd+bwd", "eval fwd")
SUBSET_SHAPES = {
    "cpu": {
        "batchnorm": [(32, 64, 56, 56), (32, 256, 14, 14), (8, 512, 7, 7)],
        "batchrenorm": [(32, 64, 56, 56), (8, 512, 7, 7)],
        "layernorm": [(8192, 1024), (64, 1024)],
        "rmsnorm": [(8192, 1024), (64, 1024)],
        "layernorm2d": [(32, 96, 56, 56), (32, 768, 7, 7)],
    },
    "cuda": {
        "batchnorm": [(128, 64, 112, 112), (128, 1024, 14, 14), (8, 512, 7, 7)],
        "batchrenorm": [(128, 64, 112, 112), (8, 512, 7, 7)],
        # The LLM targets (16384 x 4096, 65536 x 8192 in bf16) and a small block.
        "layernorm": [(16384, 4096), (65536, 8192), (64, 1024)],
        "rmsnorm": [(16384, 4096), (65536, 8192), (64, 1024)],
        "layernorm2d": [(128, 96, 56, 56), (128, 768, 7, 7)],
    },
}


@dataclass
class Case:
    """One measurement; inputs and modules are made (make_input, build) only when the
    case runs, so that the suite never holds more than one case's tensors."""

    op: str
    shape: tuple
    layout: str
    dtype: torch.dtype
    pass_: str
    device: str

    @property
    def key(self):
        return (self.op, self.shape, self.layout, str(self.dtype).replace("torch.", ""), self.pass_)

    def make_input(self):
        return _input(self.shape, self.dtype, self.layout, self.device)

    def ours_batch_norm(self, x):
        """Our Batch Norm on x, for the Batch Renorm cases: Renorm's cost over it."""
        ours, _ = _batch_norm_modules(self.shape, self.dtype, self.device)
        return _runner(ours, x, self.pass_)

    def native_without_cudnn(self, x):
        """On CUDA, PyTorch's Batch Norm with cuDNN disabled (ATen's own
        kernels): the baseline is the faster of the two. None elsewhere."""
        if self.device != "cuda" or self.op not in ("batchnorm", "batchrenorm"):
            return None
        _, native = _batch_norm_modules(self.shape, self.dtype, self.device)
        run = _runner(native, x, self.pass_)

        def aten():
            with torch.backends.cudnn.flags(enabled=False):
                return run()

        return aten

    def build(self, x):
        """(ours, native, copy, native module name, bytes of the floor) on x;
        `copy` copies a tensor of x's size into a preallocated one: the
        bandwidth ceiling at this size, caches included."""
        if self.op in ("batchnorm", "batchrenorm"):
            ours, native = _batch_norm_modules(
                self.shape, self.dtype, self.device, self.op == "batchrenorm"
            )
        else:
            ours, native = _norm_modules(self.op, self.shape, self.dtype, self.device)
        floor = FLOOR_PASSES[self.pass_] * x.numel() * x.element_size()
        dst = torch.empty_like(x)
        copy = lambda: dst.copy_(x)  # noqa: E731
        return (
            _runner(ours, x, self.pass_),
            _runner(native, x, self.pass_),
            copy,
            type(native).__name__,
            floor,
        )


def _runner(module: nn.Module, x: torch.Tensor, pass_: str) -> Callable[[], object]:
    module.train(pass_ != "eval fwd")
    if pass_ != "train fwd+bwd":

        def forward():
            with torch.no_grad():
                return module(x)

        return forward
    xg = x.detach().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    grad_out = torch.randn_like(module(xg))

    def forward_backward():
        y = module(xg)
        return torch.autograd.grad(y, [xg] + params, grad_out)

    return forward_backward


def _input(shape, dtype, layout, device):
    x = torch.randn(shape, device=device, dtype=torch.float32).mul_(1.5).add_(0.3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _batch_norm_modules(shape, dtype, device, renorm=False):
    import torch_bnext

    dim = len(shape) - 2
    ours_cls = {0: "BatchNorm1d", 1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d"}[dim]
    native = getattr(nn, ours_cls)(shape[1])
    if renorm:
        ours = getattr(torch_bnext, ours_cls.replace("BatchNorm", "BatchRenorm"))(shape[1])
    else:
        ours = getattr(torch_bnext, ours_cls)(shape[1])
    # Mixed precision as under AMP: reduced-precision activations, float32 parameters.
    return ours.to(device), native.to(device)


class PermutedLayerNorm2d(nn.LayerNorm):
    """What timm's and torchvision's LayerNorm2d run: permute to channels-last,
    torch's layer_norm, permute back."""

    def forward(self, x):
        y = nn.functional.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return y.permute(0, 3, 1, 2)


def _norm_modules(op, shape, dtype, device):
    import torch_bnext

    if op == "layernorm2d":
        ours = torch_bnext.LayerNorm2d(shape[1], eps=1e-6)
        return ours.to(device, dtype), PermutedLayerNorm2d(shape[1], eps=1e-6).to(device, dtype)
    hidden = shape[-1]
    if op == "layernorm":
        return torch_bnext.LayerNorm(hidden).to(device, dtype), nn.LayerNorm(hidden).to(
            device, dtype
        )
    return torch_bnext.RMSNorm(hidden).to(device, dtype), nn.RMSNorm(hidden).to(device, dtype)


def available_ops():
    import torch_bnext

    ops = ["batchnorm"]
    if hasattr(torch_bnext, "BatchRenorm2d"):
        ops.append("batchrenorm")
    if hasattr(torch_bnext, "LayerNorm"):
        ops.append("layernorm")
    if hasattr(torch_bnext, "RMSNorm"):
        ops.append("rmsnorm")
    if hasattr(torch_bnext, "LayerNorm2d"):
        ops.append("layernorm2d")
    return ops


def default_shapes(op, device, full=True):
    if not full:
        return SUBSET_SHAPES[device][op]
    if op == "layernorm2d":
        return LN2D_SHAPES[device]
    return (BN_SHAPES if op in ("batchnorm", "batchrenorm") else LN_SHAPES)[device]


def build_cases(ops, device, dtypes, shapes: Optional[list] = None, passes=None, full=True):
    """Cases of the full suite (full=True) or of the default subset; shapes and
    passes, where given, replace the suite's (or subset's) own."""
    passes = passes or (PASSES if full else SUBSET_PASSES)
    cases = []
    for op in ops:
        is_bn = op in ("batchnorm", "batchrenorm", "layernorm2d")
        for shape in shapes or default_shapes(op, device, full):
            layouts = (
                ["contiguous", "channels_last"] if is_bn and len(shape) == 4 else ["contiguous"]
            )
            for layout in layouts:
                for dtype in dtypes:
                    for pass_ in passes:
                        if op == "batchrenorm" and pass_ == "eval fwd":
                            continue  # identical to Batch Norm eval
                        cases.append(Case(op, tuple(shape), layout, dtype, pass_, device))
    return cases
