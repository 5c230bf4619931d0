"""Profile torch_bnext against PyTorch native (cuDNN where torch picks it).

    python benchmarks/run.py                       # default suite, CUDA if present else CPU
    python benchmarks/run.py --ops batchnorm --dtypes float32 bfloat16 --threads 2
    python benchmarks/run.py --shapes 32x64x56x56 --passes "train fwd+bwd" --json out.json --png out.png
    python benchmarks/run.py --trace traces/       # torch.profiler traces of both implementations

Prints: op, shape, layout, dtype, pass, ours, native, speedup, GB/s (bytes of the
floor: each input read once, each output written once), % of the measured
copy bandwidth, the floor's time at that bandwidth and native / floor: the
largest speedup any kernel could show. Run it several times; compare medians.
"""

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import FLOOR_PASSES, PASSES, available_ops, build_cases  # noqa: E402
from report import table, write_csv, write_json, write_markdown, write_png  # noqa: E402
from timing import copy_bandwidth, paired_medians  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", help="batchnorm batchrenorm layernorm rmsnorm (default: all built)")
    p.add_argument("--shapes", nargs="+", help="e.g. 32x64x56x56 8192x1024 (default: built-in suite)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                   help="default: float32 and bfloat16")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=3, help="alternating ours/native measurements")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    p.add_argument("--json", help="write results as JSON")
    p.add_argument("--csv", help="write results as CSV")
    p.add_argument("--md", help="write the table as markdown")
    p.add_argument("--png", help="draw a speedup chart (matplotlib)")
    p.add_argument("--trace", metavar="DIR", help="write torch.profiler traces of both implementations")
    p.add_argument("--processes", type=int, default=1,
                   help="repeat the suite in this many fresh processes and report medians")
    p.add_argument("--allocator", choices=["steady", "system"], default="steady",
                   help="steady (default): glibc keeps freed memory for reuse, so that fresh "
                        "outputs are not page-faulted in on every call; system: as configured")
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
    names = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"
             and not e.key.startswith(("Memcpy", "Memset"))]
    return [n if len(n) < 60 else n[:57] + "..." for n in names[:4]]


def write_trace(directory, key, ours, native, device):
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(directory, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    stem = "_".join(str(k).replace(" ", "").replace("(", "").replace(")", "").replace(",", "x")
                    for k in key)
    for impl, fn in (("ours", ours), ("native", native)):
        with profile(activities=activities) as prof:
            for _ in range(3):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
        prof.export_chrome_trace(os.path.join(directory, f"{stem}_{impl}.json"))


def run_in_processes(args, argv):
    """Runs the suite in args.processes fresh processes (allocator and cache
    state differ between processes more than within one) and returns the
    per-case medians, plus the machine description of the first run."""
    import json
    import statistics
    import subprocess
    import tempfile

    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    for flag in ("--processes", "--json", "--csv", "--md", "--png", "--trace"):
        while flag in child_argv:
            i = child_argv.index(flag)
            del child_argv[i:i + 2]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = os.path.join(tmp, f"run{i}.json")
            print(f"process {i + 1}/{args.processes}", file=sys.stderr)
            subprocess.run([sys.executable, os.path.abspath(__file__), *child_argv, "--json", out],
                           check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                runs.append(json.load(f))
    results = []
    for rows in zip(*(r["results"] for r in runs)):
        merged = dict(rows[0])
        for key in ("ours_ms", "native_ms", "speedup", "gbps", "copy_gbps", "pct_copy", "floor_ms",
                    "max_speedup", "renorm_over_bn"):
            values = [r[key] for r in rows if r.get(key) is not None]
            merged[key] = statistics.median(values) if values else None
        results.append(merged)
    return results, runs[0]["meta"]


def main(argv=None):
    args = parse_args(argv)
    if args.allocator == "steady":
        use_steady_allocator(argv if argv is not None else sys.argv[1:])
    load_extension()
    if args.processes > 1:
        results, meta = run_in_processes(args, argv)
        note = (f"device: {meta['device']} ({meta['machine']}); torch {meta['torch']}; "
                f"allocator: {args.allocator}; medians of {args.processes} processes; GB/s counts each input read once and "
                "each output written once; % copy compares it with a copy of the same size")
        return report(args, results, meta, note)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if device == "cuda":
        import torch_bnext

        if not torch_bnext.HAS_CUDA_KERNELS:
            sys.exit("torch_bnext was built without CUDA kernels: rebuild with nvcc present (BNEXT_CUDA=1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    built = available_ops()
    ops = args.ops or built
    missing = [o for o in ops if o not in built]
    if missing:
        sys.exit(f"not available in this build: {missing} (built: {built})")
    dtypes = [DTYPES[d] for d in (args.dtypes or ["float32", "bfloat16"])]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else None

    if device == "cpu":
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    else:
        machine = torch.cuda.get_device_name()
    note = (f"device: {device} ({machine}); torch {torch.__version__}; allocator: {args.allocator}; "
            "GB/s counts each input read once and each output written once; "
            "% copy compares it with a copy of the same size")
    print(note, file=sys.stderr)

    cases = build_cases(ops, device, dtypes, shapes, args.passes)
    results = []
    for i, case in enumerate(cases):
        progress(i, len(cases), " ".join(map(str, case.key)))
        x = case.make_input()
        ours, native, copy, native_name, bytes_floor = case.build(x)
        t_ours, t_native = paired_medians(ours, native, device, args.rounds, args.min_run_time)
        over_bn = None
        if case.op == "batchrenorm":  # the bound: Renorm / our Batch Norm, same input
            t_renorm, t_bn = paired_medians(ours, case.ours_batch_norm(x), device, args.rounds,
                                            args.min_run_time)
            over_bn = t_renorm / t_bn
        gbps = bytes_floor / t_ours / 1e9
        x_bytes = bytes_floor // FLOOR_PASSES[case.pass_]
        bandwidth = copy_bandwidth(copy, x_bytes, device, args.min_run_time)
        results.append({
            "op": case.op, "shape": list(case.shape), "layout": case.layout, "dtype": case.key[3],
            "pass": case.pass_, "ours_ms": t_ours * 1e3, "native_ms": t_native * 1e3,
            "speedup": t_native / t_ours, "gbps": gbps, "copy_gbps": bandwidth / 1e9,
            "pct_copy": 100 * gbps * 1e9 / bandwidth,
            # The floor: the bytes a perfect kernel moves, at the measured copy
            # bandwidth; native / floor bounds the speedup any kernel can reach.
            "floor_ms": bytes_floor / bandwidth * 1e3,
            "max_speedup": t_native * bandwidth / bytes_floor,
            "renorm_over_bn": over_bn,
            "native": native_name,
            "native_kernels": native_kernels(native, device) if device == "cuda" else [],
        })
        if args.trace:
            write_trace(args.trace, case.key, ours, native, device)
        del ours, native  # free this case's tensors before the next one
    progress(len(cases), len(cases), "done")
    meta = {"device": device, "machine": machine, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "allocator": args.allocator}
    return report(args, results, meta, note)


def report(args, results, meta, note):
    print(table(results, note))
    if args.json:
        write_json(args.json, results, meta)
    if args.csv:
        write_csv(args.csv, results)
    if args.md:
        write_markdown(args.md, results, note)
    if args.png:
        write_png(args.png, results, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
