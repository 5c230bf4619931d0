"""What the test suite and `python -m torch_bnext.check` share: the relative
error, the one tolerance table, and random inputs in each memory layout.

REL_TOL bounds a relative-norm error against a float64 reference computed
from the same (already rounded) input values:

    rel_err = ||ours - reference||_2 / ||reference||_2

so a bound says how much of the result's size rounding may take, over the
whole tensor, whatever its scale. It has one bound per dtype of the result; a
comparison whose error legitimately grows beyond it (a gradient that sums many
terms, two rounded results compared with each other) passes an explicit
`factor` where it is made, with the reason beside it.
"""

import math

import torch

# Room for the rounding of the result's dtype and of reductions over thousands
# of values. float64 (unit roundoff 1.1e-16) and float32 (6e-8) compute in their
# own type; float16 (4.9e-4) and bfloat16 (3.9e-3) are stored in theirs and
# accumulated in float32, so the final rounding to storage dominates. The
# half-precision figures are those of apex's tests.
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
}

# The devices this machine runs: the CPU, and CUDA when a GPU is visible.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64 on the CPU.
    Infinity, which no tolerance accepts, when `actual` holds a NaN or an
    infinity, or differs at all from an `expected` of zeros (exact zeros, such
    as a one-value batch's variance, must come out exactly)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return math.inf
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    if denom == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / denom


def assert_close_rel(actual, expected, dtype, what="", factor=1.0) -> float:
    """Fails unless rel_err(actual, expected) <= REL_TOL[dtype] * factor;
    returns the error. `dtype` is the precision `actual` was computed in."""
    err = rel_err(actual, expected)
    tol = REL_TOL[dtype] * factor
    if not err <= tol:
        note = " (non-finite values, or not zero where zero is expected)" if math.isinf(err) else ""
        raise AssertionError(f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype}){note}")
    return err


def to_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Lay x out as `fmt`: contiguous, channels_last (4D/5D) or a non-contiguous
    view (every other element of the last dimension of a wider tensor)."""
    if fmt == "contiguous":
        return x.contiguous()
    if fmt == "channels_last":
        mf = {4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()]
        return x.contiguous(memory_format=mf)
    if fmt == "strided":
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return view
    raise ValueError(fmt)


def formats_for(shape):
    """The layouts a tensor of `shape` can take (channels_last needs 4D or 5D)."""
    fmts = ["contiguous", "strided"]
    if len(shape) >= 4:
        fmts.append("channels_last")
    return fmts


def random_input(shape, dtype, fmt="contiguous", device="cpu", mean=0.5, std=2.0, seed=None):
    """Random values (never zeros) of `dtype`, laid out as `fmt`. Drawn in
    float64 then rounded, so a float64 copy is exactly the input's values. With
    a `seed`, drawn on the CPU from their own generator: the same values on
    every device, whatever the global random state."""
    if seed is None:
        x = torch.randn(shape, dtype=torch.float64, device=device)
    else:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    return to_format((x * std + mean).to(dtype), fmt)


def param_dtype_for(dtype):
    """The parameters' dtype for inputs of `dtype`: float32 for half and
    bfloat16 activations (mixed precision, as autocast leaves them), else the
    input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
