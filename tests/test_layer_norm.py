"""LayerNorm / RMSNorm: kernels against float64 references and torch.nn,
autograd, fake kernels (opcheck, torch.compile), modules, convert_model, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_bnext
from torch_bnext.functional import layer_norm, rms_norm
from torch_bnext.testing import REL_TOL, rel_err

ops = torch.ops.bnext

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64, device=device).to(dtype)


def run(kind, x, shape, weight, bias, eps=1e-5):
    """Output and gradients (x, weight, bias) of our layer or torch's for a
    fixed random upstream gradient."""
    x = x.detach().clone().requires_grad_()
    params = [
        p.detach().clone().requires_grad_() if p is not None else None for p in (weight, bias)
    ]
    w, b = params
    if kind == "ours_ln":
        y = layer_norm(x, shape, w, b, eps)
    elif kind == "ref_ln":
        y = F.layer_norm(x, shape, w, b, eps)
    elif kind == "ours_rms":
        y = rms_norm(x, shape, w, eps)
    else:
        y = F.rms_norm(x, shape, w, eps)
    # Drawn on the CPU for every device: a CUDA generator with the same seed
    # draws other numbers, and results on two devices must be comparable.
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(x.device, y.dtype)
    y.backward(dy)
    return [y] + [t.grad for t in [x] + params if t is not None]


def reference(kind, x, shape, weight, bias, eps=1e-5):
    """torch's result computed in float64 on the very same values."""
    up = lambda t: t.double() if t is not None else None  # noqa: E731
    return run("ref_" + kind, up(x), shape, up(weight), up(bias), eps)


def check_against_reference(kind, x, shape, weight, bias, tol, eps=1e-5):
    """Our error against float64 within `tol`, or within a few times torch's own
    error in the same dtype (where torch itself is further off)."""
    ours = run("ours_" + kind, x, shape, weight, bias, eps)
    theirs = run("ref_" + kind, x, shape, weight, bias, eps)
    ref = reference(kind, x, shape, weight, bias, eps)
    assert len(ours) == len(ref) == len(theirs)
    assert ours[0].dtype == x.dtype and ours[1].dtype == x.dtype
    for name, a, t, r in zip(["out", "dx", "dweight", "dbias"], ours, theirs, ref):
        assert a.shape == r.shape, name
        assert a.dtype == t.dtype, name
        if name in ("dx", "dweight") and kind == "ln" and math.prod(shape) == 1:
            # A row of one value normalises to 0 whatever x is: both are exactly
            # 0, up to the rounding of dy * w, scaled by rstd = eps**-0.5.
            opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
            w_max = weight.abs().max().item() if weight is not None else 1.0
            bound = 8 * torch.finfo(opmath).eps * eps**-0.5 * (1 + w_max) * x.numel()
            assert a.double().abs().max().item() <= bound, name
            continue
        err = rel_err(a, r)
        assert err <= max(tol, 4 * rel_err(t, r)), (name, err, rel_err(t, r))
    return ours


# ------------------------------------------------------------- parity, dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("hidden", [1, 3, 127, 768, 4096])
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_parity_hidden_sizes(kind, hidden, dtype, device):
    rows = 64 if hidden <= 768 else 8
    x = randn(rows, hidden, dtype=dtype, device=device) * 2 + 0.5
    w = randn(hidden, dtype=dtype, device=device)
    b = randn(hidden, dtype=dtype, device=device) if kind == "ln" else None
    check_against_reference(kind, x, [hidden], w, b, REL_TOL[dtype])


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_matches_torch_modules_float64(kind, device):
    # float64 leaves no room for rounding differences: the formulas must agree.
    x = randn(5, 7, 33, dtype=torch.float64, device=device)
    w = randn(33, dtype=torch.float64, device=device)
    b = randn(33, dtype=torch.float64, device=device) if kind == "ln" else None
    ours = run("ours_" + kind, x, [33], w, b)
    theirs = run("ref_" + kind, x, [33], w, b)
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_multi_dim_normalized_shape(kind, device):
    shape = [3, 5, 6]
    x = randn(4, 2, *shape, device=device)
    w = randn(*shape, device=device)
    b = randn(*shape, device=device) if kind == "ln" else None
    ours = check_against_reference(kind, x, shape, w, b, REL_TOL[torch.float32])
    assert ours[2].shape == torch.Size(shape)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_whole_tensor_normalized(kind, device):
    # normalized_shape == input.shape: one row, 0-dimensional statistics.
    x = randn(6, 10, device=device)
    w = randn(6, 10, device=device)
    b = randn(6, 10, device=device) if kind == "ln" else None
    check_against_reference(kind, x, [6, 10], w, b, REL_TOL[torch.float32])


