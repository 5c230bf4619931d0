"""Batch Renorm schedules (issue 13): evaluated from num_batches_tracked on the
device, inside the graph; equal to their host values; picklable; and the
README's recipe under torch.compile(fullgraph=True) before, during and after
the ramp, equal to eager."""

import contextlib
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import torch_bnext as tb
from torch_bnext.testing import to_format

_ops = torch.ops.bnext


def test_device_evaluation_equals_host_values():
    ramps = [
        *tb.renorm_schedule(),
        *tb.renorm_schedule(warmup_steps=3, r_max=2.5, r_max_steps=10, d_max=0.7, d_max_steps=7),
        tb.LinearRamp(1.0, 3.0, 4, 4),
        tb.LinearRamp(0.1, 0.3, 0, 3),
    ]
    steps = list(range(0, 60)) + [4999, 5000, 5001, 12345, 24999, 25000, 39999, 40000, 10**9]
    for ramp in ramps:
        device_values = ramp(torch.tensor(steps, dtype=torch.long))
        assert device_values.dtype == torch.float64
        assert device_values.tolist() == [ramp(s) for s in steps], ramp  # exactly
    r, d = tb.renorm_schedule()
    assert [r(s) for s in (0, 5000, 22500, 40000, 10**6)] == [1, 1, 2, 3, 3]
    assert isinstance(r(torch.tensor(7)), torch.Tensor) and isinstance(r(7), float)


def test_schedules_and_models_pickle():
    r, d = tb.renorm_schedule(warmup_steps=1, r_max_steps=4, d_max_steps=3)
    assert pickle.loads(pickle.dumps(r)) == r and copy.deepcopy(d) == d
    model = nn.Sequential(nn.Conv2d(3, 4, 1), tb.BatchRenorm2d(4, r_max=r, d_max=d))
    for _ in range(3):
        model(torch.randn(2, 3, 4, 4))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    clone = pickle.loads(pickle.dumps(model))
    deep = copy.deepcopy(model)
    x = torch.randn(2, 3, 4, 4)
    want = model(x)
    for other in (restored, clone, deep):
        assert other[1].r_max == r and other[1].num_batches_tracked.item() == 3
        assert torch.equal(other(x), want)


def test_tensor_limits_equal_float_limits(device):
    torch.manual_seed(0)
    for dtype, fmt in (
        (torch.float32, "contiguous"),
        (torch.bfloat16, "channels_last"),
        (torch.float64, "strided"),
    ):
        x = to_format(torch.randn(5, 3, 4, 6, dtype=dtype, device=device) * 2 + 1, fmt)
        rm = torch.randn(3, device=device) * 0.3
        rv = torch.rand(3, device=device) + 0.2
        w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
        if dtype == torch.float64:
            rm, rv, w, b = rm.double(), rv.double(), w.double(), b.double()
        for r_max, d_max in ((1.0, 0.0), (1.3, 0.2), (3.0, 5.0)):
            want = _ops.batch_renorm_train.default(x, rm, rv, w, b, 1e-5, r_max, d_max)
            for limit_device in (device, "cpu"):
                limits = (
                    torch.tensor(r_max, dtype=torch.float64, device=limit_device),
                    torch.tensor(d_max, dtype=torch.float64, device=limit_device),
                )
                got = _ops.batch_renorm_train_scheduled(x, rm, rv, w, b, 1e-5, *limits)
                for name, g, e in zip(("out", "mean", "var", "r", "d"), got, want):
                    assert torch.equal(g, e), (dtype, fmt, r_max, name)


