"""Batch Norm's CUDA kernels (and Batch Renorm's, and the distributed
statistics merge), run by the CPU emulator (csrc/emulator/), against the CPU
kernels and float64 references. These run everywhere: on a machine without a
GPU they are the only execution the CUDA code gets. They cover every launch
plan branch (vector and scalar loads, one or many partials, planes split into
stripes, several planes per block) by varying shapes, alignment and the
emulated SM count (the num_sms fixture)."""

import pytest
import torch

import torch_bnext  # noqa: F401  (registers the bnext ops compared with)
from torch_bnext.testing import assert_close_rel, rel_err

BN = torch.ops.bnext

# The statistics and the backward sums are float32 whatever the input's dtype
# (float64 for float64), so half-precision inputs are held to float32's bound;
# tighter than REL_TOL's, which also covers the longer float32 computations of
# outputs and gradients.
SUMS_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}

# (shape, channels_last): channels-first planes long and short, (N, C) input
# (channels-last rows), odd channel counts, vector-friendly and unfriendly sizes.
SHAPES = [
    ((4, 3, 5, 7), False),  # S = 35: ragged planes (vector middles, scalar edges)
    ((3, 5, 14, 14), False),  # S = 196: ResNet's 14x14 maps, ragged in 16-bit types
    ((2, 5, 8, 8), False),  # S = 64: vector loads
    ((1, 1, 1), False),  # one value
    ((2, 6, 5), False),  # S = 5: shorter than a vector, scalar loads
    ((3, 2, 4096), False),  # long planes: stripes split across blocks
    ((2, 3, 4099), False),  # long ragged planes: the edges in the first stripe only
    ((9, 65), False),  # (N, C): channels-last rows, C odd
    ((6, 64, 3, 3), True),  # channels-last, vector loads
    ((5, 3, 4, 2), True),  # channels-last, C = 3
    ((2, 127, 3, 2, 2), False),  # 3-d, C = 127
]


