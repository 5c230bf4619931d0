"""One rank of the multi-process tests (tests/test_distributed.py).

    python distributed_worker.py SCENARIO RANK WORLD PORT OUT_DIR

Joins a gloo process group on 127.0.0.1:PORT with a bounded timeout, runs
SCENARIO and saves what it measured to OUT_DIR/rank<RANK>.pt for the test
process to compare with single-process results.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import torch_bnext as tb
from torch_bnext.testing import rel_err

# Every rank builds the same global batch from the same seed and takes its
# slice: the test process rebuilds it to compute the whole-batch reference.
CASES = {
    # name: (shape of one sample (C, *spatial), memory format, renorm)
    "1d": ((3,), None, False),
    "1d_seq": ((4, 5), None, False),
    "2d": ((3, 4, 5), None, False),
    "2d_channels_last": ((3, 4, 5), torch.channels_last, False),
    "3d": ((2, 3, 2, 4), None, False),
    "3d_channels_last": ((2, 3, 2, 4), torch.channels_last_3d, False),
    "2d_momentum_none": ((3, 4, 5), None, False),
    "renorm_2d": ((3, 4, 5), None, True),
    "renorm_2d_channels_last": ((3, 4, 5), torch.channels_last, True),
    "renorm_1d_schedule": ((5,), None, True),
    # Batch Norm + activation (timm's SyncBatchNormAct, converted) and InPlaceABNSync.
    "act_silu_2d": ((3, 4, 5), None, False),
    "act_leaky_relu_2d_channels_last": ((3, 4, 5), torch.channels_last, False),
    "inplace_abn_2d": ((3, 4, 5), None, False),
}
STEPS = 3


def rank_sizes(world):
    """Uneven batches; with three ranks the middle one is empty."""
    return {1: [6], 2: [3, 5], 3: [4, 0, 3]}[world]


def global_batch(case, world, step):
    sample, fmt, _ = CASES[case]
    gen = torch.Generator().manual_seed(1000 * step + len(case))
    n = sum(rank_sizes(world))
    x = torch.randn(n, *sample, generator=gen, dtype=torch.float64) * 2 + 3
    grad = torch.randn(n, *sample, generator=gen, dtype=torch.float64)
    return x, grad


def local_class(sample, renorm):
    """The single-process layer for inputs of (N, *sample)."""
    dims = {1: 1, 2: 1, 3: 2, 4: 3}[len(sample)]
    return getattr(tb, f"{'BatchRenorm' if renorm else 'BatchNorm'}{dims}d")


def make_layer(case, sync, process_group=None):
    sample, _, renorm = CASES[case]
    channels = sample[0]
    torch.manual_seed(7)
    momentum = None if case.endswith("momentum_none") else 0.3
    if case.startswith("act_"):
        act = nn.SiLU() if "silu" in case else nn.LeakyReLU(0.1)
        if sync:
            layer = tb.modules.zoo.SyncBatchNormAct(
                channels, momentum=momentum, process_group=process_group, act=act
            )
        else:
            layer = tb.BatchNormAct2d(channels, momentum=momentum, act_layer=act)
    elif case.startswith("inplace_abn"):
        cls = tb.InPlaceABNSync if sync else tb.InPlaceABN
        extra = dict(group=process_group) if sync else {}
        layer = cls(channels, momentum=momentum, activation_param=0.1, **extra)
    elif renorm:
        limits = (
            dict(r_max=tb.LinearRamp(1.0, 1.5, 0, 2), d_max=tb.LinearRamp(0.0, 0.5, 0, 2))
            if case.endswith("schedule")
            else dict(r_max=1.2, d_max=0.3)
        )
        cls = tb.SyncBatchRenorm if sync else local_class(sample, renorm)
        extra = dict(process_group=process_group) if sync else {}
        layer = cls(channels, momentum=0.3, **limits, **extra)
    else:
        cls = tb.SyncBatchNorm if sync else local_class(sample, renorm)
        extra = dict(process_group=process_group) if sync else {}
        layer = cls(channels, momentum=momentum, **extra)
    layer = layer.double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        if renorm:  # far from the batch statistics: r and d clip
            layer.running_mean.fill_(1.0)
            layer.running_var.fill_(9.0)
    return layer


def run_steps(case, layer, world, rank=None):
    """STEPS training steps on this rank's slice of the global batch (the whole
    batch for rank None); returns what was measured."""
    _, fmt, _ = CASES[case]
    sizes = rank_sizes(world)
    start = 0 if rank is None else sum(sizes[:rank])
    stop = sum(sizes) if rank is None else start + sizes[rank]
    record = []
    for step in range(STEPS):
        x, grad = global_batch(case, world, step)
        x, grad = x[start:stop], grad[start:stop]
        if fmt is not None:
            x, grad = x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)
        x.requires_grad_()
        for p in layer.parameters():
            p.grad = None
        # In-place layers take a non-leaf input (autograd refuses a leaf).
        y = layer(x * 1 if case.startswith("inplace") else x)
        y.backward(grad)
        record.append(
            {
                "out": y.detach().clone(),
                "grad_input": x.grad.clone(),
                "out_channels_last": fmt is not None and y.is_contiguous(memory_format=fmt),
                "grad_weight": layer.weight.grad.clone(),
                "grad_bias": layer.bias.grad.clone(),
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
                "num_batches_tracked": int(layer.num_batches_tracked),
            }
        )
    return record


def scenario_parity(rank, world):
    return {case: run_steps(case, make_layer(case, sync=True), world, rank) for case in CASES}


def scenario_errors(rank, world):
    """A mistake one rank can see is raised there before any collective: the
    rank then makes a correct call, which meets the others' in the collective."""
    layer = tb.SyncBatchNorm(3).double()
    good = torch.randn(4, 3, 5, dtype=torch.float64)
    result = {}
    if rank == 0:
        before = layer.running_mean.clone()
        for bad, name in (
            (torch.randn(4, 5, 5, dtype=torch.float64), "channels"),
            (torch.randn(4, dtype=torch.float64), "dims"),
            (torch.randint(0, 3, (4, 3, 5)), "dtype"),
        ):
            try:
                layer(bad)
                result[name] = None
            except (RuntimeError, ValueError) as exc:
                result[name] = f"{type(exc).__name__}: {exc}"
        result["untouched"] = (
            bool(torch.equal(layer.running_mean, before)) and int(layer.num_batches_tracked) == 0
        )
    out = layer(good)  # all ranks: one collective each, matched
    result["completed"] = bool(torch.isfinite(out).all())
    result["num_batches_tracked"] = int(layer.num_batches_tracked)
    return result


