"""The Batch Norm + activation kernels (csrc/batch_norm_act/, on Batch Norm's
CPU backend) against float64 compositions of torch operators: the building
blocks and the whole passes, every activation, dtype and layout path of the
kernels (channels-first planes, tiny planes, channels-last tiles, wide and
narrow rows), with and without a residual, and in-place mode.

The ops are called without autograd (torch.no_grad(), inputs that do not
require grad): their autograd formulas are tested in test_batch_norm_act.py."""

import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import torch_bnext  # noqa: F401  (registers torch.ops.bnext)
from torch_bnext.testing import REL_TOL, assert_close_rel, random_input, rel_err, to_format

ops = torch.ops.bnext

# (activation, its parameter, the torch.nn.functional composite). Parameters
# off their defaults, to see them arrive; the others get one too, to see it
# ignored.
ACTIVATIONS = {
    "identity": (0.3, lambda u, p: u),
    "relu": (0.3, lambda u, p: F.relu(u)),
    "leaky_relu": (0.1, lambda u, p: F.leaky_relu(u, p)),
    "elu": (0.7, lambda u, p: F.elu(u, p)),
    "silu": (0.3, lambda u, p: F.silu(u)),
    "gelu": (0.3, lambda u, p: F.gelu(u, approximate="none")),
    "gelu_tanh": (0.3, lambda u, p: F.gelu(u, approximate="tanh")),
    "hardswish": (0.3, lambda u, p: F.hardswish(u)),
    "relu6": (0.3, lambda u, p: F.relu6(u)),
}
INVERTIBLE = ["identity", "leaky_relu", "elu"]
# Those whose derivative the backward may take from the output.
PIECEWISE_LINEAR = ["identity", "relu", "leaky_relu", "relu6"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (id, shape, layout): one per path of the kernels (batch_norm/cpu_layout.h).
CASES = [
    ("planes", (3, 65, 6, 7), "contiguous"),  # channels-first planes
    ("planes_c1", (5, 1, 7, 9), "contiguous"),
    ("ncl", (4, 65, 20), "contiguous"),  # planes; tiny planes in 16 bits
    ("ncl_tiny", (9, 127, 3), "contiguous"),  # tiny planes: virtual channels
    ("ncl_tiny_c1", (16, 1, 2), "contiguous"),
    ("nc", (37, 127), "contiguous"),  # rows of C
    ("nc_narrow", (101, 3), "contiguous"),  # narrow rows: groups and a tail
    ("nhwc", (3, 127, 5, 6), "channels_last"),  # tiles of channels
    ("nhwc_wide", (2, 1000, 3, 3), "channels_last"),  # wide rows
    ("nhwc_narrow", (5, 3, 5, 7), "channels_last"),  # narrow rows
]
CASE_IDS = [c[0] for c in CASES]
# The whole passes run on fewer paths (their kernels are the building blocks').
PASS_CASES = [c for c in CASES if c[0] in {"planes", "ncl_tiny", "nc_narrow", "nhwc", "nhwc_wide"}]
PASS_IDS = [c[0] for c in PASS_CASES]


def seed(*key):
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_channel(v, x):
    """A per-channel vector shaped to broadcast against x."""
    return v.double().view(1, -1, *([1] * (x.dim() - 2)))


def act_ref(name, u):
    param, fn = ACTIVATIONS[name]
    return fn(u, param)


def act_grad_ref(name, u, dy):
    """dy * act'(u) in float64, by autograd through the torch composite."""
    u = u.detach().double().requires_grad_()
    with torch.enable_grad():
        (g,) = torch.autograd.grad(act_ref(name, u), u, dy.double())
    return g


def derivative_from_output_ref(name, y):
    """act'(u) from y = act(u), for the piecewise linear activations, with
    ATen's choice at the kinks (relu'(0) = 0, relu6' = 0 at 0 and 6)."""
    y = y.double()
    one, zero = torch.ones_like(y), torch.zeros_like(y)
    if name == "relu":
        return torch.where(y > 0, one, zero)
    if name == "relu6":
        return torch.where((y > 0) & (y < 6), one, zero)
    if name == "leaky_relu":
        return torch.where(y > 0, one, one * ACTIVATIONS[name][0])
    return one


def inverse_ref(name, y):
    """The activation's input from its output (in-place mode)."""
    param = ACTIVATIONS[name][0]
    y = y.double()
    if name == "leaky_relu":
        return torch.where(y > 0, y, y / param)
    if name == "elu":
        return torch.where(y > 0, y, torch.log1p(y / param))
    return y


def assert_sums_close(actual, expected, terms, dtype, what):
    """Per-channel sums accumulated in the opmath dtype: the error relative to
    the sums of |terms|, which cancellation in the sums themselves does not
    shrink."""
    dims = [d for d in range(terms.dim()) if d != 1]
    scale = terms.abs().sum(dims)
    err = ((actual.double() - expected.double()).norm() / scale.norm()).item()
    tol = 8 * REL_TOL[opmath(dtype)]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def channel_sums(t, xmu):
    dims = [d for d in range(t.dim()) if d != 1]
    return t.sum(dims), (t * xmu).sum(dims)


def inputs(shape, dtype, fmt, residual):
    C = shape[1]
    om = opmath(dtype)
    x = random_input(shape, dtype, fmt, mean=0.5, std=2.0)
    mean = torch.randn(C, dtype=om) * 0.5 + 0.5
    # Both signs of scale: a negative weight flips the activation's input.
    sign = torch.where(torch.rand(C) < 0.25, -1.0, 1.0).to(om)
    scale = (torch.rand(C, dtype=om) + 0.5) * sign
    shift = torch.randn(C, dtype=om)
    res = random_input(shape, dtype, fmt, mean=0.0, std=1.0) if residual else None
    dy = random_input(shape, dtype, fmt, mean=0.0, std=1.0)
    return x, mean, scale, shift, res, dy


def assert_layout_kept(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.stride() == x.stride()


# ------------------------------------------------------------ building blocks


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_elemt_and_backward_reduce(case, act, dtype, residual):
    """act((x - mean) * scale + shift [+ residual]), then g = dy * act'(u)
    with its per-channel sums, against float64 on the same rounded values."""
    _, shape, fmt = case
    seed(shape, fmt, act, dtype, residual)
    x, mean, scale, shift, res, dy = inputs(shape, dtype, fmt, residual)
    param = ACTIVATIONS[act][0]
    xmu = x.double() - per_channel(mean, x)
    u = xmu * per_channel(scale, x) + per_channel(shift, x)
    if residual:
        u = u + res.double()

    out = ops.batch_norm_act_elemt(x, mean, scale, shift, res, act, param)
    assert_layout_kept(out, x)
    assert_close_rel(out, act_ref(act, u), dtype, "out", 2)

    g, sum_g, sum_gx = ops.batch_norm_act_backward_reduce(
        dy, x, mean, scale, shift, res, act, param
    )
    assert_layout_kept(g, x)
    assert sum_g.dtype == opmath(dtype) and sum_g.shape == (shape[1],)
    g_ref = act_grad_ref(act, u, dy)
    assert_close_rel(g, g_ref, dtype, "grad_pre", 2)
    sg_ref, sgx_ref = channel_sums(g_ref, xmu)
    assert_sums_close(sum_g, sg_ref, g_ref, dtype, "sum_dy")
    assert_sums_close(sum_gx, sgx_ref, g_ref * xmu, dtype, "sum_dy_xmu")
    if residual:
        return
    # Without a residual: the same sums with g not stored, and the elementwise
    # pass that recomputes g.
    sum_g, sum_gx = ops.batch_norm_act_backward_sums(dy, x, mean, scale, shift, act, param)
    assert_sums_close(sum_g, sg_ref, g_ref, dtype, "sum_dy, g not stored")
    assert_sums_close(sum_gx, sgx_ref, g_ref * xmu, dtype, "sum_dy_xmu, g not stored")
    a, k, c = (torch.randn(shape[1], dtype=opmath(dtype)) for _ in range(3))
    dx = ops.batch_norm_act_backward_elemt(dy, x, mean, scale, shift, a, k, c, act, param)
    assert_layout_kept(dx, x)
    dx_ref = per_channel(a, x) * g_ref + per_channel(k, x) * xmu + per_channel(c, x)
    assert_close_rel(dx, dx_ref, dtype, "grad_input, g recomputed", 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", PIECEWISE_LINEAR)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_backward_reduce_from_output(case, act, dtype):
    """g = dy * act'(u) with act' from the forward's output (what a layer with
    a residual keeps instead of the residual), and its sums."""
    _, shape, fmt = case
    seed(shape, fmt, act, dtype, "from_output")
    x, mean, scale, shift, res, dy = inputs(shape, dtype, fmt, residual=True)
    param = ACTIVATIONS[act][0]
    y = ops.batch_norm_act_elemt(x, mean, scale, shift, res, act, param)
    g, sum_g, sum_gx = ops.batch_norm_act_backward_reduce_from_output(dy, x, y, mean, act, param)
    assert_layout_kept(g, x)
    xmu = x.double() - per_channel(mean, x)
    g_ref = dy.double() * derivative_from_output_ref(act, y)
    assert_close_rel(g, g_ref, dtype, "grad_pre", 2)
    sg_ref, sgx_ref = channel_sums(g_ref, xmu)
    assert_sums_close(sum_g, sg_ref, g_ref, dtype, "sum_dy")
    assert_sums_close(sum_gx, sgx_ref, g_ref * xmu, dtype, "sum_dy_xmu")


def inplace_inputs(shape, dtype, fmt, act):
    """An output y = act(u) (rounded to dtype), dy, shift and inv_scale."""
    C = shape[1]
    om = opmath(dtype)
    u = random_input(shape, torch.float64, fmt, mean=0.3, std=1.5)
    y = act_ref(act, u).to(dtype)
    shift = torch.randn(C, dtype=om)
    inv_scale = (torch.rand(C, dtype=om) + 0.5) * torch.where(torch.rand(C) < 0.25, -1.0, 1.0).to(
        om
    )
    dy = random_input(shape, dtype, fmt, mean=0.0, std=1.0)
    return y, dy, shift, inv_scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", INVERTIBLE)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_inplace_backward_reduce_and_elemt(case, act, dtype):
    """From the output alone: xmu = (act^-1(y) - shift) * inv_scale,
    g = dy * act'(act^-1(y)), then dx = a * g + k * xmu + c."""
    _, shape, fmt = case
    seed(shape, fmt, act, dtype, "inplace")
    y, dy, shift, inv_scale = inplace_inputs(shape, dtype, fmt, act)
    param = ACTIVATIONS[act][0]
    u = inverse_ref(act, y)
    xmu = (u - per_channel(shift, y)) * per_channel(inv_scale, y)

    g, sum_g, sum_gx = ops.batch_norm_act_inplace_backward_reduce(
        dy, y, shift, inv_scale, act, param
    )
    assert_layout_kept(g, y)
    g_ref = act_grad_ref(act, u, dy)
    assert_close_rel(g, g_ref, dtype, "grad_pre", 2)
    sg_ref, sgx_ref = channel_sums(g_ref, xmu)
    assert_sums_close(sum_g, sg_ref, g_ref, dtype, "sum_dy")
    assert_sums_close(sum_gx, sgx_ref, g_ref * xmu, dtype, "sum_dy_xmu")

    C = shape[1]
    a, k, c = (torch.randn(C, dtype=opmath(dtype)) for _ in range(3))
    dx = ops.batch_norm_act_inplace_backward_elemt(g, y, shift, inv_scale, a, k, c, act, param)
    assert_layout_kept(dx, y)
    dx_ref = per_channel(a, y) * g.double() + per_channel(k, y) * xmu + per_channel(c, y)
    assert_close_rel(dx, dx_ref, dtype, "grad_input", 2)


# ---------------------------------------------------------------- whole passes


def params(C, dtype, affine=True):
    if not affine:
        return None, None
    pdt = opmath(dtype)
    w = (torch.rand(C, dtype=pdt) + 0.5) * torch.where(torch.rand(C) < 0.25, -1.0, 1.0).to(pdt)
    return w, torch.randn(C, dtype=pdt)


def composite(x, w, b, res, act, eps, training, running=None, r=None, d=None):
    """act(batch_norm(x) [+ residual]) in float64, the activation's input u
    (detached) and the leaves (x, w, b, residual; those given) for
    torch.autograd.grad. r and d: Batch Renorm's correction of the normalised
    value (constants)."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if w is None else w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    r64 = None if res is None else res.detach().double().requires_grad_()
    with torch.enable_grad():
        rm, rv = (None, None) if running is None else (running[0].double(), running[1].double())
        u = F.batch_norm(x64, rm, rv, None, None, training=training, eps=eps)
        if r is not None:
            u = u * per_channel(r, x) + per_channel(d, x)
        if w64 is not None:
            u = u * per_channel(w64, x) + per_channel(b64, x)
        if r64 is not None:
            u = u + r64
        out = act_ref(act, u)
    return out, u.detach(), [t for t in (x64, w64, b64, r64) if t is not None]


def grads_ref(out, leaves, dy):
    with torch.enable_grad():
        return torch.autograd.grad(out, leaves, dy.double())


# Gradients through Batch Norm sum over the batch and cancel: the room that
# tests/test_batch_norm.py gives them.
FWD_FACTOR = {torch.float32: 8, torch.float64: 8, torch.float16: 2, torch.bfloat16: 2}
GRAD_FACTOR = {torch.float32: 32, torch.float64: 32, torch.float16: 4, torch.bfloat16: 4}


def batch_stats(x):
    dims = [d for d in range(x.dim()) if d != 1]
    return x.double().mean(dims), x.double().var(dims, unbiased=False)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("case", PASS_CASES, ids=PASS_IDS)
@torch.no_grad()
def test_train_and_backward(case, act, dtype, residual):
    _, shape, fmt = case
    seed(shape, fmt, act, dtype, residual, "train")
    C = shape[1]
    param = ACTIVATIONS[act][0]
    eps = 1e-3
    x = random_input(shape, dtype, fmt, mean=0.5, std=2.0)
    w, b = params(C, dtype)
    res = random_input(shape, dtype, fmt, mean=0.0, std=1.0) if residual else None
    dy = random_input(shape, dtype, fmt, mean=0.0, std=1.0)

    out, mean, var = ops.batch_norm_act_train(x, w, b, res, eps, act, param)
    assert_layout_kept(out, x)
    ref, u, leaves = composite(x, w, b, res, act, eps, training=True)
    assert_close_rel(out, ref, dtype, "out", FWD_FACTOR[dtype])
    mean_ref, var_ref = batch_stats(x)
    assert_close_rel(mean, mean_ref, dtype, "mean", 4)
    assert_close_rel(var, var_ref, dtype, "var", 4)

    dx, dw, db, g = ops.batch_norm_act_backward(
        dy, x, mean, var, w, b, res, None, None, eps, act, param, True
    )
    assert_layout_kept(dx, x)
    refs = grads_ref(ref, leaves, dy)
    tol = GRAD_FACTOR[dtype]
    assert_close_rel(dx, refs[0], dtype, "grad_input", tol)
    assert_close_rel(dw, refs[1], dtype, "grad_weight", tol)
    assert_close_rel(db, refs[2], dtype, "grad_bias", tol)
    if residual:
        # grad_pre: the activation's input's gradient, the residual's.
        assert_layout_kept(g, x)
        assert_close_rel(g, act_grad_ref(act, u, dy), dtype, "grad_pre", 2)
        assert_close_rel(g, refs[3], dtype, "grad_residual", 2)
    else:
        assert g.numel() == 0  # never stored without a residual
    if act in PIECEWISE_LINEAR:
        # act' from the output instead of from u recomputed with the residual.
        dx2, dw2, db2, g2 = ops.batch_norm_act_backward(
            dy, x, mean, var, w, b, None, None, None, eps, act, param, True, out
        )
        g_ref = dy.double() * derivative_from_output_ref(act, out)
        assert_close_rel(g2, g_ref, dtype, "grad_pre from output", 2)
        # The same g whenever the rounded output keeps u's side of every kink.
        assert_close_rel(dx2, refs[0], dtype, "grad_input from output", tol)
        assert_close_rel(dw2, refs[1], dtype, "grad_weight from output", tol)
        assert_close_rel(db2, refs[2], dtype, "grad_bias from output", tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("case", PASS_CASES, ids=PASS_IDS)
@torch.no_grad()
def test_infer_and_eval_backward(case, act, dtype):
    """Running statistics (the backward with training=False), no affine
    parameters, a residual in another layout than the input."""
    _, shape, fmt = case
    seed(shape, fmt, act, dtype, "infer")
    C = shape[1]
    param = ACTIVATIONS[act][0]
    eps = 1e-5
    x = random_input(shape, dtype, fmt, mean=0.5, std=2.0)
    res = random_input(shape, dtype, "contiguous", mean=0.0, std=1.0)
    dy = random_input(shape, dtype, fmt, mean=0.0, std=1.0)
    pdt = opmath(dtype)
    rm, rv = torch.randn(C, dtype=pdt) * 0.5 + 0.5, torch.rand(C, dtype=pdt) * 3 + 0.5

    out = ops.batch_norm_act_infer(x, rm, rv, None, None, res, eps, act, param)
    assert_layout_kept(out, x)
    ref, u, leaves = composite(x, None, None, res, act, eps, training=False, running=(rm, rv))
    assert_close_rel(out, ref, dtype, "out", FWD_FACTOR[dtype])

    dx, dw, db, g = ops.batch_norm_act_backward(
        dy, x, rm, rv, None, None, res, None, None, eps, act, param, False
    )
    refs = grads_ref(ref, leaves, dy)
    assert_close_rel(dx, refs[0], dtype, "grad_input", GRAD_FACTOR[dtype])
    assert_close_rel(g, refs[1], dtype, "grad_residual", 2)
    # No weight: its gradient is still computed, sum(g * xhat) and sum(g).
    xhat = (x.double() - per_channel(rm, x)) / (per_channel(rv, x) + eps).sqrt()
    dims = [d for d in range(x.dim()) if d != 1]
    g_ref = act_grad_ref(act, u, dy)
    assert_close_rel(dw, (g_ref * xhat).sum(dims), dtype, "grad_weight", GRAD_FACTOR[dtype])
    assert_close_rel(db, g_ref.sum(dims), dtype, "grad_bias", GRAD_FACTOR[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act", ["relu", "silu", "elu"])
@torch.no_grad()
def test_backward_with_renorm_correction(act, dtype):
    """Batch Renorm's r and d rescale the weight in the recomputed u and in
    the backward coefficients."""
    shape, fmt = (4, 65, 5, 6), "channels_last"
    seed(shape, act, dtype, "renorm")
    C = shape[1]
    param = ACTIVATIONS[act][0]
    eps = 1e-3
    x = random_input(shape, dtype, fmt, mean=0.5, std=2.0)
    w, b = params(C, dtype)
    dy = random_input(shape, dtype, fmt, mean=0.0, std=1.0)
    r = torch.rand(C, dtype=dtype) + 0.5
    d = torch.randn(C, dtype=dtype) * 0.3
    mean, var = (t.to(dtype) for t in batch_stats(x))
    dx, dw, db, g = ops.batch_norm_act_backward(
        dy, x, mean, var, w, b, None, r, d, eps, act, param, True
    )
    ref, u, leaves = composite(x, w, b, None, act, eps, training=True, r=r, d=d)
    refs = grads_ref(ref, leaves, dy)
    tol = GRAD_FACTOR[dtype]
    assert_close_rel(dx, refs[0], dtype, "grad_input", tol)
    assert_close_rel(dw, refs[1], dtype, "grad_weight", tol)
    assert_close_rel(db, refs[2], dtype, "grad_bias", tol)
    assert g.numel() == 0  # no residual


# In-place mode recomputes x from the rounded output: in 16 bits that costs
# the output's rounding error once more, amplified where the activation is
# flat (elu far below 0).
INPLACE_GRAD_FACTOR = {torch.float32: 32, torch.float64: 32, torch.float16: 8, torch.bfloat16: 8}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", INVERTIBLE)
@pytest.mark.parametrize(
    "case", PASS_CASES + [("strided", (3, 65, 6, 7), "strided")], ids=PASS_IDS + ["strided"]
)
@torch.no_grad()
def test_inplace_train_and_backward(case, act, dtype, training):
    """batch_norm_act_train_ / infer_ write the output over the input's own
    storage; batch_norm_act_inplace_backward takes the gradients from it."""
    _, shape, fmt = case
    seed(shape, fmt, act, dtype, training, "inplace")
    C = shape[1]
    param = ACTIVATIONS[act][0]
    eps = 1e-3
    # Within three standard deviations, so that elu's input stays above -7: an
    # output within half an ulp of -alpha rounds (in float16) to -alpha or
    # beyond, where its inverse is -inf or NaN.
    x0 = to_format(random_input(shape, torch.float64, mean=0.5, std=2.0).clamp(-5.5, 6.5), fmt)
    x0 = x0.to(dtype)
    w, b = params(C, dtype)
    b = b * 0.5
    dy = random_input(shape, dtype, fmt, mean=0.0, std=1.0)
    x = x0.clone()
    if fmt == "strided":  # a view: the result is written back through it
        x = random_input(shape, dtype, "strided")
        x.copy_(x0)
    ptr, strides = x.data_ptr(), x.stride()
    pdt = opmath(dtype)
    if training:
        mean, var = ops.batch_norm_act_train_(x, w, b, eps, act, param)
        out, mean2, var2 = ops.batch_norm_act_train(x0, w, b, None, eps, act, param)
        assert torch.equal(mean, mean2) and torch.equal(var, var2)
        ref, _, leaves = composite(x0, w, b, None, act, eps, training=True)
    else:
        var = torch.rand(C, dtype=pdt) * 2 + 3
        rm = torch.randn(C, dtype=pdt) * 0.3 + 0.5
        ops.batch_norm_act_infer_(x, rm, var, w, b, eps, act, param)
        out = ops.batch_norm_act_infer(x0, rm, var, w, b, None, eps, act, param)
        ref, _, leaves = composite(x0, w, b, None, act, eps, training=False, running=(rm, var))
    assert x.data_ptr() == ptr and x.stride() == strides
    # The same kernels as the out-of-place pass: the same bits.
    assert torch.equal(x, out)
    assert_close_rel(x, ref, dtype, "out", FWD_FACTOR[dtype])

    dx, dw, db = ops.batch_norm_act_inplace_backward(dy, x, var, w, b, eps, act, param, training)
    assert_layout_kept(dx, x0)
    refs = grads_ref(ref, leaves, dy)
    tol = INPLACE_GRAD_FACTOR[dtype]
    assert_close_rel(dx, refs[0], dtype, "grad_input", tol)
    assert_close_rel(dw, refs[1], dtype, "grad_weight", tol)
    assert_close_rel(db, refs[2], dtype, "grad_bias", tol)


# ------------------------------------------------------------ bit for bit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_identity_without_residual_is_batch_norm(case, dtype):
    """The activation epilogue adds nothing to Batch Norm's elementwise pass:
    with identity and no residual the output is batch_norm_train's, bit for
    bit."""
    _, shape, fmt = case
    seed(shape, fmt, dtype, "identity")
    x = random_input(shape, dtype, fmt)
    w, b = params(shape[1], dtype)
    out, mean, var = ops.batch_norm_act_train(x, w, b, None, 1e-5, "identity", 0.0)
    out2, mean2, var2 = ops.batch_norm_train(x, w, b, 1e-5)
    assert torch.equal(out, out2) and torch.equal(mean, mean2) and torch.equal(var, var2)


THREAD_SHAPES = [
    ((5, 65, 14, 14), "contiguous"),  # 325 planes: split unevenly by 2 threads
    ((5, 65, 14, 14), "channels_last"),
    ((600, 65, 3), "contiguous"),  # tiny planes
    ((9001, 3), "contiguous"),  # narrow rows, several chunks
    ((64, 1000), "contiguous"),  # wide rows
]


@pytest.mark.parametrize("shape,fmt", THREAD_SHAPES, ids=str)
@torch.no_grad()
def test_results_do_not_depend_on_thread_count(shape, fmt):
    """Partitions depend on the shape only: the same bits for 1, 2 and 3
    threads, the stored gradients included."""
    seed(shape, fmt, "threads")
    C = shape[1]
    x = random_input(shape, torch.float32, fmt)
    res = random_input(shape, torch.float32, fmt, mean=0.0, std=1.0)
    dy = random_input(shape, torch.float32, fmt, mean=0.0, std=1.0)
    w, b = params(C, torch.float32)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, mean, var = ops.batch_norm_act_train(x, w, b, res, 1e-5, "silu", 0.0)
            grads = ops.batch_norm_act_backward(
                dy, x, mean, var, w, b, res, None, None, 1e-5, "silu", 0.0, True
            )
            grads += ops.batch_norm_act_backward(
                dy, x, mean, var, w, b, None, None, None, 1e-5, "silu", 0.0, True
            )[:3]
            y = x.clone()
            ops.batch_norm_act_train_(y, w, b, 1e-5, "elu", 0.7)
            igrads = ops.batch_norm_act_inplace_backward(dy, y, var, w, b, 1e-5, "elu", 0.7, True)
            results.append((out, mean, var, *grads, y, *igrads))
    finally:
        torch.set_num_threads(old)
    for i, (one, *others) in enumerate(zip(*results)):
        assert all(torch.equal(one, other) for other in others), f"output {i}"


# ------------------------------------------------------------ streaming stores

# Odd planes: most start unaligned, so the streamed elementwise pass begins
# with a scalar head (the activations' scalar policy).
STREAM_CONFIGS = [((3, 5, 7, 9), "contiguous"), ((4, 32, 5, 5), "channels_last")]
STREAM_ACTS = ["relu", "leaky_relu", "elu", "silu", "gelu", "gelu_tanh", "hardswish"]


def compute_streamed():
    results = {}
    for i, (shape, fmt) in enumerate(STREAM_CONFIGS):
        for j, dtype in enumerate(DTYPES):
            for k, act in enumerate(STREAM_ACTS):
                gen = torch.Generator().manual_seed(100 * i + 10 * j + k)
                x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
                res = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
                dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
                if fmt == "channels_last":
                    x, res, dy = (
                        t.contiguous(memory_format=torch.channels_last) for t in (x, res, dy)
                    )
                pdt = opmath(dtype)
                w = torch.randn(shape[1], generator=gen, dtype=pdt)
                b = torch.randn(shape[1], generator=gen, dtype=pdt)
                param = ACTIVATIONS[act][0]
                out, mean, var = ops.batch_norm_act_train(x, w, b, res, 1e-5, act, param)
                dx = ops.batch_norm_act_backward(
                    dy, x, mean, var, w, b, res, None, None, 1e-5, act, param, True
                )[0]
                dx_plain = ops.batch_norm_act_backward(
                    dy, x, mean, var, w, b, None, None, None, 1e-5, act, param, True
                )[0]
                results[f"{shape}-{fmt}-{dtype}-{act}"] = [
                    out.contiguous(),
                    dx.contiguous(),
                    dx_plain.contiguous(),
                ]
    return results


def test_streaming_stores(tmp_path):
    """Every output streamed (BNEXT_STREAM_MIN_BYTES=0, a child process) against
    cached stores: the same bits for piecewise-linear activations; the scalar
    head of a streamed plane evaluates exp/erf/tanh with the C library, so the
    others may differ in the last bit of those."""
    out_file = tmp_path / "streamed.pt"
    env = dict(os.environ, BNEXT_STREAM_MIN_BYTES="0")
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); "
        "import test_batch_norm_act_kernels as t; torch.save(t.compute_streamed(), sys.argv[1])"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", code, str(out_file), here], env=env, check=True)
    streamed = torch.load(out_file)
    with torch.no_grad():
        cached = compute_streamed()
    assert streamed.keys() == cached.keys()
    exact = ("relu", "leaky_relu", "hardswish")
    for key, tensors in cached.items():
        for a, b in zip(tensors, streamed[key]):
            if key.endswith(exact):
                assert torch.equal(a, b), key
            else:
                assert rel_err(b, a) <= 4 * REL_TOL[a.dtype], key
