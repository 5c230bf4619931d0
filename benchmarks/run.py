"""Profile torch_bnext against PyTorch native (cuDNN where torch picks it).

    python benchmarks/run.py                       # default subset (~2 min on 2 CPU cores)
    python benchmarks/run.py --full                # the whole suite (126 CPU cases, ~5-10 min)
    python benchmarks/run.py --ops batchnorm --dtypes float32 bfloat16 --threads 2
    python benchmarks/run.py --shapes 32x64x56x56 --passes "train fwd+bwd" \
        --json out.json --png out.png
    python benchmarks/run.py --trace traces/       # torch.profiler traces of both implementations

Without --full it runs a representative subset: ResNet-50 Batch Norm shapes
(a large, a mid and a small layer; NCHW and channels_last), Batch Renorm,
transformer LayerNorm/RMSNorm shapes, float32 and bfloat16, train fwd+bwd and
eval fwd. --ops/--shapes/--dtypes/--passes replace that choice (of the subset,
or with --full of the whole suite) for the dimension they name.

Prints: op, shape, layout, dtype, pass, ours, native, speedup, GB/s (bytes of the
floor: each input read once, each output written once), % of the measured
copy bandwidth, the floor's time at that bandwidth and native / floor: the
largest speedup any kernel could show, and whether the row is reliable.
Results go to bench_out/<time>-<device>/ (table.txt, table.md, results.json,
results.csv, speedup.png) unless --no-out; --json/--csv/--md/--png write
further copies where you say.

Rows whose measurement is not trustworthy are marked '?' after the speedup,
with the reason in the "reliable" column, and a warning at the end counts
them: the rounds disagree by more than 25% (or the IQR is more than 25% of the
median), the times sit on multiples of the scheduler tick (descheduled),
calls too short for the calls timed, too few samples, other processes using
the CPUs during the case, or ours faster than the copy-bandwidth floor
(benchmarks/reliability.py). Run it on a quiet machine; compare medians.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reliability  # noqa: E402
from cases import FLOOR_PASSES, PASSES, available_ops, build_cases  # noqa: E402
from report import table, write_csv, write_json, write_markdown, write_png  # noqa: E402
from timing import copy_bandwidth, paired_samples  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-process medians merged by --processes (reliability.merge_rows).
MERGED_KEYS = (
    "ours_ms",
    "native_ms",
    "speedup",
    "gbps",
    "copy_gbps",
    "pct_copy",
    "floor_ms",
    "max_speedup",
    "renorm_over_bn",
    "others_cpus",
    "native_cudnn_ms",
    "native_aten_ms",
)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the whole suite (every built-in shape and pass) instead of the default subset",
    )
    p.add_argument(
        "--ops", nargs="+", help="batchnorm batchrenorm layernorm rmsnorm (default: all built)"
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        help="e.g. 32x64x56x56 8192x1024 (default: the subset's shapes, with --full the suite's)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=sorted(DTYPES),
        help="default: float32 and bfloat16",
    )
    p.add_argument(
        "--passes",
        nargs="+",
        default=None,
        choices=PASSES,
        help="default: 'train fwd+bwd' and 'eval fwd'; with --full all three",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating ours/native measurements (their spread marks unreliable rows)",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per measurement (default: 0.15; with --full 0.2)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="results folder (default: bench_out/<YYYYmmdd-HHMMSS>-<device>/ in the repository)",
    )
    p.add_argument("--no-out", action="store_true", help="write no results folder")
    p.add_argument("--json", help="also write results as JSON here")
    p.add_argument("--csv", help="also write results as CSV here")
    p.add_argument("--md", help="also write the table as markdown here")
    p.add_argument("--png", help="also draw a speedup chart here (needs matplotlib)")
    p.add_argument(
        "--trace", metavar="DIR", help="write torch.profiler traces of both implementations"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="repeat the suite in this many fresh processes and report medians",
    )
    p.add_argument(
        "--allocator",
        choices=["steady", "system"],
        default="steady",
        help="steady (default): glibc keeps freed memory for reuse, so that fresh "
        "outputs are not page-faulted in on every call; system: as configured",
    )
    return p.parse_args(argv)


# glibc returns freed blocks of 32 MiB and more (and trims the heap) to the
# OS, so every call's fresh outputs are page-faulted in again; in a VM a fault
# costs ~1 us per 4 KiB page, which for a 32 MiB output is several times the
# kernel itself and hits ours and native alike. Served from the heap and never
# trimmed, memory is reused as PyTorch's caching allocators reuse it on a GPU.
STEADY_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 62)}


def use_steady_allocator(argv):
    """Re-executes this script with STEADY_ALLOCATOR set (glibc reads it at
    start-up); returns only if it is already set or cannot be."""
    if all(os.environ.get(k) == v for k, v in STEADY_ALLOCATOR.items()):
        return
    if platform.system() != "Linux":
        return
    env = dict(os.environ, **STEADY_ALLOCATOR)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


def load_extension():
    try:
        import torch_bnext
    except ImportError as exc:
        sys.exit(f"torch_bnext is not built: {exc}\nBuild it first: make build")
    return torch_bnext


def progress(i, n, label):
    if not sys.stderr.isatty():  # a log file gets one line per case, not a redrawn bar
        print(f"[{i}/{n}] {label}", file=sys.stderr)
        return
    width = 30
    done = int(width * i / n)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:<60}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def native_kernels(fn, device):
    """Names of the GPU kernels that one call of fn launches (cuDNN or native)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [
        e.key
        for e in prof.key_averages()
        if e.device_type.name == "CUDA" and not e.key.startswith(("Memcpy", "Memset"))
    ]
    return [n if len(n) < 60 else n[:57] + "..." for n in names[:4]]


