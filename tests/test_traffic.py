"""The emulator's traffic counter (csrc/emulator/traffic.cpp) and the model
built on it (tools/traffic_model.py), held to the kernels: for ResNet-50's
Batch Norm layers and LLM LayerNorm/RMSNorm rows at an H100's 132 SMs, the
traffic is within 5% of the algorithm's passes (each pass's inputs read once,
its outputs written once), the warps' accesses on the vector paths use >= 90%
of the 32-byte sectors they touch, and every launch with enough work for the
whole GPU fills every SM. A model of the kernels' memory behaviour, not of a
GPU's timing: tools/traffic_model.py prints the table."""

import functools

import pytest
import torch
import traffic_model as tm
from emulated_cuda import load

pytestmark = pytest.mark.skipif(
    not load().traffic_available(),
    reason="the AddressSanitizer build of the emulator has no traffic counter",
)

# The counter against kernels whose traffic CUDA's memory model fixes: 2
# blocks of 64 threads (4 warps), each thread copying one float or one float4
# from `stride` elements apart.
COPIES = [
    # stride, vector, sectors per warp load, useful share
    (1, False, 4, 1.0),  # 32 lanes x 4 B: one 128-byte line
    (8, False, 32, 0.125),  # a lane per 32-byte sector
    (1, True, 16, 1.0),  # 32 lanes x 16 B, one request
    (2, True, 32, 0.5),  # 16 B used of each lane's sector
]


@pytest.mark.parametrize("stride,vector,sectors,useful", COPIES, ids=str)
def test_counter_sees_the_warps_sectors(emu, stride, vector, sectors, useful):
    width = 4 if vector else 1
    x = torch.randn(128 * width * stride, generator=torch.Generator().manual_seed(stride))
    out = {}
    [launch] = tm.count(emu, lambda: out.update(y=emu.strided_copy(x, stride, vector)))
    want = x.view(-1, width)[::stride][:128].reshape(-1)
    torch.testing.assert_close(out["y"], want, rtol=0, atol=0)
    assert launch.grid == (2, 1, 1) and launch.block == (64, 1, 1)
    data = 128 * width * 4
    assert launch.load_bytes == launch.store_bytes == data
    assert launch.load_requests == launch.store_requests == 4  # one per warp
    assert launch.load_sectors == 4 * sectors
    assert launch.load_useful == data
    assert launch.load_useful / (launch.load_sectors * tm.SECTOR) == useful
    assert launch.load_distinct == 4 * sectors
    # The stores are contiguous whatever the loads' stride.
    assert launch.store_sectors == launch.store_distinct == data // tm.SECTOR


def test_counting_is_off_outside_a_count(emu):
    x = torch.randn(512)
    emu.strided_copy(x, 1, False)
    assert emu.take_traffic() == []


# --------------------------------------------------------------- the model
# One emulation per case, shared by the assertions below.


@pytest.fixture(scope="module")
def at_132_sms():
    emu = load()
    old = emu.num_sms()
    emu.set_num_sms(tm.NUM_SMS)
    try:
        yield emu
    finally:
        emu.set_num_sms(old)


@functools.cache
def _batch_norm(emu, shape, channels_last):
    return tm.batch_norm_cases(emu, shape, torch.bfloat16, channels_last)


@functools.cache
def _layer_norm(emu, N, rms):
    return tm.layer_norm_at(emu, tm.LLM_ROWS, N, torch.bfloat16, rms)


BN = [(shape, cl) for shape in tm.RESNET50_BN for cl in (False, True)]
LN = [(N, rms) for N in tm.LLM_WIDTHS for rms in (False, True)]


BN_IDS = [f"{'x'.join(map(str, shape))}-{'NHWC' if cl else 'NCHW'}" for shape, cl in BN]
LN_IDS = [f"{'RMSNorm' if rms else 'LayerNorm'}-{N}" for N, rms in LN]


def _all_cases(emu):
    cases = [c for shape, cl in BN for c in _batch_norm(emu, shape, cl)]
    return cases + [c for N, rms in LN for c in _layer_norm(emu, N, rms)]


@pytest.mark.parametrize("shape,channels_last", BN, ids=BN_IDS)
def test_batch_norm_traffic_is_the_passes(at_132_sms, shape, channels_last):
    for case in _batch_norm(at_132_sms, shape, channels_last):
        assert case.ratio <= 1.05, (
            f"{case.name}: {case.traffic / 1e6:.3f} MB modelled, {case.ideal / 1e6:.3f} MB in "
            f"the passes (x{case.ratio:.3f}); launches:\n"
            + "\n".join(f"  {x.symbol} {x.grid} {x.traffic}" for x in case.launches)
        )


@pytest.mark.parametrize("N,rms", LN, ids=LN_IDS)
def test_layer_norm_traffic_is_the_passes_at_16384_rows(at_132_sms, N, rms):
    cases = _layer_norm(at_132_sms, N, rms)
    assert cases is not None, "the traffic is not affine in the rows from 2 to 6 rows per SM"
    for case in cases:
        assert case.ratio <= 1.05, (
            f"{case.name}: {case.traffic / 1e6:.1f} MB modelled, {case.ideal / 1e6:.1f} MB in "
            f"the passes (x{case.ratio:.3f})"
        )


def _vectorizable(shape, channels_last):
    """Whether the data passes move 8 bfloat16 at a time: NHWC rows of C, NCHW
    planes of H * W that hold a vector (RaggedPlane reads a plane's edges one
    element at a time when H * W is no multiple of 8)."""
    return shape[1] % 8 == 0 if channels_last else shape[2] * shape[3] >= 8


def _sector_bound(shape, channels_last):
    """The share of the touched sectors the vector accesses must use: 90%; on
    NCHW planes whose bytes are no multiple of 32, less: each plane's run of
    whole vectors (16-byte aligned, at least (H * W - 7) // 8 of them) may
    start and end in the middle of a sector, so a run of L bytes may touch
    L + 32 bytes of sectors (7x7 bfloat16: 80 of 112)."""
    S = shape[2] * shape[3]
    if channels_last or (2 * S) % 32 == 0:
        return 0.9
    run = (S - 7) // 8 * 16
    return min(0.9, run / (run + 32))


def _check_vector_launches(case, expect_vectors, bound=0.9):
    vector = [x for x in case.launches if x.vector_efficiency is not None]
    if expect_vectors:
        assert vector, f"{case.name}: no launch made a vector access"
    for x in vector:
        assert x.vector_efficiency >= bound, (
            f"{case.name}: {x.symbol} uses {x.vector_efficiency:.1%} of the sectors its "
            f"vector accesses touch (at least {bound:.1%})"
        )


def test_vector_paths_use_their_sectors(at_132_sms):
    for shape, cl in BN:
        for case in _batch_norm(at_132_sms, shape, cl):
            _check_vector_launches(case, _vectorizable(shape, cl), _sector_bound(shape, cl))
    for N, rms in LN:
        for case in _layer_norm(at_132_sms, N, rms):
            _check_vector_launches(case, N % 8 == 0)


def test_launches_with_work_for_every_sm_fill_them(at_132_sms):
    for case in _all_cases(at_132_sms):
        busy = [x for x in case.launches if tm.enough_work(x)]
        assert busy, f"{case.name}: no launch has work for every SM"
        for x in busy:
            assert x.blocks >= tm.NUM_SMS, (
                f"{case.name}: {x.symbol} launches {x.blocks} blocks of {x.threads} threads "
                f"for {(x.load_useful + x.store_useful) / 1e6:.2f} MB on {tm.NUM_SMS} SMs"
            )
