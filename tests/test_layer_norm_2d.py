"""LayerNorm / RMSNorm over dim 1 (the _2d ops, LayerNorm2d / RMSNorm2d):
kernels against float64 references in every layout, autograd (gradcheck,
double backward, forward mode, vmap), fake kernels (opcheck, torch.compile),
errors, and reproducibility of the parameter gradients."""

import pytest
import torch
import torch.nn.functional as F

import torch_bnext
from torch_bnext.functional import layer_norm_2d, rms_norm_2d
from torch_bnext.testing import REL_TOL, param_dtype_for, random_input, rel_err, to_format

ops = torch.ops.bnext

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Odd channel counts, planes that are not a multiple of the vector width
# (7x7, 5x3, 1x1) or span several tiles (56x56), 3D and 5D inputs, one sample.
SHAPES = [
    (2, 3, 5, 3),
    (2, 65, 7, 7),
    (1, 127, 1, 1),
    (3, 1, 9, 9),
    (2, 96, 56, 56),
    (2, 5, 33),
    (2, 3, 4, 5, 6),
    (1, 1000, 3, 3),
]


def layout(x, fmt):
    # "strided" slices the last dim; channels_last needs 4D / 5D.
    if fmt == "channels_last" and x.dim() not in (4, 5):
        pytest.skip("channels_last needs a 4D or 5D input")
    return to_format(x, fmt)


def reference(kind, x, weight, bias, eps):
    """The zoos' formula (permute -> torch's norm -> permute), in float64."""
    rows = x.double().movedim(1, -1)
    w = weight.double() if weight is not None else None
    if kind == "ln":
        b = bias.double() if bias is not None else None
        y = F.layer_norm(rows, (x.shape[1],), w, b, eps)
    else:
        y = F.rms_norm(rows, (x.shape[1],), w, eps)
    return y.movedim(-1, 1)


def run(kind, x, weight, bias, eps, dy, ours):
    x = x.detach().clone().requires_grad_()
    params = [
        p.detach().clone().requires_grad_() if p is not None else None for p in (weight, bias)
    ]
    w, b = params
    if ours:
        y = layer_norm_2d(x, w, b, eps) if kind == "ln" else rms_norm_2d(x, w, eps)
    else:
        y = reference(kind, x, w, b, eps)
    y.backward(dy.to(y.dtype))
    return [y] + [t.grad for t in [x] + params if t is not None]


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(kind, fmt, shape, dtype):
    x = layout(random_input(shape, dtype, seed=1), fmt)
    pdt = param_dtype_for(dtype)
    weight = random_input((shape[1],), pdt, seed=2)
    bias = random_input((shape[1],), pdt, seed=3) if kind == "ln" else None
    dy = random_input(shape, torch.float64, seed=4)
    ours = run(kind, x, weight, bias, 1e-6, dy, ours=True)
    ref = run(kind, x, weight, bias, 1e-6, dy, ours=False)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for name, a, r in zip(["out", "dx", "dweight", "dbias"], ours, ref):
        # A channel of one value normalises to exactly 0: dx and dweight are
        # rounding noise around 0 in both, not comparable by relative error.
        if shape[1] == 1 and kind == "ln" and name in ("dx", "dweight"):
            assert a.double().abs().max() <= 1e-3 * r.double().abs().max() + 1e-2
            continue
        err = rel_err(a, r)
        # float16/bfloat16 outputs round to their dtype; parameter gradients
        # are sums over every position, in float32.
        assert err <= REL_TOL[dtype] * (2 if name == "dweight" else 1), (name, err)


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_statistics_and_layout(kind, fmt):
    x = layout(random_input((2, 6, 4, 5), torch.float32, seed=5), fmt)
    out = (
        ops.layer_norm_2d_fwd(x, None, None, 1e-5)
        if kind == "ln"
        else ops.rms_norm_2d_fwd(x, None, 1e-5)
    )
    rows = x.double().movedim(1, -1)
    rstd = ((rows - rows.mean(-1, keepdim=True)) if kind == "ln" else rows).square()
    rstd = (rstd.mean(-1) + 1e-5).rsqrt()
    assert rel_err(out[-1], rstd) <= REL_TOL[torch.float32]
    if kind == "ln":
        assert rel_err(out[1], rows.mean(-1)) <= REL_TOL[torch.float32]
    # The output keeps a channels_last input's layout (no copy back to NCHW).
    assert out[0].stride() == x.stride()
    assert out[-1].shape == (2, 4, 5) and out[-1].dtype == torch.float32