def test_invalid_tensor_limits():
    x = torch.randn(4, 3) + 1
    rm, rv = torch.zeros(3), torch.ones(3)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # On the CPU the value is checked as a float limit is (no synchronisation to avoid).
    for r_max, d_max, match in (
        (0.5, 1.0, "r_max"),
        (2.0, -1.0, "d_max"),
        (float("nan"), 1.0, "r_max"),
    ):
        with pytest.raises(ValueError, match=match):
            _ops.batch_renorm_train_scheduled(x, rm, rv, None, None, 1e-5, t(r_max), t(d_max))
    with pytest.raises(RuntimeError, match="0-dim"):
        _ops.batch_renorm_train_scheduled(x, rm, rv, None, None, 1e-5, torch.ones(1), t(1.0))
    with pytest.raises(RuntimeError, match="floating-point"):
        _ops.batch_renorm_train_scheduled(x, rm, rv, None, None, 1e-5, torch.tensor(2), t(1.0))
    with pytest.raises(ValueError, match="r_max"):
        tb.BatchRenorm1d(3, r_max=tb.LinearRamp(0.5, 2.0, 0, 10))
    with pytest.raises(ValueError, match="d_max"):
        tb.BatchRenorm1d(3, d_max=tb.LinearRamp(0.0, -1.0, 0, 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_invalid_tensor_limit_on_gpu_gives_nan_not_a_clipped_value():
    x = torch.randn(4, 3, device="cuda") + 1
    rm, rv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    bad = torch.tensor(0.5, device="cuda")
    out, _, _, r, d = _ops.batch_renorm_train_scheduled(
        x, rm, rv, None, None, 1e-5, bad, torch.tensor(1.0, device="cuda")
    )
    assert out.isnan().all() and r.isnan().all() and d.isnan().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_cpu_limits_beside_a_gpu_input_are_read_on_the_host_and_capture_in_a_cuda_graph():
    """A CPU limit is read as a float limit is (checked, and no pageable copy
    to the GPU, which would synchronise and fail CUDA graph capture)."""
    x = torch.randn(8, 3, 5, device="cuda") + 1
    rm, rv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    with pytest.raises(ValueError, match="r_max"):
        _ops.batch_renorm_train_scheduled(x, rm, rv, None, None, 1e-5, t(0.5), t(1.0))
    limits = (t(1.5), t(0.5))
    want = _ops.batch_renorm_train.default(x, rm, rv, None, None, 1e-5, 1.5, 0.5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture needs
        _ops.batch_renorm_train_scheduled(x, rm, rv, None, None, 1e-5, *limits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = _ops.batch_renorm_train_scheduled(x, rm, rv, None, None, 1e-5, *limits)
    graph.replay()
    torch.cuda.synchronize()
    for g, e in zip(got, want):
        assert torch.equal(g, e)


def test_opcheck_tensor_overload():
    torch.manual_seed(1)
    for fmt in ("contiguous", "channels_last"):
        x = to_format(torch.randn(3, 4, 5, 2) + 0.5, fmt).requires_grad_()
        w = (torch.rand(4) + 0.5).requires_grad_()
        b = torch.randn(4).requires_grad_()
        rm, rv = torch.randn(4) * 0.2, torch.rand(4) + 0.5
        limits = (torch.tensor(1.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
        torch.library.opcheck(
            _ops.batch_renorm_train_scheduled.default, (x, rm, rv, w, b, 1e-5, *limits)
        )
        torch.library.opcheck(
            _ops.batch_renorm_train_scheduled.default,
            (x.detach(), rm, rv, None, None, 1e-5, *limits),
        )


def test_forward_mode_with_tensor_limits_matches_float_limits():
    import torch.func as func

    torch.manual_seed(2)
    x = torch.randn(6, 3, 4, dtype=torch.float64) * 2
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    tangent = torch.randn_like(x)
    limits = (torch.tensor(1.2, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))
    _, want = func.jvp(
        lambda t: _ops.batch_renorm_train(t, rm, rv, None, None, 1e-5, 1.2, 0.3)[0],
        (x,),
        (tangent,),
    )
    _, got = func.jvp(
        lambda t: _ops.batch_renorm_train_scheduled(t, rm, rv, None, None, 1e-5, *limits)[0],
        (x,),
        (tangent,),
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _recipe_model(r_max, d_max, device):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.BatchNorm2d(4),
    )
    return tb.convert_model(model, norm="batchrenorm", r_max=r_max, d_max=d_max).to(device)


def test_readme_recipe_compiles_fullgraph_through_the_ramp(device):
    """The README's recipe with a short warm-up: compiled once, no recompilation
    and no graph break before, during and after the ramp, and equal to eager
    at every step (outputs, gradients, running statistics). Before this release
    the ramp's first step failed to compile (SymFloat r_max)."""
    warmup, r_steps, d_steps, steps = 2, 6, 4, 9
    r_max, d_max = tb.renorm_schedule(warmup_steps=warmup, r_max_steps=r_steps, d_max_steps=d_steps)
    eager = _recipe_model(r_max, d_max, device)
    compiled_model = _recipe_model(r_max, d_max, device)
    fixed = _recipe_model(1.0, 0.0, device)  # Batch Norm: what the warm-up equals
    compiled = torch.compile(compiled_model, fullgraph=True)
    gen = torch.Generator().manual_seed(4)
    torch._dynamo.reset()
    stack = contextlib.ExitStack()
    for step in range(steps):
        x = (torch.randn(4, 3, 6, 6, generator=gen) * 3 + step).to(device)
        if device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for model in (eager, compiled, fixed):
            for p in model.parameters():
                p.grad = None
            y = model(x)
            y.square().mean().backward()
            outs.append(y)
        if step == 0:
            # From here on a recompilation would fail the test.
            stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
        # Inductor may reorder the convolutions' arithmetic: close, not bitwise.
        close = dict(rtol=1e-5, atol=1e-5, msg=lambda m, step=step: f"step {step}: {m}")
        torch.testing.assert_close(outs[1], outs[0], **close)
        for p_e, p_c in zip(eager.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, **close)
        for b_e, b_c in zip(eager.buffers(), compiled_model.buffers()):
            torch.testing.assert_close(b_c, b_e, **close)
        # The schedule is in force: Batch Norm until the warm-up ends, then not.
        same_as_bn = torch.equal(outs[0], outs[2])
        assert same_as_bn == (step <= warmup), f"step {step}"
    stack.close()
    assert compiled_model[1].num_batches_tracked.item() == steps


def test_python_callables_still_work_with_a_host_read():
    layer = tb.BatchRenorm1d(3, r_max=lambda step: 1.0 + step, d_max=tb.LinearRamp(0.0, 1.0, 0, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            layer(torch.randn(8, 3))
    assert layer.num_batches_tracked.item() == 3
