"""The CUDA kernels, run by the CPU emulator (csrc/emulator/), against the CPU
kernels and float64 references. These run everywhere: on a machine without a
GPU they are the only execution the CUDA code gets. They cover every launch
plan branch (vector and scalar loads, one or many partials, planes split into
stripes, several planes per block) by varying shapes, alignment and the
emulated SM count."""

import os
import subprocess
import sys

import pytest
import torch

import torch_bnext  # noqa: F401  (the bnext ops to compare with)
from emulated_cuda import load, num_sms  # noqa: F401  (num_sms: a fixture)

EMU = load()
BN = torch.ops.bnext

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}

# (shape, channels_last): channels-first planes long and short, (N, C) input
# (channels-last rows), odd channel counts, vector-friendly and unfriendly sizes.
SHAPES = [
    ((4, 3, 5, 7), False),      # S = 35: scalar loads, several planes per block
    ((2, 5, 8, 8), False),      # S = 64: vector loads
    ((1, 1, 1), False),         # one value
    ((3, 2, 4096), False),      # long planes: stripes split across blocks
    ((9, 65), False),           # (N, C): channels-last rows, C odd
    ((6, 64, 3, 3), True),      # channels-last, vector loads
    ((5, 3, 4, 2), True),       # channels-last, C = 3
    ((2, 127, 3, 2, 2), False), # 3-d, C = 127
]


def _rel(got, want):
    got, want = got.double(), want.double()
    den = want.norm().clamp_min(1e-300)
    return ((got - want).norm() / den).item()


def _input(shape, channels_last, dtype, offset=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    base = torch.randn(numel + offset, generator=gen, dtype=torch.float64) * 2 + 3
    x = base[offset:].view(shape).to(dtype) if offset == 0 else base.to(dtype)[offset:].view(shape)
    if channels_last and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x



def _reduce_dims(x):
    return [d for d in range(x.dim()) if d != 1]


@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_stats_match_float64(shape, channels_last, dtype, num_sms):
    x = _input(shape, channels_last, dtype)
    mean, var = EMU.batch_norm_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=_reduce_dims(x), unbiased=False)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert _rel(mean, ref_mean) <= TOL[dtype]
    assert _rel(var, ref_var) <= TOL[dtype] * 10


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_misaligned_inputs_take_the_scalar_path(offset, dtype, num_sms):
    for shape, cl in [((3, 4, 16), False), ((40, 16), False)]:
        x = _input(shape, cl, dtype, offset=offset)
        dy = _input(shape, cl, dtype, offset=offset, seed=1)
        mean, var = EMU.batch_norm_stats(x)
        want = BN.batch_norm_stats(x)
        assert _rel(mean, want[0]) <= 1e-6 and _rel(var, want[1]) <= 1e-5
        sums = EMU.batch_norm_backward_reduce(dy, x, mean)
        want_sums = BN.batch_norm_backward_reduce(dy, x, mean)
        for g, w in zip(sums, want_sums):
            assert _rel(g, w) <= 1e-5
        scale, shift = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
        out = EMU.batch_norm_elemt(x, mean, scale, shift)
        assert _rel(out, BN.batch_norm_elemt(x, mean, scale, shift)) <= 1e-3


