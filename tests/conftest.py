"""Fixtures. The helpers the tests share (tolerances, inputs) live in
torch_bnext.testing, which `python -m torch_bnext.check` uses too."""

import os

import pytest
from emulated_cuda import load

from torch_bnext.testing import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# The orders the emulator runs blocks and threads in (cuda_emulator.h): every
# emulated test runs under each. BNEXT_EMU_SCHEDULES="random:1,random:2" runs
# them under seeded random orders instead (test_emulator.py's slow test does).
SCHEDULES = os.environ.get("BNEXT_EMU_SCHEDULES", "forward,reverse").split(",")


@pytest.fixture(scope="session", params=SCHEDULES)
def emu(request):
    """torch.ops.bnext_emu: the CUDA kernels built for the CPU emulator, set to
    one schedule. The first use compiles the library (about a minute), so it
    is loaded by the tests that need it rather than when their module is
    collected."""
    ops = load()
    name, _, seed = request.param.partition(":")
    ops.set_schedule(name, int(seed or 0))
    yield ops
    ops.set_schedule("forward", 0)


@pytest.fixture(params=[1, 3, 132], ids=lambda n: f"sms{n}")
def num_sms(request, emu):
    """The emulated GPU's SM count, which sets the launch plans: 1 (one block
    row, no partials), 3, and an H100's 132 (many partials)."""
    old = emu.num_sms()
    emu.set_num_sms(request.param)
    yield request.param
    emu.set_num_sms(old)
