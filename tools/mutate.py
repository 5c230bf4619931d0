"""Mutation check of the emulated CUDA suite (issue 22): puts one device bug
at a time into the kernels and runs the emulated tests, which must fail for
every one. The emulator is the only judge of the CUDA kernels on a machine
without a GPU; a bug it lets through would reach the GPU unseen.

    python tools/mutate.py --list             the catalogue
    python tools/mutate.py                    every mutation (hours on 2 cores)
    python tools/mutate.py --only barrier     the ids containing "barrier"

Each mutation edits one source in place, runs pytest (which rebuilds the
emulator library with ninja: only the units that include the edited file),
and restores the source, also on Ctrl-C or a kill. A mutation whose text is no longer
in its source is an error: the catalogue follows the kernels. The report
gives each mutation's verdict (caught: the suite failed; survived: it
passed; broken: the emulator no longer compiles, which proves nothing) and
the score, caught / (caught + survived).
"""

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# The emulated suites, the quickest to fail first; -x stops at the first failure.
SUITES = [
    "tests/test_emulator.py",
    "tests/test_cuda_emulated_layer_norm.py",
    "tests/test_cuda_emulated_layer_norm_2d.py",
    "tests/test_cuda_emulated_batch_norm.py",
    "tests/test_cuda_emulated_batch_norm_act.py",
]


@dataclasses.dataclass
class Mutation:
    id: str
    path: str  # relative to csrc/
    old: str
    new: str
    what: str
    occurrence: int = 0  # which occurrence of `old` (0: the first)


def barrier_deletions():
    """Every __syncthreads() of the product kernels deleted in turn."""
    out = []
    for folder, _, files in sorted(os.walk(CSRC)):
        rel = os.path.relpath(folder, CSRC)
        if rel.startswith("emulator"):
            continue
        for name in sorted(files):
            if not name.endswith((".cuh", ".cu")):
                continue
            path = os.path.join(rel, name)
            lines = open(os.path.join(CSRC, path)).read().splitlines()
            k = 0
            for i, line in enumerate(lines):
                if line.strip() == "__syncthreads();":
                    out.append(
                        Mutation(
                            f"barrier:{path}:{i + 1}",
                            path,
                            "__syncthreads();",
                            ";",
                            f"the __syncthreads() at {path}:{i + 1} deleted",
                            k,
                        )
                    )
                    k += 1
    return out


# Hand-written: the bugs a kernel author makes besides a missing barrier.
CATALOGUE = [
    Mutation(
        "bound:block_reduce",
        "common/cuda_reduce.cuh",
        "v = lane < warps ?",
        "v = lane <= warps ?",
        "off-by-one: the block reduction's second stage reads one warp slot too many",
    ),
    Mutation(
        "lane:block_reduce",
        "common/cuda_reduce.cuh",
        "if (lane == 0) scratch[warp] = v;",
        "if (lane == 1) scratch[warp] = v;",
        "wrong lane: lane 1 publishes the warp's total, which lane 0 holds",
    ),
    Mutation(
        "shuffle:warp_reduce",
        "common/cuda_reduce.cuh",
        "for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)",
        "for (int offset = kWarpSize / 4; offset > 0; offset >>= 1)",
        "wrong shuffle offset: the warp tree starts at 8, dropping half the lanes",
    ),
    Mutation(
        "shuffle:welford_m2",
        "common/cuda_reduce.cuh",
        "out.m2 = shfl_down(w.m2, offset);",
        "out.m2 = shfl_down(w.m2, offset + 1);",
        "wrong shuffle offset in one field of the Welford shuffle",
    ),
    Mutation(
        "init:column_reduce",
        "common/cuda_reduce.cuh",
        "  scratch[idx] = v;\n  __syncthreads();",
        "  if (threadIdx.y > 0) scratch[idx] = v;\n  __syncthreads();",
        "missing shared-memory initialisation: row 0 of the column tree never stores",
    ),
    Mutation(
        "stride:column_reduce",
        "common/cuda_reduce.cuh",
        "for (int stride = blockDim.y / 2; stride > 0; stride >>= 1)",
        "for (int stride = blockDim.y / 4; stride > 0; stride >>= 1)",
        "wrong tree: the column reduction skips its first level",
    ),
    Mutation(
        "partial:finalize",
        "batch_norm/cuda_kernels.cuh",
        "for (int64_t p = lane; p < num_parts; p += cuda::kWarpSize)",
        "for (int64_t p = lane; p < num_parts - 1; p += cuda::kWarpSize)",
        "dropped partial: Batch Norm's finalize skips the last block's partial",
    ),
    Mutation(
        "partial:column_merge",
        "layer_norm/cuda_kernels.cuh",
        "for (int64_t p = threadIdx.y; p < num_parts; p += blockDim.y)",
        "for (int64_t p = threadIdx.y + 1; p < num_parts; p += blockDim.y)",
        "dropped partial: LayerNorm's column merge skips the first part",
    ),
    Mutation(
        "partial:group_columns",
        "layer_norm/cuda_kernels.cuh",
        "for (int w = 1; w < kWarps; ++w)",
        "for (int w = 1; w < kWarps - 1; ++w)",
        "dropped partial: the short-row backward merges one warp too few",
    ),
    Mutation(
        "lane:channel_stats",
        "layer_norm/cuda_channel_kernels.cuh",
        "      shared_stats[threadIdx.x] = stats;",
        "      shared_stats[(threadIdx.x + 1) % cuda::kWarpSize] = stats;",
        "wrong slot: the channel kernel publishes a position's statistics to its neighbour",
    ),
    Mutation(
        "bound:planes_loop",
        "batch_norm/cuda_kernels.cuh",
        "for (int64_t n = y * ppb + slot; n < N; n += Y * ppb)",
        "for (int64_t n = y * ppb + slot; n < N - 1; n += Y * ppb)",
        "off-by-one: Batch Norm's NCHW reduce skips the last sample",
    ),
    Mutation(
        "bound:ragged_tail",
        "batch_norm/cuda_kernels.cuh",
        "tail = S - head - nvec * VEC;",
        "tail = S - head - nvec * VEC - (S - head - nvec * VEC > 0);",
        "off-by-one: NCHW planes of ragged size lose their last element",
    ),
    Mutation(
        "offset:ragged_edge",
        "batch_norm/cuda_kernels.cuh",
        "return e < head ? e : e + nvec * VEC;",
        "return e < head ? e : e + (nvec - 1) * VEC;",
        "wrong offset: a ragged plane's tail is read from inside its last vector",
    ),
]


