"""Batch Norm + activation CUDA kernels (batch_norm_act: the activation as the
epilogue of Batch Norm's elementwise kernels and the prologue of its backward
reduce), run by the CPU emulator (csrc/emulator/) against float64 references
composed from torch ops, with gradients from torch.autograd. They cover every
activation in every dtype and layout, with and without a residual, and every
launch plan branch (vector and scalar loads, planes split into stripes, several
planes per block, channels-last rows, one or many partials, grids smaller than
the work) by varying shapes, alignment and the emulated SM count."""

import pytest
import torch
import torch.nn.functional as F
from emulated_cuda import grid_caps, load

from torch_bnext.testing import assert_close_rel, rel_err

ACTIVATIONS = {
    "identity": lambda u, p: u,
    "relu": lambda u, p: F.relu(u),
    "leaky_relu": lambda u, p: F.leaky_relu(u, p),
    "elu": lambda u, p: F.elu(u, p),
    "silu": lambda u, p: F.silu(u),
    "gelu": lambda u, p: F.gelu(u, approximate="none"),
    "gelu_tanh": lambda u, p: F.gelu(u, approximate="tanh"),
    "hardswish": lambda u, p: F.hardswish(u),
    "relu6": lambda u, p: F.relu6(u),
}
# leaky_relu's negative_slope, elu's alpha (the others ignore theirs).
PARAMS = {"leaky_relu": 0.2, "elu": 0.7}
# In-place mode recomputes the activation's input from its output.
INVERTIBLE = ["identity", "leaky_relu", "elu"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# The backward sums are float32 whatever the input's dtype (float64 for
# float64), and g = dy * act'(u) enters them unrounded: half-precision inputs
# are held to float32's bound. act' is computed to a few units of roundoff of
# its terms, which are of order 1, so the error of sum g * w (w = 1 or x - mean)
# is bounded relative to sum |dy * w|: the sums cancel, and g itself may be all
# tiny in a channel (gelu_tanh far left of 0, where 1 + tanh(.) cancels).
SUMS_TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}

# Batch statistics (float32, float64 for float64), as Batch Norm's tests hold them.
STATS_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}

# (shape, channels_last) for the launch plans: channels-first planes short and
# long, (N, C) input and channels-last rows, odd channel counts.
PATH_SHAPES = [
    ((4, 3, 5, 7), False),  # S = 35: scalar loads, several planes per block
    ((2, 5, 8, 8), False),  # S = 64: vector loads
    ((1, 1, 1), False),  # one value
    ((2, 1, 8195), False),  # long odd planes: scalar loads, stripes split across blocks
    ((3, 2, 4096), False),  # long planes, vector loads, several partials
    ((2, 3, 3, 2, 2), False),  # 3-d
    ((9, 65), False),  # (N, C): channels-last rows, C odd
    ((33, 1), False),  # (N, C), one channel
    ((1200, 3), False),  # many rows: the row loops stride over the grid (unrolled, then tail)
    ((6, 64, 3, 3), True),  # channels-last, vector loads
    ((5, 3, 4, 2), True),  # channels-last, C = 3
    ((3, 127, 2, 2), True),  # channels-last, C = 127
]


@pytest.fixture(autouse=True)
def _no_grad():
    """The emulated ops are called as kernels: no autograd (the references
    turn it on for themselves)."""
    with torch.no_grad():
        yield


def _input(shape, channels_last, dtype, offset=0, seed=0, std=2.0, mean=3.0):
    """Random values of `dtype`; with `offset` a view `offset` elements into its
    storage, so that it is not 16-byte aligned."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    base = torch.randn(numel + offset, generator=gen, dtype=torch.float64) * std + mean
    x = base.to(dtype)[offset:].view(shape)
    if channels_last and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _like(values, x):
    """`values` (float64) rounded to x's dtype and laid out as x."""
    return torch.empty_like(x).copy_(values)


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_vectors(C, dtype, seed, n):
    """n per-channel vectors of the opmath dtype: mean-like, scale-like (positive
    and negative, away from zero), shift-like, then more shift-like ones."""
    gen = torch.Generator().manual_seed(seed)
    opmath = _opmath(dtype)
    mean = torch.randn(C, generator=gen, dtype=opmath) * 0.3 + 3
    sign = torch.where(torch.rand(C, generator=gen) < 0.25, -1.0, 1.0).to(opmath)
    scale = (torch.rand(C, generator=gen, dtype=opmath) * 1.5 + 0.5) * sign
    rest = [torch.randn(C, generator=gen, dtype=opmath) for _ in range(n - 2)]
    return [mean, scale, *rest]


