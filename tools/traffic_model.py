"""A model of the CUDA kernels' global-memory traffic and SM fill, from the CPU
emulator (csrc/emulator/traffic.cpp counts every load and store of the kernels;
tests/emulated_cuda.py builds it), for the shapes people train: ResNet-50's
Batch Norm layers and LLM LayerNorm/RMSNorm rows, at an H100's 132 SMs with
the registers ptxas gave the kernels (tools/resource_report.py).

A model, not a measurement: DRAM traffic is taken as the distinct 32-byte
sectors each launch touches (as if the caches kept what one launch re-reads),
and the share of peak bandwidth as the ideal bytes over that traffic, times the
fraction of the SMs' resident blocks the launches fill. Latency, clocks and
the caches' real sizes are the GPU's to judge.

    python tools/traffic_model.py      (prints the table; needs a CUDA build's report)

tests/test_traffic.py holds the kernels to it.
"""

import dataclasses

import torch

NUM_SMS = 132
SECTOR = 32


@dataclasses.dataclass
class Launch:
    symbol: str
    grid: tuple
    block: tuple
    load_bytes: int
    load_requests: int
    load_sectors: int
    load_useful: int
    load_distinct: int
    load_vector_sectors: int
    load_vector_useful: int
    store_bytes: int
    store_requests: int
    store_sectors: int
    store_useful: int
    store_distinct: int
    store_vector_sectors: int
    store_vector_useful: int

    @property
    def blocks(self):
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def threads(self):
        return self.block[0] * self.block[1] * self.block[2]

    @property
    def traffic(self):
        """Modelled DRAM bytes: each distinct sector once."""
        return (self.load_distinct + self.store_distinct) * SECTOR

    @property
    def vector_efficiency(self):
        """The same of the vector loads and stores alone (None without any)."""
        sectors = self.load_vector_sectors + self.store_vector_sectors
        if not sectors:
            return None
        return (self.load_vector_useful + self.store_vector_useful) / (sectors * SECTOR)

    @property
    def sector_efficiency(self):
        """Distinct bytes the warps asked for over the sectors they touched."""
        sectors = self.load_sectors + self.store_sectors
        return (self.load_useful + self.store_useful) / max(1, sectors * SECTOR)


def parse(records):
    launches = []
    for line in records:
        symbol, *numbers = line.split()
        n = list(map(int, numbers))
        launches.append(Launch(symbol, tuple(n[0:3]), tuple(n[3:6]), *n[6:]))
    return launches


def count(emu, fn):
    """The launches `fn` makes on the emulator, with their traffic."""
    emu.set_traffic_counting(True)
    try:
        fn()
        return parse(emu.take_traffic())
    finally:
        emu.set_traffic_counting(False)


@dataclasses.dataclass
class Case:
    name: str
    ideal: int  # bytes: every pass's inputs read once, its outputs written once
    launches: list
    traffic: int = None  # modelled bytes: the launches' unless extrapolated

    def __post_init__(self):
        if self.traffic is None:
            self.traffic = sum(launch.traffic for launch in self.launches)

    @property
    def ratio(self):
        return self.traffic / self.ideal


