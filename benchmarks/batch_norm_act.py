"""Batch Norm + activation: speed of the fused layer and memory of whole
models, against timm's layers and models and torchvision's ResNet-50.

    python benchmarks/batch_norm_act.py --layers     # fused vs our BN + act vs timm, fwd+bwd
    python benchmarks/batch_norm_act.py --memory     # saved tensors and peak RSS of a step
    python benchmarks/batch_norm_act.py --models     # training steps, timm's vs converted

--layers: CPU, --threads threads (default 2), NCHW float32, torch.utils.benchmark;
shapes of ResNet-50 (ReLU) and EfficientNet-B0 (SiLU) at batch 8. Three layers on
the same input, timed in alternating rounds within each process: torch_bnext's
BatchNormAct2d (fused), torch_bnext.BatchNorm2d followed by torch's activation
module, and timm's BatchNormAct2d (nn.BatchNorm2d then the activation); the
median over --processes fresh processes (default 3), which keep freed memory
(see KEEP_FREED_MEMORY).

--memory: one training step (forward, sum, backward) at batch 4, 224x224,
float32, CPU; the bytes of the distinct storages that autograd saves for
backward (torch.autograd.graph.saved_tensors_hooks, each storage counted once)
and the process's peak RSS, each model in a fresh process. timm
efficientnet_b0 against convert_model's (fused, not in place); timm
tresnet_m against convert_model(in_place=True); torchvision resnet50 against
torch_bnext.fuse's.

--models: training steps (forward, cross-entropy, backward) of timm's
efficientnet_b0 and tresnet_m against convert_model's, alternating, batch 8,
224x224 (tresnet_m: 2), medians of --steps steps after a warm-up.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.utils.benchmark as benchmark
from torch import nn

RESNET50 = [(8, 64, 112, 112), (8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7)]
EFFNET_B0 = [
    (8, 32, 112, 112),
    (8, 96, 56, 56),
    (8, 144, 56, 56),
    (8, 240, 28, 28),
    (8, 672, 14, 14),
]


# glibc returns freed blocks of more than 32 MiB (and, past its trim
# threshold, the top of the heap) to the system, so each step's 25 MB outputs
# are mapped afresh and page-faulted in while a kernel writes them: that moved
# one timing from 0.8 to 2.9 ms here, differently for each layer. The layer
# processes keep freed memory instead (--system-malloc: glibc's defaults), as
# a caching allocator would: the timings are then of the kernels.
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": "4000000000",
    "MALLOC_TRIM_THRESHOLD_": "40000000000",
}


def _layers_one(threads: int, min_run_time: float, rounds: int) -> list:
    """One process: each shape's three layers timed in `rounds` alternating
    rounds; the median of each layer's round medians, in seconds."""
    import timm

    import torch_bnext as tb

    torch.manual_seed(0)
    rows = []
    for act, shapes in (("relu", RESNET50), ("silu", EFFNET_B0)):
        act_cls = {"relu": nn.ReLU, "silu": nn.SiLU}[act]
        for shape in shapes:
            C = shape[1]
            layers = {
                "fused": tb.BatchNormAct2d(C, act_layer=act_cls),
                "ours+act": nn.Sequential(tb.BatchNorm2d(C), act_cls()),
                "timm": timm.layers.BatchNormAct2d(C, act_layer=act_cls),
            }
            x = torch.randn(shape).requires_grad_()
            gy = torch.randn(shape)
            times = {name: [] for name in layers}
            for _ in range(rounds):
                for name, layer in layers.items():
                    timer = benchmark.Timer(
                        "torch.autograd.grad(layer(x), x, gy)",
                        globals={"layer": layer, "x": x, "gy": gy, "torch": torch},
                        num_threads=threads,
                    )
                    m = timer.blocked_autorange(min_run_time=min_run_time / rounds)
                    times[name].append(m.median)
            rows.append([act, list(shape), {k: statistics.median(v) for k, v in times.items()}])
    return rows