def catalogue():
    return barrier_deletions() + CATALOGUE


def locate(m):
    """The source's text and where the mutation applies in it."""
    text = open(os.path.join(CSRC, m.path)).read()
    starts = [x.start() for x in re.finditer(re.escape(m.old), text)]
    if len(starts) <= m.occurrence:
        raise SystemExit(f"{m.id}: {m.old!r} (occurrence {m.occurrence}) is not in {m.path}")
    return text, starts[m.occurrence]


def write_source(path, text):
    """Replaces a source in one step (a temporary file renamed over it), with
    SIGTERM and SIGINT held back meanwhile: a kill that came during a plain
    write once left a restored source empty."""
    signals = {signal.SIGTERM, signal.SIGINT}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        tmp = path + ".mutate-tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def apply(m):
    """Returns the source's original text after writing the mutated one."""
    text, at = locate(m)
    write_source(os.path.join(CSRC, m.path), text[:at] + m.new + text[at + len(m.old) :])
    return text


def run_suite(timeout):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Without the traffic counter's instrumentation the emulator's units
    # compile several times faster, and no mutation is about traffic.
    env["BNEXT_EMULATOR_TRAFFIC"] = "0"
    # Not the test of this catalogue itself: a mutation changes its texts.
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
    cmd += ["-k", "not mutation_catalogue"]
    try:
        r = subprocess.run(
            cmd + SUITES, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", ""
    out = r.stdout + r.stderr
    if r.returncode == 0:
        return "survived", ""
    if "error building extension" in out or "ninja: build stopped" in out:
        return "broken", "the emulator does not compile"
    failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    # What caught it: the emulator's own error, or a comparison.
    why = [line[1:].strip() for line in out.splitlines() if line.startswith("E ")]
    detail = failed[0] if failed else out.strip().splitlines()[-1]
    return "caught", (detail[:120] + (" -- " + why[0][:200] if why else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the catalogue and exit")
    ap.add_argument("--only", nargs="*", default=[], help="ids containing any of these")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per mutation")
    args = ap.parse_args()
    todo = [m for m in catalogue() if not args.only or any(s in m.id for s in args.only)]
    if args.list:
        for m in todo:
            locate(m)
            print(f"{m.id:50s} {m.what}")
        return 0
    # A kill (SIGTERM) still restores the mutated source (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("mutate.py: terminated"))
    verdicts = {}
    for m in todo:
        t0 = time.time()
        original = apply(m)
        try:
            verdict, detail = run_suite(args.timeout)
        finally:
            write_source(os.path.join(CSRC, m.path), original)
        verdicts[m.id] = verdict
        print(f"{verdict:9s} {m.id} ({time.time() - t0:.0f} s) {detail}", flush=True)
    caught = sum(v == "caught" for v in verdicts.values())
    judged = sum(v in ("caught", "survived") for v in verdicts.values())
    print(f"score: {caught}/{judged} caught", flush=True)
    return 0 if caught == judged else 1


if __name__ == "__main__":
    sys.exit(main())