def test_many_positions():
    """65536+ positions per channel: tiles across planes, chunked parameter
    gradients."""
    shape = (1, 8, 256, 257)
    x = random_input(shape, torch.float32, seed=6)
    weight, bias = (
        random_input((8,), torch.float32, seed=7),
        random_input((8,), torch.float32, seed=8),
    )
    dy = random_input(shape, torch.float64, seed=9)
    ours = run("ln", x, weight, bias, 1e-6, dy, ours=True)
    ref = run("ln", x, weight, bias, 1e-6, dy, ours=False)
    for a, r in zip(ours, ref):
        assert rel_err(a, r) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_parameter_gradients_do_not_depend_on_threads(kind):
    x = random_input((4, 24, 30, 30), torch.float32, seed=10)
    w = random_input((24,), torch.float32, seed=11).requires_grad_()
    dy = random_input(x.shape, torch.float32, seed=12)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            w.grad = None
            y = layer_norm_2d(x, w, None) if kind == "ln" else rms_norm_2d(x, w)
            y.backward(dy)
            grads.append(w.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


# ------------------------------------------------------------------ autograd


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_layer_norm_2d(fmt, affine):
    x = layout(random_input((2, 3, 2, 3), torch.float64, seed=13), fmt).requires_grad_()
    w = random_input((3,), torch.float64, seed=14).requires_grad_() if affine else None
    b = random_input((3,), torch.float64, seed=15).requires_grad_() if affine else None
    args = (x, w, b) if affine else (x,)

    def f(*a):
        return layer_norm_2d(a[0], *(a[1:] if affine else (None, None)), 1e-5)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_rms_norm_2d(fmt, affine):
    x = layout(random_input((2, 3, 2, 3), torch.float64, seed=16), fmt).requires_grad_()
    w = random_input((3,), torch.float64, seed=17).requires_grad_() if affine else None
    args = (x, w) if affine else (x,)

    def f(*a):
        return rms_norm_2d(a[0], a[1] if affine else None, 1e-5)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_forward_mode_matches_reference(kind):
    x = random_input((2, 5, 3, 4), torch.float64, seed=18)
    w = random_input((5,), torch.float64, seed=19)
    b = random_input((5,), torch.float64, seed=20) if kind == "ln" else None
    tangents = [random_input(t.shape, torch.float64, seed=21 + i) for i, t in enumerate((x, w))]

    def ours(x, w):
        return layer_norm_2d(x, w, b) if kind == "ln" else rms_norm_2d(x, w, 1e-6)

    def ref(x, w):
        return reference(kind, x, w, b, 1e-6 if kind == "ln" else 1e-6)

    _, t_ours = torch.func.jvp(ours, (x, w), tuple(tangents))
    _, t_ref = torch.func.jvp(ref, (x, w), tuple(tangents))
    assert rel_err(t_ours, t_ref) <= REL_TOL[torch.float64]


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_vmap_matches_a_loop(kind):
    x = random_input((3, 2, 4, 5, 5), torch.float32, seed=23)
    w = random_input((3, 4), torch.float32, seed=24)

    def f(x, w):
        return layer_norm_2d(x, w, None) if kind == "ln" else rms_norm_2d(x, w, 1e-6)

    batched = torch.vmap(f)(x, w)
    looped = torch.stack([f(x[i], w[i]) for i in range(3)])
    assert rel_err(batched, looped) <= REL_TOL[torch.float32]


def test_statistics_have_no_gradient():
    x = random_input((2, 3, 4, 4), torch.float64, seed=25).requires_grad_()
    _, mean, rstd = ops.layer_norm_2d_fwd(x, None, None, 1e-5)
    assert not mean.requires_grad and not rstd.requires_grad


@pytest.mark.parametrize("op", ["layer_norm_2d_bwd", "rms_norm_2d_bwd"])
def test_backward_op_refuses_grad_of_its_statistics(op):
    x = random_input((2, 3, 4, 4), torch.float64, seed=26)
    dy = random_input(x.shape, torch.float64, seed=27)
    if op == "layer_norm_2d_bwd":
        _, mean, rstd = ops.layer_norm_2d_fwd(x, None, None, 1e-5)
        rstd.requires_grad_()
        dx = ops.layer_norm_2d_bwd(dy, x, mean, rstd, None, 1e-5, [False, False])[0]
    else:
        _, rstd = ops.rms_norm_2d_fwd(x, None, 1e-5)
        rstd.requires_grad_()
        dx = ops.rms_norm_2d_bwd(dy, x, rstd, None, 1e-5, False)[0]
    with pytest.raises(RuntimeError, match="not implemented"):
        dx.sum().backward()


# ---------------------------------------------------- fake kernels, compile


def _opcheck_samples():
    for fmt in ("contiguous", "channels_last", "strided"):
        for dtype in (torch.float32, torch.bfloat16):
            x = to_format(random_input((2, 5, 3, 4), dtype, seed=28), fmt)
            w = random_input((5,), param_dtype_for(dtype), seed=29)
            b = random_input((5,), param_dtype_for(dtype), seed=30)
            yield fmt, dtype, x, w, b


@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(affine):
    for _, _, x, w, b in _opcheck_samples():
        w_, b_ = (w, b) if affine else (None, None)
        out, mean, rstd = ops.layer_norm_2d_fwd(x, w_, b_, 1e-5)
        dy = torch.randn_like(out)
        torch.library.opcheck(ops.layer_norm_2d_fwd, (x, w_, b_, 1e-5))
        torch.library.opcheck(
            ops.layer_norm_2d_bwd, (dy, x, mean, rstd, w_, 1e-5, [affine, affine])
        )
        _, rstd = ops.rms_norm_2d_fwd(x, w_, 1e-5)
        torch.library.opcheck(ops.rms_norm_2d_fwd, (x, w_, 1e-5))
        torch.library.opcheck(ops.rms_norm_2d_bwd, (dy, x, rstd, w_, 1e-5, affine))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_compiled_module_fullgraph(fmt):
    torch._dynamo.reset()
    m = torch_bnext.LayerNorm2d(6, eps=1e-6)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = to_format(random_input((2, 6, 5, 5), torch.float32, seed=31), fmt).requires_grad_()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    ref = run("ln", x, m.weight, m.bias, 1e-6, torch.ones(x.shape, dtype=torch.float64), False)
    assert rel_err(y, ref[0]) <= REL_TOL[torch.float32]
    assert rel_err(x.grad, ref[1]) <= REL_TOL[torch.float32]


# -------------------------------------------------------------------- errors


def test_weight_of_the_wrong_shape_is_torchs_error():
    x = random_input((2, 4, 3, 3), torch.float32, seed=32)
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape"):
        F.layer_norm(x.movedim(1, -1), (4,), torch.ones(5))
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape"):
        layer_norm_2d(x, torch.ones(5))
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape"):
        rms_norm_2d(x, torch.ones(3))


def test_bad_inputs():
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        layer_norm_2d(torch.randn(5))
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        layer_norm_2d(torch.ones(2, 3, 4, dtype=torch.long))
    x = random_input((2, 4, 3, 3), torch.float32, seed=33)
    _, mean, rstd = ops.layer_norm_2d_fwd(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"expected statistics of shape \[2, 3, 3\]"):
        ops.layer_norm_2d_bwd(x, x, mean[:1], rstd, None, 1e-5, [False, False])


# ------------------------------------------------------------------- modules


def test_modules_keep_nn_parameters_and_keys():
    m = torch_bnext.LayerNorm2d(8)
    assert set(m.state_dict()) == {"weight", "bias"}
    r = torch_bnext.RMSNorm2d(8)
    assert set(r.state_dict()) == {"weight"}
    x = random_input((2, 8, 3, 3), torch.float32, seed=34)
    assert rel_err(m(x), reference("ln", x, m.weight, m.bias, m.eps)) <= REL_TOL[torch.float32]
    # torch's RMSNorm default eps (None): float32's epsilon.
    ref = reference("rms", x, r.weight, None, torch.finfo(torch.float32).eps)
    assert rel_err(r(x), ref) <= REL_TOL[torch.float32]
