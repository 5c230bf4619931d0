"""ptxas's resources per kernel, from the CUDA build's report.

Every CUDA build of the extension records ptxas's resource lines
(tools/nvcc_resources.py, put in front of nvcc by setup.py) in
build/resource-usage/<source>.txt. This reads them back: registers, spills,
stack and shared memory per kernel and architecture, and the blocks of a given
size one SM keeps resident as the registers and shared memory allow
(tests/test_resource_usage.py holds the kernels to them).

    python tools/resource_report.py [--arch sm_90] [--all]

prints the kernels that spill, use a stack frame or keep less than half of an
SM's threads resident at their launch bounds' block size (--all: every kernel).
"""

import argparse
import contextlib
import dataclasses
import glob
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_DIR = os.path.join(ROOT, "build", "resource-usage")

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclasses.dataclass
class Kernel:
    symbol: str  # mangled, as the emulator's launch log names it too
    arch: str
    source: str  # the report it came from
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    name: str = ""  # demangled

    @property
    def spills(self):
        return self.spill_stores + self.spill_loads


def parse(text, source=""):
    """The entry functions of one report, in order."""
    kernels = []
    current = None
    properties_of = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = Kernel(symbol=m[1], arch=m[2], source=source)
            kernels.append(current)
            properties_of = None
            continue
        m = _PROPERTIES.search(line)
        if m:
            properties_of = m[1]
            continue
        m = _FRAME.search(line)
        if m and current is not None and properties_of == current.symbol:
            current.stack_bytes, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m and current is not None:
            current.registers = int(m[1])
            s = _SMEM.search(line)
            current.shared_bytes = int(s[1]) if s else 0
    return kernels


def demangle(kernels):
    try:
        out = subprocess.run(
            ["c++filt"],
            input="\n".join(k.symbol for k in kernels),
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.splitlines()
    except OSError:
        out = []
    if len(out) != len(kernels):
        out = [k.symbol for k in kernels]
    for k, name in zip(kernels, out):
        k.name = name
    return kernels


def reports(report_dir=REPORT_DIR):
    """{report file name: text} of the last CUDA build."""
    found = {}
    for path in sorted(glob.glob(os.path.join(report_dir, "*.txt"))):
        with open(path) as f:
            found[os.path.basename(path)] = f.read()
    return found


def load(report_dir=REPORT_DIR):
    kernels = []
    for name, text in reports(report_dir).items():
        kernels.extend(parse(text, name))
    return demangle(kernels)


# sm_80 / sm_90: what one SM holds (the CUDA occupancy calculator's figures;
# shared memory is sm_90's 228 KiB).
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are given to a warp in multiples of this
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 233472
SHARED_RESERVED_PER_BLOCK = 1024


def resident_blocks(registers, shared_bytes, threads):
    """Blocks of `threads` one SM keeps resident (the emulator's
    resident_blocks does the same arithmetic; a test keeps them equal)."""
    warps = -(-threads // 32)
    blocks = min(MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM)
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    if per_warp:
        blocks = min(blocks, REGISTERS_PER_SM // per_warp // warps)
    return min(blocks, SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK))


@contextlib.contextmanager
def emulating(emu, kernels, num_sms):
    """The emulator planning as a GPU with `num_sms` SMs and these kernels'
    registers and shared memory would (cuda::resident_blocks); its defaults
    again afterwards."""
    old = emu.num_sms()
    emu.set_kernel_resources(
        [k.symbol for k in kernels],
        [k.registers for k in kernels],
        [k.shared_bytes for k in kernels],
    )
    emu.set_num_sms(num_sms)
    try:
        yield
    finally:
        emu.set_num_sms(old)
        emu.set_kernel_resources([], [], [])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--all", action="store_true")
    args = parser.parse_args()
    kernels = [k for k in load() if k.arch == args.arch]
    if not kernels:
        raise SystemExit(f"no {args.arch} kernels in {REPORT_DIR}: build with CUDA first")
    print(f"{'regs':>4} {'smem':>6} {'stack':>5} {'spill':>5} {'@256':>4} {'@512':>4}  kernel")
    for k in sorted(kernels, key=lambda k: (k.source, k.name)):
        at256 = resident_blocks(k.registers, k.shared_bytes, 256)
        at512 = resident_blocks(k.registers, k.shared_bytes, 512)
        if args.all or k.spills or k.stack_bytes or at256 < 4:
            print(
                f"{k.registers:>4} {k.shared_bytes:>6} {k.stack_bytes:>5} {k.spills:>5} "
                f"{at256:>4} {at512:>4}  {k.name[:150]}"
            )


if __name__ == "__main__":
    main()
