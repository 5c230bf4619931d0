"""PyTorch's own samples for its norm modules and functions (the ModuleInfo /
OpInfo entries that ship with the wheel), run through ours and through
torch's on the same values: outputs, running statistics, first- and
second-order gradients, forward-mode AD, error inputs, memory formats,
non-contiguous inputs, pickling and state_dict."""

import copy
import io
import math
import pickle

import pytest
import torch

# torch's test helpers import expecttest (requirements-dev.txt has it; a bare
# machine such as the lent GPU may not).
pytest.importorskip("expecttest")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

import torch_bnext
from torch_bnext import functional as ours_F

OUR_MODULES = {
    "nn.BatchNorm1d": torch_bnext.BatchNorm1d,
    "nn.BatchNorm2d": torch_bnext.BatchNorm2d,
    "nn.BatchNorm3d": torch_bnext.BatchNorm3d,
    "nn.LayerNorm": torch_bnext.LayerNorm,
    "nn.RMSNorm": torch_bnext.RMSNorm,
}
OUR_FUNCTIONS = {
    "nn.functional.batch_norm": ours_F.batch_norm,
    "nn.functional.layer_norm": ours_F.layer_norm,
    "nn.functional.rms_norm": ours_F.rms_norm,
}
MODULE_INFOS = {m.name: m for m in module_db if m.name in OUR_MODULES}
OP_INFOS = {o.name: o for o in op_db if o.name in OUR_FUNCTIONS and o.variant_test_name == ""}
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-7), torch.float32: dict(rtol=1e-4, atol=2e-5)}
DTYPES = [torch.float64, torch.float32]


def test_every_entry_is_found():
    assert set(MODULE_INFOS) == set(OUR_MODULES)
    assert set(OP_INFOS) == set(OUR_FUNCTIONS)


