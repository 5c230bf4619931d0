"""The registers, spills and shared memory ptxas gave every CUDA kernel, read
from the CUDA build's report (build/resource-usage/: tools/nvcc_resources.py
records ptxas's lines while setup.py compiles the kernels, so CI checks them on
every submission without a GPU), held to what the launch plans assume:
- no kernel spills more than the figures below record (spills go to local
  memory, a second trip through the L1/L2 per value on the hot path);
- the plans whose blocks stride over the work (LayerNorm/RMSNorm rows and
  channels) launch exactly as many blocks as the SMs keep resident with those
  registers: no more (they would queue), no fewer (idle SMs); the fused row
  backward, whose blocks each write a partial row, stops at 256 threads an SM. The emulator gets the
  report's figures and sizes the grids as cudaOccupancyMaxActiveBlocksPerMultiprocessor
  does on a GPU; its launch log shows the grids."""

import os
import re

import pytest
import torch
from emulated_cuda import load
from resource_report import REPORT_DIR, emulating, resident_blocks
from resource_report import load as load_report

import torch_bnext

KERNELS = load_report()

requires_report = pytest.mark.skipif(
    not torch_bnext.HAS_CUDA_KERNELS and not KERNELS,
    reason="a CPU-only build compiles no CUDA kernel (CI builds with CUDA)",
)

# Spill bytes (stores + loads) per kernel family, the most any kernel of it
# has today (sm_80 and sm_90, nvcc 13.0): a kernel that spills more, or one of
# another family that starts to spill, fails. Lower them as kernels improve.
# 60 of 2592 kernels spill, most of them float64 or activation variants:
# - Batch Norm's channels-last reductions (float64 activation gradients at 128
#   registers: 112 B; also the float32 statistics at 64 registers: 64 B);
# - LayerNorm2d's channel backward with the fused column sums keeps a tile's
#   dy and x and the per-channel sums live across the block reduction;
# - the row backward of float16/bfloat16 without fused columns on sm_80 (a
#   stack frame for the loads of its two rows), and 16 fused columns.
SPILL_ALLOWANCE = {
    # float64 with a gradient on sm_80: 24 B since the ragged planes' scalar edges
    r"batch_norm::cuda_kernels::affine_planes_kernel<": 24,
    r"batch_norm::cuda_kernels::affine_rows_kernel<": 32,
    r"batch_norm::cuda_kernels::reduce_planes_kernel<": 64,
    r"batch_norm::cuda_kernels::reduce_rows_kernel<": 112,
    r"layer_norm::cuda_kernels::backward_long_kernel<": 44,
    r"layer_norm::cuda_kernels::backward_short_kernel<": 24,
    r"layer_norm::cuda_kernels::channel_backward_kernel<[^,]+, true, true>": 92,
}

# Kernels whose blocks stride over the work with a grid of the resident blocks.
STRIDING = re.compile(
    r"layer_norm::cuda_kernels::(forward|backward)_(short|long)_kernel<"
    r"|layer_norm::cuda_kernels::channel_(forward|backward)_kernel<"
)


# The row backward with fused column sums (KV > 0) writes a partial row of dw
# and db per block: its grid stops at 256 threads an SM (kFusedThreadsPerSm).
FUSED = re.compile(r"layer_norm::cuda_kernels::backward_(short|long)_kernel<[^<>]+, [1-9]\d*>")
FUSED_THREADS_PER_SM = 256


def _cuda_sources():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = []
    for folder, _, files in os.walk(os.path.join(root, "csrc")):
        found += [os.path.join(folder, f) for f in files if f.endswith(".cu")]
    return sorted(os.path.relpath(p, root) for p in found)


@requires_report
def test_every_cuda_source_has_a_report():
    have = {k.source for k in KERNELS}
    missing = [s for s in _cuda_sources() if s.replace(os.sep, "_") + ".txt" not in have]
    assert not missing, (
        f"no ptxas report in {REPORT_DIR} for {missing}: rebuild the extension (make build); "
        "setup.py records it through tools/nvcc_resources.py"
    )
    archs = {k.arch for k in KERNELS}
    assert "sm_90" in archs, f"the report has {sorted(archs)}, not sm_90 (TORCH_CUDA_ARCH_LIST)"
    assert all(k.registers > 0 for k in KERNELS)


@requires_report
def test_no_kernel_spills_beyond_its_allowance():
    over = []
    for k in KERNELS:
        if not k.spills:
            continue
        allowed = [b for p, b in SPILL_ALLOWANCE.items() if re.search(p, k.name)]
        if not allowed or k.spills > max(allowed):
            over.append(
                f"{k.arch} {k.name}: {k.spill_stores} B spill stores, {k.spill_loads} B loads "
                f"at {k.registers} registers (allowed {max(allowed) if allowed else 0})"
            )
    assert not over, "\n".join(over)


