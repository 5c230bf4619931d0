"""The LayerNorm / RMSNorm CUDA kernels (csrc/layer_norm/cuda_kernels.cuh), run
by the CPU emulator, against the CPU kernels and float64 references computed
from the same (rounded) inputs. The shapes reach every launch plan: rows short
enough for groups of 1 to 32 lanes, rows of a block each, vector and scalar
loads, row loops that stride over a capped grid, column sums in one part or
merged from several."""

import pytest
import torch
import torch.nn.functional as F
from emulated_cuda import grid_caps

import torch_bnext  # noqa: F401  (registers the bnext ops compared with)
from torch_bnext.testing import REL_TOL

BN = torch.ops.bnext
EPS = 1e-5

# bfloat16 tighter than REL_TOL's: these shapes keep within 1e-2.
TOL = {**REL_TOL, torch.bfloat16: 1e-2}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Groups of 1, 4, 8 and 32 lanes (vector and scalar), a block per row.
ROW_LENGTHS = [1, 3, 32, 33, 64, 1000, 1024, 1025, 4096, 5000]
LN_MASKS = [(True, True), (True, False), (False, True), (False, False)]


def _err(got, want, scale=None):
    """||got - want|| relative to ||want||, or to `scale` (the size of the terms
    a result is a sum of) where cancellation makes the result itself small."""
    got, want = got.double(), want.double()
    den = want.norm()
    if scale is not None:
        den = torch.maximum(den, scale.double().norm())
    return ((got - want).norm() / den.clamp_min(1e-300)).item()