def _input(shape, channels_last, dtype, offset=0, seed=0):
    """Random values; with `offset` a view that starts `offset` elements into
    its storage, so that it is not 16-byte aligned."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    base = torch.randn(numel + offset, generator=gen, dtype=torch.float64) * 2 + 3
    x = base.to(dtype)[offset:].view(shape)
    if channels_last and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _reduce_dims(x):
    return [d for d in range(x.dim()) if d != 1]


@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_stats_match_float64(shape, channels_last, dtype, emu, num_sms):
    x = _input(shape, channels_last, dtype)
    mean, var = emu.batch_norm_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=_reduce_dims(x), unbiased=False)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(mean, ref_mean) <= SUMS_TOL[dtype]
    assert rel_err(var, ref_var) <= SUMS_TOL[dtype] * 10


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_misaligned_inputs_take_the_scalar_path(offset, dtype, emu, num_sms):
    for shape, cl in [((3, 4, 16), False), ((40, 16), False)]:
        x = _input(shape, cl, dtype, offset=offset)
        dy = _input(shape, cl, dtype, offset=offset, seed=1)
        mean, var = emu.batch_norm_stats(x)
        want = BN.batch_norm_stats(x)
        assert rel_err(mean, want[0]) <= 1e-6 and rel_err(var, want[1]) <= 1e-5
        sums = emu.batch_norm_backward_reduce(dy, x, mean)
        want_sums = BN.batch_norm_backward_reduce(dy, x, mean)
        for g, w in zip(sums, want_sums):
            assert rel_err(g, w) <= 1e-5
        scale, shift = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
        out = emu.batch_norm_elemt(x, mean, scale, shift)
        assert rel_err(out, BN.batch_norm_elemt(x, mean, scale, shift)) <= 1e-3


@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_building_blocks_match_cpu_kernels(shape, channels_last, dtype, emu, num_sms):
    x = _input(shape, channels_last, dtype)
    dy = _input(shape, channels_last, dtype, seed=1)
    C = shape[1]
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(2)
    mean, scale, shift, a, k, c = (torch.randn(C, generator=gen, dtype=opmath) for _ in range(6))
    out = emu.batch_norm_elemt(x, mean, scale, shift)
    want = BN.batch_norm_elemt(x, mean, scale, shift)
    assert out.stride() == want.stride() and out.dtype == dtype
    out_tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(out, want) <= out_tol
    sums = emu.batch_norm_backward_reduce(dy, x, mean)
    for got, w in zip(sums, BN.batch_norm_backward_reduce(dy, x, mean)):
        assert rel_err(got, w) <= SUMS_TOL[dtype] * 10
    dx = emu.batch_norm_backward_elemt(dy, x, mean, a, k, c)
    want_dx = BN.batch_norm_backward_elemt(dy, x, mean, a, k, c)
    assert dx.stride() == want_dx.stride()
    assert rel_err(dx, want_dx) <= out_tol


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_train_backward_and_running_stats_match_cpu(channels_last, dtype, emu, num_sms):
    x = _input((6, 9, 5, 4), channels_last, dtype)
    dy = _input((6, 9, 5, 4), channels_last, dtype, seed=1)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(9, dtype=opmath) + 0.5
    b = torch.randn(9, dtype=opmath)
    got = emu.batch_norm_train(x, w, b, 1e-5)
    want = BN.batch_norm_train(x, w, b, 1e-5)
    # Two float16 results, each within REL_TOL of the exact one, may be twice
    # that apart.
    factor = 2 if dtype == torch.float16 else 1
    for name, g, t in zip(("out", "mean", "var"), got, want):
        assert_close_rel(g, t, dtype, name, factor)
    for training in (True, False):
        grads = emu.batch_norm_backward(dy, x, want[1], want[2], w, 1e-5, training)
        wgrads = BN.batch_norm_backward(dy, x, want[1], want[2], w, 1e-5, training)
        for name, g, t in zip(("grad_input", "grad_weight", "grad_bias"), grads, wgrads):
            assert_close_rel(g, t, dtype, f"{name}, training={training}", factor)
    bufs = [torch.zeros(9, dtype=opmath), torch.ones(9, dtype=opmath), torch.tensor(3)]
    wbufs = [t.clone() for t in bufs]
    emu.batch_norm_update_stats(*bufs, want[1], want[2], 0.1, x.numel() // 9)
    BN.batch_norm_update_stats(*wbufs, want[1], want[2], 0.1, x.numel() // 9)
    # Up to FMA contraction, which the two builds decide differently.
    for g, t in zip(bufs, wbufs):
        torch.testing.assert_close(g, t, rtol=1e-14 if opmath == torch.float64 else 1e-6, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_renorm_matches_cpu(channels_last, emu, num_sms):
    x = _input((7, 5, 3, 3), channels_last, torch.float64)
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    got = emu.batch_renorm_train(x, rm, rv, None, None, 1e-5, 1.5, 0.5)
    want = BN.batch_renorm_train(x, rm, rv, None, None, 1e-5, 1.5, 0.5)
    for g, t in zip(got, want):
        assert_close_rel(g, t, torch.float64, "batch_renorm_train")
    got_t = emu.batch_renorm_train_scheduled(
        x, rm, rv, None, None, 1e-5, torch.tensor(1.5), torch.tensor(0.5)
    )
    for g, t in zip(got_t, got):
        assert torch.equal(g, t)


def test_distributed_gather_matches_cpu(emu, num_sms):
    gen = torch.Generator().manual_seed(3)
    means = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    vars_ = torch.rand(3, 7, generator=gen, dtype=torch.float64)
    counts = torch.tensor([4.0, 0.0, 9.0], dtype=torch.float64)
    w, b = torch.rand(7) + 0.5, torch.randn(7)
    rm, rv = torch.randn(7), torch.rand(7) + 0.5
    args = (
        means,
        vars_,
        counts,
        torch.float32,
        w,
        b,
        1e-5,
        rm,
        rv,
        torch.tensor(1.5),
        torch.tensor(0.5),
    )
    got = emu.batch_norm_gather_stats(*args)
    want = BN.batch_norm_gather_stats(*args)
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-7)


def test_large_channels_last_rows(emu):
    """More than 65536 rows: the row loop strides over the capped grid."""
    x = _input((70001, 3), False, torch.float32)
    mean, var = emu.batch_norm_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=0, unbiased=False)
    assert rel_err(mean, ref_mean) <= 1e-6 and rel_err(var, ref_var) <= 1e-6


def test_one_launch_when_one_block_row_suffices(emu):
    """A reduction that fits one block row writes the result directly: no finalize kernel."""
    old = emu.num_sms()
    try:
        emu.set_num_sms(1)
        x = _input((2, 64, 4, 4), False, torch.float32)
        before = emu.launch_count()
        emu.batch_norm_stats(x)
        one = emu.launch_count() - before
        emu.set_num_sms(132)
        before = emu.launch_count()
        emu.batch_norm_stats(_input((512, 2, 4, 4), False, torch.float32))
        two = emu.launch_count() - before
    finally:
        emu.set_num_sms(old)
    assert (one, two) == (1, 2)


def test_launches_of_a_training_step(emu):
    """ATen's CUDA Batch Norm makes a training step's forward in 3 launches
    (statistics; their inversion with the running update; the map), and
    torch.nn's module a 4th for num_batches_tracked += 1; the backward in 2
    (the sums, the map). Ours: the reduction and, where blocks share a
    channel (to fill the GPU where ATen gives a channel one block), the merge
    of their partials; the map, which works out each channel's coefficients
    itself (and in the backward, the weight gradient); the running update,
    which counts the step too (no aten op). So 4 and 3 here, 3 and 2 without
    partials; evaluation 1, as in ATen. The backward's third launch is the
    price of filling the GPU: ATen's NCHW reduction gives each of these 64
    channels one block, on a GPU of 132 SMs; its channels-last one, which
    splits channels over blocks as we do, zeroes a semaphore buffer first
    (at::zeros, a launch too) so that the last block merges."""
    old = emu.num_sms()
    x = _input((64, 64, 7, 7), False, torch.float32)
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    rm, rv, steps = torch.zeros(64), torch.ones(64), torch.tensor(5)
    try:
        emu.set_num_sms(132)  # partials: the merge is a launch of its own
        before = emu.launch_count()
        emu.batch_norm_stats(x)
        stats = emu.launch_count() - before
        before = emu.launch_count()
        with torch.profiler.profile() as prof:
            _, mean, var = emu.batch_norm_train(x, w, b, 1e-5)
            emu.batch_norm_update_stats(rm, rv, steps, mean, var, 0.1, x.numel() // 64)
        train = emu.launch_count() - before
        dy = _input((64, 64, 7, 7), False, torch.float32, seed=1)
        before = emu.launch_count()
        emu.batch_norm_backward(dy, x, mean, var, w, 1e-5, True)
        backward = emu.launch_count() - before
        before = emu.launch_count()
        emu.batch_norm_infer(x, rm, rv, w, b, 1e-5)
        infer = emu.launch_count() - before
    finally:
        emu.set_num_sms(old)
    assert (stats, train, backward, infer) == (2, 4, 3, 1)
    assert steps.item() == 6
    assert not [e.name for e in prof.events() if e.name in ("aten::add_", "aten::add")]
