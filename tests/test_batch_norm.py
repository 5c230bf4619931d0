import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_bnext
from torch_bnext import functional as BF
from torch_bnext.testing import (
    assert_close_rel,
    formats_for,
    param_dtype_for,
    random_input,
    rel_err,
    to_format,
)

# torch < 2.8 raised RuntimeError for some mistakes it now (and torch_bnext) calls
# NotImplementedError.
OLDER_TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8)

ops = torch.ops.bnext

SHAPES = {  # (N, C, *spatial) per module dimensionality
    1: [(16, 1), (7, 65), (5, 3, 9), (4, 127, 6)],
    2: [(4, 3, 5, 7), (2, 65, 3, 3), (3, 127, 4, 1), (2, 1, 6, 5)],
    3: [(2, 3, 3, 4, 5), (2, 65, 2, 2, 3)],
}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OUR_BN = {1: torch_bnext.BatchNorm1d, 2: torch_bnext.BatchNorm2d, 3: torch_bnext.BatchNorm3d}


# ------------------------------------------------------------------ parity


PARITY_CASES = [
    (dim, shape, fmt, dtype)
    for dim, shapes in SHAPES.items()
    for shape in shapes
    for fmt in formats_for(shape)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
]


@pytest.mark.parametrize("dim,shape,fmt,dtype", PARITY_CASES)
@pytest.mark.parametrize(
    "momentum,affine,track",
    [(0.1, True, True), (0.3, False, True), (None, True, True), (0.1, True, False)],
)
def test_module_parity_with_torch(dim, shape, fmt, dtype, momentum, affine, track, device):
    """Several training steps then eval, against torch.nn.BatchNorm*d run in
    float64 on the same values: outputs, all gradients, running statistics and
    num_batches_tracked."""
    torch.manual_seed(zlib.crc32(repr((shape, fmt, dtype, momentum, affine, track)).encode()))
    C = shape[1]
    pdt = param_dtype_for(dtype)
    ref = TORCH_BN[dim](C, momentum=momentum, affine=affine, track_running_stats=track)
    ref = ref.to(device=device, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = OUR_BN[dim](C, momentum=momentum, affine=affine, track_running_stats=track)
    ours = ours.to(device=device, dtype=pdt)
    ours.load_state_dict(ref.state_dict())

    for step, training in enumerate([True, True, True, False]):
        ref.train(training)
        ours.train(training)
        # Batch means away from 0, where a relative error of the running mean means little.
        x = random_input(shape, dtype, fmt, device, mean=step + 0.5).requires_grad_()
        x_ref = x.detach().double().requires_grad_()
        y = ours(x)
        y_ref = ref(x_ref)
        assert y.dtype == dtype and y.shape == x.shape
        if fmt == "channels_last":
            assert y.stride() == x.stride()
        g = torch.randn_like(y_ref).to(dtype)  # the reference sees the same rounded values
        y.backward(g)
        y_ref.backward(g.double())
        tol = 8.0 if dtype in (torch.float32,) else 1.0
        assert_close_rel(y, y_ref, dtype, "output", tol)
        assert_close_rel(x.grad, x_ref.grad, dtype, "grad_input", 4 * tol)
        if affine:
            assert_close_rel(ours.weight.grad, ref.weight.grad, dtype, "grad_weight", 4 * tol)
            assert_close_rel(ours.bias.grad, ref.bias.grad, dtype, "grad_bias", 4 * tol)
            ours.weight.grad = ours.bias.grad = ref.weight.grad = ref.bias.grad = None
        if track:
            assert_close_rel(ours.running_mean, ref.running_mean, pdt, "running_mean", 4)
            assert_close_rel(ours.running_var, ref.running_var, pdt, "running_var", 4)
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
        else:
            assert ours.running_mean is None and ours.num_batches_tracked is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_matches_torch_functional(dtype, device):
    torch.manual_seed(0)
    x = random_input((6, 5, 4, 3), dtype, "contiguous", device)
    opts = dict(dtype=dtype, device=device)
    w, b = torch.rand(5, **opts) + 0.5, torch.randn(5, **opts)
    rm, rv = torch.randn(5, **opts), torch.rand(5, **opts) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    for training in (True, False):
        y = BF.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-3)
        y_ref = F.batch_norm(x, rm_ref, rv_ref, w, b, training, 0.2, 1e-3)
        assert_close_rel(y, y_ref, dtype, f"training={training}", 4)
        assert_close_rel(rm, rm_ref, dtype, "running_mean", 4)
        assert_close_rel(rv, rv_ref, dtype, "running_var", 4)
    # No running statistics at all: batch statistics, nothing updated.
    y = BF.batch_norm(x, None, None, w, b, True)
    assert_close_rel(y, F.batch_norm(x, None, None, w, b, True), dtype, "no running stats", 4)


