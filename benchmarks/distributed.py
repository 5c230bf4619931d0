"""The cost of synchronisation: torch_bnext.SyncBatchNorm against our local
BatchNorm on the same per-rank batch, in 2 processes (gloo on the CPU by
default; NCCL on one GPU per rank with --device cuda, where torch's own
SyncBatchNorm is timed as well).

    python benchmarks/distributed.py                 # 2 CPU processes, gloo
    python benchmarks/distributed.py --world 2 --threads 1 --shapes 16x64x28x28

Each rank times train fwd+bwd over a fixed number of calls (the same on every
rank, so that the collectives match) with torch.utils.benchmark (CPU) or CUDA
events, alternating the layers over several rounds; rank 0 prints the per-shape
medians (ms) and the overhead of synchronising, sync / local.
"""

import argparse
import datetime
import os
import socket
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = ["16x64x28x28", "16x256x14x14", "64x512", "8x32x8x8"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="per-rank input shapes")
    p.add_argument("--calls", type=int, default=20, help="calls per measurement")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


def time_it(fn, device, calls):
    """Seconds per call over a fixed number of calls: every rank must make the
    same calls, or the collectives would not match (an autorange would choose
    a different count on each rank and hang)."""
    if device == "cpu":
        import torch.utils.benchmark as benchmark

        timer = benchmark.Timer(
            stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
        )
        return timer.timeit(calls).median
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(calls):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def train_step(layer, x, grad):
    def step():
        x.grad = None
        layer(x).backward(grad)

    return step


def rank_main(rank, args, port):
    import torch_bnext as tb

    torch.set_num_threads(args.threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=120),
    )
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    rows = []
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.split("x"))
        channels = shape[1]
        torch.manual_seed(rank)
        x = torch.randn(shape, device=device).requires_grad_()
        grad = torch.randn(shape, device=device)
        layers = {
            "local": tb.BatchNorm1d(channels) if len(shape) < 4 else tb.BatchNorm2d(channels),
            "sync": tb.SyncBatchNorm(channels),
        }
        if args.device == "cuda":
            layers["torch sync"] = torch.nn.SyncBatchNorm(channels)
        times = {name: [] for name in layers}
        for _ in range(args.rounds):
            for name, layer in layers.items():
                layer.to(device).train()
                dist.barrier()
                times[name].append(time_it(train_step(layer, x, grad), args.device, args.calls))
        # The floor of synchronising: the step's two collectives alone, at its sizes.
        table = torch.zeros(args.world, 2 * channels + 1, dtype=torch.float64, device=device)
        sums = torch.zeros(2 * channels, device=device)

        def collectives(table=table, sums=sums):
            dist.all_reduce(table)
            dist.all_reduce(sums)

        times["2 all-reduces"] = []
        for _ in range(args.rounds):
            dist.barrier()
            times["2 all-reduces"].append(time_it(collectives, args.device, args.calls))
        rows.append((spec, {k: statistics.median(v) * 1e3 for k, v in times.items()}))
    if rank == 0:
        names = list(rows[0][1])
        print(
            f"{args.world} ranks, {backend}, {args.device}, {args.threads} thread(s) per rank; "
            "train fwd+bwd per rank, median ms"
        )
        print(
            f"{'shape (per rank)':<18}" + "".join(f"{n:>15}" for n in names) + f"{'sync/local':>12}"
        )
        for spec, t in rows:
            print(
                f"{spec:<18}"
                + "".join(f"{t[n]:>15.3f}" for n in names)
                + f"{t['sync'] / t['local']:>12.2f}"
            )
    dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        sys.exit(f"--device cuda needs {args.world} GPUs, {torch.cuda.device_count()} visible")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args, port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
