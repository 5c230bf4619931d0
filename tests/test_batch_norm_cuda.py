"""Batch Norm on CUDA: our kernels against a float64 CPU reference (same input
values) and against torch's own CUDA Batch Norm."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_bnext
from torch_bnext import functional as BF
from torch_bnext.testing import (
    assert_close_rel,
    formats_for,
    param_dtype_for,
    rel_err,
)
from torch_bnext.testing import (
    random_input as _random_input,
)

random_input = functools.partial(_random_input, device="cuda")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ops = torch.ops.bnext

# Relative-norm tolerances against float64 on the same (rounded) values:
# float32 arithmetic, or half/bfloat16 storage with float32 accumulation.
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

SHAPES = [
    (16, 1),
    (7, 65),
    (5, 3, 9),
    (4, 127, 6),
    (2, 1, 40),
    (4, 3, 5, 7),
    (2, 65, 3, 3),
    (3, 127, 4, 1),
    (2, 1, 6, 5),
    (2, 3, 3, 4, 5),
    (2, 65, 2, 2, 3),
]


CASES = [(s, f) for s in SHAPES for f in formats_for(s)]


def reduce_dims(x):
    return [d for d in range(x.dim()) if d != 1]


def channel_shape(x):
    return [1, -1] + [1] * (x.dim() - 2)


def run_batch_norm(fn, x, rm, rv, w, b, training, momentum, eps, dy):
    """One forward and backward; returns (out, grad_input, grad_weight, grad_bias)."""
    x = x.detach().requires_grad_()
    w = w.detach().clone().requires_grad_() if w is not None else None
    b = b.detach().clone().requires_grad_() if b is not None else None
    out = fn(x, rm, rv, w, b, training, momentum, eps)
    out.backward(dy)
    return out, x.grad, (w.grad if w is not None else None), (b.grad if b is not None else None)


# ------------------------------------------------------------------ functional


@pytest.mark.parametrize("shape,fmt", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_matches_reference_and_torch_cuda(shape, fmt, dtype):
    """Training step then eval step: output, input/weight/bias gradients and
    running statistics against float64 on the CPU and against torch on CUDA."""
    torch.manual_seed(0)
    C = shape[1]
    pdt = param_dtype_for(dtype)
    x = random_input(shape, dtype, fmt)
    w = torch.rand(C, dtype=pdt, device="cuda") + 0.5
    b = torch.randn(C, dtype=pdt, device="cuda")
    rm0 = torch.randn(C, dtype=pdt, device="cuda")
    rv0 = torch.rand(C, dtype=pdt, device="cuda") + 0.5
    ours_rm, ours_rv = rm0.clone(), rv0.clone()
    tcu_rm, tcu_rv = rm0.clone(), rv0.clone()
    ref_rm, ref_rv = rm0.double().cpu(), rv0.double().cpu()
    for training in (True, False):
        dy = torch.randn(shape, dtype=torch.float64, device="cuda").to(dtype)
        args = (training, 0.1, 1e-5)
        ours = run_batch_norm(BF.batch_norm, x, ours_rm, ours_rv, w, b, *args, dy)
        tcu = run_batch_norm(F.batch_norm, x, tcu_rm, tcu_rv, w, b, *args, dy)
        ref = run_batch_norm(
            F.batch_norm,
            x.double().cpu(),
            ref_rm,
            ref_rv,
            w.double().cpu(),
            b.double().cpu(),
            *args,
            dy.double().cpu(),
        )
        assert ours[0].dtype == dtype and ours[0].device == x.device
        if fmt == "channels_last":
            assert ours[0].stride() == x.stride()
        slack = 4 if dtype == torch.float32 else 1
        for name, a, t, r, f in zip(
            ("output", "grad_input", "grad_weight", "grad_bias"),
            ours,
            tcu,
            ref,
            (2 * slack, 8 * slack, 8 * slack, 8 * slack),
        ):
            what = f"{name} training={training}"
            assert_close_rel(a, r, dtype if name in ("output", "grad_input") else pdt, what, f)
            # torch may keep reduced-precision intermediates: the input dtype's
            # tolerance for everything; accuracy is checked against float64 above.
            assert_close_rel(a, t, dtype, what + " vs torch cuda", 2 * f)
        assert_close_rel(ours_rm, ref_rm, pdt, "running_mean", 4)
        assert_close_rel(ours_rv, ref_rv, pdt, "running_var", 4)
        assert_close_rel(ours_rm, tcu_rm, dtype, "running_mean vs torch cuda", 8)
        assert_close_rel(ours_rv, tcu_rv, dtype, "running_var vs torch cuda", 8)


# --------------------------------------------------------------------- modules


MODULE_CASES = [
    (1, (7, 65), "contiguous"),
    (1, (4, 127, 6), "strided"),
    (1, (16, 1), "contiguous"),
    (2, (4, 3, 5, 7), "channels_last"),
    (2, (2, 65, 3, 3), "contiguous"),
    (2, (3, 127, 4, 1), "strided"),
    (2, (2, 1, 6, 5), "channels_last"),
    (3, (2, 3, 3, 4, 5), "channels_last"),
    (3, (2, 65, 2, 2, 3), "contiguous"),
]
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OUR_BN = {1: torch_bnext.BatchNorm1d, 2: torch_bnext.BatchNorm2d, 3: torch_bnext.BatchNorm3d}


@pytest.mark.parametrize("dim,shape,fmt", MODULE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_parity(dim, shape, fmt, dtype, momentum):
    """Three training steps then eval, against torch.nn.BatchNorm*d in float64
    on the CPU and in the same dtype on CUDA, including num_batches_tracked."""
    torch.manual_seed(1)
    C = shape[1]
    pdt = param_dtype_for(dtype)
    ours = OUR_BN[dim](C, momentum=momentum).to("cuda", pdt)
    tcu = TORCH_BN[dim](C, momentum=momentum).to("cuda", pdt)
    ref = TORCH_BN[dim](C, momentum=momentum).double()
    with torch.no_grad():
        w, b = torch.rand(C) + 0.5, torch.randn(C)
        for m in (ours, tcu, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    for step in range(4):
        training = step < 3
        for m in (ours, tcu, ref):
            m.train(training)
        x = random_input(shape, dtype, fmt)
        dy = torch.randn(shape, dtype=torch.float64, device="cuda").to(dtype)
        xs = [
            x.detach().requires_grad_(),
            x.detach().clone().requires_grad_(),
            x.detach().double().cpu().requires_grad_(),
        ]
        outs = [m(xi) for m, xi in zip((ours, tcu, ref), xs)]
        for out, g in zip(outs, (dy, dy, dy.double().cpu())):
            out.backward(g)
        f = 2 if dtype == torch.float32 else 1
        for other, factor in ((ref, 1), (tcu, 2)):
            i = 2 if other is ref else 1
            # Against torch on CUDA, the input dtype's tolerance throughout (torch
            # may keep reduced-precision intermediates); float64 is the accuracy check.
            pdt_cmp = pdt if other is ref else dtype
            assert_close_rel(outs[0], outs[i], dtype, f"output step {step}", factor * 2 * f)
            assert_close_rel(
                xs[0].grad, xs[i].grad, dtype, f"grad_input step {step}", factor * 8 * f
            )
            assert_close_rel(
                ours.weight.grad, other.weight.grad, pdt_cmp, "grad_weight", factor * 8 * f
            )
            assert_close_rel(ours.bias.grad, other.bias.grad, pdt_cmp, "grad_bias", factor * 8 * f)
            assert_close_rel(
                ours.running_mean, other.running_mean, pdt_cmp, "running_mean", factor * 4
            )
            assert_close_rel(
                ours.running_var, other.running_var, pdt_cmp, "running_var", factor * 4
            )
            assert ours.num_batches_tracked.item() == other.num_batches_tracked.item()
        for m in (ours, tcu, ref):
            m.weight.grad = m.bias.grad = None
    assert ours.num_batches_tracked.item() == 3
    assert ours.running_mean.device.type == "cuda"


# ------------------------------------------------------------ building blocks


@pytest.mark.parametrize("shape,fmt", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_ops_match_reference(shape, fmt, dtype):
    torch.manual_seed(2)
    # Offsets keep every per-channel mean and sum well away from zero, where a
    # relative error says nothing.
    x = random_input(shape, dtype, fmt, mean=3.0, std=1.0)
    dy = random_input(shape, dtype, fmt, mean=0.5, std=1.0)
    opm = torch.float64 if dtype == torch.float64 else torch.float32
    x64, dy64 = x.double().cpu(), dy.double().cpu()
    dims, cs = reduce_dims(x), channel_shape(x)

    mean, var = ops.batch_norm_stats(x)
    assert mean.dtype == var.dtype == opm and mean.device == x.device
    ref_mean = x64.mean(dim=dims)
    assert_close_rel(mean, ref_mean, dtype if dtype == torch.float64 else torch.float32, "mean", 4)
    assert_close_rel(
        var,
        x64.var(dim=dims, unbiased=False),
        dtype if dtype == torch.float64 else torch.float32,
        "var",
        4,
    )

    C = shape[1]
    m = torch.randn(C, dtype=opm, device="cuda")
    scale = torch.randn(C, dtype=opm, device="cuda")
    shift = torch.randn(C, dtype=opm, device="cuda")
    y = ops.batch_norm_elemt(x, m, scale, shift)
    m64, scale64, shift64 = (t.double().cpu().view(cs) for t in (m, scale, shift))
    y_ref = (x64 - m64) * scale64 + shift64
    assert y.dtype == dtype
    assert_close_rel(y, y_ref, dtype, "elemt", 2)

    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, m)
    opm_dtype = dtype if dtype == torch.float64 else torch.float32
    assert_close_rel(sum_dy, dy64.sum(dim=dims), opm_dtype, "sum_dy", 8)
    assert_close_rel(
        sum_dy_xmu,
        (dy64 * (x64 - m.double().cpu().view(cs))).sum(dim=dims),
        opm_dtype,
        "sum_dy_xmu",
        8,
    )

    a, k, c = (torch.randn(C, dtype=opm, device="cuda") for _ in range(3))
    dx = ops.batch_norm_backward_elemt(dy, x, m, a, k, c)
    md = m.double().cpu().view(cs)
    dx_ref = (
        a.double().cpu().view(cs) * dy64
        + k.double().cpu().view(cs) * (x64 - md)
        + c.double().cpu().view(cs)
    )
    assert dx.dtype == dtype
    assert_close_rel(dx, dx_ref, dtype, "backward_elemt", 2)


def test_empty_inputs():
    for shape in ((0, 3, 4), (0, 5), (2, 3, 0, 4)):
        x = torch.randn(shape, device="cuda")
        mean, var = ops.batch_norm_stats(x)
        assert mean.shape == (shape[1],) and torch.equal(mean.cpu(), torch.zeros(shape[1]))
        assert torch.equal(var.cpu(), torch.zeros(shape[1]))
        vec = torch.randn(shape[1], device="cuda")
        assert ops.batch_norm_elemt(x, vec, vec, vec).shape == x.shape
        sums = ops.batch_norm_backward_reduce(x, x, vec)
        assert all(torch.equal(s.cpu(), torch.zeros(shape[1])) for s in sums)
        assert ops.batch_norm_backward_elemt(x, x, vec, vec, vec, vec).shape == x.shape


# ------------------------------------------------------------- large inputs


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((70000, 3), "contiguous"),  # 2-D: channels-last rows, few channels
        ((66000, 130), "contiguous"),  # many rows and several channel tiles
        ((1100, 5, 8, 8), "channels_last"),
        ((2, 1, 300, 300), "contiguous"),  # one channel, few planes: stripes split across blocks
        ((64, 7, 33, 35), "contiguous"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_inputs(shape, fmt, dtype):
    torch.manual_seed(3)
    x = random_input(shape, dtype, fmt)
    C = shape[1]
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    rm_ref, rv_ref = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    dy = random_input(shape, dtype, fmt, mean=0.0, std=1.0)
    ours = run_batch_norm(BF.batch_norm, x, rm, rv, None, None, True, 0.1, 1e-5, dy)
    ref = run_batch_norm(
        F.batch_norm,
        x.double().cpu(),
        rm_ref,
        rv_ref,
        None,
        None,
        True,
        0.1,
        1e-5,
        dy.double().cpu(),
    )
    assert_close_rel(ours[0], ref[0], dtype, "output", 2)
    assert_close_rel(ours[1], ref[1], dtype, "grad_input", 8)
    assert_close_rel(rm, rm_ref, torch.float32, "running_mean", 8)
    assert_close_rel(rv, rv_ref, torch.float32, "running_var", 8)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_statistics_are_accurate_for_large_mean(fmt):
    """mean 1e4, std 1 in float32: E[x^2]-E[x]^2 would be off by > 100 here."""
    torch.manual_seed(4)
    x = random_input((16, 8, 24, 24), torch.float32, fmt, mean=1e4, std=1.0)
    mean, var = ops.batch_norm_stats(x)
    x64 = x.double().cpu()
    assert rel_err(mean, x64.mean(dim=(0, 2, 3))) <= 1e-6
    assert rel_err(var, x64.var(dim=(0, 2, 3), unbiased=False)) <= 2e-3


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((8, 16, 20, 20), "channels_last"),
        ((8, 16, 20, 20), "contiguous"),
        ((70000, 3), "contiguous"),
    ],
)
def test_reductions_are_deterministic(shape, fmt):
    torch.manual_seed(5)
    x = random_input(shape, torch.float32, fmt)
    dy = random_input(shape, torch.float32, fmt)
    zeros = x.new_zeros(shape[1])
    first = ops.batch_norm_stats(x) + ops.batch_norm_backward_reduce(dy, x, zeros)
    for _ in range(3):
        again = ops.batch_norm_stats(x) + ops.batch_norm_backward_reduce(dy, x, zeros)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_matches_cpu_kernels():
    torch.manual_seed(6)
    for shape, fmt in (
        ((6, 5, 4, 3), "contiguous"),
        ((6, 5, 4, 3), "channels_last"),
        ((9, 65), "contiguous"),
    ):
        x = random_input(shape, torch.float64, fmt)
        for a, b in zip(
            ops.batch_norm_train(x, None, None, 1e-5),
            ops.batch_norm_train(x.cpu(), None, None, 1e-5),
        ):
            assert_close_rel(a, b, torch.float64, "train vs cpu", 10)


# ---------------------------------------------------------- devices and errors


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_second_device(fmt):
    """Kernels run on the input's device, not the current one."""
    torch.manual_seed(7)
    assert torch.cuda.current_device() == 0
    m = torch_bnext.BatchNorm2d(5).to("cuda:1")
    ref = nn.BatchNorm2d(5).double()
    x = random_input((4, 5, 6, 7), torch.float32, fmt, device="cuda:1").requires_grad_()
    x_ref = x.detach().double().cpu().requires_grad_()
    y, y_ref = m(x), ref(x_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double().cpu())
    assert y.device == x.grad.device == m.weight.grad.device == torch.device("cuda:1")
    assert_close_rel(y, y_ref, torch.float32, "output", 2)
    assert_close_rel(x.grad, x_ref.grad, torch.float32, "grad_input", 8)
    assert_close_rel(m.weight.grad, ref.weight.grad, torch.float32, "grad_weight", 8)
    assert_close_rel(m.running_var, ref.running_var, torch.float32, "running_var", 4)
    assert m.num_batches_tracked.item() == 1
    m.eval()
    ref.eval()
    assert_close_rel(m(x), ref(x_ref), torch.float32, "eval output", 2)
    # The stream work above ran on device 1; the current device is unchanged.
    assert torch.cuda.current_device() == 0


def test_cpu_input_with_cuda_vectors_is_rejected():
    x = torch.randn(4, 3, 5)
    vec = torch.randn(3, device="cuda")
    with pytest.raises(RuntimeError):
        ops.batch_norm_elemt(x, vec, vec, vec)
    with pytest.raises(RuntimeError):
        ops.batch_norm_backward_reduce(torch.randn(4, 3, 5, device="cuda"), x, vec)