def clone(value):
    """A fresh copy of every tensor in value (requires_grad kept)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    return value


def tensors_requiring_grad(*values):
    found = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.requires_grad:
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found += tensors_requiring_grad(*v)
        elif isinstance(v, dict):
            found += tensors_requiring_grad(*v.values())
    return found


def assert_same(got, expected, dtype, what):
    if expected is None:
        assert got is None, what
        return
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    torch.testing.assert_close(got, expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def compare_gradients(out_o, out_t, leaves_o, leaves_t, dtype, what):
    """First-order gradients, and (float64) the gradients of a gradient
    penalty: the double backward that used to come back as silent zeros."""
    if not out_t.requires_grad or out_t.numel() == 0:
        return
    g = torch.randn_like(out_t)
    second = dtype == torch.float64
    grads_o = torch.autograd.grad(
        out_o, leaves_o, g, create_graph=second, allow_unused=True, materialize_grads=True
    )
    grads_t = torch.autograd.grad(
        out_t, leaves_t, g, create_graph=second, allow_unused=True, materialize_grads=True
    )
    for i, (a, b) in enumerate(zip(grads_o, grads_t)):
        assert_same(a, b, dtype, f"{what}: gradient {i}")
    if not second or not any(t.requires_grad for t in grads_t):
        return
    pen_o = sum((a * a).sum() for a in grads_o)
    pen_t = sum((b * b).sum() for b in grads_t)
    for i, (a, b) in enumerate(
        zip(
            torch.autograd.grad(pen_o, leaves_o, allow_unused=True, materialize_grads=True),
            torch.autograd.grad(pen_t, leaves_t, allow_unused=True, materialize_grads=True),
        )
    ):
        assert_same(a, b, dtype, f"{what}: second-order gradient {i}")


# ------------------------------------------------------------------ modules


def _module_pair(info, ours_cls, sample, device, dtype, training):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(0)
    theirs = info.module_cls(*args, **kwargs).to(device=device, dtype=dtype)
    ours = ours_cls(*args, **kwargs).to(device=device, dtype=dtype)
    with torch.no_grad():  # random parameters, not the initial ones/zeros
        for p in theirs.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return ours.train(training), theirs.train(training)


def _channels_last(t):
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if isinstance(t, torch.Tensor) and t.dim() in formats:
        return t.detach().contiguous(memory_format=formats[t.dim()]).requires_grad_(t.requires_grad)
    return t


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(OUR_MODULES))
def test_module_samples(name, dtype, training, device):
    info, ours_cls = MODULE_INFOS[name], OUR_MODULES[name]
    samples = info.module_inputs_func(
        info, device=device, dtype=dtype, requires_grad=True, training=training
    )
    assert samples
    for k, sample in enumerate(samples):
        what = f"{name} sample {k} ({sample.desc or sample.constructor_input.args})"
        ours, theirs = _module_pair(info, ours_cls, sample, device, dtype, training)
        for layout, transform in (("as given", lambda t: t), ("channels_last", _channels_last)):
            fargs = [transform(a) for a in sample.forward_input.args]
            a_o, a_t = clone(fargs), clone(fargs)
            out_o, out_t = ours(*a_o), theirs(*a_t)
            assert_same(out_o, out_t, dtype, f"{what}, {layout}: output")
            if out_t.dim() >= 4 and layout == "channels_last":
                fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[out_t.dim()]
                assert out_o.is_contiguous(memory_format=fmt) == out_t.is_contiguous(
                    memory_format=fmt
                ), f"{what}: memory format"
            for key, value in theirs.state_dict().items():
                assert_same(ours.state_dict()[key], value, dtype, f"{what}, {layout}: {key}")
            leaves_o = tensors_requiring_grad(a_o) + list(ours.parameters())
            leaves_t = tensors_requiring_grad(a_t) + list(theirs.parameters())
            compare_gradients(out_o, out_t, leaves_o, leaves_t, dtype, f"{what}, {layout}")
        # Pickling, deepcopy and torch.save keep the class, the state and the results.
        for restored in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
            assert type(restored) is ours_cls
            assert list(restored.state_dict()) == list(theirs.state_dict())
        buffer = io.BytesIO()
        torch.save(ours.state_dict(), buffer)
        buffer.seek(0)
        assert set(torch.load(buffer)) == set(theirs.state_dict())


@pytest.mark.parametrize("name", sorted(OUR_MODULES))
def test_module_error_samples(name, device):
    info, ours_cls = MODULE_INFOS[name], OUR_MODULES[name]
    if info.module_error_inputs_func is None:
        pytest.skip(f"{name} has no error samples")
    errors = list(
        info.module_error_inputs_func(
            info, device=device, dtype=torch.float32, requires_grad=False, training=True
        )
    )
    assert errors
    for err in errors:
        sample = err.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        if err.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(err.error_type):
                ours_cls(*args, **kwargs)
            continue
        ours = ours_cls(*args, **kwargs).to(device)
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        with pytest.raises(err.error_type):
            ours(*sample.forward_input.args, **sample.forward_input.kwargs)
        for key, value in ours.state_dict().items():  # a failed call changes nothing
            assert torch.equal(value, state[key]), f"{name}: {key} changed by a failing call"


# ---------------------------------------------------------------- functions


def _call(fn, sample):
    return fn(sample.input, *sample.args, **sample.kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(OUR_FUNCTIONS))
def test_function_samples(name, dtype, device):
    info, ours_fn = OP_INFOS[name], OUR_FUNCTIONS[name]
    samples = list(info.sample_inputs(device, dtype, requires_grad=True))
    assert samples
    for k, sample in enumerate(samples):
        for variant, s in (("as given", sample), ("non-contiguous", sample.noncontiguous())):
            what = f"{name} sample {k} ({variant}: {s.input.shape}, {s.kwargs})"
            s_o, s_t = clone(s), clone(s)
            out_o, out_t = _call(ours_fn, s_o), _call(info.op, s_t)
            assert_same(out_o, out_t, dtype, f"{what}: output")
            # Running statistics updated in place (batch_norm in training).
            for a, b in zip(s_o.args, s_t.args):
                if isinstance(b, torch.Tensor) and not b.requires_grad:
                    assert_same(a, b, dtype, f"{what}: in-place argument")
            if dtype != torch.float64 and _rows_of_one(name, s):
                # A row of one value normalises to 0 whatever x is: dx is
                # rounding noise times rstd = eps**-0.5, in both (float64 is compared).
                continue
            leaves_o = tensors_requiring_grad(s_o.input, s_o.args, s_o.kwargs)
            leaves_t = tensors_requiring_grad(s_t.input, s_t.args, s_t.kwargs)
            compare_gradients(out_o, out_t, leaves_o, leaves_t, dtype, what)


def _rows_of_one(name, sample):
    return name == "nn.functional.layer_norm" and math.prod(sample.args[0]) == 1


@pytest.mark.parametrize("name", sorted(OUR_FUNCTIONS))
def test_function_forward_ad_samples(name, device):
    info, ours_fn = OP_INFOS[name], OUR_FUNCTIONS[name]
    for k, sample in enumerate(info.sample_inputs(device, torch.float64, requires_grad=False)):
        if sample.input.numel() == 0:
            continue
        tangent = torch.randn_like(sample.input)

        def jvp(fn, sample=sample, tangent=tangent):
            s = clone(sample)  # fresh running statistics for each call
            f = lambda x: fn(x, *s.args, **s.kwargs)  # noqa: E731
            return torch.func.jvp(f, (s.input,), (tangent,))

        for a, b in zip(jvp(ours_fn), jvp(info.op)):
            assert_same(a, b, torch.float64, f"{name} sample {k} jvp")


@pytest.mark.parametrize("name", sorted(OUR_FUNCTIONS))
def test_function_error_samples(name, device):
    info, ours_fn = OP_INFOS[name], OUR_FUNCTIONS[name]
    if info.error_inputs_func is None:
        pytest.skip(f"{name} has no error samples")
    errors = list(info.error_inputs(device))
    assert errors
    for err in errors:
        with pytest.raises(err.error_type):
            _call(ours_fn, err.sample_input)
