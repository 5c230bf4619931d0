"""Timers: torch.utils.benchmark on the CPU, CUDA events on a GPU. Ours and
native are timed alternately in the same process so that drift in the
machine's state (frequency, page-cache, other load) hits both alike."""

import statistics

import torch
import torch.utils.benchmark as benchmark


def _cpu_median(fn, min_run_time):
    # Timer defaults to one thread; measure with the threads the caller set.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _cuda_median(fn, min_run_time):
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
    return statistics.median(times)


def median_time(fn, device, min_run_time=0.2):
    fn()  # warm-up: allocator, lazy initialisation, cuDNN heuristics
    return (_cuda_median if device == "cuda" else _cpu_median)(fn, min_run_time)


def paired_medians(ours, native, device, rounds=3, min_run_time=0.2):
    """Median seconds of each callable over `rounds` alternating measurements."""
    a, b = [], []
    for _ in range(rounds):
        a.append(median_time(ours, device, min_run_time))
        b.append(median_time(native, device, min_run_time))
    return statistics.median(a), statistics.median(b)


def copy_bandwidth(copy, nbytes, device, min_run_time=0.2):
    """Bytes per second (read + written) of `copy`, which copies nbytes."""
    return 2 * nbytes / median_time(copy, device, min_run_time)