def _ch(v, x):
    """A per-channel vector in float64, broadcast against x (N, C, *)."""
    return v.double().view(1, -1, *([1] * (x.dim() - 2)))


def _reduce_dims(x):
    return [d for d in range(x.dim()) if d != 1]


def _act(name, u):
    return ACTIVATIONS[name](u, PARAMS.get(name, 0.0))


def _act_grad(name, u, dy):
    """dy * act'(u) in float64, by autograd."""
    with torch.enable_grad():
        u = u.detach().double().requires_grad_()
        return torch.autograd.grad(_act(name, u), u, dy.double())[0]


def _inverse(name, y):
    """The activation's input from its output (invertible activations), float64."""
    p = PARAMS.get(name, 0.0)
    if name == "leaky_relu":
        return torch.where(y > 0, y, y / p)
    if name == "elu":
        return torch.where(y > 0, y, torch.log1p(y / p))
    assert name == "identity"
    return y


def _pre(x, mean, scale, shift, residual):
    """u = (x - mean) * scale + shift [+ residual] in float64."""
    u = (x.double() - _ch(mean, x)) * _ch(scale, x) + _ch(shift, x)
    return u if residual is None else u + residual.double()


def _check_sum(got, g_ref, dy, w, dtype, what):
    """sum g * w per channel against float64 (SUMS_TOL's bound)."""
    dims = _reduce_dims(g_ref)
    assert got.dtype == _opmath(dtype) and got.shape == (g_ref.shape[1],)
    err = (got.double() - (g_ref * w).sum(dims)).abs()
    size = (dy.double() * w).abs().sum(dims)
    assert torch.all(err <= SUMS_TOL[dtype] * size), (what, (err / size).max().item())


def _check_sums(got, g_ref, dy, xmu_ref, dtype):
    _check_sum(got[0], g_ref, dy, torch.ones_like(xmu_ref), dtype, "sum g")
    _check_sum(got[1], g_ref, dy, xmu_ref, dtype, "sum g * (x - mean)")


# ------------------------------------------------------------ building blocks


def _check_act_blocks(emu, shape, channels_last, dtype, name, residual):
    """batch_norm_act_elemt and batch_norm_act_backward_reduce against float64."""
    x = _input(shape, channels_last, dtype)
    dy = _input(shape, channels_last, dtype, seed=1, mean=0.0, std=1.0)
    res = _input(shape, channels_last, dtype, seed=2, mean=0.0, std=1.0) if residual else None
    mean, scale, shift = _channel_vectors(shape[1], dtype, seed=3, n=3)
    p = PARAMS.get(name, 0.0)
    u = _pre(x, mean, scale, shift, res)

    out = emu.batch_norm_act_elemt(x, mean, scale, shift, res, name, p)
    assert out.dtype == dtype and out.stride() == x.stride()
    assert_close_rel(out, _act(name, u), dtype, f"{name} out")

    g, *sums = emu.batch_norm_act_backward_reduce(dy, x, mean, scale, shift, res, name, p)
    g_ref = _act_grad(name, u, dy)
    xmu_ref = x.double() - _ch(mean, x)
    assert g.dtype == dtype and g.stride() == x.stride()
    assert_close_rel(g, g_ref, dtype, f"{name} g")
    _check_sums(sums, g_ref, dy, xmu_ref, dtype)
    if not residual:
        _check_recomputing_blocks(emu, dy, x, mean, scale, shift, name, g_ref, xmu_ref)


def _check_recomputing_blocks(emu, dy, x, mean, scale, shift, name, g_ref, xmu_ref):
    """batch_norm_act_backward_sums and _elemt (no residual: g recomputed in
    both passes, never stored) against float64."""
    p = PARAMS.get(name, 0.0)
    sums = emu.batch_norm_act_backward_sums(dy, x, mean, scale, shift, name, p)
    _check_sums(sums, g_ref, dy, xmu_ref, x.dtype)
    a, k, c = _channel_vectors(x.shape[1], x.dtype, seed=5, n=3)
    dx = emu.batch_norm_act_backward_elemt(dy, x, mean, scale, shift, a, k, c, name, p)
    dx_ref = _ch(a, x) * g_ref + _ch(k, x) * xmu_ref + _ch(c, x)
    assert dx.dtype == x.dtype and dx.stride() == x.stride()
    assert_close_rel(dx, dx_ref, x.dtype, f"{name} recomputed dx")