def write_trace(directory, key, ours, native, device):
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(directory, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    stem = "_".join(
        str(k).replace(" ", "").replace("(", "").replace(")", "").replace(",", "x") for k in key
    )
    for impl, fn in (("ours", ours), ("native", native)):
        with profile(activities=activities) as prof:
            for _ in range(3):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
        prof.export_chrome_trace(os.path.join(directory, f"{stem}_{impl}.json"))


VALUE_FLAGS = ("--processes", "--json", "--csv", "--md", "--png", "--trace", "--out")


def child_arguments(argv):
    """argv for a --processes child: without the options the parent handles
    (in both the "--flag value" and "--flag=value" forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in VALUE_FLAGS:
            skip = True
        elif a.split("=", 1)[0] in VALUE_FLAGS or a == "--no-out":
            pass
        else:
            out.append(a)
    return out + ["--no-out"]


def run_in_processes(args, argv):
    """Runs the suite in args.processes fresh processes (allocator and cache
    state differ between processes more than within one) and returns the
    per-case merged rows (reliability.merge_rows), plus the machine
    description of the first run with every run's load."""
    import json
    import subprocess
    import tempfile

    child_argv = child_arguments(argv if argv is not None else sys.argv[1:])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = os.path.join(tmp, f"run{i}.json")
            print(f"process {i + 1}/{args.processes}", file=sys.stderr)
            subprocess.run(
                [sys.executable, os.path.abspath(__file__), *child_argv, "--json", out],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            with open(out) as f:
                runs.append(json.load(f))
    results = [
        reliability.merge_rows(rows, MERGED_KEYS) for rows in zip(*(r["results"] for r in runs))
    ]
    meta = dict(runs[0]["meta"])
    loads = [r["meta"].get("load") for r in runs if r["meta"].get("load")]
    if loads:

        def worst(key):
            values = [ld[key] for ld in loads if ld.get(key) is not None]
            return max(values) if values else None

        meta["load"] = dict(
            loads[0],
            **{k: worst(k) for k in ("others_cpus_run", "others_cpus_start", "load1_start")},
        )
    meta["processes"] = args.processes
    return results, meta


def measure_case(case, args, device, free_cpus, tick):
    """One row of the table: ours and native timed alternately, the copy
    bandwidth, and the reliability verdict."""
    meter = reliability.CpuMeter().start()
    started = time.monotonic()
    x = case.make_input()
    ours, native, copy, native_name, bytes_floor = case.build(x)
    s_ours, s_native = paired_samples(ours, native, device, args.rounds, args.min_run_time)
    t_ours = statistics.median(s.median for s in s_ours)
    t_native = statistics.median(s.median for s in s_native)
    aten = case.native_without_cudnn(x)
    baseline = {}
    if aten is not None:  # the faster of cuDNN and ATen is the baseline
        s_default, s_aten = paired_samples(native, aten, device, args.rounds, args.min_run_time)
        t_default = statistics.median(s.median for s in s_default)
        t_aten = statistics.median(s.median for s in s_aten)
        baseline = {"native_cudnn_ms": t_default * 1e3, "native_aten_ms": t_aten * 1e3}
        if t_aten < t_default:
            native, t_native, s_native = aten, t_aten, s_aten
            native_name += " (ATen, cuDNN off)"
    over_bn, renorm_reliable = None, True
    if case.op == "batchrenorm":  # the bound: Renorm / our Batch Norm, same input
        s_renorm, s_bn = paired_samples(
            ours, case.ours_batch_norm(x), device, args.rounds, args.min_run_time
        )
        over_bn = statistics.median(s.median for s in s_renorm) / statistics.median(
            s.median for s in s_bn
        )
        renorm_reliable = not reliability.row_flags(
            [s.as_round() for s in s_renorm], [s.as_round() for s in s_bn], device, tick=tick
        )
    gbps = bytes_floor / t_ours / 1e9
    x_bytes = bytes_floor // FLOOR_PASSES[case.pass_]
    bandwidth = copy_bandwidth(copy, x_bytes, device, args.min_run_time)
    others = meter.stop() if device == "cpu" else None
    floor_ms = bytes_floor / bandwidth * 1e3
    ours_rounds = [s.as_round() for s in s_ours]
    native_rounds = [s.as_round() for s in s_native]
    flags = reliability.row_flags(
        ours_rounds, native_rounds, device, others, free_cpus, t_ours * 1e3, floor_ms, tick
    )
    row = {
        "op": case.op,
        "shape": list(case.shape),
        "layout": case.layout,
        "dtype": case.key[3],
        "pass": case.pass_,
        "ours_ms": t_ours * 1e3,
        "native_ms": t_native * 1e3,
        "speedup": t_native / t_ours,
        "gbps": gbps,
        "copy_gbps": bandwidth / 1e9,
        "pct_copy": 100 * gbps * 1e9 / bandwidth,
        # The floor: the bytes a perfect kernel moves, at the measured copy
        # bandwidth; native / floor bounds the speedup any kernel can reach.
        "floor_ms": floor_ms,
        "max_speedup": t_native * bandwidth / bytes_floor,
        "renorm_over_bn": over_bn,
        **baseline,
        "reliable": not flags,
        "flags": flags,
        "renorm_reliable": renorm_reliable,
        "others_cpus": others,
        "case_s": time.monotonic() - started,
        "native": native_name,
        "native_kernels": native_kernels(native, device) if device == "cuda" else [],
        "ours_stats": reliability.impl_stats(ours_rounds),
        "native_stats": reliability.impl_stats(native_rounds),
    }
    if args.trace:
        write_trace(args.trace, case.key, ours, native, device)
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.full else 0.15
    if args.allocator == "steady":
        use_steady_allocator(argv if argv is not None else sys.argv[1:])
    load_extension()
    started = time.monotonic()
    if args.processes > 1:
        results, meta = run_in_processes(args, argv)
        note = (
            f"device: {meta['device']} ({meta['machine']}); torch {meta['torch']}; "
            f"allocator: {args.allocator}; {selection(args)}; {args.rounds} rounds x "
            f"{args.min_run_time} s; medians of {args.processes} processes (of the reliable "
            "rows where some were); GB/s counts each input read once and "
            "each output written once; % copy compares it with a copy of the same size"
        )
        return report(args, results, meta, note, started)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if device == "cuda":
        import torch_bnext

        if not torch_bnext.HAS_CUDA_KERNELS:
            sys.exit(
                "torch_bnext was built without CUDA kernels: "
                "rebuild with nvcc present (BNEXT_CUDA=1)"
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    built = available_ops()
    ops = args.ops or built
    missing = [o for o in ops if o not in built]
    if missing:
        sys.exit(f"not available in this build: {missing} (built: {built})")
    dtypes = [DTYPES[d] for d in (args.dtypes or ["float32", "bfloat16"])]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else None

    threads = torch.get_num_threads()
    load = reliability.load_state(threads if device == "cpu" else 1)
    if device == "cpu":
        machine = f"{platform.processor() or platform.machine()}, {threads} threads"
    else:
        machine = torch.cuda.get_device_name()
    start_load = (
        f"; load average at start {load['load1_start']:.2f} on {load['cpus']} CPUs"
        if load["load1_start"] is not None
        else ""
    )
    if load["others_cpus_start"] is not None:
        start_load += f", others using {load['others_cpus_start']:.2f} CPUs"
    note = (
        f"device: {device} ({machine}); torch {torch.__version__}; allocator: {args.allocator}; "
        f"{selection(args)}; "
        f"{args.rounds} rounds x {args.min_run_time} s{start_load}; "
        "GB/s counts each input read once and each output written once; "
        "% copy compares it with a copy of the same size"
    )
    print(note, file=sys.stderr)
    warning = reliability.load_warning(load)
    if warning:
        print(warning, file=sys.stderr)

    cases = build_cases(ops, device, dtypes, shapes, args.passes, full=args.full)
    free_cpus = max(0, load["cpus"] - threads)
    tick = reliability.kernel_tick()
    run_meter = reliability.CpuMeter().start()
    results = []
    for i, case in enumerate(cases):
        progress(i, len(cases), " ".join(map(str, case.key)))
        results.append(measure_case(case, args, device, free_cpus, tick))
    progress(len(cases), len(cases), "done")
    load["others_cpus_run"] = run_meter.stop() if device == "cpu" else None
    meta = {
        "device": device,
        "machine": machine,
        "torch": torch.__version__,
        "threads": threads,
        "allocator": args.allocator,
        "full": args.full,
        "rounds": args.rounds,
        "min_run_time": args.min_run_time,
        "load": load,
        "tick_ms": tick * 1e3,
    }
    return report(args, results, meta, note, started)


def selection(args):
    """Which cases, in words, for the header."""
    named = [o for o in ("ops", "shapes", "dtypes", "passes") if getattr(args, o)]
    base = "full suite" if args.full else "default subset (--full: all)"
    return base + (f" narrowed by --{', --'.join(named)}" if named else "")


def results_folder(args, meta):
    if args.no_out:
        return None
    if args.out:
        return args.out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(REPO, "bench_out", f"{stamp}-{meta['device']}")


def _shown(path):
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def report(args, results, meta, note, started=None):
    warnings = reliability.summary(results, meta.get("load"))
    meta = dict(
        meta, unreliable_rows=sum(not r.get("reliable", True) for r in results), warnings=warnings
    )
    text = table(results, note)
    print(text)
    wanted = []  # (kind, path)
    folder = results_folder(args, meta)
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "table.txt"), "w") as f:
            f.write(table(results, note, warnings) + "\n")
        wanted += [
            ("md", os.path.join(folder, "table.md")),
            ("json", os.path.join(folder, "results.json")),
            ("csv", os.path.join(folder, "results.csv")),
            ("png", os.path.join(folder, "speedup.png")),
        ]
    for kind in ("json", "csv", "md", "png"):
        if getattr(args, kind):
            wanted.append((kind, getattr(args, kind)))
    written, notes = [], []
    for kind, path in wanted:
        if kind == "json":
            write_json(path, results, meta)
        elif kind == "csv":
            write_csv(path, results)
        elif kind == "md":
            write_markdown(path, results, note, warnings)
        elif not write_png(path, results, note):
            notes.append(
                f"note: matplotlib is not installed, {path} skipped (pip install matplotlib)"
            )
            continue
        written.append(path)
    if folder:
        print(f"\nresults folder: {_shown(folder)}")
        for path in [os.path.join(folder, "table.txt")] + written:
            print(f"  {os.path.basename(path) if os.path.dirname(path) == folder else path}")
    elif written:
        print("\nwritten: " + ", ".join(written))
    for line in dict.fromkeys(notes):
        print(line)
    if started is not None:
        print(f"{len(results)} cases in {time.monotonic() - started:.0f} s")
    if warnings:
        print("")
        print("\n".join(warnings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
