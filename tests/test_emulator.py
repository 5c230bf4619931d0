"""The CPU emulator of CUDA (csrc/emulator/) itself: its reductions, block
order and the errors it reports where a GPU would hang or refuse a launch; an
AddressSanitizer + UBSan build that must catch a kernel reading past its
tensor, an overflowing index and a misaligned load, and then run the emulated
kernels' cases clean; and a build contracting multiply-adds as nvcc does,
which bounds how far a GPU's last bits may stray."""

import os
import subprocess
import sys

import pytest
import torch
from subprocess_pytest import ROOT, failure_report, run_pytest


def test_reductions_give_cuda_results(emu):
    out = emu.selftest("reductions")
    # 96 threads valued 1..96: the block sum, then each warp's butterfly sum,
    # then the sum of squares from a second reduction on the same scratch.
    assert out[:5].tolist() == [
        96 * 97 / 2,
        sum(range(1, 33)),
        sum(range(33, 65)),
        sum(range(65, 97)),
        sum(k * k for k in range(1, 97)),
    ]
    col = emu.selftest("column")
    assert col[:4].tolist() == [(x + 1) * 36 for x in range(4)]
    assert col[4:].tolist() == [(x + 1) ** 2 * sum(y * y for y in range(1, 9)) for x in range(4)]


def test_runs_blocks_one_at_a_time_in_the_schedules_order(emu):
    # Block (x, y) of a (3, 2) grid records how many blocks ran before it.
    order = emu.selftest("block_order")[:6].tolist()
    if emu.schedule() == "forward":
        assert order == [0, 1, 2, 3, 4, 5]
    elif emu.schedule() == "reverse":
        assert order == [5, 4, 3, 2, 1, 0]
    assert sorted(order) == [0, 1, 2, 3, 4, 5]  # random: one at a time all the same


def test_a_missing_barrier_shows_under_the_reverse_schedule(emu):
    """Thread 0 writes a shared value and the others read it with no barrier
    between: the forward order hides the bug, the reverse order exposes it
    (on a GPU it is a race)."""
    before = emu.schedule()
    try:
        emu.set_schedule("forward")
        assert emu.selftest("missing_barrier").tolist() == [42.0] * 8
        emu.set_schedule("reverse")
        assert emu.selftest("missing_barrier").tolist() == [42.0] + [0.0] * 7
    finally:
        emu.set_schedule(before)


