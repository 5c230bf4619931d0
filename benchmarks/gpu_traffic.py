"""The GPU's answer to tools/traffic_model.py: DRAM bytes per training step of
Batch Norm (ResNet-50 shapes at batch 128, NCHW and channels-last) and of
LayerNorm/RMSNorm (16384 x 4096), bfloat16, ours and PyTorch's, as Nsight
Compute counts them. Shapes far above the 60 MB L2, so that the counts are
memory traffic, not cache hits.

    ncu --clock-control none --profile-from-start off --csv --print-units base \\
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \\
        python3 benchmarks/gpu_traffic.py > ncu.csv
    python3 benchmarks/gpu_traffic.py --summarize ncu.csv

The first command profiles one forward and one forward+backward of each case
(after a warm-up, between cudaProfilerStart/Stop), with a marker kernel
(torch.cuda._sleep: ATen's spin_kernel) before each; the second sums the
kernels between markers and prints bytes per case in passes over the input
(the algorithm's minimum: forward 3 for Batch Norm, 2 for LayerNorm; backward 5
and 3; its kernels read x twice where statistics come first).
"""

import argparse
import csv
import io
import sys

import torch

CASES = [
    ("batchnorm", (128, 256, 56, 56), "nchw"),
    ("batchnorm", (128, 256, 56, 56), "nhwc"),
    ("batchnorm", (128, 1024, 14, 14), "nchw"),
    ("batchnorm", (128, 1024, 14, 14), "nhwc"),
    ("batchnorm", (128, 2048, 7, 7), "nchw"),
    ("layernorm", (16384, 4096), "rows"),
    ("rmsnorm", (16384, 4096), "rows"),
]
PASSES = ("fwd", "fwd+bwd")
MINIMUM = {"batchnorm": {"fwd": 3, "fwd+bwd": 8}, "layernorm": {"fwd": 2, "fwd+bwd": 5}}
MINIMUM["rmsnorm"] = MINIMUM["layernorm"]


def labels():
    return [
        (impl, op, shape, layout, p)
        for op, shape, layout in CASES
        for p in PASSES
        for impl in ("ours", "torch")
    ]


def modules(op, shape):
    from torch import nn

    import torch_bnext as tb

    if op == "batchnorm":
        return tb.BatchNorm2d(shape[1]), nn.BatchNorm2d(shape[1])
    if op == "layernorm":
        return tb.LayerNorm(shape[-1]), nn.LayerNorm(shape[-1])
    return tb.RMSNorm(shape[-1]), nn.RMSNorm(shape[-1])


def profile():
    torch.manual_seed(0)
    steps = []
    for op, shape, layout in CASES:
        ours, native = modules(op, shape)
        x = torch.randn(shape, device="cuda").mul_(1.5).add_(0.3).to(torch.bfloat16)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = torch.float32 if op == "batchnorm" else torch.bfloat16  # AMP's choice
        for m in (ours, native):
            m.to("cuda", dtype)
        dy = torch.randn_like(x)
        for p in PASSES:
            for m in (ours, native):
                xg = x.detach().requires_grad_(p != "fwd")

                def step(m=m, xg=xg, p=p, dy=dy):
                    y = m(xg)
                    if p != "fwd":
                        torch.autograd.grad(y, [xg, *m.parameters()], dy)

                steps.append(step)
    for step in steps:  # warm-up: first-call work stays out of the profile
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for step in steps:
        torch.cuda._sleep(1000)
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def summarize(path):
    # ncu's own messages (==PROF==) and the program's output surround the table.
    lines = [line for line in open(path) if line.startswith('"')]
    rows = [r for r in csv.DictReader(io.StringIO("".join(lines))) if r.get("Metric Name")]
    cases, current = [], None
    seen = set()
    for row in rows:
        key = (row["ID"], row["Kernel Name"])
        if row["Kernel Name"].startswith("spin_kernel") or "spin_kernel" in row["Kernel Name"]:
            if key not in seen:
                current = {"bytes": 0.0, "ns": 0.0, "kernels": 0}
                cases.append(current)
            seen.add(key)
            continue
        if current is None:
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row["Metric Unit"]
        scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6}
        if row["Metric Name"].startswith("dram__bytes"):
            current["bytes"] += value * scale.get(unit, 1)
        elif row["Metric Name"] == "gpu__time_duration.sum":
            current["ns"] += value * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(unit, 1)
            current["kernels"] += 1
    names = labels()
    if len(cases) != len(names):
        print(f"{len(cases)} marked cases in the profile, {len(names)} expected", file=sys.stderr)
    head = ("case", "impl", "kernels", "passes", "min", "us", "GB/s")
    print("{:44s} {:5s} {:>7s} {:>7s} {:>4s} {:>9s} {:>7s}".format(*head))
    for (impl, op, shape, layout, p), c in zip(names, cases):
        tensor = torch.Size(shape).numel() * 2
        name = f"{op} {'x'.join(map(str, shape))} {layout} {p}"
        print(
            f"{name:44s} {impl:5s} {c['kernels']:7d} {c['bytes'] / tensor:7.2f} "
            f"{MINIMUM[op][p]:4d} {c['ns'] / 1e3:9.1f} {c['bytes'] / max(c['ns'], 1):7.0f}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--summarize", metavar="NCU_CSV")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        profile()


if __name__ == "__main__":
    main()
