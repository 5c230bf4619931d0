"""CUDA paths beyond the kernels' own parity tests (test_batch_norm_cuda.py,
test_layer_norm.py): Batch Renorm on CUDA, a non-default stream, CUDA graph
capture, torch.compile(fullgraph=True) on CUDA and the edge shapes of the
row norms. They skip without a GPU; the CUDA kernels compile in CI anyway."""

import pytest
import torch
from torch import nn

import torch_bnext as tb

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and tb.HAS_CUDA_KERNELS),
    reason="needs a GPU and torch_bnext built with CUDA kernels",
)


def _layers(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        tb.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(2),
        tb.LayerNorm(36),
        tb.RMSNorm(36),
    )


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batch_renorm_on_cuda_matches_cpu_float64(fmt, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 7, 3, generator=gen, dtype=torch.float64) * 2 + 1
    limits = (torch.tensor(1.3), torch.tensor(0.4))
    layers = {}
    for device in ("cpu", "cuda"):
        layer = tb.BatchRenorm2d(5, momentum=0.3, r_max=1.3, d_max=0.4).double()
        with torch.no_grad():
            layer.running_mean.fill_(0.5)
            layer.running_var.fill_(3.0)
        layers[device] = layer.to(device)
    xc = x.to("cuda", dtype).contiguous(memory_format=fmt).requires_grad_()
    xr = x.clone().requires_grad_()
    layers["cuda"].to(dtype if dtype == torch.float64 else torch.float32)
    y, yr = layers["cuda"](xc), layers["cpu"](xr)
    g = torch.randn(yr.shape, generator=gen, dtype=torch.float64)
    y.backward(g.to("cuda", dtype))
    yr.backward(g)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    for got, want in (
        (y, yr),
        (xc.grad, xr.grad),
        (layers["cuda"].running_var, layers["cpu"].running_var),
        (layers["cuda"].weight.grad, layers["cpu"].weight.grad),
    ):
        err = (got.double().cpu() - want.detach()).norm() / want.detach().norm()
        assert err <= tol, err
    assert y.is_contiguous(memory_format=fmt)
    # The schedule path (limits as device tensors) gives the same bits.
    out_t = torch.ops.bnext.batch_renorm_train_scheduled(
        xc.detach(),
        layers["cuda"].running_mean,
        layers["cuda"].running_var,
        None,
        None,
        1e-5,
        *(t.cuda() for t in limits),
    )
    out_f = torch.ops.bnext.batch_renorm_train(
        xc.detach(),
        layers["cuda"].running_mean,
        layers["cuda"].running_var,
        None,
        None,
        1e-5,
        1.3,
        0.4,
    )
    assert all(torch.equal(a, b) for a, b in zip(out_t, out_f))


def test_non_default_stream_gives_the_same_bits():
    model = _layers().cuda()
    x = torch.randn(4, 3, 6, 6, device="cuda")
    want = model(x)
    want.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = model(x)
        got.sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_cuda_graph_capture_and_replay():
    model = _layers().cuda().eval()
    static_x = torch.randn(4, 3, 6, 6, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch requires
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
    for seed in range(3):
        torch.manual_seed(seed)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.testing.assert_close(static_y, model(static_x), rtol=0, atol=0)


def test_training_step_is_graph_capturable():
    """The training forward and the running-statistics update never read a
    value on the host, so a whole step captures."""
    layer = tb.BatchNorm2d(8).cuda()
    r_max, d_max = tb.renorm_schedule(warmup_steps=1, r_max_steps=3, d_max_steps=3)
    renorm = tb.BatchRenorm2d(8, r_max=r_max, d_max=d_max).cuda()
    x = torch.randn(4, 8, 5, 5, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(x), renorm(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(x)
        renorm(x)
    before = int(renorm.num_batches_tracked)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert int(renorm.num_batches_tracked) == before + 2
    assert int(layer.num_batches_tracked) == before + 2


def test_compile_fullgraph_on_cuda_matches_eager():
    eager = _layers().cuda()
    compiled_model = _layers().cuda()
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6, device="cuda").contiguous(memory_format=torch.channels_last)
        y_e, y_c = eager(x), compiled(x)
        y_e.sum().backward()
        y_c.sum().backward()
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        for p_e, p_c in zip(eager.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-5)
        for b_e, b_c in zip(eager.buffers(), compiled_model.buffers()):
            torch.testing.assert_close(b_c, b_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,normalized", [((0, 16), (16,)), ((4, 0), (0,)), ((2, 0, 8), (8,))])
def test_row_norms_with_empty_rows_or_columns(shape, normalized):
    x = torch.randn(shape, device="cuda", requires_grad=True)
    for ours, theirs in (
        (tb.LayerNorm(normalized), nn.LayerNorm(normalized)),
        (tb.RMSNorm(normalized), nn.RMSNorm(normalized)),
    ):
        ours, theirs = ours.cuda(), theirs.cuda()
        y = ours(x)
        assert y.shape == theirs(x).shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        x.grad = None
