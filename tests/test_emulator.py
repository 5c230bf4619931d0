"""The CPU emulator of CUDA (csrc/emulator/) itself: its reductions, block
order and the errors it reports where a GPU would hang or refuse a launch, and
an AddressSanitizer build that must catch a kernel reading past its tensor
and then run the emulated kernels' cases clean."""

import os
import subprocess
import sys

import pytest


def test_reductions_give_cuda_results(emu):
    out = emu.selftest("reductions")
    # 96 threads valued 1..96: the block sum, then each warp's butterfly sum.
    assert out[:4].tolist() == [
        96 * 97 / 2,
        sum(range(1, 33)),
        sum(range(33, 65)),
        sum(range(65, 97)),
    ]
    col = emu.selftest("column")
    assert col[:4].tolist() == [(x + 1) * 36 for x in range(4)]


def test_runs_blocks_in_order(emu):
    assert emu.selftest("block_order")[:7].tolist() == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "case,message",
    [
        ("divergent_barrier", "different __syncthreads"),
        ("exited_lane", "lane that has exited"),
        ("barrier_or_shuffle", "deadlock"),
        ("too_many_threads", "invalid configuration argument"),
        ("grid_y_too_large", "invalid configuration argument"),
    ],
)
def test_reports_what_a_gpu_would_hang_on_or_refuse(case, message, emu):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(case)


# ------------------------------------------------ memory bounds (AddressSanitizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    return dict(os.environ, BNEXT_EMULATOR_ASAN="1", LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0")


@pytest.mark.slow  # builds the library with ASan (a minute), then runs 100 cases 5x slower
def test_kernels_stay_within_their_tensors_under_address_sanitizer():
    """The emulated kernels built with AddressSanitizer, so that every load and
    store is checked against the bounds of its tensor (what compute-sanitizer's
    memcheck does on a GPU): first a kernel that reads one element past its
    tensor must be caught, then the selection must run clean."""
    env = _asan_env()
    probe = (
        "import sys; sys.path.insert(0, 'tests'); from emulated_cuda import load; "
        "load().selftest('out_of_bounds')"
    )
    bad = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert bad.returncode != 0 and "heap-buffer-overflow" in bad.stderr, bad.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + ASAN_SELECTION,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "AddressSanitizer" not in run.stderr.replace("ASan doesn't fully support", "")
