"""Is a benchmark row's measurement trustworthy? Pure Python (no torch), so
that the rules are unit-tested on their own (tests/test_bench_report.py).

A row is marked unreliable (``reliable: False`` plus its ``flags``; the table
shows ``?`` after the speedup) when any of these holds for ours or native:

  spread  the medians of the alternating rounds differ by more than
          SPREAD_MAX of their median ((max - min) / median), or the
          interquartile range of all the timed blocks is more than SPREAD_MAX
          of their median: the median itself moved while it was measured.
  tick    the per-call times sit on multiples of the scheduler tick (4 ms at
          CONFIG_HZ=250): on several different multiples (within
          TICK_TOLERANCE of a tick), or all on one within TICK_TIGHT (8.000 ms
          for ours and native alike). The process waited for whole ticks (CPU
          contention), and those times are the scheduler's, not the kernel's
          (earlier runs printed 8/16/32 ms rows and a "214x" speedup that way).
  short   a call shorter than SHORT_CALL_S (20 us CPU, 5 us CUDA) with fewer
          than SHORT_MIN_CALLS calls timed, or each call timed on its own (CUDA
          events, ~0.5 us resolution): timer and launch overhead, not the kernel.
  few     fewer than MIN_BLOCKS timed blocks over all rounds: no spread to judge.
  load    other processes (and the hypervisor's steal) used more than
          LOAD_MARGIN CPUs beyond the ones this run leaves free, on average
          over the case (/proc/stat, Linux only).
  floor   ours ran faster than FLOOR_FACTOR x the floor (the bytes a perfect
          kernel moves at the copy bandwidth measured just before): either the
          copy or the kernel was disturbed, so the ratio and % copy are wrong.

With --processes N the per-process rows are merged by merge_rows: the medians
come from the processes whose row was reliable, and the merged row is reliable
only when most processes' rows were and those agree (within SPREAD_MAX).
"""

import math
import os
import statistics
import time

SPREAD_MAX = 0.25
SHORT_CALL_S = {"cpu": 20e-6, "cuda": 5e-6}
SHORT_MIN_CALLS = 1000
MIN_BLOCKS = 3
TICK_S = 4e-3  # replaced by the running kernel's CONFIG_HZ where it can be read
TICK_TOLERANCE = 0.03  # of a tick, when the times land on several multiples
TICK_TIGHT = 0.005  # of a tick, when they all land on one (a real kernel does 1 time in 100)
TICK_FRACTION = 0.75  # of the timed blocks
LOAD_MARGIN = 0.25  # CPUs
FLOOR_FACTOR = 1 / 1.5

FLAG_TEXT = {
    "spread": f"ours or native moved by more than {SPREAD_MAX:.0%} of the median between rounds "
    f"(or within one: IQR > {SPREAD_MAX:.0%} of the median)",
    "tick": "times sit on multiples of the scheduler tick: the process was descheduled "
    "(CPU contention)",
    "short": f"calls under {SHORT_CALL_S['cpu'] * 1e6:.0f} us (CPU) / "
    f"{SHORT_CALL_S['cuda'] * 1e6:.0f} us (CUDA) with fewer than {SHORT_MIN_CALLS} calls "
    "timed or timed one by one: timer/launch overhead",
    "few": f"fewer than {MIN_BLOCKS} timed blocks: too few samples to judge the spread",
    "load": f"other processes used more than {LOAD_MARGIN} CPUs beyond those this run leaves free",
    "floor": f"ours faster than the copy-bandwidth floor / {1 / FLOOR_FACTOR:.1f}: "
    "copy or kernel disturbed",
    "processes": f"the reliable processes' medians differ by more than {SPREAD_MAX:.0%}",
    "majority": "most processes measured this row unreliably",
}


def quantile(values, q):
    """Linear-interpolated quantile (as torch.quantile and numpy's default)."""
    s = sorted(values)
    if not s:
        raise ValueError("quantile of no values")
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def rel_spread(values):
    """(max - min) / median; 0 for fewer than two values."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med > 0 else math.inf


def rel_iqr(values):
    if len(values) < 2:
        return 0.0
    med = quantile(values, 0.5)
    return (quantile(values, 0.75) - quantile(values, 0.25)) / med if med > 0 else math.inf


def tick_snapped(call_times, tick=None):
    """True when at least TICK_FRACTION of the per-call times (at least 3) are a
    whole number (>= 1) of scheduler ticks: within TICK_TOLERANCE of a tick
    and on at least two different multiples, or within TICK_TIGHT. A kernel
    that genuinely takes about 2 ticks (8.05 ms) is not flagged; one whose
    time is the scheduler's lands exactly on them (8.000, 16.00, 32.00 ms)."""
    tick = tick or TICK_S
    if len(call_times) < 3:
        return False
    loose, tight = [], 0
    for t in call_times:
        k = round(t / tick)
        off = abs(t / tick - k)
        if k >= 1 and off <= TICK_TOLERANCE:
            loose.append(k)
            tight += off <= TICK_TIGHT
    need = TICK_FRACTION * len(call_times)
    return len(loose) >= need and (len(set(loose)) >= 2 or tight >= need)