@pytest.mark.parametrize(
    "kind,affine",
    [("ln", a) for a in ["weight_bias", "weight", "bias", "none"]]
    + [("rms", "weight"), ("rms", "none")],
)
def test_optional_parameters(kind, affine, device):
    x = randn(16, 40, device=device)
    w = randn(40, device=device) if "weight" in affine else None
    b = randn(40, device=device) if "bias" in affine and kind == "ln" else None
    check_against_reference(kind, x, [40], w, b, REL_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_mixed_precision_float32_params(kind, dtype, device):
    # Half/bfloat16 activations with float32 parameters: output in the input
    # dtype, parameter gradients in float32, as torch gives them.
    x = randn(32, 96, dtype=dtype, device=device)
    w = randn(96, device=device)
    b = randn(96, device=device) if kind == "ln" else None
    ours = check_against_reference(kind, x, [96], w, b, REL_TOL[dtype])
    # torch's dtypes on the CPU: its CUDA layer_norm before 2.14 refuses
    # float32 parameters beside a bfloat16 input ("expected scalar type").
    cpu = lambda t: t.cpu() if t is not None else None  # noqa: E731
    theirs = run("ref_" + kind, cpu(x), [96], cpu(w), cpu(b))
    assert ours[0].dtype == theirs[0].dtype == dtype
    assert (
        [g.dtype for g in ours[2:]]
        == [g.dtype for g in theirs[2:]]
        == [torch.float32] * len(ours[2:])
    )


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_batch"])
def test_non_contiguous_input(kind, layout, device):
    if layout == "transposed":
        x = randn(64, 24, device=device).t()  # (24, 64), rows strided
    elif layout == "sliced":
        x = randn(24, 128, device=device)[:, ::2]
    else:
        x = randn(1, 64, device=device).expand(24, 64)
    assert not x.is_contiguous()
    w = randn(64, device=device)
    b = randn(64, device=device) if kind == "ln" else None
    check_against_reference(kind, x, [64], w, b, REL_TOL[torch.float32])


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_non_contiguous_grad_out(kind, device):
    x = randn(16, 48, device=device)
    w = randn(48, device=device)
    y, stat = (lambda r: (r[0], r[1:]))(
        ops.layer_norm_fwd(x, [48], w, None, 1e-5)
        if kind == "ln"
        else ops.rms_norm_fwd(x, [48], w, 1e-5)
    )
    dy = randn(48, 16, device=device).t()
    if kind == "ln":
        got = ops.layer_norm_bwd(dy, x, stat[0], stat[1], w, 1e-5, [True, True])
        want = ops.layer_norm_bwd(dy.contiguous(), x, stat[0], stat[1], w, 1e-5, [True, True])
    else:
        got = ops.rms_norm_bwd(dy, x, stat[0], w, 1e-5, True)
        want = ops.rms_norm_bwd(dy.contiguous(), x, stat[0], w, 1e-5, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_long_rows(kind, device):
    hidden = 65536 + 37  # past 2**16 and not a multiple of any vector width
    x = randn(3, hidden, device=device) + 3
    w = randn(hidden, device=device)
    b = randn(hidden, device=device) if kind == "ln" else None
    check_against_reference(kind, x, [hidden], w, b, REL_TOL[torch.float32])


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_many_rows(kind, device):
    x = randn(65536 + 123, 5, device=device)
    w = randn(5, device=device)
    b = randn(5, device=device) if kind == "ln" else None
    check_against_reference(kind, x, [5], w, b, REL_TOL[torch.float32])


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_results_do_not_depend_on_thread_count(kind):
    """Rows are split by shape, never by thread count: bitwise equal results for
    1, 2 and 4 threads. 101 rows of 1024: two threads split them at row 51, so
    rows that one thread reduces in groups of four are reduced alone."""
    torch.manual_seed(0)
    x, g = randn(101, 1024), randn(101, 1024)
    w, b = torch.rand(1024) + 0.5, randn(1024)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            if kind == "ln":
                out, mean, rstd = ops.layer_norm_fwd(x, [1024], w, b, 1e-5)
                grads = ops.layer_norm_bwd(g, x, mean, rstd, w, 1e-5, [True, True])
                results.append((out, mean, rstd) + tuple(grads))
            else:
                out, rstd = ops.rms_norm_fwd(x, [1024], w, 1e-6)
                results.append((out, rstd) + tuple(ops.rms_norm_bwd(g, x, rstd, w, 1e-5, True)))
    finally:
        torch.set_num_threads(old)
    for one, *others in zip(*results):
        assert all(torch.equal(one, other) for other in others)


def test_large_mean_small_std(device):
    # fp32 rows with mean 1e3 and std 0.1: E[x^2] - E[x]^2 would lose the variance.
    x = (1e3 + 0.1 * randn(32, 1024, dtype=torch.float64, device=device)).float()
    w = randn(1024, device=device)
    b = randn(1024, device=device)
    ours = run("ours_ln", x, [1024], w, b)
    ref = reference("ln", x, [1024], w, b)
    for name, a, r in zip(["out", "dx", "dweight", "dbias"], ours, ref):
        assert rel_err(a, r) <= 2e-3, (name, rel_err(a, r))
    _, mean, rstd = ops.layer_norm_fwd(x, [1024], None, None, 1e-5)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        rstd.double(), (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=2e-3, atol=0
    )


def test_constant_rows(device):
    x = torch.full((4, 100), 3.25, device=device)
    y, mean, rstd = ops.layer_norm_fwd(x, [100], None, None, 1e-5)
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.allclose(rstd, torch.full_like(rstd, 1e-5**-0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_statistics_dtype_and_shape(dtype, device):
    x = randn(2, 3, 8, dtype=dtype, device=device)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    _, mean, rstd = ops.layer_norm_fwd(x, [8], None, None, 1e-5)
    _, rms_rstd = ops.rms_norm_fwd(x, [3, 8], None, 1e-5)
    assert mean.shape == rstd.shape == (2, 3) and rms_rstd.shape == (2,)
    assert mean.dtype == rstd.dtype == rms_rstd.dtype == opmath


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rms_norm_default_eps(dtype, device):
    # Tiny values make the result depend on eps: eps=None must pick torch's.
    x = (1e-4 * randn(4, 16, dtype=torch.float64, device=device)).to(dtype)
    ours = rms_norm(x, [16])
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    theirs = F.rms_norm(x.double(), [16], eps=torch.finfo(opmath).eps)
    assert rel_err(ours, theirs) <= REL_TOL[dtype]
    assert rel_err(ours, F.rms_norm(x, [16])) <= max(REL_TOL[dtype], 1e-5)


# ---------------------------------------------------------------- autograd

GRADCHECK_CASES = [
    ("ln", True, True),
    ("ln", True, False),
    ("ln", False, True),
    ("ln", False, False),
    ("rms", True, False),
    ("rms", False, False),
]


@pytest.mark.parametrize("kind,with_weight,with_bias", GRADCHECK_CASES)
@pytest.mark.parametrize("shape", [[7], [3, 4]])
def test_gradcheck_float64(kind, with_weight, with_bias, shape):
    x_shape = (2, 3, 4) if shape == [3, 4] else (5, 7)
    x = torch.randn(x_shape, dtype=torch.float64)
    x.requires_grad_()
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True) if with_weight else None
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True) if with_bias else None
    if kind == "ln":
        fn = lambda x, w, b: layer_norm(x, shape, w, b, 1e-5)  # noqa: E731
        args = (x, w, b)
    else:
        fn = lambda x, w: rms_norm(x, shape, w, 1e-5)  # noqa: E731
        args = (x, w)
    assert torch.autograd.gradcheck(fn, args)


def test_statistics_are_not_differentiable():
    x = torch.randn(4, 8, requires_grad=True)
    _, mean, rstd = ops.layer_norm_fwd(x, [8], None, None, 1e-5)
    assert not mean.requires_grad and not rstd.requires_grad


def opcheck_samples():
    x = torch.randn(3, 4, 10)
    w = torch.randn(10)
    b = torch.randn(10)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    dy = torch.randn_like(x)
    _, mean, rstd = ops.layer_norm_fwd(x, [10], w, b, 1e-5)
    _, rms_rstd = ops.rms_norm_fwd(x, [10], w, 1e-5)
    # Dense but not contiguous (a channels-last map flattened, as timm's
    # LayerNorm2d after a permute gives): the fake kernels must say which
    # layout each output takes.
    xp = torch.randn(3, 10, 4).transpose(1, 2)
    dyp = torch.randn(3, 10, 4).transpose(1, 2)
    _, mean_p, rstd_p = ops.layer_norm_fwd(xp, [10], w, b, 1e-5)
    _, rms_rstd_p = ops.rms_norm_fwd(xp, [10], w, 1e-5)
    return [
        (ops.layer_norm_fwd.default, (xp, [10], w, b, 1e-5)),
        (ops.layer_norm_bwd.default, (dyp, xp, mean_p, rstd_p, w, 1e-5, [True, True])),
        (ops.rms_norm_fwd.default, (xp, [10], w, 1e-5)),
        (ops.rms_norm_bwd.default, (dyp, xp, rms_rstd_p, w, 1e-5, True)),
        (ops.layer_norm_fwd.default, (x, [10], w, b, 1e-5)),
        (ops.layer_norm_fwd.default, (xr, [4, 10], None, None, 1e-6)),
        (ops.layer_norm_fwd.default, (xr, [10], wr, None, 1e-5)),
        (ops.layer_norm_bwd.default, (dy, x, mean, rstd, w, 1e-5, [True, True])),
        (ops.layer_norm_bwd.default, (dy, x, mean, rstd, None, 1e-5, [False, True])),
        (ops.layer_norm_bwd.default, (dy, x, mean, rstd, w, 1e-5, [False, False])),
        (ops.rms_norm_fwd.default, (x, [10], w, 1e-5)),
        (ops.rms_norm_fwd.default, (xr, [10], wr, 1e-5)),
        (ops.rms_norm_fwd.default, (x.half(), [4, 10], None, 1e-5)),
        (ops.rms_norm_bwd.default, (dy, x, rms_rstd, w, 1e-5, True)),
        (ops.rms_norm_bwd.default, (dy, x, rms_rstd, None, 1e-5, False)),
    ]


@pytest.mark.parametrize("index", range(len(opcheck_samples())))
def test_opcheck(index):
    op, args = opcheck_samples()[index]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------- torch.compile


class Block(nn.Module):
    """Pre-norm transformer MLP block with a final RMSNorm."""

    def __init__(self, dim, ln_cls, rms_cls):
        super().__init__()
        self.norm1 = ln_cls(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.norm2 = rms_cls(dim)

    def forward(self, x):
        x = x + self.fc2(F.gelu(self.fc1(self.norm1(x))))
        return self.norm2(x)


def test_torch_compile_fullgraph_block():
    torch.manual_seed(0)
    block = Block(32, torch_bnext.LayerNorm, torch_bnext.RMSNorm)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compiled_block = Block(32, torch_bnext.LayerNorm, torch_bnext.RMSNorm)
    compiled_block.load_state_dict(block.state_dict())
    compiled = torch.compile(compiled_block, fullgraph=True)
    x = torch.randn(4, 6, 32)
    dy = torch.randn(4, 6, 32)
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    ye = block(xe)
    yc = compiled(xc)
    ye.backward(dy)
    yc.backward(dy)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    for (name, pe), pc in zip(block.named_parameters(), compiled_block.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------------- modules


def test_layer_norm_module_matches_torch():
    ours = torch_bnext.LayerNorm(12)
    theirs = nn.LayerNorm(12)
    assert isinstance(ours, nn.LayerNorm)
    assert ours.normalized_shape == theirs.normalized_shape == (12,)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours) == repr(theirs)
    no_bias = torch_bnext.LayerNorm([3, 4], bias=False, dtype=torch.float64)
    assert no_bias.bias is None and no_bias.weight.dtype == torch.float64
    assert no_bias.weight.shape == (3, 4)
    assert torch_bnext.LayerNorm(4, elementwise_affine=False).weight is None
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_rms_norm_module_matches_torch():
    ours = torch_bnext.RMSNorm([2, 6])
    theirs = nn.RMSNorm([2, 6])
    assert isinstance(ours, nn.RMSNorm)
    assert ours.eps is None and ours.state_dict().keys() == theirs.state_dict().keys()
    assert torch_bnext.RMSNorm(4, elementwise_affine=False).weight is None
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 2, 6)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_convert_model_layernorm():
    model = (
        nn.Sequential(
            nn.Linear(8, 8),
            nn.LayerNorm(8),
            nn.RMSNorm(8, eps=1e-6),
            nn.BatchNorm1d(8),
            nn.LayerNorm(8, bias=False),
            nn.LayerNorm(8, elementwise_affine=False),
        )
        .double()
        .eval()
    )
    params = {name: p for name, p in model.named_parameters()}
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = model(x)
    converted = torch_bnext.convert_model(model, layernorm=True)
    assert type(converted[1]) is torch_bnext.LayerNorm
    assert type(converted[2]) is torch_bnext.RMSNorm and converted[2].eps == 1e-6
    assert type(converted[3]) is torch_bnext.BatchNorm1d
    assert type(converted[4]) is torch_bnext.LayerNorm and converted[4].bias is None
    assert converted[5].weight is None and converted[5].bias is None
    for name, p in converted.named_parameters():
        assert p is params[name]
    assert not any(m.training for m in converted.modules())
    torch.testing.assert_close(converted(x), expected)


def test_convert_model_default_leaves_layernorm():
    model = nn.Sequential(nn.LayerNorm(8), nn.RMSNorm(8), nn.BatchNorm1d(8))
    converted = torch_bnext.convert_model(model)
    assert type(converted[0]) is nn.LayerNorm and type(converted[1]) is nn.RMSNorm
    assert type(converted[2]) is torch_bnext.BatchNorm1d


# ------------------------------------------------------------------ errors


def same_error(ours, theirs, match):
    """Both calls fail with the same exception type; ours with `match` in its message."""
    with pytest.raises(Exception) as expected:
        theirs()
    with pytest.raises(type(expected.value), match=match):
        ours()


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_errors_match_torch(kind):
    ours_fn, torch_fn = (layer_norm, F.layer_norm) if kind == "ln" else (rms_norm, F.rms_norm)
    x = torch.randn(4, 8)
    same_error(lambda: ours_fn(x, [7]), lambda: torch_fn(x, [7]), "expected input with shape")
    if kind == "rms" and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11):
        # torch < 2.11 raised RuntimeError here; newer ones (and ours) ValueError.
        with pytest.raises(ValueError, match="at least 3 dimensions"):
            ours_fn(x, [4, 8, 2])
    else:
        same_error(
            lambda: ours_fn(x, [4, 8, 2]),
            lambda: torch_fn(x, [4, 8, 2]),
            "expected input with shape|at least 3 dimensions",
        )
    same_error(lambda: ours_fn(x, []), lambda: torch_fn(x, []), "at least 1-dimensional")
    same_error(
        lambda: ours_fn(x, [8], torch.randn(7)),
        lambda: torch_fn(x, [8], torch.randn(7)),
        "Expected weight to be of same shape",
    )
    same_error(lambda: ours_fn(x.int(), [8]), lambda: torch_fn(x.int(), [8]), "not implemented")
    same_error(
        lambda: torch_bnext.LayerNorm(8)(torch.randn(3, 7)),
        lambda: nn.LayerNorm(8)(torch.randn(3, 7)),
        "expected input with shape",
    )


def test_layer_norm_param_errors_match_torch():
    x = torch.randn(4, 8)
    same_error(
        lambda: layer_norm(x, [8], None, torch.randn(9)),
        lambda: F.layer_norm(x, [8], None, torch.randn(9)),
        "Expected bias to be of same shape",
    )
    w64 = torch.randn(8, dtype=torch.float64)
    same_error(lambda: layer_norm(x, [8], w64), lambda: F.layer_norm(x, [8], w64), "dtype")


# -------------------------------------------------------------------- CUDA


@cuda_only
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_cuda_matches_cpu(kind):
    x = randn(33, 515)
    w = randn(515)
    b = randn(515) if kind == "ln" else None
    cpu = run("ours_" + kind, x, [515], w, b)
    gpu = run("ours_" + kind, x.cuda(), [515], w.cuda(), b.cuda() if b is not None else None)
    for a, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), a, rtol=1e-5, atol=1e-5)


@cuda_only
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_cuda_deterministic_param_grads(kind):
    x = randn(4096, 256, device="cuda")
    w = randn(256, device="cuda")
    first = run("ours_" + kind, x, [256], w, None)
    second = run("ours_" + kind, x, [256], w, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@cuda_only
def test_cuda_device_mismatch_errors():
    x = torch.randn(4, 8, device="cuda")
    w = torch.randn(8)
    same_error(lambda: layer_norm(x, [8], w), lambda: F.layer_norm(x, [8], w), "device")
    same_error(lambda: rms_norm(x, [8], w), lambda: F.rms_norm(x, [8], w), "device")


@cuda_only
def test_cuda_gradcheck_float64():
    x = torch.randn(3, 20, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(20, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, [20], w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, [20], w, 1e-5), (x, w))


@cuda_only
def test_cuda_opcheck():
    for op, args in opcheck_samples():
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)