def test_large_row_count_channels_last_and_2d():
    torch.manual_seed(0)
    for x in (
        random_input((70000, 3), torch.float32, "contiguous"),
        random_input((1100, 5, 8, 8), torch.float32, "channels_last"),
    ):
        rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        y = BF.batch_norm(x, rm, rv, training=True)
        rm_ref = torch.zeros(x.shape[1], dtype=torch.float64)
        rv_ref = torch.ones(x.shape[1], dtype=torch.float64)
        y_ref = F.batch_norm(x.double(), rm_ref, rv_ref, training=True)
        assert_close_rel(y, y_ref, torch.float32, "output")
        assert_close_rel(rv, rv_ref, torch.float32, "running_var")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_statistics_are_accurate_for_large_mean(fmt):
    """mean 1e4, std 1 in float32: E[x^2]-E[x]^2 would be off by > 100 here."""
    torch.manual_seed(0)
    x = random_input((16, 8, 24, 24), torch.float32, fmt, mean=1e4, std=1.0)
    mean, var = ops.batch_norm_stats(x)
    x64 = x.double()
    ref_mean = x64.mean(dim=(0, 2, 3))
    ref_var = x64.var(dim=(0, 2, 3), unbiased=False)
    assert rel_err(mean, ref_mean) <= 1e-6
    assert rel_err(var, ref_var) <= 2e-3
    # The normalised output keeps its accuracy too (no x * s + t cancellation).
    y = BF.batch_norm(x, None, None, training=True)
    y_ref = (x64 - ref_mean[:, None, None]) / torch.sqrt(ref_var[:, None, None] + 1e-5)
    assert rel_err(y, y_ref) <= 2e-3


@pytest.mark.parametrize("shape", [(8, 3, 20, 20), (5, 65, 14, 14), (600, 65, 3), (9001, 3)])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_results_do_not_depend_on_thread_count(fmt, shape):
    """The kernels partition the work by shape, never by thread count, so the
    results are bitwise equal for any number of threads. (5, 65, 14, 14) has
    325 planes: two threads split them at plane 163, so planes that one thread
    reduces in groups of four are reduced alone, and must give the same bits.
    (600, 65, 3) takes the virtual-channel path of planes under a cache line."""
    if fmt == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs 4D input")
    torch.manual_seed(0)
    C = shape[1]
    x = random_input(shape, torch.float32, fmt)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    g = torch.randn_like(x)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            out, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
            grads = ops.batch_norm_backward(g, x, mean, var, w, 1e-5, True)
            results.append((out, mean, var) + tuple(grads))
    finally:
        torch.set_num_threads(old)
    for one, *others in zip(*results):
        assert all(torch.equal(one, other) for other in others)


# ---------------------------------------------------------------- gradcheck

GRAD_SHAPES = [
    ((5, 3), "contiguous"),
    ((4, 3, 5), "contiguous"),
    ((4, 3, 5), "strided"),
    ((3, 2, 3, 4), "contiguous"),
    ((3, 2, 3, 4), "channels_last"),
    ((2, 3, 2, 2, 3), "channels_last"),
    ((2, 3, 2, 2, 3), "strided"),
]


@pytest.mark.parametrize("shape,fmt", GRAD_SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(shape, fmt, training, affine):
    torch.manual_seed(1)
    C = shape[1]
    x = random_input(shape, torch.float64, fmt).requires_grad_()
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=torch.float64).requires_grad_() if affine else None
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        # Clones: the training path updates the running statistics in place.
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)

    assert torch.autograd.gradcheck(fn, (x, w, b))


# ---------------------------------------------------------------- opcheck