def _representative_results(emu):
    """Every kernel family once: Batch Norm NCHW and channels-last, LayerNorm
    short and long rows, RMSNorm, forward and backward."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 7, 9, 11, generator=gen).to(memory_format=fmt)
        w, b = torch.randn(7, generator=gen), torch.randn(7, generator=gen)
        y, mean, invstd = emu.batch_norm_train(x, w, b, 1e-5)
        dy = torch.randn(x.shape, generator=gen).to(memory_format=fmt)
        out += [y, mean, invstd, *emu.batch_norm_backward(dy, x, mean, invstd, w, 1e-5, True)]
    for cols in (33, 5000):
        x = torch.randn(6, cols, generator=gen)
        w, b = torch.randn(cols, generator=gen), torch.randn(cols, generator=gen)
        dy = torch.randn(6, cols, generator=gen)
        y, mean, rstd = emu.layer_norm_fwd(x, [cols], w, b, 1e-5)
        out += [y, mean, rstd, *emu.layer_norm_bwd(dy, x, mean, rstd, w, 1e-5, [True, True])]
        y, rstd = emu.rms_norm_fwd(x, [cols], w, 1e-5)
        out += [y, rstd, *emu.rms_norm_bwd(dy, x, rstd, w, 1e-5, True)]
    return out


@pytest.mark.parametrize("schedule", ["reverse", "random:1", "random:2", "random:3"])
def test_results_are_bitwise_identical_under_every_schedule(emu, schedule):
    before = emu.schedule()
    try:
        emu.set_schedule("forward")
        want = _representative_results(emu)
        name, _, seed = schedule.partition(":")
        emu.set_schedule(name, int(seed or 0))
        got = _representative_results(emu)
    finally:
        emu.set_schedule(before)
    assert len(got) == len(want) > 20
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"result {i} differs under {schedule}"


@pytest.mark.slow
def test_emulated_suite_under_random_schedules():
    """The emulated tests (one SM count) under two seeded random orders."""
    suites = ["tests/test_cuda_emulated_batch_norm.py", "tests/test_cuda_emulated_layer_norm.py"]
    env = dict(os.environ, BNEXT_EMU_SCHEDULES="random:1,random:2")
    result = run_pytest(["-m", "not slow", "-k", "not sms132", *suites], env, 3000)
    assert result.returncode == 0, failure_report(result)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:1"])
@pytest.mark.parametrize(
    "case,message",
    [
        # The unchecked twin of this kernel gives the right answer in the
        # forward order (test above); the checker names the race in any order.
        (
            "racy_publish",
            r"thread \(\d+, 0, 0\) (reads|writes) what (thread \(\d+, 0, 0\)|several threads)",
        ),
        ("racy_sum", r"(reads|writes) what thread .* since the last barrier \(a race\)"),
        # Block 1 reads what block 0 wrote: statics would hand it over, a GPU
        # gives garbage.
        ("uninitialised_shared", r"reads a byte no thread of its block has written"),
        ("shared_out_of_bounds", r"thread \(31, 0, 0\) writes 8 bytes .* outside its arrays"),
        ("too_much_shared", r"too much shared memory: `values` in too_much_shared_kernel"),
    ],
    ids=lambda v: v if v.isidentifier() else "",
)
def test_shared_memory_checker_names_the_bug(case, message, schedule, emu):
    """Racecheck and initcheck on the CPU: every BNEXT_SHARED access is
    checked, per byte, against the block's writes and reads since its last
    barrier."""
    before = emu.schedule()
    try:
        name, _, seed = schedule.partition(":")
        emu.set_schedule(name, int(seed or 0))
        with pytest.raises(RuntimeError, match=message) as caught:
            emu.selftest(case)
    finally:
        emu.set_schedule(before)
    # The array, its declaration and the byte are named.
    assert "of `" in str(caught.value) or "too much" in str(caught.value)


@pytest.mark.parametrize(
    "case,message",
    [
        ("divergent_barrier", "different __syncthreads"),
        ("exited_lane", "lane that has exited"),
        ("divergent_shuffle", "shuffle in divergent code"),
        ("barrier_or_shuffle", "deadlock"),
        ("misaligned_vector", "misaligned address: a 16-byte vector access"),
        ("too_many_threads", "invalid configuration argument"),
        ("grid_y_too_large", "invalid configuration argument"),
    ],
)
def test_reports_what_a_gpu_would_hang_on_or_refuse(case, message, emu):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(case)


# ------------------------------------------------ memory bounds (AddressSanitizer)
# One SM count of the Batch Norm cases and the Layer Norm cases that reach every
# launch plan without the slowest shapes: ASan makes the emulator ~5x slower.
ASAN_SELECTION = [
    "-k",
    "sms3 or layer_norm",  # -k filters every path below
    "tests/test_cuda_emulated_batch_norm.py",
    "tests/test_cuda_emulated_layer_norm.py::test_single_row",
    "tests/test_cuda_emulated_layer_norm.py::test_every_output_mask",
    "tests/test_cuda_emulated_layer_norm.py::test_misaligned_inputs_take_the_scalar_path",
    "tests/test_cuda_emulated_layer_norm.py::test_strided_rows_and_column_parts",
    "tests/test_cuda_emulated_layer_norm.py::test_without_weight_or_bias",
]


def _asan_env():
    try:
        lib = subprocess.run(
            ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except OSError:
        lib = ""
    if not os.path.isabs(lib) or not os.path.exists(lib):
        pytest.skip("no AddressSanitizer runtime (gcc's libasan.so)")
    # One schedule: bounds do not depend on the order the threads run in.
    return dict(
        os.environ,
        BNEXT_EMULATOR_ASAN="1",
        BNEXT_EMU_SCHEDULES="forward",
        LD_PRELOAD=lib,
        ASAN_OPTIONS="detect_leaks=0",
    )


def _selftest_in_subprocess(case, env):
    probe = (
        "import sys; sys.path.insert(0, 'tests'); from emulated_cuda import load; "
        f"load().selftest('{case}')"
    )
    return subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.slow  # builds the library with ASan (minutes), then runs 100 cases 5x slower
def test_kernels_stay_within_their_tensors_under_address_and_ub_sanitizers():
    """The emulated kernels built with AddressSanitizer, so that every load and
    store is checked against the bounds of its tensor (what compute-sanitizer's
    memcheck does on a GPU), and with UBSan: first a kernel that reads one
    element past its tensor, one whose index overflows and one that reads a
    misaligned float must be caught, then the selection must run clean."""
    env = _asan_env()
    bad = _selftest_in_subprocess("out_of_bounds", env)
    assert bad.returncode != 0 and "heap-buffer-overflow" in bad.stderr, bad.stderr[-2000:]
    # UBSan, built in with it: a 32-bit index that overflows, a misaligned float.
    for case, finding in [
        ("signed_overflow", "signed integer overflow"),
        ("misaligned_scalar", "load of misaligned address"),
    ]:
        bad = _selftest_in_subprocess(case, env)
        assert bad.returncode != 0 and f"runtime error: {finding}" in bad.stderr, (
            case,
            bad.stderr[-2000:],
        )
    run = run_pytest(ASAN_SELECTION, env, 1800)
    assert run.returncode == 0, failure_report(run, 3000, 3000)
    assert "AddressSanitizer" not in run.stderr.replace("ASan doesn't fully support", "")
    assert "runtime error:" not in run.stderr


# How far apart (normwise, in float32 eps) the contracted and the default
# builds' results may be. Measured: at most 1.4 (Batch Renorm's d, channels-
# last), 0.3-0.8 for most outputs; both builds stay within 1.6 eps of float64.
FMA_BOUND_EPS = 4


@pytest.mark.slow  # builds the emulator with contraction (minutes)
def test_fma_contraction_bounds_the_last_bits_a_gpu_changes(tmp_path):
    """nvcc contracts a*b+c into one fused multiply-add by default, the host
    compiler does not: a GPU's results differ from the emulator's (and the CPU
    kernels') in their last bits. The emulator built contracting wherever gcc
    can (tests/contraction_cases.py runs it in a subprocess) must contract
    (some results change), stay within the float32 tolerance of float64 that
    every build is held to, and differ from the default build by a few
    roundings of the result's size at most: the bound a GPU comparison meets."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no fused multiply-add")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import contraction_cases
    from emulated_cuda import load

    from torch_bnext.testing import REL_TOL, rel_err

    saved = tmp_path / "fused.pt"
    run = subprocess.run(
        [sys.executable, "tests/contraction_cases.py", str(saved)],
        cwd=ROOT,
        env=dict(os.environ, BNEXT_EMULATOR_FMA="1"),
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    fused = torch.load(saved)
    plain = contraction_cases.results(load())
    exact = contraction_cases.results(torch.ops.bnext, torch.float64)
    eps = torch.finfo(torch.float32).eps
    apart = {k: rel_err(fused[k], plain[k]) / eps for k in plain}
    report = ", ".join(f"{k} {v:.2g}" for k, v in apart.items())
    assert sum(v > 0 for v in apart.values()) >= len(apart) // 2, "no contraction? " + report
    for k, want in exact.items():
        assert rel_err(fused[k], want) <= REL_TOL[torch.float32], k
    assert max(apart.values()) <= FMA_BOUND_EPS, "differences in float32 eps: " + report


def test_mutation_catalogue_still_applies():
    """tools/mutate.py puts each bug of its catalogue into the kernels in
    turn (the emulated suite must catch every one); its texts must still be
    in the sources, or the check would silently test nothing."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import mutate

    mutations = mutate.catalogue()
    barriers = [m for m in mutations if m.id.startswith("barrier:")]
    assert len(barriers) >= 10 and len(mutations) >= len(barriers) + 10
    for m in mutations:
        text, at = mutate.locate(m)
        assert text[at : at + len(m.old)] == m.old
