"""The channels-first LayerNorm / RMSNorm CUDA kernels
(csrc/layer_norm/cuda_channel_kernels.cuh: the _2d ops on NCHW-like input),
run by the CPU emulator, against float64 references computed from the same
(rounded) inputs with plain torch over dim 1. The shapes reach every launch
plan: channel lanes from 1 to 16, channels many times the lanes, odd
positions counts (the last tile part empty), tiles that stride over a capped
grid, dweight/dbias written by a single block or merged from its partial
rows. A channels_last input takes the row kernels instead."""

import pytest
import torch
import torch.nn.functional as F
from emulated_cuda import grid_caps

from torch_bnext.testing import REL_TOL, param_dtype_for, to_format

EPS = 1e-5

# bfloat16 tighter than REL_TOL's: these shapes keep within 1e-2.
TOL = {**REL_TOL, torch.bfloat16: 1e-2}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LN_MASKS = [(True, True), (True, False), (False, True), (False, False)]
# (N, C, *): odd channel counts, 1x1 / 7x7 / 5x3 planes, 3D and 5D input, B = 1
# (C = 1 and 1x1 planes through strided views: see _channel_kernel_input).
SHAPES = [
    (2, 3, 5, 3),
    (1, 65, 7, 7),
    (4, 127, 1, 1),
    (3, 1, 5, 3),
    (3, 33, 10),
    (2, 5, 3, 4, 2),
]


def _err(got, want, scale=None):
    """||got - want|| relative to ||want||, or to `scale` (the size of the terms
    a result is a sum of) where cancellation makes the result itself small."""
    got, want = got.double(), want.double()
    den = want.norm()
    if scale is not None:
        den = torch.maximum(den, scale.double().norm())
    return ((got - want).norm() / den.clamp_min(1e-300)).item()


def _tensor(shape, dtype, seed, mean=0.0, std=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).to(dtype)


def _channel_kernel_input(t):
    """t, or, where its channels are innermost already (C = 1, or planes of
    one position), which the ops read in place as rows for the row kernels, a
    strided view of it, which they make NCHW-contiguous for the channel
    kernels."""
    return to_format(t, "strided") if t.movedim(1, -1).is_contiguous() else t


def _inputs(shape, dtype, weight=True, bias=True):
    """x, dy of `dtype`, laid out for the channel kernels; (C,) parameters of
    param_dtype_for(dtype) (float32 for half and bfloat16)."""
    C, pdtype = shape[1], param_dtype_for(dtype)
    x = _channel_kernel_input(_tensor(shape, dtype, 0, mean=3.0, std=2.0))
    dy = _channel_kernel_input(_tensor(shape, dtype, 1))
    w = _tensor((C,), pdtype, 2, mean=1.0, std=0.5) if weight else None
    b = _tensor((C,), pdtype, 3) if bias else None
    return x, dy, w, b


# ---------------------------------------------------------------- references


def _leaf(t):
    """A float64 copy that collects a gradient (never the caller's tensor)."""
    return None if t is None else t.to(torch.float64, copy=True).requires_grad_()


def _reference(x, dy, w, b, centred):
    """float64 outputs, statistics and gradients (dim 1 moved last, torch's
    own layer_norm / the RMSNorm formula, moved back), with the scales of
    dx, dw, db."""
    C = x.shape[1]
    xd, wd, bd = (_leaf(t) for t in (x, w, b))
    rows = xd.movedim(1, -1)
    if centred:
        y = F.layer_norm(rows, [C], wd, bd, EPS)
    else:
        y = rows * (rows.square().mean(-1, keepdim=True) + EPS).rsqrt()
        if wd is not None:
            y = y * wd
    y = y.movedim(-1, 1)
    y.backward(dy.double())
    x64, dy64 = x.double(), dy.double()
    if centred:
        var, mean = torch.var_mean(x64, dim=1, unbiased=False)
    else:
        var = x64.square().mean(1)
        mean = torch.zeros_like(var)
    rstd = (var + EPS).rsqrt()
    xhat = (x64 - mean.unsqueeze(1)) * rstd.unsqueeze(1)
    g = dy64 * (w.double().view(-1, *[1] * (x.dim() - 2)) if w is not None else 1.0)
    dims = [d for d in range(x.dim()) if d != 1]
    return {
        "out": y.detach(),
        "mean": mean,
        "rstd": rstd,
        "dx": xd.grad,
        "dx_scale": g * rstd.unsqueeze(1),
        "dw": wd.grad if wd is not None else (dy64 * xhat).sum(dims),
        # |xhat| + 1: channels of one value have xhat = 0 exactly, up to rounding.
        "dw_scale": (dy64.abs() * (xhat.abs() + 1)).sum(dims),
        "db": bd.grad if bd is not None else dy64.sum(dims),
        "db_scale": dy64.abs().sum(dims),
    }