def impl_flags(rounds, device="cpu", tick=None):
    """Flags of one implementation's measurements. rounds: one dict per round,
    {"times": seconds per call of each timed block, "number_per_run": calls per block}."""
    flags = set()
    medians = [statistics.median(r["times"]) for r in rounds if r["times"]]
    pooled = [t for r in rounds for t in r["times"]]
    if not pooled:
        return {"few"}
    if rel_spread(medians) > SPREAD_MAX or rel_iqr(pooled) > SPREAD_MAX:
        flags.add("spread")
    if tick_snapped(pooled, tick):
        flags.add("tick")
    calls = sum(len(r["times"]) * r["number_per_run"] for r in rounds)
    one_call_blocks = all(
        r["number_per_run"] == 1 for r in rounds
    )  # CUDA events: each call on its own
    if statistics.median(pooled) < SHORT_CALL_S.get(device, SHORT_CALL_S["cpu"]) and (
        calls < SHORT_MIN_CALLS or one_call_blocks
    ):
        flags.add("short")
    if len(pooled) < MIN_BLOCKS:
        flags.add("few")
    return flags


def impl_stats(rounds):
    """What the JSON keeps of one implementation's rounds."""
    medians = [statistics.median(r["times"]) for r in rounds if r["times"]]
    pooled = [t for r in rounds for t in r["times"]]
    return {
        "round_ms": [m * 1e3 for m in medians],
        "spread": rel_spread(medians),
        "iqr_rel": rel_iqr(pooled),
        "blocks": len(pooled),
        "calls": sum(len(r["times"]) * r["number_per_run"] for r in rounds),
        # Per round: calls per block and each block's ms per call (to re-judge a run later).
        "number_per_run": [r["number_per_run"] for r in rounds],
        "times_ms": [[float(f"{t * 1e3:.5g}") for t in r["times"]] for r in rounds],
    }


def row_flags(
    ours_rounds,
    native_rounds,
    device="cpu",
    others_cpus=None,
    free_cpus=0.0,
    ours_ms=None,
    floor_ms=None,
    tick=None,
):
    """Sorted flags of one row (empty: reliable)."""
    flags = impl_flags(ours_rounds, device, tick) | impl_flags(native_rounds, device, tick)
    if others_cpus is not None and others_cpus > free_cpus + LOAD_MARGIN:
        flags.add("load")
    if ours_ms is not None and floor_ms and ours_ms < FLOOR_FACTOR * floor_ms:
        flags.add("floor")
    return sorted(flags)