def _op_samples(dtype, fmt, device):
    torch.manual_seed(2)
    C = 3
    x = random_input((4, C, 5, 6), dtype, fmt, device)
    pdt = param_dtype_for(dtype)
    opm = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(C, dtype=pdt, device=device) + 0.5
    b = torch.randn(C, dtype=pdt, device=device)
    mean = torch.randn(C, dtype=opm, device=device)
    var = torch.rand(C, dtype=opm, device=device) + 0.5
    vec = lambda: torch.randn(C, dtype=opm, device=device)  # noqa: E731
    g = torch.randn_like(x)
    rm = torch.randn(C, dtype=pdt, device=device)
    rv = torch.rand(C, dtype=pdt, device=device) + 0.5
    steps = torch.tensor(3, device=device)
    req = lambda t: t.clone().requires_grad_()  # noqa: E731
    return [
        (ops.batch_norm_stats, (x,)),
        (ops.batch_norm_elemt, (x, mean, vec(), vec())),
        (ops.batch_norm_backward_reduce, (g, x, mean)),
        (ops.batch_norm_backward_elemt, (g, x, mean, vec(), vec(), vec())),
        (ops.batch_norm_train, (req(x), req(w), req(b), 1e-5)),
        (ops.batch_norm_train, (req(x), None, None, 1e-5)),
        (ops.batch_norm_infer, (req(x), rm, rv, req(w), req(b), 1e-5)),
        (ops.batch_norm_backward, (g, x, mean, var, w, 1e-5, True)),
        (ops.batch_norm_backward, (g, x, mean, var, None, 1e-5, False)),
        (ops.batch_norm_update_stats, (rm.clone(), rv.clone(), steps.clone(), mean, var, 0.1, 120)),
        (
            ops.batch_norm_update_stats,
            (rm.clone(), rv.clone(), steps.clone(), mean, var, None, 120),
        ),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
def test_opcheck(dtype, fmt, device):
    for op, args in _op_samples(dtype, fmt, device):
        torch.library.opcheck(op, args)


# --------------------------------------------------------------- compile


class SmallCNN(nn.Module):
    def __init__(self, channels=8, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * 4 * 4, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


def _train(model, batches, steps_per_batch=1, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, target in batches:
        for _ in range(steps_per_batch):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def _batches(n=5, memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(8, 3, 8, 8, generator=gen).contiguous(memory_format=memory_format),
            torch.randint(0, 5, (8,), generator=gen),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_small_cnn_training_matches_torch(memory_format):
    torch.manual_seed(4)
    model = SmallCNN().to(memory_format=memory_format)
    reference = copy.deepcopy(model)
    ours = torch_bnext.convert_model(model)
    assert sum(isinstance(m, torch_bnext.BatchNorm2d) for m in ours.modules()) == 2
    batches = _batches(memory_format=memory_format)
    ref_losses = _train(reference, batches)
    our_losses = _train(ours, batches)
    assert max(abs(a - b) for a, b in zip(ref_losses, our_losses)) < 1e-4, (ref_losses, our_losses)
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items()):
        assert rel_err(a, b) < 1e-4 if a.is_floating_point() else torch.equal(a, b), name
    ours.eval()
    reference.eval()
    x = batches[0][0]
    assert rel_err(ours(x), reference(x)) < 1e-4


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(5)
    eager = torch_bnext.convert_model(SmallCNN())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, target = _batches(1)[0]
    for training in (True, False):
        eager.train(training)
        compiled_model.train(training)
        y_e = eager(x)
        y_c = compiled(x)
        assert rel_err(y_c, y_e) < 1e-5
        if training:
            F.cross_entropy(y_e, target).backward()
            F.cross_entropy(y_c, target).backward()
            for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
                assert rel_err(p_c.grad, p_e.grad) < 1e-5, name
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        assert rel_err(b_c, b_e) < 1e-6 if b_e.is_floating_point() else torch.equal(b_c, b_e), name


def test_torch_compile_momentum_none():
    torch.manual_seed(6)
    bn = torch_bnext.BatchNorm2d(4, momentum=None)
    ref = nn.BatchNorm2d(4, momentum=None)
    compiled = torch.compile(bn, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3)
        compiled(x)
        ref(x)
    assert rel_err(bn.running_var, ref.running_var) < 1e-6
    assert bn.num_batches_tracked.item() == 3


# ------------------------------------------------------ modules and convert


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_modules_are_drop_in(dim):
    ours, theirs = OUR_BN[dim](7, eps=1e-3, momentum=0.2), TORCH_BN[dim](7, eps=1e-3, momentum=0.2)
    assert isinstance(ours, TORCH_BN[dim])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    theirs.running_mean.uniform_()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(7)) and ours.num_batches_tracked.item() == 0
    ours.weight.data.fill_(3)
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(7))
    no_affine = OUR_BN[dim](7, affine=False, track_running_stats=False)
    assert no_affine.weight is None and no_affine.running_mean is None


def test_eval_without_running_stats_uses_batch_stats():
    torch.manual_seed(7)
    ours = torch_bnext.BatchNorm2d(3, track_running_stats=False).eval()
    ref = nn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 5, 5)
    assert rel_err(ours(x), ref(x)) < 1e-5