# ----------------------------------------------------------------- checkers


def _check(name, got, ref, tol, dtype=None):
    want = ref[name]
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if dtype is not None:
        assert got.dtype == dtype, (name, got.dtype, dtype)
    scale = ref.get(name + "_scale")
    err = _err(got, want, scale)
    assert err <= tol, (name, "vs float64", err)


def _check_layer_norm(emu, x, dy, w, b, masks=LN_MASKS):
    tol, opmath = TOL[x.dtype], torch.float64 if x.dtype == torch.float64 else torch.float32
    ref = _reference(x, dy, w, b, centred=True)
    out, mean, rstd = emu.layer_norm_2d_fwd(x, w, b, EPS)
    _check("out", out, ref, tol, x.dtype)
    _check("mean", mean, ref, tol, opmath)
    _check("rstd", rstd, ref, tol, opmath)
    grad_dtype = w.dtype if w is not None else x.dtype
    for mask in masks:
        if w is None and mask[0]:
            continue
        dx, dw, db = emu.layer_norm_2d_bwd(dy, x, mean, rstd, w, EPS, list(mask))
        _check("dx", dx, ref, tol, x.dtype)
        for name, wanted, got in (("dw", mask[0], dw), ("db", mask[1], db)):
            if wanted:
                _check(name, got, ref, tol, grad_dtype)
            else:
                assert got.shape == (0,)
    return out


def _check_rms_norm(emu, x, dy, w, weight_grads=(True, False)):
    tol, opmath = TOL[x.dtype], torch.float64 if x.dtype == torch.float64 else torch.float32
    ref = _reference(x, dy, w, None, centred=False)
    out, rstd = emu.rms_norm_2d_fwd(x, w, EPS)
    _check("out", out, ref, tol, x.dtype)
    _check("rstd", rstd, ref, tol, opmath)
    for weight_grad in weight_grads:
        if w is None and weight_grad:
            continue
        dx, dw = emu.rms_norm_2d_bwd(dy, x, rstd, w, EPS, weight_grad)
        _check("dx", dx, ref, tol, x.dtype)
        if weight_grad:
            _check("dw", dw, ref, tol, w.dtype)
        else:
            assert dw.shape == (0,)
    return out


def _check_both(emu, x, dy, w, b, full_masks=False):
    masks = LN_MASKS if full_masks else [(True, True)]
    _check_layer_norm(emu, x, dy, w, b, masks=masks)
    _check_rms_norm(emu, x, dy, w, weight_grads=(True, False) if full_masks else (True,))


