import pytest
import torch

# Relative-norm tolerances against a float64 reference on the same values:
# float32 arithmetic, and half/bfloat16 storage with float32 accumulation
# (the figures apex's tests use).
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_rel(actual, expected, dtype, what="", factor=1.0):
    err = rel_err(actual, expected)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype})"


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
    fmts = ["contiguous", "strided"]
    if len(shape) >= 4:
        fmts.append("channels_last")
    return fmts


def random_input(shape, dtype, fmt, device="cpu", mean=0.5, std=2.0):
    """Random values (never zeros) of `dtype`, laid out as `fmt`."""
    x = torch.randn(shape, dtype=torch.float64, device=device) * std + mean
    return to_format(x.to(dtype), fmt)


def param_dtype_for(dtype):
    # Mixed precision: half/bfloat16 activations with float32 parameters, as AMP does.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
