"""SyncBatchNorm and SyncBatchRenorm (issue 12) over torch.distributed with
gloo on the CPU: 2 and 3 processes spawned here (tests/distributed_worker.py)
on 127.0.0.1 and a free port, each bounded by a timeout so that a hang fails
instead of stalling CI. Each distributed result is compared in float64 with
our single-process layer on the concatenation of all ranks' batches."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torch_bnext as tb
from torch_bnext.testing import REL_TOL

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

# The tests that spawn ranks (run_ranks) are marked slow: each process
# imports torch and meets the others before the first step.
TIMEOUT_S = 240
TOL = dict(rtol=1e-10, atol=1e-12)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario, world, tmp_path):
    """Runs `scenario` in `world` processes; returns each rank's saved result."""
    port = free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                worker.__file__,
                scenario,
                str(rank),
                str(world),
                str(port),
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{scenario} with {world} ranks did not finish in {TIMEOUT_S} s (a hang)")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def reference(case, world):
    """Our single-process layer on the concatenated batch, STEPS steps."""
    return worker.run_steps(case, worker.make_layer(case, sync=False), world)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_equals_the_whole_batch_on_one_process(world, tmp_path):
    results = run_ranks("parity", world, tmp_path)
    sizes = worker.rank_sizes(world)
    for case in worker.CASES:
        want = reference(case, world)
        for step in range(worker.STEPS):
            w = want[step]
            ranks = [r[case][step] for r in results]
            msg = f"{case}, step {step}"
            torch.testing.assert_close(
                torch.cat([r["out"] for r in ranks]), w["out"], **TOL, msg=msg
            )
            torch.testing.assert_close(
                torch.cat([r["grad_input"] for r in ranks]), w["grad_input"], **TOL, msg=msg
            )
            # Parameter gradients are each rank's share: their sum is the whole batch's.
            for name in ("grad_weight", "grad_bias"):
                torch.testing.assert_close(
                    sum(r[name] for r in ranks), w[name], **TOL, msg=f"{msg}: {name}"
                )
            for rank, r in enumerate(ranks):
                for name in ("running_mean", "running_var"):
                    torch.testing.assert_close(
                        r[name], w[name], **TOL, msg=f"{msg}: {name} on rank {rank}"
                    )
                assert r["num_batches_tracked"] == w["num_batches_tracked"] == step + 1
                if sizes[rank] > 0 and worker.CASES[case][1] is not None:
                    assert r["out_channels_last"], msg


@pytest.mark.slow
def test_a_local_mistake_raises_before_any_collective(tmp_path):
    results = run_ranks("errors", 2, tmp_path)
    bad = results[0]
    assert "running_mean should contain 5 elements not 3" in bad["channels"]
    assert bad["dims"].startswith("ValueError") and "2D" in bad["dims"]
    assert "floating-point" in bad["dtype"]
    assert bad["untouched"]
    # The correct calls that followed met in one collective on both ranks.
    assert all(r["completed"] and r["num_batches_tracked"] == 1 for r in results)


@pytest.mark.slow
def test_half_precision_channels_last_matches_the_local_layer(tmp_path):
    """Statistics merged in float32 across 3 ranks (one empty), mean 100."""
    for rank, errors in enumerate(run_ranks("half", 3, tmp_path)):
        for dtype, e in errors.items():
            tol = REL_TOL[getattr(torch, dtype)]
            for name in ("out", "grad_input", "grad_weight", "running_var"):
                assert e[name] <= tol, (rank, dtype, name, e[name])
            assert e["layout_kept"] and e["dtype_kept"], (rank, dtype)


@pytest.mark.slow
def test_compiles_fullgraph_and_equals_eager(tmp_path):
    results = run_ranks("compile", 2, tmp_path)
    assert all(r == {"2d": worker.STEPS, "renorm_1d_schedule": worker.STEPS} for r in results)


@pytest.mark.slow
def test_ddp_training_matches_single_process_training(tmp_path):
    world = 2
    results = run_ranks("ddp", world, tmp_path)
    torch.manual_seed(5)
    single = tb.convert_model(worker.SmallNet().double())
    worker.train_small_net(single, worker.ddp_batches(world))
    want = single.state_dict()
    for rank, r in enumerate(results):
        assert r["state"].keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(
                r["state"][name], value, rtol=1e-9, atol=1e-11, msg=f"{name} on rank {rank}"
            )