def _layers(threads: int, min_run_time: float, processes: int, system_malloc: bool) -> None:
    """--processes fresh processes of _layers_one; per shape, the median over
    processes of each layer's time, and ratios of those."""
    env = dict(os.environ, **({} if system_malloc else KEEP_FREED_MEMORY))
    runs = []
    for _ in range(processes):
        out = subprocess.run(
            [sys.executable, __file__, "--layers-one", "--threads", str(threads)]
            + ["--min-run-time", str(min_run_time)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = {"ours+act": [], "timm": []}
    for i, (act, shape, _) in enumerate(runs[0]):
        t = {k: statistics.median(run[i][2][k] for run in runs) for k in runs[0][i][2]}
        for ref in ratios:
            ratios[ref].append(t[ref] / t["fused"])
        print(
            f"{act:5s} {str(tuple(shape)):20s} fused {t['fused'] * 1e3:8.2f} ms  "
            + "  ".join(
                f"{k} {t[k] * 1e3:8.2f} ms ({t[k] / t['fused']:.2f}x)" for k in ("ours+act", "timm")
            ),
            flush=True,
        )
    for ref, r in ratios.items():
        print(
            f"median speed-up of fused over {ref}: {statistics.median(r):.2f}x "
            f"(range {min(r):.2f}-{max(r):.2f}x; {processes} processes, {threads} threads)"
        )


def _model(name: str, variant: str):
    import torch_bnext as tb

    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50()
        return tb.fuse(model) if variant == "ours" else model
    import timm

    model = timm.create_model(name, pretrained=False)
    if variant == "ours":
        model = tb.convert_model(model, in_place=name == "tresnet_m")
    return model


def _memory_one(name: str, variant: str) -> dict:
    """Saved bytes (distinct storages) and peak RSS of one training step."""
    model = _model(name, variant)
    x = torch.randn(4, 3, 224, 224)
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return {
        "saved_mib": sum(storages.values()) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _memory() -> None:
    for name in ("efficientnet_b0", "tresnet_m", "resnet50"):
        res = {}
        for variant in ("theirs", "ours"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-one", name, variant],
                capture_output=True,
                text=True,
                check=True,
            )
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        t, o = res["theirs"], res["ours"]
        print(
            f"{name:16s} saved {t['saved_mib']:7.1f} -> {o['saved_mib']:7.1f} MiB "
            f"({o['saved_mib'] / t['saved_mib']:.3f}x); peak RSS {t['peak_rss_mib']:7.0f} -> "
            f"{o['peak_rss_mib']:7.0f} MiB",
            flush=True,
        )


def _models(steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    for name, batch in (("efficientnet_b0", 8), ("tresnet_m", 2)):
        theirs = _model(name, "theirs")
        ours = _model(name, "ours")
        x = torch.randn(batch, 3, 224, 224)
        target = torch.randint(0, 1000, (batch,))

        def step(m, x=x, target=target):
            nn.functional.cross_entropy(m(x.clone()), target).backward()

        times = {"theirs": [], "ours": []}
        for m in (theirs, ours):
            step(m)  # warm-up
        for _ in range(steps):
            for key, m in (("theirs", theirs), ("ours", ours)):
                t0 = time.perf_counter()
                step(m)
                times[key].append(time.perf_counter() - t0)
        t, o = statistics.median(times["theirs"]), statistics.median(times["ours"])
        print(f"{name:16s} step: timm {t * 1e3:.0f} ms, converted {o * 1e3:.0f} ms ({t / o:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--models", action="store_true")
    p.add_argument("--memory-one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--layers-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--processes", type=int, default=3, help="--layers: fresh processes")
    p.add_argument(
        "--system-malloc", action="store_true", help="--layers: glibc's defaults (see the source)"
    )
    args = p.parse_args()
    if args.memory_one:
        torch.set_num_threads(args.threads)
        print(json.dumps(_memory_one(*args.memory_one)))
        return
    if args.layers_one:
        print(json.dumps(_layers_one(args.threads, args.min_run_time, rounds=3)))
        return
    if not (args.layers or args.memory or args.models):
        args.layers = args.memory = args.models = True
    if args.layers:
        _layers(args.threads, args.min_run_time, args.processes, args.system_malloc)
    if args.memory:
        _memory()
    if args.models:
        _models(args.steps, args.threads)


if __name__ == "__main__":
    main()