def scenario_half(rank, world):
    """bfloat16 and float16, channels_last, mean 100: the synchronised layer
    against our local layer on the whole batch, which every rank can compute;
    returns the relative errors."""
    sizes = rank_sizes(world)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    errors = {}
    for dtype in (torch.bfloat16, torch.float16):
        gen = torch.Generator().manual_seed(3)
        x = (torch.randn(sum(sizes), 6, 5, 5, generator=gen) * 3 + 100).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn(x.shape, generator=gen).to(dtype)
        sync, local = tb.SyncBatchNorm(6), tb.BatchNorm2d(6)
        xs, xl = x[start:stop].clone().requires_grad_(), x.clone().requires_grad_()
        ys = sync(xs)
        ys.backward(g[start:stop])
        yl = local(xl)
        yl.backward(g)
        grad_weight = sync.weight.grad.clone()
        dist.all_reduce(grad_weight)

        name = str(dtype).replace("torch.", "")
        errors[name] = {
            "out": rel_err(ys, yl[start:stop]) if stop > start else 0.0,
            "grad_input": rel_err(xs.grad, xl.grad[start:stop]) if stop > start else 0.0,
            "grad_weight": rel_err(grad_weight, local.weight.grad),
            "running_var": rel_err(sync.running_var, local.running_var),
            "layout_kept": stop == start or ys.is_contiguous(memory_format=torch.channels_last),
            "dtype_kept": ys.dtype == dtype,
        }
    return errors


def scenario_compile(rank, world):
    """torch.compile(fullgraph=True) of the layers: the collectives trace
    (dynamo rewrites torch.distributed's in-place all_reduce); compiled
    results against eager ones."""
    import copy

    out = {}
    for case in ("2d", "renorm_1d_schedule"):
        eager = make_layer(case, sync=True)
        compiled_layer = copy.deepcopy(eager)
        compiled = torch.compile(compiled_layer, fullgraph=True)
        got, want = run_steps(case, compiled, world, rank), run_steps(case, eager, world, rank)
        for name in ("out", "grad_input", "grad_weight", "running_var"):
            for g, w in zip(got, want):
                torch.testing.assert_close(g[name], w[name], rtol=1e-12, atol=1e-12)
        out[case] = len(got)
    return out


class SmallNet(nn.Module):
    """A ResNet-like stem and block, with torch's BatchNorm2d as torchvision has."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.block(h)))


def ddp_batches(world, steps=3, per_rank=4):
    gen = torch.Generator().manual_seed(11)
    return [
        (
            torch.randn(world * per_rank, 3, 6, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (world * per_rank,), generator=gen),
        )
        for _ in range(steps)
    ]


def train_small_net(model, batches, rank_slice=slice(None)):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, labels in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[rank_slice]), labels[rank_slice])
        loss.backward()
        opt.step()
    return model


def scenario_ddp(rank, world):
    torch.manual_seed(5)
    model = tb.SyncBatchNorm.convert_sync_batchnorm(SmallNet().double())
    ddp = nn.parallel.DistributedDataParallel(model)
    per_rank = 4
    train_small_net(
        ddp, ddp_batches(world, per_rank=per_rank), slice(rank * per_rank, (rank + 1) * per_rank)
    )
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}}


def main():
    scenario, rank, world, port, out_dir = sys.argv[1:]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = globals()[f"scenario_{scenario}"](rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