def test_convert_sync_batchnorm_reuses_parameters_and_buffers():
    model = worker.SmallNet()
    model.block.append(nn.SyncBatchNorm(8))  # torch's SyncBatchNorm converts too
    model.block.append(tb.BatchNorm2d(8))
    model.eval()
    tensors = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model.stem(x)
    converted = tb.SyncBatchNorm.convert_sync_batchnorm(model)
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [tb.SyncBatchNorm] * 5
    assert {id(t) for t in list(converted.parameters()) + list(converted.buffers())} == tensors
    assert not converted.training
    with torch.no_grad():
        torch.testing.assert_close(converted.stem(x), want)
    renorm = tb.SyncBatchRenorm.convert_sync_batchrenorm(converted, r_max=2.0, d_max=1.0)
    assert [
        type(m) for m in renorm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ] == [tb.SyncBatchRenorm] * 5
    assert renorm.stem[1].r_max == 2.0


def test_without_a_process_group_it_is_the_local_layer():
    torch.manual_seed(3)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    ours, local = tb.SyncBatchNorm(4).double(), tb.BatchNorm1d(4).double()
    torch.testing.assert_close(ours(x), local(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, local.running_var, rtol=0, atol=0)
    renorm, local_renorm = tb.SyncBatchRenorm(4).double(), tb.BatchRenorm1d(4).double()
    torch.testing.assert_close(renorm(x), local_renorm(x), rtol=0, atol=0)


def test_world_size_one_is_the_local_layer(tmp_path):
    """An initialised group of one rank runs the local layer, in this process."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        case = "2d"
        got = worker.run_steps(case, worker.make_layer(case, sync=True), world=1, rank=0)
        want = reference(case, 1)
        for g, w in zip(got, want):
            for name in ("out", "grad_input", "running_var"):
                torch.testing.assert_close(g[name], w[name], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_distributed_steps_refuse_differentiation():
    means = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.bnext.batch_norm_gather_stats(
            means,
            torch.rand(2, 3, dtype=torch.float64),
            torch.tensor([2, 3]),
            torch.float64,
            None,
            None,
            1e-5,
            None,
            None,
            None,
            None,
        )


def test_gather_stats_merges_like_one_batch_and_survives_a_large_mean():
    """Chan's merge of per-rank statistics, float32, mean 1e4: the variance
    as accurate as float64's (E[x^2] - E[x]^2 would lose it)."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 5, generator=gen, dtype=torch.float64) + 1e4 for n in (7, 0, 130, 1)]
    whole = torch.cat(parts)
    means = torch.stack(
        [p.mean(0) if len(p) else torch.zeros(5, dtype=torch.float64) for p in parts]
    )
    vars_ = torch.stack(
        [p.var(0, unbiased=False) if len(p) else torch.zeros(5, dtype=torch.float64) for p in parts]
    )
    counts = torch.tensor([len(p) for p in parts])
    mean, var, count, scale, shift, r, d = torch.ops.bnext.batch_norm_gather_stats(
        means.float(),
        vars_.float(),
        counts,
        torch.float32,
        None,
        None,
        1e-5,
        None,
        None,
        None,
        None,
    )
    assert count.item() == len(whole) and count.dtype == torch.long
    # The exact merge (float64) of the float32 partials the op was given.
    m32, v32, n = means.float().double(), vars_.float().double(), counts.double()[:, None]
    exact_mean = (n * m32).sum(0) / n.sum()
    exact_var = (n * (v32 + (m32 - exact_mean) ** 2)).sum(0) / n.sum()
    torch.testing.assert_close(mean.double(), exact_mean, rtol=2.5e-7, atol=0)  # 2 ulps
    # float32 deltas between means of 1e4 carry ~1e-3 absolute error: ~1e-5 of a variance of 1
    torch.testing.assert_close(var.double(), exact_var, rtol=5e-5, atol=0)
    # and the whole batch's, up to the float32 rounding of the partial means (1e4: ~5e-4)
    torch.testing.assert_close(var.double(), whole.var(0, unbiased=False), rtol=1e-4, atol=0)
    assert torch.equal(r, torch.ones(5)) and torch.equal(d, torch.zeros(5))
    torch.library.opcheck(
        torch.ops.bnext.batch_norm_gather_stats.default,
        (
            means,
            vars_,
            counts,
            torch.float64,
            torch.rand(5, dtype=torch.float64),
            None,
            1e-5,
            torch.zeros(5, dtype=torch.float64),
            torch.ones(5, dtype=torch.float64),
            torch.tensor(2.0),
            torch.tensor(1.0),
        ),
    )
    torch.library.opcheck(
        torch.ops.bnext.batch_norm_backward_coeffs.default,
        (torch.randn(5), torch.randn(5), torch.rand(5), None, None, None, 1e-5, torch.tensor(9)),
    )
    rm, rv = torch.zeros(5), torch.ones(5)
    torch.library.opcheck(
        torch.ops.bnext.batch_norm_update_stats_global.default,
        (rm, rv, None, torch.randn(5), torch.rand(5), 0.1, torch.tensor(9)),
    )