def _rand(shape, dtype, seed, mean=0.0, std=1.0, memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean
    return t.to(dtype).contiguous(memory_format=memory_format)


def batch_norm_cases(emu, shape, dtype, channels_last):
    """Training forward (statistics, then normalise) and backward (reduce,
    then elementwise) of one Batch Norm layer."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _rand(shape, dtype, 0, 0.5, 2.0, fmt)
    dy = _rand(shape, dtype, 1, memory_format=fmt)
    C = shape[1]
    w = _rand((C,), torch.float32, 2, 1.0, 0.5)
    b = _rand((C,), torch.float32, 3)
    E = x.numel() * x.element_size()
    c = C * 4  # one float per channel
    tag = f"BN {'NHWC' if channels_last else 'NCHW'} {tuple(shape)} {str(dtype)[6:]}"
    out = {}
    fwd = count(emu, lambda: out.update(r=emu.batch_norm_train(x, w, b, 1e-5)))
    _, mean, var = out["r"]
    bwd = count(emu, lambda: emu.batch_norm_backward(dy, x, mean, var, w, 1e-5, True))
    return [
        # statistics: read x; normalise: read x, write y; per channel: w, b, mean, var.
        Case(f"{tag} fwd", 3 * E + 6 * c, fwd),
        # reduce: read dy, x; elementwise: read dy, x, write dx; dw, db, coefficients.
        Case(f"{tag} bwd", 5 * E + 8 * c, bwd),
    ]


def layer_norm_cases(emu, M, N, dtype, rms=False):
    x = _rand((M, N), dtype, 0, 3.0, 2.0)
    dy = _rand((M, N), dtype, 1)
    w = _rand((N,), dtype, 2, 1.0, 0.5)
    b = None if rms else _rand((N,), dtype, 3)
    E = x.numel() * x.element_size()
    p = N * x.element_size()
    rows = M * 4  # one float per row
    tag = f"{'RMSNorm' if rms else 'LayerNorm'} ({M}, {N}) {str(dtype)[6:]}"
    out = {}
    if rms:
        fwd = count(emu, lambda: out.update(r=emu.rms_norm_fwd(x, [N], w, 1e-5)))
        rstd = out["r"][1]
        bwd = count(emu, lambda: emu.rms_norm_bwd(dy, x, rstd, w, 1e-5, True))
        # fwd: read x, w; write y, rstd. bwd: read dy, x, w, rstd; write dx, dw.
        return [
            Case(f"{tag} fwd", 2 * E + p + rows, fwd),
            Case(f"{tag} bwd", 3 * E + 2 * p + rows, bwd),
        ]
    fwd = count(emu, lambda: out.update(r=emu.layer_norm_fwd(x, [N], w, b, 1e-5)))
    mean, rstd = out["r"][1:]
    bwd = count(emu, lambda: emu.layer_norm_bwd(dy, x, mean, rstd, w, 1e-5, [True, True]))
    return [
        Case(f"{tag} fwd", 2 * E + 2 * p + 2 * rows, fwd),
        Case(f"{tag} bwd", 3 * E + 3 * p + 2 * rows, bwd),
    ]


def extrapolate(runs, rows, counts):
    """The cases at `rows` rows from the same cases run at `counts` rows (three
    counts). The model's traffic is affine in the rows once the kernels that
    leave a partial per block stop growing their grids (the data grows with
    the rows, the partials and the parameters do not); the three runs check
    that it is, and None is returned where it is not."""
    (M1, M2, M3), out = counts, []
    for a, b, c in zip(*runs):
        slope = (c.traffic - b.traffic) / (M3 - M2)
        if abs((b.traffic - a.traffic) / (M2 - M1) - slope) > 1e-3 * slope:
            return None
        ideal_slope = (c.ideal - b.ideal) / (M3 - M2)
        name = c.name.replace(f"({M3},", f"({rows},")
        out.append(
            Case(
                name,
                round(c.ideal + ideal_slope * (rows - M3)),
                c.launches,
                round(c.traffic + slope * (rows - M3)),
            )
        )
    return out


def layer_norm_at(emu, rows, N, dtype, rms=False):
    """LayerNorm/RMSNorm forward and backward at `rows` rows, extrapolated
    from 2, 4 and 6 rows per SM (the fused backward's grid stops at 2 blocks
    of 128 threads an SM)."""
    counts = (2 * NUM_SMS, 4 * NUM_SMS, 6 * NUM_SMS)
    return extrapolate([layer_norm_cases(emu, M, N, dtype, rms) for M in counts], rows, counts)


# ResNet-50's Batch Norm widths at its four stages, each at about 1.6M
# elements (batch 2 at 56x56 to 16 at 7x7: the emulator's budget), and LLM
# rows: 16384 tokens of 4096 and 8192.
RESNET50_BN = [(2, 256, 56, 56), (4, 512, 28, 28), (8, 1024, 14, 14), (16, 2048, 7, 7)]
LLM_ROWS = 16384
LLM_WIDTHS = (4096, 8192)


def enough_work(launch):
    """Whether the launch has a vector per thread for a block on every SM: a
    launch with less may leave SMs idle."""
    useful = launch.load_useful + launch.store_useful
    return useful >= NUM_SMS * launch.threads * 16


def fill(case, resident_of):
    """The fraction of the SMs' resident blocks the case's largest launch fills."""
    best = 0.0
    for launch in case.launches:
        resident = resident_of(launch)
        if resident:
            best = max(best, min(1.0, launch.blocks / (NUM_SMS * resident)))
    return best


def main():
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(here), "tests"))
    from emulated_cuda import load
    from resource_report import emulating, resident_blocks
    from resource_report import load as load_report

    emu = load()
    kernels = {k.symbol: k for k in load_report() if k.arch == "sm_90"}

    def resident_of(launch):
        k = kernels.get(launch.symbol)
        return resident_blocks(k.registers, k.shared_bytes, launch.threads) if k else 0

    with emulating(emu, kernels.values(), NUM_SMS):
        cases = []
        for shape in RESNET50_BN:
            for cl in (False, True):
                cases += batch_norm_cases(emu, shape, torch.bfloat16, cl)
        for N in LLM_WIDTHS:
            for rms in (False, True):
                cases += layer_norm_at(emu, LLM_ROWS, N, torch.bfloat16, rms) or []
    print(f"MODEL: emulated traffic at {NUM_SMS} SMs (tools/traffic_model.py), not a measurement")
    if not kernels:
        print("(no ptxas report in build/resource-usage: build with CUDA for the share column)")
    print(
        f"{'case':<46} {'ideal MB':>9} {'model MB':>9} {'ratio':>6} {'vector':>7} {'blocks':>7}"
        f" {'share':>6}"
    )
    for c in cases:
        vector = [x.vector_efficiency for x in c.launches if x.vector_efficiency is not None]
        blocks = min((x.blocks for x in c.launches if enough_work(x)), default=0)
        share = f"{fill(c, resident_of) / c.ratio:>6.1%}" if kernels else f"{'n/a':>6}"
        print(
            f"{c.name:<46} {c.ideal / 1e6:>9.2f} {c.traffic / 1e6:>9.2f} {c.ratio:>6.3f} "
            f"{min(vector, default=0):>7.1%} {blocks:>7} {share}"
        )
    print(
        "ratio: modelled DRAM bytes (distinct sectors per launch) over the passes' minimum; "
        "vector: the least sector efficiency of a launch's vector accesses; blocks: the fewest "
        "of a launch with work for every SM; share: of peak bandwidth, the ideal bytes over the "
        "modelled ones times the resident blocks the largest launch fills"
    )


if __name__ == "__main__":
    main()