def _check_inplace_blocks(emu, shape, channels_last, dtype, name):
    """batch_norm_act_inplace_backward_reduce and _elemt against float64, from
    an output y = act(u) in x's dtype: the reference recomputes u from that same
    y (act^-1 from torch ops), so rounding y is no error of the kernels."""
    x = _input(shape, channels_last, dtype)
    dy = _input(shape, channels_last, dtype, seed=1, mean=0.0, std=1.0)
    g_in = _input(shape, channels_last, dtype, seed=2, mean=0.0, std=1.0)
    mean, scale, shift, a, k, c = _channel_vectors(shape[1], dtype, seed=4, n=6)
    scale = scale * 0.25  # |u| within about 5: elu's inverse stays well conditioned
    inv_scale = 1 / scale
    p = PARAMS.get(name, 0.0)
    y = _like(_act(name, _pre(x, mean, scale, shift, None)), x)
    u_ref = _inverse(name, y.double())
    xmu_ref = (u_ref - _ch(shift, x)) * _ch(inv_scale, x)

    g, *sums = emu.batch_norm_act_inplace_backward_reduce(dy, y, shift, inv_scale, name, p)
    g_ref = _act_grad(name, u_ref, dy)
    assert g.dtype == dtype and g.stride() == x.stride()
    assert_close_rel(g, g_ref, dtype, f"{name} in-place g")
    _check_sums(sums, g_ref, dy, xmu_ref, dtype)

    dx = emu.batch_norm_act_inplace_backward_elemt(g_in, y, shift, inv_scale, a, k, c, name, p)
    dx_ref = _ch(a, x) * g_in.double() + _ch(k, x) * xmu_ref + _ch(c, x)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    assert_close_rel(dx, dx_ref, dtype, f"{name} in-place dx")


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_building_blocks_every_activation(name, dtype, emu):
    for shape, cl in [((2, 5, 8, 8), False), ((5, 3, 4, 2), True), ((9, 65), False)]:
        for residual in (False, True):
            _check_act_blocks(emu, shape, cl, dtype, name, residual)
        if name in INVERTIBLE:
            _check_inplace_blocks(emu, shape, cl, dtype, name)


