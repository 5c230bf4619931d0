"""Timers: torch.utils.benchmark on the CPU, CUDA events on a GPU. Ours and
native are timed alternately in the same process so that drift in the
machine's state (frequency, page-cache, other load) hits both alike.

Each measurement returns a Sample (the per-call time of every timed block and
the calls per block) so that reliability.py can judge its spread; the
*_median functions keep the plain medians."""

import statistics
from dataclasses import dataclass, field

import torch
import torch.utils.benchmark as benchmark


@dataclass
class Sample:
    """One measurement: seconds per call of each timed block."""

    times: list = field(default_factory=list)
    number_per_run: int = 1

    @property
    def median(self):
        return statistics.median(self.times)

    def as_round(self):
        return {"times": list(self.times), "number_per_run": self.number_per_run}


BLOCKS = 10  # timed blocks per measurement that the block size aims at


class BoundedTimer(benchmark.Timer):
    """torch.utils.benchmark.Timer whose blocked_autorange sizes its blocks to
    about min_run_time / BLOCKS (at least 10^4 x the timer's overhead when
    that fits). Torch's own estimate grows the block 10x at a time until the
    timer overhead (the median of 5 empty timings, which a descheduled
    process inflates) is 1e-4 of it, and stops only past min_run_time: on a
    busy machine a 3 ms call got 300 ms blocks, a measurement took 6x
    min_run_time and had one block, so no spread to judge."""

    def _estimate_block_size(self, min_run_time):
        try:
            from torch.utils.benchmark.utils import common

            threads = common.set_torch_threads(self._task_spec.num_threads)
            timeit = self._timeit
        except (ImportError, AttributeError):  # another torch's internals: its own estimate
            return super()._estimate_block_size(min_run_time)
        with threads:
            overhead = min(timeit(0) for _ in range(5))
            target = min(max(overhead * 1e4, min_run_time / 1000), min_run_time / BLOCKS)
            number = 1
            while True:
                t = timeit(number)
                if t >= target or number >= 2**30:
                    return number
                number = max(number + 1, min(number * 1000, int(number * target / t * 1.05) + 1))


def _cpu_sample(fn, min_run_time):
    # Timer defaults to one thread; measure with the threads the caller set.
    timer = BoundedTimer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Sample(list(m.times), m.number_per_run)


def _cuda_sample(fn, min_run_time):
    fn()
    torch.cuda.synchronize()
    # Estimate the repetitions that fill min_run_time, then time each one with events.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(5, min(1000, int(min_run_time * 1e3 / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return Sample(times, 1)


def sample(fn, device, min_run_time=0.2):
    fn()  # warm-up: allocator, lazy initialisation, cuDNN heuristics
    return (_cuda_sample if device == "cuda" else _cpu_sample)(fn, min_run_time)


def median_time(fn, device, min_run_time=0.2):
    return sample(fn, device, min_run_time).median


def paired_samples(ours, native, device, rounds=3, min_run_time=0.2):
    """`rounds` alternating measurements of each callable: two lists of Samples."""
    a, b = [], []
    for _ in range(rounds):
        a.append(sample(ours, device, min_run_time))
        b.append(sample(native, device, min_run_time))
    return a, b


def paired_medians(ours, native, device, rounds=3, min_run_time=0.2):
    """Median seconds of each callable over `rounds` alternating measurements."""
    a, b = paired_samples(ours, native, device, rounds, min_run_time)
    return statistics.median(s.median for s in a), statistics.median(s.median for s in b)


def copy_bandwidth(copy, nbytes, device, min_run_time=0.2):
    """Bytes per second (read + written) of `copy`, which copies nbytes."""
    return 2 * nbytes / median_time(copy, device, min_run_time)