def _plan(emu, P, C):
    """The grid and channel lanes the kernels launch with (channel_plan in
    cuda_channel_kernels.cuh), for choosing shapes that reach a plan."""
    tiles = -(-P // 32)
    most = min(1 << (C - 1).bit_length(), 16)
    wanted = -(-emu.num_sms() * 2048 // (tiles * 32))
    lanes = max(min(1 << (wanted - 1).bit_length(), 16), min(4, most))
    lanes = min(lanes, most)
    per_sm = min(2048 // (32 * lanes), 32)
    return min(tiles, emu.num_sms() * per_sm, 65535), lanes


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_match_float64(dtype, shape, emu):
    x, dy, w, b = _inputs(shape, dtype)
    _check_both(emu, x, dy, w, b)


@pytest.mark.parametrize("shape", [(4, 65, 9, 7), (2, 3, 40, 40)], ids=str)
def test_capped_grids_stride_over_the_rest(shape, emu):
    """Grids capped at 2 x 2 blocks: the position tiles and the column parts
    stride over the rest."""
    x, dy, w, b = _inputs(shape, torch.float32)
    with grid_caps(emu, 2, 2):
        _check_both(emu, x, dy, w, b)


@pytest.mark.parametrize("shape", [(2, 1000, 2, 3), (1, 1000, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_channels_per_lane(dtype, shape, emu):
    """C = 1000: every channel lane takes dozens of channels, batches of
    loads and a partial last batch."""
    x, dy, w, b = _inputs(shape, dtype)
    _check_both(emu, x, dy, w, b)


@pytest.mark.parametrize("shape", [(2, 65, 5, 3), (3, 33, 10)], ids=str)
def test_every_output_mask(shape, emu):
    x, dy, w, b = _inputs(shape, torch.float32)
    _check_both(emu, x, dy, w, b, full_masks=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_without_weight_or_bias(dtype, emu):
    for weight, bias in [(False, False), (True, False), (False, True)]:
        x, dy, w, b = _inputs((2, 7, 5, 3), dtype, weight=weight, bias=bias)
        _check_layer_norm(emu, x, dy, w, b)
        if not bias:
            _check_rms_norm(emu, x, dy, w)


def test_grad_weight_without_a_weight_is_refused(emu):
    x, dy, _, _ = _inputs((2, 3, 4), torch.float32)
    _, mean, rstd = emu.layer_norm_2d_fwd(x, None, None, EPS)
    with pytest.raises(RuntimeError, match="grad_weight requested without a weight"):
        emu.layer_norm_2d_bwd(dy, x, mean, rstd, None, EPS, [True, False])


@pytest.mark.parametrize(
    "shape,memory_format",
    [((2, 65, 5, 3), torch.channels_last), ((2, 5, 3, 4, 2), torch.channels_last_3d)],
    ids=["4d", "5d"],
)
def test_channels_last_takes_the_row_kernels(shape, memory_format, emu):
    """Channels innermost: rows of C for the row kernels, read in place; the
    outputs keep the layout, and agree with the NCHW path's."""
    x, dy, w, b = _inputs(shape, torch.float32)
    x_cl, dy_cl = (t.contiguous(memory_format=memory_format) for t in (x, dy))
    out = _check_layer_norm(emu, x_cl, dy_cl, w, b, masks=[(True, True)])
    assert out.is_contiguous(memory_format=memory_format)
    rms_out = _check_rms_norm(emu, x_cl, dy_cl, w, weight_grads=(True,))
    assert rms_out.is_contiguous(memory_format=memory_format)
    for got, want in zip(
        emu.layer_norm_2d_fwd(x_cl, w, b, EPS), emu.layer_norm_2d_fwd(x, w, b, EPS)
    ):
        assert _err(got, want) <= 1e-6
    _, mean, rstd = emu.layer_norm_2d_fwd(x_cl, w, b, EPS)
    dx = emu.layer_norm_2d_bwd(dy_cl, x_cl, mean, rstd, w, EPS, [False, False])[0]
    assert dx.is_contiguous(memory_format=memory_format)


def test_non_contiguous_input(emu):
    """Any layout but channels-innermost is made NCHW-contiguous first."""
    x, dy, w, b = _inputs((3, 6, 5, 8), torch.float32)
    x_s, dy_s = x[..., ::2], dy[..., ::2]
    assert not x_s.is_contiguous()
    _check_both(emu, x_s, dy_s, w, b)
    xt, dyt = x.transpose(2, 3), dy.transpose(2, 3)
    _check_both(emu, xt, dyt, w, b)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0)], ids=str)
def test_no_positions(shape, emu):
    x = torch.randn(shape)
    w, b = torch.ones(3), torch.zeros(3)
    out, mean, rstd = emu.layer_norm_2d_fwd(x, w, b, EPS)
    stat_shape = shape[:1] + shape[2:]
    assert out.shape == x.shape and mean.shape == rstd.shape == stat_shape
    dx, dw, db = emu.layer_norm_2d_bwd(x, x, mean, rstd, w, EPS, [True, True])
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))
    rout, rrstd = emu.rms_norm_2d_fwd(x, w, EPS)
    assert rout.shape == x.shape and rrstd.shape == stat_shape
    rdx, rdw = emu.rms_norm_2d_bwd(x, x, rrstd, w, EPS, True)
    assert rdx.shape == x.shape and torch.equal(rdw, torch.zeros(3))


def _launches(emu, op, *args):
    before = emu.launch_count()
    op(*args)
    return emu.launch_count() - before


def test_launches(emu):
    """A forward and a dx are one launch each; the column sums come from the
    dx kernel, directly with a grid of one block (32 positions or fewer), else
    through its partial rows and a merge launch."""
    counts = []
    for shape in [(1, 6, 4, 8), (2, 6, 5, 7)]:
        x, dy, w, b = _inputs(shape, torch.float32)
        _, mean, rstd = emu.layer_norm_2d_fwd(x, w, b, EPS)
        counts.append(_launches(emu, emu.layer_norm_2d_fwd, x, w, b, EPS))
        for mask in ([True, True], [False, True], [False, False]):
            counts.append(_launches(emu, emu.layer_norm_2d_bwd, dy, x, mean, rstd, w, EPS, mask))
        counts.append(_launches(emu, emu.rms_norm_2d_bwd, dy, x, rstd, w, EPS, True))
    assert counts == [1, 1, 1, 1, 1] + [1, 2, 2, 1, 2]


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"]
)
def test_16_bit_parameter_gradients_from_the_merge(memory_format, emu):
    """bfloat16 parameters (a model cast to bfloat16): the merge of the dx
    kernel's partials writes their gradients in bfloat16, with no cast after
    it. The one copy left is the weight's to float32 before the kernels (the
    _2d ops read opmath parameters)."""
    x, dy, w, b = _inputs((4, 16, 6, 6), torch.bfloat16)
    w, b = w.bfloat16(), b.bfloat16()
    x, dy = (t.contiguous(memory_format=memory_format) for t in (x, dy))
    _, mean, rstd = emu.layer_norm_2d_fwd(x, w, b, EPS)
    with torch.profiler.profile() as prof:
        before = emu.launch_count()
        _, dw, db = emu.layer_norm_2d_bwd(dy, x, mean, rstd, w, EPS, [True, True])
        launches = emu.launch_count() - before
    copies = [e.name for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")]
    assert copies == ["aten::_to_copy", "aten::copy_"] and launches == 2
    ref = _reference(x, dy, w, b, centred=True)
    _check("dw", dw, ref, TOL[torch.bfloat16], torch.bfloat16)
    _check("db", db, ref, TOL[torch.bfloat16], torch.bfloat16)


# (N, C, *): the grid's stride (blocks * 32 positions) within a plane (S = 576)
# and over several planes at once (S = 25, 4), with 1, 4 and 4 lanes.
STRIDED_SHAPES = [
    (2, 1, 24, 24),
    (2, 3, 24, 24),
    (2, 6, 24, 24),
    (2, 40, 24, 24),
    (40, 6, 5, 5),
    (130, 3, 2, 2),
]


@pytest.mark.parametrize("shape", STRIDED_SHAPES, ids=str)
def test_tiles_stride_over_the_grid(shape, emu):
    """More tiles of 32 positions than the grid's blocks (one SM: 16 blocks
    of 4 lanes, 32 of 1 lane), so the blocks loop, stepping their positions
    across planes, and their partial rows of the column sums add several
    tiles each."""
    old = emu.num_sms()
    try:
        emu.set_num_sms(1)
        positions = shape[0] * shape[2] * shape[3]
        grid, _ = _plan(emu, positions, shape[1])
        assert grid < -(-positions // 32)
        x, dy, w, b = _inputs(shape, torch.float32)
        _check_both(emu, x, dy, w, b)
    finally:
        emu.set_num_sms(old)


@pytest.mark.parametrize("shape", [(2, 7, 9, 11), (3, 20, 6, 6), (1, 300, 3, 3)], ids=str)
def test_column_partials_are_deterministic(shape, emu, num_sms):
    """The plan follows the SM count (lanes, grid, partial rows); the results
    match float64 under each, and repeat bitwise (no atomics)."""
    x, dy, w, b = _inputs(shape, torch.float32)
    _check_both(emu, x, dy, w, b)
    _, mean, rstd = emu.layer_norm_2d_fwd(x, w, b, EPS)
    first = emu.layer_norm_2d_bwd(dy, x, mean, rstd, w, EPS, [True, True])
    second = emu.layer_norm_2d_bwd(dy, x, mean, rstd, w, EPS, [True, True])
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def _representative_results(emu):
    out = []
    for shape in [(2, 7, 9, 11), (1, 300, 3, 3), (2, 3, 5)]:
        x, dy, w, b = _inputs(shape, torch.float32)
        y, mean, rstd = emu.layer_norm_2d_fwd(x, w, b, EPS)
        out += [y, mean, rstd, *emu.layer_norm_2d_bwd(dy, x, mean, rstd, w, EPS, [True, True])]
        y, rstd = emu.rms_norm_2d_fwd(x, w, EPS)
        out += [y, rstd, *emu.rms_norm_2d_bwd(dy, x, rstd, w, EPS, True)]
    return out


def test_bitwise_identical_under_every_schedule(emu):
    before = emu.schedule()
    try:
        emu.set_schedule("forward")
        want = _representative_results(emu)
        for name, seed in [("reverse", 0), ("random", 1), ("random", 2)]:
            emu.set_schedule(name, seed)
            got = _representative_results(emu)
            for i, (g, w) in enumerate(zip(got, want)):
                assert torch.equal(g, w), f"result {i} differs under {name}:{seed}"
    finally:
        emu.set_schedule(before)


def test_large_mean_keeps_the_variance(emu):
    """|mean| = 1e4 >> std = 1: float32 values hold the deviations to about
    1e-3 (torch's own float32 layer_norm is 6e-4 off here), and Welford's
    merges keep that; E[x^2] - E[x]^2 would lose the variance entirely."""
    x = _tensor((2, 64, 4, 4), torch.float32, 0, mean=1e4, std=1.0)
    dy = _tensor((2, 64, 4, 4), torch.float32, 1)
    ref = _reference(x, dy, None, None, centred=True)
    out, mean, rstd = emu.layer_norm_2d_fwd(x, None, None, EPS)
    _check("mean", mean, ref, TOL[torch.float32])
    _check("rstd", rstd, ref, 1e-3)
    _check("out", out, ref, 1e-3)