def merge_rows(rows, numeric_keys):
    """One row from the same case's rows of several processes: medians over the
    reliable ones (all of them where none is), speedup the median of the
    per-process ratios; reliable when most processes' rows were reliable and
    the reliable ones agree within SPREAD_MAX."""
    good = [r for r in rows if r.get("reliable", True)]
    use = good or list(rows)
    merged = dict(rows[0])
    for key in numeric_keys:
        values = [r[key] for r in use if r.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    flags = set()
    if 2 * len(good) <= len(rows):
        flags.add("majority")
        for r in rows:
            flags.update(r.get("flags", []))
    if (
        len(use) >= 2
        and max(
            rel_spread([r.get("ours_ms") for r in use]),
            rel_spread([r.get("native_ms") for r in use]),
        )
        > SPREAD_MAX
    ):
        flags.add("processes")
    merged["flags"] = sorted(flags)
    merged["reliable"] = not flags
    merged["processes_reliable"] = f"{len(good)}/{len(rows)}"
    merged["renorm_reliable"] = all(r.get("renorm_reliable", True) for r in use)
    return merged


def kernel_tick():
    """Seconds per scheduler tick of the running kernel (CONFIG_HZ), or TICK_S."""
    import gzip
    import platform

    for path in ("/proc/config.gz", f"/boot/config-{platform.release()}"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return 1.0 / int(line.split("=")[1])
        except (OSError, ValueError):
            continue
    return TICK_S


def available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class CpuMeter:
    """CPUs used by other processes (and stolen by the hypervisor) on the CPUs
    this process may run on, between start() and stop(): /proc/stat's busy
    time of those CPUs minus this process's own CPU time. None where
    /proc/stat is missing (not Linux)."""

    def __init__(self):
        try:
            self.cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:
            self.cpus = None
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = None

    def _busy(self):
        """Busy seconds of our CPUs (user nice system irq softirq steal)."""
        if self.cpus is None:
            return None
        wanted = {f"cpu{c}" for c in self.cpus}
        total = 0
        try:
            with open("/proc/stat") as f:
                for line in f:
                    parts = line.split()
                    if parts and parts[0] in wanted:
                        v = [int(x) for x in parts[1:9]]
                        total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        except OSError:
            return None
        return total / self.hz

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system

    def start(self):
        self._start = (time.monotonic(), self._busy(), self._own())
        return self

    def stop(self):
        """Average CPUs used by others since start(), or None."""
        if self._start is None:
            return None
        wall0, busy0, own0 = self._start
        busy = self._busy()
        wall = time.monotonic() - wall0
        if busy is None or busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - busy0 - (self._own() - own0)) / wall)


def load_state(threads, sample_s=0.5):
    """The machine's load when the run starts: the 1-minute load average (which
    lags: it still counts a job that ended a minute ago) and the CPUs other
    processes use now, measured over sample_s seconds (/proc/stat)."""
    try:
        load1 = os.getloadavg()[0]
    except (AttributeError, OSError):
        load1 = None
    meter = CpuMeter().start()
    time.sleep(sample_s)
    return {
        "load1_start": load1,
        "others_cpus_start": meter.stop(),
        "cpus": available_cpus(),
        "threads": threads,
    }


def load_warning(load):
    """A line when the machine was busy (other processes' CPU use at the start
    or during the whole run, the load average where that cannot be measured);
    None when quiet. Busy means more than LOAD_MARGIN CPUs beyond those the
    run's threads leave free."""
    cpus, threads = load["cpus"], load["threads"]
    free = max(0, cpus - threads)
    parts = []
    start, run = load.get("others_cpus_start"), load.get("others_cpus_run")
    if start is not None and start > free + LOAD_MARGIN:
        parts.append(f"other processes used {start:.2f} CPUs at the start")
    if run is not None and run > free + LOAD_MARGIN:
        parts.append(f"{run:.2f} CPUs on average during the run")
    if (
        start is None
        and run is None
        and load.get("load1_start") is not None
        and load["load1_start"] > free + 0.5
    ):
        parts.append(f"the 1-minute load average was {load['load1_start']:.2f} at the start")
    if not parts:
        return None
    avg = (
        f" (load average {load['load1_start']:.2f} at the start)"
        if load.get("load1_start") is not None and start is not None
        else ""
    )
    return (
        f"WARNING: the machine was busy: {' and '.join(parts)}{avg}, with {cpus} CPUs available "
        f"and {threads} threads timed ({free} left free). Timings compete for the CPUs; rerun "
        "when `uptime` shows a load near 0, or use fewer --threads."
    )


def summary(results, load=None):
    """Lines that explain the unreliable rows (and a busy machine); [] if all is well."""
    lines = []
    bad = [r for r in results if not r.get("reliable", True)]
    if bad:
        lines.append(
            f"WARNING: {len(bad)} of {len(results)} rows are unreliable (marked '?' after the "
            "speedup; reliable = false in the JSON/CSV). Do not quote their ratios:"
        )
        counts = {}
        for r in bad:
            for f in r.get("flags", []) or ["?"]:
                counts[f] = counts.get(f, 0) + 1
        for f in sorted(counts, key=lambda k: (-counts[k], k)):
            lines.append(f"  {counts[f]:>3} {f}: {FLAG_TEXT.get(f, f)}")
    renorm_bad = [
        r
        for r in results
        if r.get("renorm_over_bn") is not None and not r.get("renorm_reliable", True)
    ]
    if renorm_bad:
        lines.append(
            f"WARNING: {len(renorm_bad)} Batch Renorm / Batch Norm ratios are unreliable "
            "(marked '?')."
        )
    if load:
        w = load_warning(load)
        if w:
            lines.append(w)
    return lines