@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_building_blocks_match_cpu_kernels(shape, channels_last, dtype, num_sms):
    x = _input(shape, channels_last, dtype)
    dy = _input(shape, channels_last, dtype, seed=1)
    C = shape[1]
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(2)
    mean, scale, shift, a, k, c = (torch.randn(C, generator=gen, dtype=opmath) for _ in range(6))
    out = EMU.batch_norm_elemt(x, mean, scale, shift)
    want = BN.batch_norm_elemt(x, mean, scale, shift)
    assert out.stride() == want.stride() and out.dtype == dtype
    out_tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    assert _rel(out, want) <= out_tol
    sums = EMU.batch_norm_backward_reduce(dy, x, mean)
    for got, w in zip(sums, BN.batch_norm_backward_reduce(dy, x, mean)):
        assert _rel(got, w) <= TOL[dtype] * 10
    dx = EMU.batch_norm_backward_elemt(dy, x, mean, a, k, c)
    want_dx = BN.batch_norm_backward_elemt(dy, x, mean, a, k, c)
    assert dx.stride() == want_dx.stride()
    assert _rel(dx, want_dx) <= out_tol


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_train_backward_and_running_stats_match_cpu(channels_last, dtype, num_sms):
    x = _input((6, 9, 5, 4), channels_last, dtype)
    dy = _input((6, 9, 5, 4), channels_last, dtype, seed=1)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(9, dtype=opmath) + 0.5
    b = torch.randn(9, dtype=opmath)
    got = EMU.batch_norm_train(x, w, b, 1e-5)
    want = BN.batch_norm_train(x, w, b, 1e-5)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for g, t in zip(got, want):
        assert _rel(g, t) <= tol
    for training in (True, False):
        grads = EMU.batch_norm_backward(dy, x, want[1], want[2], w, 1e-5, training)
        wgrads = BN.batch_norm_backward(dy, x, want[1], want[2], w, 1e-5, training)
        for g, t in zip(grads, wgrads):
            assert _rel(g, t) <= tol
    bufs = [torch.zeros(9, dtype=opmath), torch.ones(9, dtype=opmath), torch.tensor(3)]
    wbufs = [t.clone() for t in bufs]
    EMU.batch_norm_update_stats(*bufs, want[1], want[2], 0.1, x.numel() // 9)
    BN.batch_norm_update_stats(*wbufs, want[1], want[2], 0.1, x.numel() // 9)
    # Up to FMA contraction, which the two builds decide differently.
    for g, t in zip(bufs, wbufs):
        torch.testing.assert_close(g, t, rtol=1e-14 if opmath == torch.float64 else 1e-6, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_renorm_matches_cpu(channels_last, num_sms):
    x = _input((7, 5, 3, 3), channels_last, torch.float64)
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    got = EMU.batch_renorm_train(x, rm, rv, None, None, 1e-5, 1.5, 0.5)
    want = BN.batch_renorm_train(x, rm, rv, None, None, 1e-5, 1.5, 0.5)
    for g, t in zip(got, want):
        assert _rel(g, t) <= 1e-12
    got_t = EMU.batch_renorm_train_scheduled(x, rm, rv, None, None, 1e-5, torch.tensor(1.5),
                                             torch.tensor(0.5))
    for g, t in zip(got_t, got):
        assert torch.equal(g, t)


def test_distributed_gather_matches_cpu(num_sms):
    gen = torch.Generator().manual_seed(3)
    means = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    vars_ = torch.rand(3, 7, generator=gen, dtype=torch.float64)
    counts = torch.tensor([4.0, 0.0, 9.0], dtype=torch.float64)
    w, b = torch.rand(7) + 0.5, torch.randn(7)
    rm, rv = torch.randn(7), torch.rand(7) + 0.5
    args = (means, vars_, counts, torch.float32, w, b, 1e-5, rm, rv, torch.tensor(1.5), torch.tensor(0.5))
    got = EMU.batch_norm_gather_stats(*args)
    want = BN.batch_norm_gather_stats(*args)
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-7)


def test_large_channels_last_rows():
    """More than 65536 rows: the row loop strides over the capped grid."""
    x = _input((70001, 3), False, torch.float32)
    mean, var = EMU.batch_norm_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=0, unbiased=False)
    assert _rel(mean, ref_mean) <= 1e-6 and _rel(var, ref_var) <= 1e-6


def test_one_launch_when_one_block_row_suffices():
    """A reduction that fits one block row writes the result directly: no finalize kernel."""
    old = EMU.num_sms()
    try:
        EMU.set_num_sms(1)
        x = _input((2, 64, 4, 4), False, torch.float32)
        before = EMU.launch_count()
        EMU.batch_norm_stats(x)
        one = EMU.launch_count() - before
        EMU.set_num_sms(132)
        before = EMU.launch_count()
        EMU.batch_norm_stats(_input((512, 2, 4, 4), False, torch.float32))
        two = EMU.launch_count() - before
    finally:
        EMU.set_num_sms(old)
    assert (one, two) == (1, 2)


# ------------------------------------------------------------- the emulator


def test_emulator_reductions_give_cuda_results():
    out = EMU.selftest("reductions")
    # 96 threads valued 1..96: the block sum, then each warp's butterfly sum.
    assert out[:4].tolist() == [96 * 97 / 2, sum(range(1, 33)), sum(range(33, 65)), sum(range(65, 97))]
    col = EMU.selftest("column")
    assert col[:4].tolist() == [(x + 1) * 36 for x in range(4)]


def test_emulator_runs_blocks_in_order():
    assert EMU.selftest("block_order")[:7].tolist() == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("case,message", [
    ("divergent_barrier", "different __syncthreads"),
    ("exited_lane", "lane that has exited"),
    ("barrier_or_shuffle", "deadlock"),
    ("too_many_threads", "invalid configuration argument"),
    ("grid_y_too_large", "invalid configuration argument"),
])
def test_emulator_reports_what_a_gpu_would_hang_on_or_refuse(case, message):
    with pytest.raises(RuntimeError, match=message):
        EMU.selftest(case)


# ------------------------------------------------ memory bounds (AddressSanitizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One SM count of the Batch Norm cases and the Layer Norm cases that reach every
# launch plan without the slowest shapes: ASan makes the emulator ~5x slower.
ASAN_SELECTION = [
    "-k", "(sms3 or layer_norm) and not sanitizer",  # -k filters every path below
    "tests/test_cuda_emulated.py",
    "tests/test_cuda_emulated_layer_norm.py::test_single_row",
    "tests/test_cuda_emulated_layer_norm.py::test_every_output_mask",
    "tests/test_cuda_emulated_layer_norm.py::test_misaligned_inputs_take_the_scalar_path",
    "tests/test_cuda_emulated_layer_norm.py::test_strided_rows_and_column_parts",
    "tests/test_cuda_emulated_layer_norm.py::test_without_weight_or_bias",
]


def _asan_env():
    try:
        lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except OSError:
        lib = ""
    if not os.path.isabs(lib) or not os.path.exists(lib):
        pytest.skip("no AddressSanitizer runtime (gcc's libasan.so)")
    return dict(os.environ, BNEXT_EMULATOR_ASAN="1", LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0")


def test_kernels_stay_within_their_tensors_under_address_sanitizer():
    """The emulated kernels built with AddressSanitizer, so that every load and
    store is checked against the bounds of its tensor (what compute-sanitizer's
    memcheck does on a GPU): first a kernel that reads one element past its
    tensor must be caught, then the selection must run clean."""
    env = _asan_env()
    probe = ("import sys; sys.path.insert(0, 'tests'); from emulated_cuda import load; "
             "load().selftest('out_of_bounds')")
    bad = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert bad.returncode != 0 and "heap-buffer-overflow" in bad.stderr, bad.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
                         + ASAN_SELECTION, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "AddressSanitizer" not in run.stderr.replace("ASan doesn't fully support", "")