def test_resident_blocks_agree_with_the_emulator():
    emu = load()
    for registers in (0, 16, 32, 40, 64, 72, 96, 128, 174, 255):
        for shared in (0, 1024, 16384, 49152):
            for threads in (32, 96, 128, 256, 512, 1024):
                assert emu.resident_blocks(registers, shared, threads) == resident_blocks(
                    registers, shared, threads
                ), (registers, shared, threads)
    # An H100's figures: 64 registers keep 2048 threads, 128 keep 512 threads
    # of blocks of 512, 174 one block of 256.
    assert resident_blocks(32, 0, 256) == 8
    assert resident_blocks(64, 0, 256) == 4
    assert resident_blocks(128, 0, 512) == 1
    assert resident_blocks(174, 0, 256) == 1


@pytest.fixture
def measured(emu):
    """The emulator with the report's sm_90 figures, 4 SMs and a launch log."""
    sm90 = [k for k in KERNELS if k.arch == "sm_90"]
    with emulating(emu, sm90, num_sms=4):
        emu.set_launch_logging(True)
        try:
            yield emu, {k.symbol: k for k in sm90}
        finally:
            emu.set_launch_logging(False)


def _rows(M, N, dtype):
    gen = torch.Generator().manual_seed(M * 7 + N)
    x = (torch.randn(M, N, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype)
    dy = torch.randn(M, N, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
    return x, dy, w, b


# Work for more blocks than 4 SMs keep (at most 8 blocks of 256 threads each):
# long rows (a block per row) and short rows (groups of lanes per row), the
# fused and the separate column sums, and LayerNorm2d's channel kernels.
ROW_CASES = [
    (72, 4096, torch.float32),
    (72, 4096, torch.bfloat16),
    (72, 2000, torch.float16),
    (640, 256, torch.float32),
    (640, 256, torch.bfloat16),
    (2400, 20, torch.float32),
    (72, 8192, torch.float32),
]


def _check_grids(log, by_symbol):
    checked = 0
    for line in log:
        symbol, *dims = line.split()
        gx, gy, gz, bx, by, bz = map(int, dims)
        k = by_symbol.get(symbol)
        if k is None or not STRIDING.search(k.name):
            continue
        assert gy == gz == 1
        want = 4 * resident_blocks(k.registers, k.shared_bytes, bx * by * bz)
        if FUSED.search(k.name):  # a partial row per block: 256 threads an SM
            want = min(want, 4 * max(1, FUSED_THREADS_PER_SM // (bx * by * bz)))
        assert gx == want, (
            f"{k.name} at {k.registers} registers, blocks of {bx * by * bz}: "
            f"a grid of {gx}, the 4 SMs keep {want}"
        )
        checked += 1
    return checked


@requires_report
@pytest.mark.parametrize("M,N,dtype", ROW_CASES, ids=str)
def test_row_grids_are_the_resident_blocks(M, N, dtype, measured):
    emu, by_symbol = measured
    x, dy, w, b = _rows(M, N, dtype)
    out, mean, rstd = emu.layer_norm_fwd(x, [N], w, b, 1e-5)
    grads = emu.layer_norm_bwd(dy, x, mean, rstd, w, 1e-5, [True, True])
    rms_out, rms_rstd = emu.rms_norm_fwd(x, [N], w, 1e-5)
    rms_grads = emu.rms_norm_bwd(dy, x, rms_rstd, w, 1e-5, True)
    log = emu.take_launch_log()
    unknown = [line.split()[0] for line in log if line.split()[0] not in by_symbol]
    assert not unknown, f"launched kernels the report does not name: {unknown}"
    # Forward and backward of each norm, each kernel of a plan checked.
    assert _check_grids(log, by_symbol) >= 4
    # Fewer blocks, more rows each: the results stay the CPU kernels'.
    cpu = torch.ops.bnext
    want = cpu.layer_norm_fwd(x, [N], w, b, 1e-5)
    want_grads = cpu.layer_norm_bwd(dy, x, want[1], want[2], w, 1e-5, [True, True])
    want_rms = cpu.rms_norm_fwd(x, [N], w, 1e-5)
    want_rms_grads = cpu.rms_norm_bwd(dy, x, want_rms[1], w, 1e-5, True)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for got, ref in zip(
        [out, *grads, rms_out, *rms_grads], [want[0], *want_grads, want_rms[0], *want_rms_grads]
    ):
        err = (got.double() - ref.double()).norm() / ref.double().norm()
        assert err < tol, err


@requires_report
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_grids_are_the_resident_blocks(dtype, measured):
    emu, by_symbol = measured
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 64, 64, generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(2, 24, 64, 64, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.rand(24, generator=gen, dtype=torch.float64).to(dtype) + 0.5
    b = torch.randn(24, generator=gen, dtype=torch.float64).to(dtype)
    out, mean, rstd = emu.layer_norm_2d_fwd(x, w, b, 1e-5)
    dx, dw, db = emu.layer_norm_2d_bwd(dy, x, mean, rstd, w, 1e-5, [True, True])
    assert _check_grids(emu.take_launch_log(), by_symbol) == 2
    want = torch.ops.bnext.layer_norm_2d_fwd(x, w, b, 1e-5)
    want_grads = torch.ops.bnext.layer_norm_2d_bwd(dy, x, want[1], want[2], w, 1e-5, [True] * 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, ref in zip([out, dx, dw, db], [want[0], *want_grads]):
        assert ((got.double() - ref.double()).norm() / ref.double().norm()) < tol