@pytest.mark.parametrize("shape,channels_last", PATH_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_building_blocks_every_path(shape, channels_last, dtype, emu):
    _check_act_blocks(emu, shape, channels_last, dtype, "gelu", residual=True)
    _check_act_blocks(emu, shape, channels_last, dtype, "relu", residual=False)
    _check_inplace_blocks(emu, shape, channels_last, dtype, "elu")


@pytest.mark.parametrize(
    "shape,channels_last",
    [((2, 1, 8195), False), ((3, 2, 4096), False), ((1200, 3), False), ((6, 64, 3, 3), True)],
)
def test_launch_plans_across_sm_counts(shape, channels_last, emu, num_sms):
    """One block row or many partials, grids smaller than the work: the SM
    count sets them."""
    for dtype in (torch.float32, torch.bfloat16):
        _check_act_blocks(emu, shape, channels_last, dtype, "silu", residual=True)
        _check_inplace_blocks(emu, shape, channels_last, dtype, "leaky_relu")


@pytest.mark.parametrize("caps", [(1, 1), (2, 3)], ids=["1x1", "2x3"])
@pytest.mark.parametrize(
    "shape,channels_last",
    [((4, 3, 5, 7), False), ((2, 1, 8195), False), ((1200, 3), False), ((6, 64, 3, 3), True)],
)
def test_capped_grids_stride_over_the_rest(shape, channels_last, caps, emu):
    """Grids capped far below the work (on a GPU only beyond 65535 blocks,
    e.g. ResNet's 7x7 planes at batch 256): every plan's grid-stride loops over
    planes, rows and partials run, and the emulator refuses a launch past the
    cap."""
    with grid_caps(emu, *caps):
        for dtype in (torch.float32, torch.float16):
            _check_act_blocks(emu, shape, channels_last, dtype, "silu", residual=True)
            _check_act_blocks(emu, shape, channels_last, dtype, "relu", residual=False)
            _check_inplace_blocks(emu, shape, channels_last, dtype, "leaky_relu")


def test_grid_caps_are_enforced(emu):
    """A plan that ignored the cap would be refused, as a GPU refuses a grid
    beyond 65535 in y."""
    emu.selftest("grid_y_of_3")
    with grid_caps(emu, 65535, 2):
        assert emu.grid_caps() == [65535, 2]
        with pytest.raises(RuntimeError, match="invalid configuration argument"):
            emu.selftest("grid_y_of_3")
        with pytest.raises(ValueError, match="grid caps"):
            emu.set_grid_caps(0, 1)
    assert emu.grid_caps() == [65535, 65535]


def test_wide_channels_first(emu):
    """Many channels in planes: one block column per channel."""
    _check_act_blocks(emu, (2, 65, 2, 3), False, torch.float32, "hardswish", residual=True)
    _check_inplace_blocks(emu, (1, 127, 3, 1), False, torch.float32, "elu")


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_misaligned_tensors_take_the_scalar_path(offset, dtype, emu):
    """Any one tensor off 16 bytes (here the residual, or dy with y) sends the
    kernels to scalar loads."""
    for shape, cl in [((3, 4, 16), False), ((40, 16), False)]:
        x = _input(shape, cl, dtype)
        res = _input(shape, cl, dtype, offset=offset, seed=2, mean=0.0, std=1.0)
        dy = _input(shape, cl, dtype, offset=offset, seed=1, mean=0.0, std=1.0)
        mean, scale, shift = _channel_vectors(shape[1], dtype, seed=3, n=3)
        u = _pre(x, mean, scale, shift, res)
        out = emu.batch_norm_act_elemt(x, mean, scale, shift, res, "silu", 0.0)
        assert_close_rel(out, _act("silu", u), dtype, "misaligned out")
        g, *sums = emu.batch_norm_act_backward_reduce(dy, x, mean, scale, shift, res, "silu", 0.0)
        g_ref = _act_grad("silu", u, dy)
        assert_close_rel(g, g_ref, dtype, "misaligned g")
        _check_sums(sums, g_ref, dy, x.double() - _ch(mean, x), dtype)
        u = _pre(x, mean, scale, shift, None)
        _check_recomputing_blocks(
            emu,
            dy,
            x,
            mean,
            scale,
            shift,
            "silu",
            _act_grad("silu", u, dy),
            x.double() - _ch(mean, x),
        )
        y = _like(_act("elu", u), x)
        g, *sums = emu.batch_norm_act_inplace_backward_reduce(dy, y, shift, 1 / scale, "elu", 0.7)
        assert_close_rel(g, _act_grad("elu", _inverse("elu", y.double()), dy), dtype, "misaligned")


def test_launches_one_block_row_or_partials_and_none_when_empty(emu):
    """The activations' reduce writes its sums directly when one block row
    suffices and leaves partials for the finalize kernel otherwise; an empty
    batch launches nothing and sums to zeros."""
    old = emu.num_sms()
    launches = []
    try:
        for sms, shape in [(1, (2, 64, 4, 4)), (132, (512, 2, 4, 4))]:
            emu.set_num_sms(sms)
            x = _input(shape, False, torch.float32)
            mean, scale, shift = _channel_vectors(shape[1], torch.float32, seed=3, n=3)
            before = emu.launch_count()
            emu.batch_norm_act_backward_reduce(x, x, mean, scale, shift, None, "relu", 0.0)
            emu.batch_norm_act_inplace_backward_reduce(x, x, shift, scale, "elu", 0.7)
            emu.batch_norm_act_backward_sums(x, x, mean, scale, shift, "relu", 0.0)
            launches.append(emu.launch_count() - before)
    finally:
        emu.set_num_sms(old)
    assert launches == [3, 6]
    x, v = torch.empty(0, 3, 4), torch.ones(3)
    before = emu.launch_count()
    g, *sums = emu.batch_norm_act_backward_reduce(x, x, v, v, v, x, "silu", 0.0)
    assert g.shape == x.shape and all(torch.equal(t, torch.zeros(3)) for t in sums)
    g, *sums = emu.batch_norm_act_inplace_backward_reduce(x, x, v, v, "elu", 0.7)
    assert g.shape == x.shape and all(torch.equal(t, torch.zeros(3)) for t in sums)
    assert emu.batch_norm_act_elemt(x, v, v, v, x, "gelu", 0.0).shape == x.shape
    dx = emu.batch_norm_act_inplace_backward_elemt(x, x, v, v, v, v, v, "elu", 0.7)
    assert dx.shape == x.shape
    sums = emu.batch_norm_act_backward_sums(x, x, v, v, v, "silu", 0.0)
    assert all(torch.equal(t, torch.zeros(3)) for t in sums)
    dx = emu.batch_norm_act_backward_elemt(x, x, v, v, v, v, v, v, "silu", 0.0)
    assert dx.shape == x.shape
    assert emu.launch_count() == before


def test_in_place_needs_an_invertible_activation(emu):
    y = _input((4, 3), False, torch.float32)
    v = torch.ones(3)
    with pytest.raises(ValueError, match="invertible"):
        emu.batch_norm_act_inplace_backward_reduce(y, y, v, v, "relu", 0.0)
    with pytest.raises(ValueError, match="invertible"):
        emu.batch_norm_act_inplace_backward_elemt(y, y, v, v, v, v, v, "leaky_relu", -0.1)


# --------------------------------------------------------------- whole passes


def _composite(x, w, b, res, name, eps, mean=None, var=None, r=None, d=None):
    """act(batch_norm(x) [+ res]) in float64 from torch ops: batch statistics
    (differentiated through) unless mean and var are given; Batch Renorm's r
    and d as constants."""
    if mean is None:
        var, mean = torch.var_mean(x, dim=_reduce_dims(x), unbiased=False)
    xhat = (x - _ch(mean, x)) * torch.rsqrt(_ch(var, x) + eps)
    if r is not None:
        xhat = xhat * _ch(r, x) + _ch(d, x)
    u = xhat * _ch(w, x) + _ch(b, x)
    return _act(name, u if res is None else u + res)


def _autograd(dy, x, w, b, res, name, eps, **kw):
    """Output and (grad_input, grad_weight, grad_bias[, grad_residual]) of the
    float64 composite."""
    with torch.enable_grad():
        leaves = [t.detach().double().requires_grad_() for t in (x, w, b, res) if t is not None]
        out = _composite(*leaves[:3], leaves[3] if res is not None else None, name, eps, **kw)
        grads = torch.autograd.grad(out, leaves, dy.double())
    return out.detach(), grads


def _params(C, dtype, seed):
    """weight (either sign), bias, running mean, running var: float32 for
    half-precision inputs, as under autocast."""
    gen = torch.Generator().manual_seed(seed)
    pd = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    sign = torch.where(torch.rand(C, generator=gen) < 0.25, -1.0, 1.0)
    w = ((torch.rand(C, generator=gen) + 0.5) * sign).to(pd)
    b = torch.randn(C, generator=gen).to(pd)
    rm = (torch.randn(C, generator=gen) * 0.5 + 3).to(pd)
    rv = (torch.rand(C, generator=gen) * 2 + 1).to(pd)
    return w, b, rm, rv


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_passes_match_autograd(name, dtype, emu):
    p, eps = PARAMS.get(name, 0.0), 1e-5
    for shape, cl in [((6, 3, 5, 4), False), ((4, 65, 2, 3), True)]:
        x = _input(shape, cl, dtype)
        dy = _input(shape, cl, dtype, seed=1, mean=0.0, std=1.0)
        res = _input(shape, cl, dtype, seed=2, mean=0.0, std=1.0)
        w, b, rm, rv = _params(shape[1], dtype, seed=5)
        what = f"{name} {tuple(shape)}"

        out, mean, var = emu.batch_norm_act_train(x, w, b, res, eps, name, p)
        ref_out, ref_grads = _autograd(dy, x, w, b, res, name, eps)
        ref_var, ref_mean = torch.var_mean(x.double(), dim=_reduce_dims(x), unbiased=False)
        assert out.stride() == x.stride() and out.dtype == dtype
        assert_close_rel(out, ref_out, dtype, f"{what} train out")
        assert (
            rel_err(mean, ref_mean) <= STATS_TOL[dtype]
            and rel_err(var, ref_var) <= STATS_TOL[dtype]
        )
        grads = emu.batch_norm_act_backward(
            dy, x, mean, var, w, b, res, None, None, eps, name, p, True
        )
        for label, got, ref in zip(("input", "weight", "bias", "pre"), grads, ref_grads):
            assert_close_rel(got, ref, dtype, f"{what} train grad_{label}")

        # No residual: backward recomputes g in both passes and stores none.
        out, mean, var = emu.batch_norm_act_train(x, w, b, None, eps, name, p)
        ref_out, ref_grads = _autograd(dy, x, w, b, None, name, eps)
        assert_close_rel(out, ref_out, dtype, f"{what} train out, no residual")
        grads = emu.batch_norm_act_backward(
            dy, x, mean, var, w, b, None, None, None, eps, name, p, True
        )
        assert grads[3].numel() == 0
        for label, got, ref in zip(("input", "weight", "bias"), grads, ref_grads):
            assert_close_rel(got, ref, dtype, f"{what} train grad_{label}, no residual")

        # No residual, no weight or bias.
        out = emu.batch_norm_act_train(x, None, None, None, eps, name, p)[0]
        ones, zeros = torch.ones_like(w), torch.zeros_like(b)
        assert_close_rel(out, _composite(x.double(), ones, zeros, None, name, eps), dtype, what)

        # Eval: running statistics, constants.
        out = emu.batch_norm_act_infer(x, rm, rv, w, b, res, eps, name, p)
        ref_out, ref_grads = _autograd(dy, x, w, b, res, name, eps, mean=rm, var=rv)
        assert_close_rel(out, ref_out, dtype, f"{what} infer out")
        grads = emu.batch_norm_act_backward(
            dy, x, rm, rv, w, b, res, None, None, eps, name, p, False
        )
        for label, got, ref in zip(("input", "weight", "bias", "pre"), grads, ref_grads):
            assert_close_rel(got, ref, dtype, f"{what} eval grad_{label}")

        # Batch Renorm: r and d from the running statistics, clipped.
        r_max, d_max = 1.5, 0.5
        out, mean, var, r, d = emu.batch_renorm_act_train(
            x, rm, rv, w, b, res, eps, torch.tensor(r_max), torch.tensor(d_max), name, p
        )
        sigma = torch.sqrt(rv.double() + eps)
        ref_r = (torch.sqrt(ref_var + eps) / sigma).clamp(1 / r_max, r_max)
        ref_d = ((ref_mean - rm.double()) / sigma).clamp(-d_max, d_max)
        assert rel_err(r, ref_r) <= STATS_TOL[dtype] and rel_err(d, ref_d) <= STATS_TOL[dtype]
        ref_out, ref_grads = _autograd(dy, x, w, b, res, name, eps, r=ref_r, d=ref_d)
        assert_close_rel(out, ref_out, dtype, f"{what} renorm out")
        grads = emu.batch_norm_act_backward(dy, x, mean, var, w, b, res, r, d, eps, name, p, True)
        for label, got, ref in zip(("input", "weight", "bias", "pre"), grads, ref_grads):
            assert_close_rel(got, ref, dtype, f"{what} renorm grad_{label}")


# In-place backward recomputes x - mean from the rounded output: for elu
# through log1p(y / alpha), whose condition number grows as u goes negative,
# so half-precision gradients carry more of the output's rounding (float16's
# weight gradient reaches 0.8 of REL_TOL).
INPLACE_FACTOR = {torch.float64: 1, torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}


@pytest.mark.parametrize("name", INVERTIBLE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_passes_match_autograd(name, dtype, emu):
    p, eps = PARAMS.get(name, 0.0), 1e-5
    for shape, cl in [((6, 3, 5, 4), False), ((4, 65, 2, 3), True), ((9, 3), False)]:
        x = _input(shape, cl, dtype, std=1.0)
        dy = _input(shape, cl, dtype, seed=1, mean=0.0, std=1.0)
        w, b, rm, rv = _params(shape[1], dtype, seed=6)
        what = f"{name} {tuple(shape)}"

        y = x.clone()
        mean, var = emu.batch_norm_act_train_(y, w, b, eps, name, p)
        ref_out, ref_grads = _autograd(dy, x, w, b, None, name, eps)
        assert y.stride() == x.stride()
        assert_close_rel(y, ref_out, dtype, f"{what} train_")
        ref_var, ref_mean = torch.var_mean(x.double(), dim=_reduce_dims(x), unbiased=False)
        assert (
            rel_err(mean, ref_mean) <= STATS_TOL[dtype]
            and rel_err(var, ref_var) <= STATS_TOL[dtype]
        )
        grads = emu.batch_norm_act_inplace_backward(dy, y, var, w, b, eps, name, p, True)
        for label, got, ref in zip(("input", "weight", "bias"), grads, ref_grads):
            assert_close_rel(got, ref, dtype, f"{what} train grad_{label}", INPLACE_FACTOR[dtype])

        y = x.clone()
        emu.batch_norm_act_infer_(y, rm, rv, w, b, eps, name, p)
        ref_out, ref_grads = _autograd(dy, x, w, b, None, name, eps, mean=rm, var=rv)
        assert_close_rel(y, ref_out, dtype, f"{what} infer_")
        grads = emu.batch_norm_act_inplace_backward(dy, y, rv, w, b, eps, name, p, False)
        for label, got, ref in zip(("input", "weight", "bias"), grads, ref_grads):
            assert_close_rel(got, ref, dtype, f"{what} eval grad_{label}", INPLACE_FACTOR[dtype])


def test_in_place_writes_back_into_a_strided_input(emu):
    """A non-dense input is computed in a dense copy and copied back."""
    wide = _input((4, 3, 5, 8), False, torch.float32)
    x = wide[..., ::2]
    want = _composite(x.double(), torch.ones(3), torch.zeros(3), None, "leaky_relu", 1e-5)
    emu.batch_norm_act_train_(x, None, None, 1e-5, "leaky_relu", 0.2)
    assert_close_rel(x, want, torch.float32, "strided train_")
    assert_close_rel(
        wide[..., 1::2],
        _input((4, 3, 5, 8), False, torch.float32)[..., 1::2],
        torch.float32,
        "untouched",
    )


# ---------------------------------------------------------------- schedules


def _all_results(emu):
    """Every building block and whole pass over shapes that take every kernel
    path, at SM counts with one block row and with many partials."""
    out = []
    old = emu.num_sms()
    try:
        for sms in (1, 132):
            emu.set_num_sms(sms)
            for shape, cl in [
                ((2, 1, 8195), False),
                ((4, 3, 5, 7), False),
                ((1200, 3), False),
                ((6, 64, 3, 3), True),
                ((9, 65), False),
            ]:
                x = _input(shape, cl, torch.float32)
                dy = _input(shape, cl, torch.float32, seed=1, mean=0.0, std=1.0)
                res = _input(shape, cl, torch.float32, seed=2, mean=0.0, std=1.0)
                mean, scale, shift, a, k, c = _channel_vectors(shape[1], torch.float32, 3, 6)
                out.append(emu.batch_norm_act_elemt(x, mean, scale, shift, res, "gelu", 0.0))
                out += emu.batch_norm_act_backward_reduce(
                    dy, x, mean, scale, shift, res, "gelu", 0.0
                )
                out += emu.batch_norm_act_backward_sums(dy, x, mean, scale, shift, "gelu", 0.0)
                out.append(
                    emu.batch_norm_act_backward_elemt(
                        dy, x, mean, scale, shift, a, k, c, "gelu", 0.0
                    )
                )
                y = emu.batch_norm_act_elemt(x, mean, scale, shift, None, "elu", 0.7)
                out += emu.batch_norm_act_inplace_backward_reduce(
                    dy, y, shift, 1 / scale, "elu", 0.7
                )
                out.append(
                    emu.batch_norm_act_inplace_backward_elemt(
                        dy, y, shift, 1 / scale, a, k, c, "elu", 0.7
                    )
                )
                o, m, v = emu.batch_norm_act_train(x, scale, shift, res, 1e-5, "silu", 0.0)
                out += [o, m, v]
                out += emu.batch_norm_act_backward(
                    dy, x, m, v, scale, shift, res, None, None, 1e-5, "silu", 0.0, True
                )
                out += emu.batch_norm_act_backward(
                    dy, x, m, v, scale, shift, None, None, None, 1e-5, "silu", 0.0, True
                )[:3]
    finally:
        emu.set_num_sms(old)
    return out


def test_results_are_bitwise_identical_across_schedules():
    """Run once (not under each of the emu fixture's schedules): it sets the
    schedules it compares."""
    emu = load()
    before = emu.schedule()
    try:
        emu.set_schedule("forward")
        want = _all_results(emu)
        emu.set_schedule("reverse")
        got = _all_results(emu)
    finally:
        emu.set_schedule(before)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), i