def _tensor(shape, dtype, seed, offset=0, mean=0.0, std=1.0):
    """Random values; with `offset` a view that starts `offset` elements into
    its storage, so that its rows are not 16-byte aligned."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    base = (torch.randn(numel + offset, generator=gen, dtype=torch.float64) * std + mean).to(dtype)
    return base[offset:].view(shape)


def _inputs(M, N, dtype, offset=0, weight=True, bias=True):
    x = _tensor((M, N), dtype, 0, offset, mean=3.0, std=2.0)
    dy = _tensor((M, N), dtype, 1, offset)
    w = _tensor((N,), dtype, 2, offset, mean=1.0, std=0.5) if weight else None
    b = _tensor((N,), dtype, 3, offset) if bias else None
    return x, dy, w, b


# ---------------------------------------------------------------- references


def _leaf(t):
    """A float64 copy that collects a gradient (never the caller's tensor)."""
    return None if t is None else t.to(torch.float64, copy=True).requires_grad_()


def _layer_norm_ref(x, dy, w, b):
    """float64 outputs, statistics and gradients, plus the scales of dx, dw, db."""
    N = x.shape[-1]
    xd, wd, bd = (_leaf(t) for t in (x, w, b))
    y = F.layer_norm(xd, [N], wd, bd, EPS)
    y.backward(dy.double())
    var, mean = torch.var_mean(x.double(), dim=-1, unbiased=False)
    rstd = (var + EPS).rsqrt()
    ref = {"out": y.detach(), "mean": mean, "rstd": rstd, "dx": xd.grad}
    ref.update(_param_grad_refs(x, dy, w, mean, rstd, wd, bd))
    return ref


def _rms_norm_ref(x, dy, w):
    N = x.shape[-1]
    xd, wd = _leaf(x), _leaf(w)
    y = F.rms_norm(xd, [N], wd, EPS)
    y.backward(dy.double())
    rstd = (x.double().square().mean(-1) + EPS).rsqrt()
    ref = {"out": y.detach(), "rstd": rstd, "dx": xd.grad}
    ref.update(_param_grad_refs(x, dy, w, torch.zeros_like(rstd), rstd, wd, None))
    return ref


def _param_grad_refs(x, dy, w, mean, rstd, wd, bd):
    dyd = dy.double()
    g = dyd * (w.double() if w is not None else 1.0)
    xhat = (x.double() - mean[:, None]) * rstd[:, None]
    return {
        "dx_scale": g * rstd[:, None],
        "dw": wd.grad if wd is not None else (dyd * xhat).sum(0),
        # |xhat| + 1: rows of one value have xhat = 0 exactly, up to rounding.
        "dw_scale": (dyd.abs() * (xhat.abs() + 1)).sum(0),
        "db": bd.grad if bd is not None else dyd.sum(0),
        "db_scale": dyd.abs().sum(0),
    }


# ----------------------------------------------------------------- checkers


def _check(name, got, cpu, ref, ref_key, tol, scale_key=None):
    assert got.dtype == cpu.dtype and got.shape == cpu.shape, name
    scale = ref[scale_key] if scale_key else None
    assert _err(got, cpu, scale) <= tol, (name, "vs cpu", _err(got, cpu, scale))
    err = _err(got, ref[ref_key], scale)
    assert err <= tol, (name, "vs float64", err)


def _check_layer_norm(emu, x, dy, w, b, masks=LN_MASKS):
    tol = TOL[x.dtype]
    ref = _layer_norm_ref(x, dy, w, b)
    got = emu.layer_norm_fwd(x, [x.shape[-1]], w, b, EPS)
    cpu = BN.layer_norm_fwd(x, [x.shape[-1]], w, b, EPS)
    for name, g, c in zip(("out", "mean", "rstd"), got, cpu):
        _check(name, g, c, ref, name, tol)
    for mask in masks:
        if w is None and mask[0]:
            continue
        grads = emu.layer_norm_bwd(dy, x, cpu[1], cpu[2], w, EPS, list(mask))
        cpu_grads = BN.layer_norm_bwd(dy, x, cpu[1], cpu[2], w, EPS, list(mask))
        _check("dx", grads[0], cpu_grads[0], ref, "dx", tol, "dx_scale")
        for name, wanted, g, c in zip(("dw", "db"), mask, grads[1:], cpu_grads[1:]):
            if wanted:
                _check(name, g, c, ref, name, tol, name + "_scale")
            else:
                assert g.shape == c.shape == (0,)


def _check_rms_norm(emu, x, dy, w, weight_grads=(True, False)):
    tol = TOL[x.dtype]
    ref = _rms_norm_ref(x, dy, w)
    got = emu.rms_norm_fwd(x, [x.shape[-1]], w, EPS)
    cpu = BN.rms_norm_fwd(x, [x.shape[-1]], w, EPS)
    for name, g, c in zip(("out", "rstd"), got, cpu):
        _check(name, g, c, ref, name, tol)
    for weight_grad in weight_grads:
        if w is None and weight_grad:
            continue
        grads = emu.rms_norm_bwd(dy, x, cpu[1], w, EPS, weight_grad)
        cpu_grads = BN.rms_norm_bwd(dy, x, cpu[1], w, EPS, weight_grad)
        _check("dx", grads[0], cpu_grads[0], ref, "dx", tol, "dx_scale")
        if weight_grad:
            _check("dw", grads[1], cpu_grads[1], ref, "dw", tol, "dw_scale")
        else:
            assert grads[1].shape == (0,)


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("N", ROW_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_cpu_and_float64(dtype, N, emu):
    x, dy, w, b = _inputs(5, N, dtype)
    _check_layer_norm(emu, x, dy, w, b, masks=[(True, True)])
    _check_rms_norm(emu, x, dy, w, weight_grads=[True])


@pytest.mark.parametrize("N", [64, 1000, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_params_beside_16_bit_rows(dtype, N, emu):
    """AMP's float32 parameters take the opmath path; the input's own dtype
    (the other tests) is read as it is: both as the CPU kernels."""
    x, dy, w, b = _inputs(5, N, dtype)
    _check_layer_norm(emu, x, dy, w.float(), b.float(), masks=[(True, True)])
    _check_rms_norm(emu, x, dy, w.float(), weight_grads=[True])


# aten::to of a tensor already in the dtype returns it, with no copy.
_CASTS = ("aten::_to_copy", "aten::copy_")


@pytest.mark.parametrize("N", [1000, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_parameter_gradients_come_from_the_merge(dtype, N, emu, num_sms):
    """The merge of the column partials rounds the gradients to the 16-bit
    parameters' dtype itself: a backward of 300 rows (short rows of 1000, long
    ones of 4096) is the dx kernel and the merge, with no cast after them
    (ATen's CUDA LayerNorm: 2 launches too)."""
    x, dy, w, b = _inputs(300, N, dtype)
    mean, rstd = BN.layer_norm_fwd(x, [N], w, b, EPS)[1:]
    rms_rstd = BN.rms_norm_fwd(x, [N], w, EPS)[1]
    before = emu.launch_count()
    with torch.profiler.profile() as prof:
        _, dw, db = emu.layer_norm_bwd(dy, x, mean, rstd, w, EPS, [True, True])
        launches = emu.launch_count() - before
        _, rdw = emu.rms_norm_bwd(dy, x, rms_rstd, w, EPS, True)
    assert not [e.name for e in prof.events() if e.name in _CASTS]
    assert launches == 2
    assert dw.dtype == db.dtype == rdw.dtype == dtype
    cpu = BN.layer_norm_bwd(dy, x, mean, rstd, w, EPS, [True, True])
    for got, want in ((dw, cpu[1]), (db, cpu[2])):
        assert _err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("N", ROW_LENGTHS)
def test_single_row(N, emu):
    x, dy, w, b = _inputs(1, N, torch.float32)
    _check_layer_norm(emu, x, dy, w, b, masks=[(True, True)])
    _check_rms_norm(emu, x, dy, w, weight_grads=[True])


@pytest.mark.parametrize("N", [33, 1000, 5000])
def test_every_output_mask(N, emu):
    x, dy, w, b = _inputs(5, N, torch.float32)
    _check_layer_norm(emu, x, dy, w, b)
    _check_rms_norm(emu, x, dy, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N", [32, 1024, 5000])
def test_without_weight_or_bias(N, dtype, emu):
    for weight, bias in [(False, False), (True, False), (False, True)]:
        x, dy, w, b = _inputs(5, N, dtype, weight=weight, bias=bias)
        _check_layer_norm(emu, x, dy, w, b)
        if not bias:
            _check_rms_norm(emu, x, dy, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [64, 1000, 4096])
def test_misaligned_inputs_take_the_scalar_path(N, dtype, emu):
    """Storage offset 1: rows (and the parameters) start off a 16-byte boundary."""
    x, dy, w, b = _inputs(5, N, dtype, offset=1)
    _check_layer_norm(emu, x, dy, w, b, masks=[(True, True)])
    _check_rms_norm(emu, x, dy, w, weight_grads=[True])


@pytest.mark.parametrize("M,N", [(300, 3), (300, 64), (160, 1024), (40, 4096)])
def test_strided_rows_and_column_parts(M, N, emu, num_sms):
    """Rows beyond one pass of the capped grid, and column sums merged from
    parts; the results do not depend on the run (no atomics)."""
    x, dy, w, b = _inputs(M, N, torch.float32)
    _check_layer_norm(emu, x, dy, w, b, masks=[(True, True)])
    _check_rms_norm(emu, x, dy, w, weight_grads=[True])
    mean, rstd = BN.layer_norm_fwd(x, [N], w, b, EPS)[1:]
    first = emu.layer_norm_bwd(dy, x, mean, rstd, w, EPS, [True, True])
    second = emu.layer_norm_bwd(dy, x, mean, rstd, w, EPS, [True, True])
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("M,N", [(300, 3), (160, 1024), (40, 4096)])
def test_capped_grids_stride_over_the_rest(M, N, emu):
    """Grids capped at 2 x 2 blocks: the row loops, the column tiles and the
    column parts all stride over the rest."""
    x, dy, w, b = _inputs(M, N, torch.float32)
    with grid_caps(emu, 2, 2):
        _check_layer_norm(emu, x, dy, w, b, masks=[(True, True)])
        _check_rms_norm(emu, x, dy, w, weight_grads=[True])


@pytest.mark.parametrize("N", [1, 3])
def test_more_rows_than_a_grid_dimension(N, emu):
    """70000 rows (> 65535): the row loops and the column parts stride."""
    x, dy, w, b = _inputs(70000, N, torch.float32)
    _check_layer_norm(emu, x, dy, w, b, masks=[(True, True)])
    _check_rms_norm(emu, x, dy, w, weight_grads=[True])


@pytest.mark.parametrize("shape", [(0, 7), (0, 1024), (2, 0, 64)])
def test_no_rows(shape, emu):
    x = torch.randn(shape)
    w, b = torch.ones(shape[-1]), torch.zeros(shape[-1])
    out, mean, rstd = emu.layer_norm_fwd(x, [shape[-1]], w, b, EPS)
    assert out.shape == x.shape and mean.shape == rstd.shape == shape[:-1]
    dx, dw, db = emu.layer_norm_bwd(x, x, mean, rstd, w, EPS, [True, True])
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))
    rout, rrstd = emu.rms_norm_fwd(x, [shape[-1]], w, EPS)
    assert rout.shape == x.shape and rrstd.shape == shape[:-1]
    rdx, rdw = emu.rms_norm_bwd(x, x, rrstd, w, EPS, True)
    assert rdx.shape == x.shape and torch.equal(rdw, torch.zeros_like(w))


def test_empty_rows(emu):
    """Rows of no values: mean 0 (an empty Welford set), rstd 1 / sqrt(eps) as
    the CPU kernels give, empty gradients."""
    x = torch.randn(5, 0)
    w, b = torch.ones(0), torch.zeros(0)
    out, mean, rstd = emu.layer_norm_fwd(x, [0], w, b, EPS)
    assert out.shape == (5, 0) and torch.equal(mean, torch.zeros(5))
    assert torch.equal(rstd, BN.layer_norm_fwd(x, [0], w, b, EPS)[2])
    dx, dw, db = emu.layer_norm_bwd(x, x, mean, rstd, w, EPS, [True, True])
    assert dx.shape == (5, 0) and dw.shape == db.shape == (0,)
    rout, rrstd = emu.rms_norm_fwd(x, [0], w, EPS)
    assert torch.equal(rrstd, BN.rms_norm_fwd(x, [0], w, EPS)[1])
    rdx, rdw = emu.rms_norm_bwd(x, x, rrstd, w, EPS, True)
    assert rdx.shape == (5, 0) and rdw.shape == (0,)


def _backward_launches(emu, M, N, dtype, mask=(True, True), offset=0):
    x, dy, w, b = _inputs(M, N, dtype, offset=offset)
    mean, rstd = BN.layer_norm_fwd(x, [N], w, b, EPS)[1:]
    before = emu.launch_count()
    emu.layer_norm_bwd(dy, x, mean, rstd, w, EPS, list(mask))
    return emu.launch_count() - before


def test_column_sums_launches(emu):
    """The dx kernel adds the column sums (fused): one launch when its grid is
    one block, else a merge of its blocks' partial rows. float64 takes the
    dx kernel and then the column kernels: one launch when one part of rows
    suffices, else partials and their merge. No column sums, no column work."""
    old = emu.num_sms()
    try:
        emu.set_num_sms(132)
        dtypes = (torch.float32, torch.float64)
        counts = [_backward_launches(emu, M, 64, dtype) for dtype in dtypes for M in (5, 300)]
        no_columns = [
            _backward_launches(emu, 300, 64, dtype, mask=(False, False)) for dtype in dtypes
        ]
    finally:
        emu.set_num_sms(old)
    assert counts == [1, 2, 2, 3]
    assert no_columns == [1, 1]


# One row (a grid of one block): 1 launch when the column sums are fused, 2
# (dx, then the column kernel) when not; 16-bit gradients one more, the merge
# that rounds them to the parameters' dtype (where a cast would follow). The
# register budget is 32 values of dw per thread: short rows of up to 1024
# values in every lane-group plan and KV bound (1, a quarter, all of the
# budget), long rows up to 32 values and 16 vectors per thread (512 threads:
# N <= 16384 with vectors, 8192 without), vector and scalar loads; float64
# never.
FUSION_CASES = [
    (torch.float32, 64, 0, 1),  # short, a vector per lane
    (torch.float32, 256, 0, 1),  # short, KV 2 (a quarter of the budget)
    (torch.float32, 1024, 0, 1),  # short, KV 8 (all of it)
    (torch.bfloat16, 1024, 0, 2),  # short, KV 4 (8-value vectors)
    (torch.float16, 40, 0, 2),  # short, groups of 8 lanes
    (torch.float32, 1000, 1, 1),  # short, scalar loads, KV 32
    (torch.float32, 5000, 0, 1),  # long, KV 4
    (torch.float32, 12288, 0, 1),  # long, KV 8
    (torch.bfloat16, 16384, 0, 2),  # long, KV 4 = all of the budget
    (torch.float32, 3000, 1, 1),  # long, scalar loads, KV 16
    (torch.bfloat16, 8192, 1, 2),  # long, scalar loads, 16 per thread
    (torch.float32, 16388, 0, 2),  # long, 4097 vectors: over the budget
    (torch.bfloat16, 16392, 0, 3),
    (torch.bfloat16, 8200, 1, 3),  # scalar loads, 17 per thread: over the budget
    (torch.float64, 64, 0, 2),  # float64: twice the registers per value
    (torch.float64, 1024, 0, 2),
    (torch.float64, 5000, 0, 2),
]


@pytest.mark.parametrize("dtype,N,offset,launches", FUSION_CASES)
def test_fused_and_separate_column_sums(dtype, N, offset, launches, emu, num_sms):
    """Which path a shape takes, and that both match the CPU and float64 over
    rows that stride over the grid (and so several partial rows)."""
    assert _backward_launches(emu, 1, N, dtype, offset=offset) == launches
    x, dy, w, b = _inputs(40 if N > 1024 else 300, N, dtype, offset=offset)
    _check_layer_norm(emu, x, dy, w, b, masks=[(True, True), (False, True), (True, False)])
    _check_rms_norm(emu, x, dy, w, weight_grads=[True])


def test_rows_of_several_dims_and_non_contiguous_input(emu):
    x = _tensor((6, 4, 3, 10), torch.float32, 0, mean=3.0, std=2.0).transpose(0, 1)
    dy = _tensor((4, 6, 3, 10), torch.float32, 1)
    w = _tensor((3, 10), torch.float32, 2, mean=1.0, std=0.5)
    b = _tensor((3, 10), torch.float32, 3)
    got = emu.layer_norm_fwd(x, [3, 10], w, b, EPS)
    want = BN.layer_norm_fwd(x, [3, 10], w, b, EPS)
    for g, t in zip(got, want):
        assert g.shape == t.shape and _err(g, t) <= 1e-5
    grads = emu.layer_norm_bwd(dy, x, want[1], want[2], w, EPS, [True, True])
    wgrads = BN.layer_norm_bwd(dy, x, want[1], want[2], w, EPS, [True, True])
    for g, t in zip(grads, wgrads):
        assert g.shape == t.shape and _err(g, t) <= 1e-5