def test_convert_model_preserves_everything():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=None),
        nn.Sequential(nn.BatchNorm1d(4, affine=False, eps=1e-3)),
        nn.BatchNorm3d(2, track_running_stats=False),
    ).double()
    model[1].running_mean.uniform_()
    model[1].num_batches_tracked.fill_(7)
    model.eval()
    weight = model[1].weight
    converted = torch_bnext.convert_model(model)
    assert converted is model
    assert type(model[1]) is torch_bnext.BatchNorm2d and model[1].weight is weight
    assert model[1].momentum is None and model[1].num_batches_tracked.item() == 7
    assert type(model[2][0]) is torch_bnext.BatchNorm1d and model[2][0].eps == 1e-3
    assert model[2][0].weight is None
    assert type(model[3]) is torch_bnext.BatchNorm3d and model[3].running_mean is None
    assert not model[1].training and model[1].running_mean.dtype == torch.float64
    # A bare BatchNorm module converts to a new module.
    bn = nn.BatchNorm2d(3).train()
    new = torch_bnext.convert_model(bn)
    assert type(new) is torch_bnext.BatchNorm2d and new.training and new.weight is bn.weight


# ----------------------------------------------------------------- errors


def _bn_with_stats():
    bn = torch_bnext.BatchNorm2d(3)
    bn.running_mean.uniform_()
    bn.num_batches_tracked.fill_(2)
    return bn


def _snapshot(bn):
    return [t.clone() for t in bn.buffers()]


@pytest.mark.parametrize(
    "make_input,exc,pattern",
    [
        (lambda: torch.randn(4, 3, 5), ValueError, "expected 4D input"),
        (lambda: torch.randn(1, 3, 1, 1), ValueError, "Expected more than 1 value per channel"),
        (lambda: torch.randn(4, 5, 2, 2), RuntimeError, "weight should contain 5 elements not 3"),
        (
            lambda: torch.ones(4, 3, 2, 2, dtype=torch.long),
            NotImplementedError,
            "not implemented for 'Long'",
        ),
        (
            lambda: torch.randn(4, 3, 2, 2, dtype=torch.float64),
            RuntimeError,
            "expected weight of dtype",
        ),
    ],
)
def test_module_errors_leave_statistics_untouched(make_input, exc, pattern):
    bn = _bn_with_stats()
    before = _snapshot(bn)
    with pytest.raises(exc, match=pattern):
        bn(make_input())
    for a, b in zip(before, bn.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (
            dict(running_mean=torch.zeros(4)),
            RuntimeError,
            "running_mean should contain 3 elements not 4",
        ),
        (
            dict(running_var=torch.ones(2)),
            RuntimeError,
            "running_var should contain 3 elements not 2",
        ),
        (dict(bias=torch.zeros(4)), RuntimeError, "bias should contain 3 elements not 4"),
        (
            dict(running_mean=torch.zeros(3, device="meta")),
            RuntimeError,
            "expected running_mean on device cpu",
        ),
        (dict(weight=torch.ones(3, device="meta")), RuntimeError, "expected weight on device cpu"),
    ],
)
def test_functional_errors(kwargs, exc, pattern):
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=None, bias=None)
    args.update(kwargs)
    before = [args["running_mean"].clone(), args["running_var"].clone()]
    with pytest.raises(exc, match=pattern):
        BF.batch_norm(torch.randn(4, 3, 2, 2), training=True, **args)
    if args["running_mean"].device.type == "cpu" and args["running_var"].device.type == "cpu":
        assert torch.equal(before[0], args["running_mean"])
        assert torch.equal(before[1], args["running_var"])


def test_error_matches_torch_exception_types():
    """Each mistake raises what torch.nn raises for it."""
    cases = [
        lambda f, m: f(torch.randn(4, 3, 2), torch.zeros(4), torch.ones(4), training=True),
        lambda f, m: f(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True),
        lambda f, m: f(
            torch.ones(4, 3, dtype=torch.int32), torch.zeros(3), torch.ones(3), training=True
        ),
        lambda f, m: m(3)(torch.randn(4, 3)),
    ]
    for case in cases:
        with pytest.raises(Exception) as theirs:
            case(F.batch_norm, nn.BatchNorm2d)
        with pytest.raises(Exception) as ours:
            case(BF.batch_norm, torch_bnext.BatchNorm2d)
        if type(ours.value) is NotImplementedError and OLDER_TORCH:
            # An integer input: NotImplementedError as torch >= 2.8 raises; 2.7
            # raised RuntimeError (tools/torch_range.sh 2.7.1).
            assert type(theirs.value) is RuntimeError
            continue
        assert type(ours.value) is type(theirs.value), (ours.value, theirs.value)


def test_empty_batch_behaves_like_torch():
    for training in (True, False):
        ours, ref = torch_bnext.BatchNorm2d(3).train(training), nn.BatchNorm2d(3).train(training)
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y, y_ref = ours(x), ref(x)
        assert y.shape == y_ref.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(ours.running_mean, ref.running_mean)
        assert torch.equal(ours.running_var, ref.running_var)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_half_module_and_mixed_precision():
    torch.manual_seed(8)
    x = torch.randn(6, 4, 5, 5)
    ref = nn.BatchNorm2d(4).double()
    y_ref = ref(x.double())
    for pdt in (torch.bfloat16, torch.float32):
        ours = torch_bnext.BatchNorm2d(4).to(pdt)
        y = ours(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert_close_rel(y, y_ref, torch.bfloat16, f"params {pdt}")
        assert_close_rel(ours.running_var, ref.running_var, torch.bfloat16, "running_var")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_outputs_round_like_torch(dtype):
    # y = x * scale in float32, rounded once to dtype: bitwise what torch's
    # conversion gives (the CPU kernels may use a hardware bfloat16 rounding).
    gen = torch.Generator().manual_seed(3)
    C = 7
    x = (torch.randn(4, C, 33, 5, generator=gen) * 3).to(dtype)
    scale = torch.randn(C, generator=gen) * torch.logspace(-3, 3, C)
    zeros = torch.zeros(C)
    for fmt in ("contiguous", "channels_last"):
        xf = to_format(x, fmt)
        y = torch.ops.bnext.batch_norm_elemt(xf, zeros, scale, zeros)
        expected = (xf.float() * scale.view(1, C, 1, 1)).to(dtype)
        assert torch.equal(y, expected), fmt


# Rows over 512 bytes take the whole-row CPU reductions (float32: C > 128,
# half/bfloat16: C > 256; the parity shapes above stay below, but for float64).
# Rows under 64 bytes are read in groups of rows, the rows after the last
# whole group on their own; channels-first planes under 64 bytes as
# channels-last rows of C * S values.
WIDE_ROW_CASES = [
    ((300, 129), "contiguous"),
    ((64, 1027), "contiguous"),
    ((3, 300, 5, 4), "channels_last"),
    ((2, 513, 3, 3), "channels_last"),
    ((1000, 3), "contiguous"),
    ((4099, 1), "contiguous"),
    ((8, 3, 17, 13), "channels_last"),
    ((300, 7, 5), "contiguous"),
]


@pytest.mark.parametrize("shape,fmt", WIDE_ROW_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wide_rows_match_float64(shape, fmt, dtype):
    torch.manual_seed(1)
    C = shape[1]
    dim = len(shape) - 2 if len(shape) > 2 else 1
    x = random_input(shape, dtype, fmt, mean=3.0).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ours = OUR_BN[dim](C).to(param_dtype_for(dtype))
    ref = TORCH_BN[dim](C).double()
    with torch.no_grad():
        w = torch.rand(C) + 0.5
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    dy = torch.randn(shape, dtype=torch.float64)
    ours(x).backward(dy.to(dtype))
    y_ref = ref(x64)
    y_ref.backward(dy)
    assert_close_rel(ours(x.detach()).detach(), ref(x64.detach()).detach(), dtype, "output")
    assert_close_rel(x.grad, x64.grad, dtype, "grad_input", 2)
    assert_close_rel(ours.weight.grad, ref.weight.grad, dtype, "grad_weight", 2)
    assert_close_rel(ours.running_var, ref.running_var, dtype, "running_var")


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((500, 200), "contiguous"),
        ((40, 200, 3, 3), "channels_last"),
        # planes under a cache line: virtual channels
        ((400, 60, 3), "contiguous"),
        ((64, 200, 2, 2), "contiguous"),
        # rows under a cache line: groups of rows
        ((5000, 3), "contiguous"),
    ],
)
def test_wide_row_statistics_are_accurate_for_large_mean(shape, fmt):
    torch.manual_seed(0)
    x = random_input(shape, torch.float32, fmt, mean=1e4, std=1.0)
    mean, var = ops.batch_norm_stats(x)
    dims = [0] + list(range(2, len(shape)))
    assert rel_err(mean, x.double().mean(dim=dims)) <= 1e-6
    assert rel_err(var, x.double().var(dim=dims, unbiased=False)) <= 2e-3
