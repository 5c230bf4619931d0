"""Deployment of models that use torch_bnext's layers: ONNX export (torch's
exporter with torch_bnext.onnx_translations, and the legacy TorchScript
exporter) run in onnxruntime, revert_model, torch.export save/load (eval and
training) and AOTInductor packages.

The measured max abs errors go to the test report (record_property) and to
stdout (pytest -s)."""

import copy
import io
import json
import logging
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

import torch_bnext

B = torch_bnext
F32_TOL = 1e-5
# float64: onnxruntime's LayerNormalization differs from our kernel by ~2e-12
# (outputs of magnitude ~5); half: a few units in the last place.
TOL = {torch.float32: F32_TOL, torch.float64: 1e-11, torch.float16: 4e-3}
OPSETS = [18, 23]


@pytest.fixture
def ort():
    pytest.importorskip("onnx", reason="ONNX export tests need the onnx package")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    return pytest.importorskip("onnxruntime", reason="ONNX export tests run onnxruntime")


@pytest.fixture(autouse=True)
def _quiet_exporter():
    # The exporter logs progress and torch's own deprecation notes.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logger.setLevel(level)


def record(record_property, name, err):
    record_property(name, err)
    print(f"\n[deploy] {name}: max abs error {err:.3g}")


def trained(model, *shape, dtype=torch.float32, steps=3, **kwargs):
    """`model` after a few training steps on shifted data (running statistics
    away from 0 and 1), in eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, dtype=dtype, **kwargs) * 2 + 0.5)
    return model.eval()


def ort_session(ort, model_proto):
    opset = max(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))
    try:
        return ort.InferenceSession(
            model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        if opset >= 23 and "opset" in str(exc).lower():
            pytest.skip(f"onnxruntime {ort.__version__} does not run opset {opset}: {exc}")
        raise


def run_onnx(ort, model_proto, x):
    import onnx

    onnx.checker.check_model(model_proto, full_check=True)
    session = ort_session(ort, model_proto)
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {names[0]: x.contiguous().numpy()})]


def export_onnx(model, args, opset, **kwargs):
    args = args if isinstance(args, tuple) else (args,)
    return torch.onnx.export(
        model,
        args,
        dynamo=True,
        opset_version=opset,
        custom_translation_table=B.onnx_translations(opset),
        **kwargs,
    )


def max_err(actual, expected):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return (actual.double() - expected.detach().double()).abs().max().item()


def _cl(x):
    return x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()])


# name -> (model factory, input factory, ONNX node it must become)
CASES = {
    "bn1d_NC": (
        lambda: trained(B.BatchNorm1d(4), 8, 4),
        lambda: torch.randn(3, 4),
        "BatchNormalization",
    ),
    "bn1d_NCL": (
        lambda: trained(B.BatchNorm1d(4), 8, 4, 5),
        lambda: torch.randn(3, 4, 5),
        "BatchNormalization",
    ),
    "bn2d_NCHW": (
        lambda: trained(B.BatchNorm2d(4), 4, 4, 5, 5),
        lambda: torch.randn(2, 4, 5, 5),
        "BatchNormalization",
    ),
    "bn2d_channels_last": (
        lambda: trained(B.BatchNorm2d(4), 4, 4, 5, 5),
        lambda: _cl(torch.randn(2, 4, 5, 5)),
        "BatchNormalization",
    ),
    "bn3d_NCDHW": (
        lambda: trained(B.BatchNorm3d(4), 2, 4, 3, 4, 5),
        lambda: torch.randn(2, 4, 3, 4, 5),
        "BatchNormalization",
    ),
    "bn3d_channels_last": (
        lambda: trained(B.BatchNorm3d(4), 2, 4, 3, 4, 5),
        lambda: _cl(torch.randn(2, 4, 3, 4, 5)),
        "BatchNormalization",
    ),
    "bn2d_no_affine": (
        lambda: trained(B.BatchNorm2d(4, affine=False), 4, 4, 5, 5),
        lambda: torch.randn(2, 4, 5, 5),
        "BatchNormalization",
    ),
    # Eval with batch statistics: bnext::batch_norm_train in an eval graph.
    "bn2d_no_running_stats": (
        lambda: B.BatchNorm2d(4, track_running_stats=False).eval(),
        lambda: torch.randn(2, 4, 5, 5) * 2 + 1,
        "BatchNormalization",
    ),
    "batchrenorm1d": (
        lambda: trained(B.BatchRenorm1d(4, r_max=1.5, d_max=0.5), 8, 4),
        lambda: torch.randn(3, 4),
        "BatchNormalization",
    ),
    "batchrenorm2d_channels_last": (
        lambda: trained(B.BatchRenorm2d(4, r_max=1.5, d_max=0.5), 4, 4, 5, 5),
        lambda: _cl(torch.randn(2, 4, 5, 5)),
        "BatchNormalization",
    ),
    "batchrenorm3d": (
        lambda: trained(B.BatchRenorm3d(4), 2, 4, 3, 4, 5),
        lambda: torch.randn(2, 4, 3, 4, 5),
        "BatchNormalization",
    ),
    "syncbatchnorm_eval": (
        lambda: trained(B.SyncBatchNorm(4), 4, 4, 5, 5),
        lambda: torch.randn(2, 4, 5, 5),
        "BatchNormalization",
    ),
    "layernorm": (lambda: B.LayerNorm(8), lambda: torch.randn(2, 3, 8), "LayerNormalization"),
    "layernorm_2d_shape": (
        lambda: B.LayerNorm([3, 8]),
        lambda: torch.randn(2, 3, 8),
        "LayerNormalization",
    ),
    "layernorm_no_affine": (
        lambda: B.LayerNorm(8, elementwise_affine=False),
        lambda: torch.randn(2, 3, 8),
        "LayerNormalization",
    ),
    "layernorm_no_bias": (
        lambda: B.LayerNorm(8, bias=False),
        lambda: torch.randn(2, 3, 8),
        "LayerNormalization",
    ),
    "rmsnorm": (lambda: B.RMSNorm(8), lambda: torch.randn(2, 3, 8), "RMSNormalization"),
    "rmsnorm_2d_shape_eps": (
        lambda: B.RMSNorm([3, 8], eps=1e-3),
        lambda: torch.randn(2, 3, 8),
        "RMSNormalization",
    ),
    "rmsnorm_no_weight": (
        lambda: B.RMSNorm(8, elementwise_affine=False),
        lambda: torch.randn(2, 3, 8),
        "RMSNormalization",
    ),
    # Over dim 1: Transpose -> the row node -> Transpose.
    "layernorm2d": (
        lambda: B.LayerNorm2d(6),
        lambda: torch.randn(2, 6, 5, 4),
        "LayerNormalization",
    ),
    "layernorm2d_channels_last": (
        lambda: B.LayerNorm2d(6),
        lambda: _cl(torch.randn(2, 6, 5, 4)),
        "LayerNormalization",
    ),
    "rmsnorm2d": (
        lambda: B.RMSNorm2d(6, eps=1e-5),
        lambda: torch.randn(2, 6, 3, 7),
        "RMSNormalization",
    ),
    # Batch Norm + activation: BatchNormalization then the activation's node(s).
    "bn_act_silu": (
        lambda: trained(B.BatchNormAct2d(4, act_layer=torch.nn.SiLU), 4, 4, 5, 5),
        lambda: torch.randn(2, 4, 5, 5),
        "Sigmoid",
    ),
    "bn_act_gelu_tanh": (
        lambda: trained(B.BatchNormAct2d(4, act_layer="gelu_tanh"), 4, 4, 5, 5),
        lambda: torch.randn(2, 4, 5, 5),
        "BatchNormalization",
    ),
    "bn_act_relu6_channels_last": (
        lambda: trained(B.BatchNormAct2d(4, act_layer=torch.nn.ReLU6), 4, 4, 5, 5),
        lambda: _cl(torch.randn(2, 4, 5, 5)),
        "Clip",
    ),
    # In-place layers export out of place (the same values).
    "inplace_abn": (
        lambda: trained(B.InPlaceABN(4, activation="elu", activation_param=0.5), 4, 4, 5, 5),
        lambda: torch.randn(2, 4, 5, 5),
        "Elu",
    ),
}


def _randomise_affine(model):
    # Non-trivial weights and biases (the layers start at 1 and 0).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    return model


class _Zoo(nn.Module):
    """Several cases in one model (one input and one output each): one export
    per opset instead of one per case (each costs about a second)."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, *xs):
        return tuple(m(x) for m, x in zip(self.models, xs))


def export_and_compare(ort, cases, opset, legacy=False):
    """{case: max abs error of onnxruntime against eager} and the ONNX graph's
    op types, for cases {name: (model, input)} exported as one model."""
    import onnx

    names = list(cases)
    # eval like its layers: the legacy exporter restores the root's mode
    # after export, recursively (which would put the layers in training).
    zoo = _Zoo([cases[n][0] for n in names]).eval()
    xs = tuple(cases[n][1] for n in names)
    if legacy:
        f = io.BytesIO()
        torch.onnx.export(zoo, xs, f, dynamo=False, opset_version=opset)
        proto = onnx.load_from_string(f.getvalue())
    else:
        proto = export_onnx(zoo, xs, opset).model_proto
    onnx.checker.check_model(proto, full_check=True)
    session = ort_session(ort, proto)
    feed = {i.name: x.contiguous().numpy() for i, x in zip(session.get_inputs(), xs)}
    outs = [torch.from_numpy(o) for o in session.run(None, feed)]
    with torch.no_grad():
        refs = zoo(*xs)
    assert len(outs) == len(refs)
    errs = {n: max_err(o, r) for n, o, r in zip(names, outs, refs)}
    nodes = proto.graph.node
    assert all(n.domain in ("", "ai.onnx") for n in nodes), [(n.domain, n.op_type) for n in nodes]
    return errs, {n.op_type for n in nodes}


def check_errors(record_property, prefix, errs, tol):
    for name, err in errs.items():
        record(record_property, f"{prefix}_{name}", err)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"max abs error above {tol}: {bad}"


@pytest.mark.parametrize("opset", OPSETS)
def test_onnx_float32_matches_eager(ort, opset, record_property):
    torch.manual_seed(0)
    cases = {}
    for name, (make_model, make_input, _) in CASES.items():
        cases[name] = (_randomise_affine(make_model()), make_input())
    errs, op_types = export_and_compare(ort, cases, opset)
    assert {"BatchNormalization", "LayerNormalization"} <= op_types, op_types
    if opset >= 23:
        assert "RMSNormalization" in op_types, op_types
    else:
        assert "RMSNormalization" not in op_types and "ReduceMean" in op_types, op_types
    check_errors(record_property, f"onnx_opset{opset}_float32", errs, F32_TOL)


def _issue_model():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LayerNorm(4 * 6 * 6)
    )
    model = B.convert_model(model, layernorm=True)
    return _randomise_affine(trained(model, 4, 3, 8, 8))


@pytest.mark.parametrize("opset", OPSETS)
def test_onnx_issue_model_dynamic_batch(ort, opset, record_property):
    # The model of issue #14: Conv2d -> BatchNorm2d -> ReLU -> Flatten -> LayerNorm.
    torch.manual_seed(0)
    model = _issue_model()
    program = torch.onnx.export(
        model,
        (torch.randn(2, 3, 8, 8),),
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        custom_translation_table=B.onnx_translations(opset),
    )
    errs = []
    for n in (1, 5):
        x = torch.randn(n, 3, 8, 8)
        (y,) = run_onnx(ort, program.model_proto, x)
        with torch.no_grad():
            errs.append(max_err(y, model(x)))
    record(record_property, f"onnx_opset{opset}_issue_model_float32", max(errs))
    assert max(errs) <= F32_TOL


DTYPE_CASES = {
    "bn2d": (
        lambda dt, pdt: trained(B.BatchNorm2d(4, dtype=pdt), 4, 4, 5, 5, dtype=pdt),
        lambda dt: torch.randn(2, 4, 5, 5, dtype=dt),
    ),
    "bn2d_no_running_stats": (
        lambda dt, pdt: B.BatchNorm2d(4, track_running_stats=False, dtype=pdt).eval(),
        lambda dt: torch.randn(2, 4, 5, 5, dtype=dt),
    ),
    "layernorm": (
        lambda dt, pdt: B.LayerNorm(8, dtype=pdt),
        lambda dt: torch.randn(2, 3, 8, dtype=dt),
    ),
    "layernorm_no_bias": (
        lambda dt, pdt: B.LayerNorm(8, bias=False, dtype=pdt),
        lambda dt: torch.randn(2, 3, 8, dtype=dt),
    ),
    "rmsnorm": (lambda dt, pdt: B.RMSNorm(8, dtype=pdt), lambda dt: torch.randn(2, 3, 8, dtype=dt)),
}
# (input dtype, parameter dtype): float64, half, and half input with float32
# parameters (mixed precision, which our layers accept).
DTYPES = [
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize(
    "dtypes", DTYPES, ids=lambda d: f"{d[0]}-params-{d[1]}".replace("torch.", "")
)
def test_onnx_other_dtypes_match_eager(ort, dtypes, opset, record_property):
    torch.manual_seed(0)
    dtype, param_dtype = dtypes
    cases = {
        name: (_randomise_affine(make_model(dtype, param_dtype)), make_input(dtype))
        for name, (make_model, make_input) in DTYPE_CASES.items()
    }
    errs, _ = export_and_compare(ort, cases, opset)
    prefix = f"onnx_opset{opset}_{dtype}_params_{param_dtype}".replace("torch.", "")
    check_errors(record_property, prefix, errs, TOL[dtype])


class _AllOutputs(nn.Module):
    """Every output of the row-norm ops, to check the translations' statistics
    (values, shapes and dtypes), which the layers themselves drop."""

    def __init__(self, shape, dtype):
        super().__init__()
        self.shape = list(shape)
        self.weight = nn.Parameter(torch.rand(shape, dtype=dtype) + 0.5)
        self.bias = nn.Parameter(torch.rand(shape, dtype=dtype))
        self.channel_bias = nn.Parameter(torch.rand(shape[0], dtype=dtype))

    def forward(self, x):
        ln = torch.ops.bnext.layer_norm_fwd(x, self.shape, self.weight, self.bias, 1e-5)
        rms = torch.ops.bnext.rms_norm_fwd(x, self.shape, self.weight, 1e-6)
        # (N, C, L) = (3, 2, 8) for Batch Norm: no weight, a bias.
        bn = torch.ops.bnext.batch_norm_train(x, None, self.channel_bias, 1e-5)
        return (*ln, *rms, *bn)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_onnx_statistics_outputs(ort, dtype, opset, record_property):
    torch.manual_seed(0)
    model, x = _AllOutputs((2, 8), dtype), torch.randn(3, 2, 8, dtype=dtype)
    # Unoptimised: the translations' graphs as they are.
    program = export_onnx(model, x, opset, optimize=False)
    outs = run_onnx(ort, program.model_proto, x)
    with torch.no_grad():
        refs = model(x)
    errs = [max_err(o, r) for o, r in zip(outs, refs)]
    assert len(outs) == len(refs) == 8
    record(record_property, f"onnx_opset{opset}_statistics_{dtype}", max(errs))
    # LayerNormalization computes its Mean/InvStdDev outputs in float32
    # (stash_type) whatever the input: float32's precision for those two.
    tol = [TOL[dtype], 1e-5, 1e-5] + [TOL[dtype]] * 5
    assert all(e <= t for e, t in zip(errs, tol)), errs


def test_onnx_float64_rms_norm_keeps_tiny_eps(ort):
    # float64's default eps (2.2e-16) must survive the exporter's optimiser
    # (which deletes Add(x, scalar c) for |c| <= 1e-8): all-zero rows stay 0.
    model, x = B.RMSNorm(8, dtype=torch.float64), torch.zeros(2, 8, dtype=torch.float64)
    for opset in OPSETS:
        (y,) = run_onnx(ort, export_onnx(model, x, opset).model_proto, x)
        assert torch.equal(y, model(x).detach())


@pytest.mark.parametrize(
    "layer, message",
    [
        # Batch Renorm: our translation of bnext::batch_renorm_train refuses.
        ("batchrenorm", r"model\.eval\(\)"),
        # Batch Norm: bnext::batch_norm_train translates (eval uses it too, with
        # track_running_stats=False); torch 2.14's exporter then fails on the
        # functionalised in-place update (auto_functionalized_v2), as for any
        # mutating custom op, with a KeyError naming our operator.
        ("batchnorm", r"auto_functionalized_v2[\s\S]*bnext\.batch_norm_update_stats"),
    ],
)
def test_onnx_training_mode_fails(ort, layer, message):
    model = {"batchnorm": B.BatchNorm2d, "batchrenorm": B.BatchRenorm2d}[layer](4).train()
    with pytest.raises(Exception, match=message):
        export_onnx(model, torch.randn(2, 4, 3, 3), 18)


def test_onnx_translations_opset_checks(ort):
    with pytest.raises(ValueError, match="opset_version >= 17"):
        B.onnx_translations(16)
    with pytest.raises(Exception, match="same opset_version"):
        torch.onnx.export(
            B.RMSNorm(8),
            (torch.randn(2, 8),),
            dynamo=True,
            opset_version=18,
            custom_translation_table=B.onnx_translations(23),
        )
    table = B.onnx_translations()
    for name in ("batch_norm_infer", "batch_norm_train", "layer_norm_fwd", "rms_norm_fwd"):
        assert getattr(torch.ops.bnext, name).default in table


LEGACY_CASES = [
    "bn1d_NC",
    "bn2d_channels_last",
    "bn3d_NCDHW",
    "bn2d_no_affine",
    "bn2d_no_running_stats",
    "batchrenorm2d_channels_last",
    "layernorm_2d_shape",
    "layernorm_no_affine",
    "layernorm_no_bias",
    "rmsnorm",
    "rmsnorm_no_weight",
]


@pytest.mark.parametrize("opset", [17, 20])
def test_legacy_exporter(ort, opset, record_property):
    # torch.onnx.export(dynamo=False): the TorchScript exporter, deprecated by
    # torch but present in 2.14, with a global registry of symbolic functions.
    B.onnx.register_legacy_symbolics()
    torch.manual_seed(0)
    cases = {name: (_randomise_affine(CASES[name][0]()), CASES[name][1]()) for name in LEGACY_CASES}
    errs, op_types = export_and_compare(ort, cases, opset, legacy=True)
    assert {"BatchNormalization", "LayerNormalization", "ReduceMean"} <= op_types, op_types
    check_errors(record_property, f"legacy_opset{opset}_float32", errs, F32_TOL)


def test_legacy_exporter_needs_opset_17(ort):
    B.onnx.register_legacy_symbolics()
    with pytest.raises(Exception, match="opset_version >= 17"):
        torch.onnx.export(
            B.LayerNorm(8), (torch.randn(2, 8),), io.BytesIO(), dynamo=False, opset_version=16
        )


def test_only_register_legacy_symbolics_touches_the_legacy_registry(ort):
    # The TorchScript exporter's registry is global: onnx_translations() for
    # the dynamo exporter must leave it alone.
    from torch.onnx._internal.torchscript_exporter.registration import registry

    names = [
        f"bnext::{op}"
        for op in (
            "batch_norm_infer",
            "batch_norm_train",
            "layer_norm_fwd",
            "rms_norm_fwd",
            "batch_renorm_train",
            "batch_norm_update_stats",
        )
    ]
    for name in names:
        for opset in (1, 17):
            torch.onnx.unregister_custom_op_symbolic(name, opset)
    B.onnx_translations(18)
    B.onnx_translations(23)
    assert not any(registry.is_registered_op(n, opset) for n in names for opset in (16, 17, 20))
    B.onnx.register_legacy_symbolics()
    assert all(registry.is_registered_op(n, opset) for n in names for opset in (16, 17, 20))


# --- revert_model ------------------------------------------------------------


def _torch_model(dtype=torch.float64):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, dtype=dtype),
        nn.BatchNorm2d(4, dtype=dtype),
        nn.Sequential(nn.Flatten(), nn.BatchNorm1d(144, affine=False, dtype=dtype)),
        nn.LayerNorm(144, dtype=dtype),
        nn.LayerNorm(144, bias=False, dtype=dtype),
        nn.RMSNorm(144, dtype=dtype),
        nn.RMSNorm(144, elementwise_affine=False, dtype=dtype),
        nn.Unflatten(1, (4, 6, 6)),
        nn.Unflatten(2, (1, 6)),
        nn.BatchNorm3d(4, track_running_stats=False, dtype=dtype),
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_revert_model_round_trip(mode):
    torch.manual_seed(0)
    original = _torch_model().train(mode == "train")
    reference = copy.deepcopy(original)
    state = original.state_dict(keep_vars=True)
    classes = [type(m) for m in original.modules()]
    reverted = B.revert_model(B.convert_model(original, layernorm=True))
    assert [type(m) for m in reverted.modules()] == classes
    new_state = reverted.state_dict(keep_vars=True)
    assert list(new_state) == list(state)
    assert all(new_state[k] is state[k] for k in state)  # the very objects
    assert all(m.training == (mode == "train") for m in reverted.modules())
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):  # train: the running statistics move identically too
        assert torch.equal(reverted(x), reference(x))
    for (k, v), ref in zip(reverted.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(v, ref), k


def test_revert_model_maps_every_layer():
    torch.manual_seed(0)
    ours = nn.ModuleList(
        [
            B.BatchNorm1d(4),
            B.BatchNorm2d(4),
            B.BatchNorm3d(4),
            B.BatchRenorm1d(4),
            B.BatchRenorm2d(4),
            B.BatchRenorm3d(4),
            B.SyncBatchNorm(4),
            B.SyncBatchRenorm(4),
            B.LayerNorm([2, 4]),
            B.RMSNorm(4, eps=1e-3),
        ]
    )
    expected = [
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.SyncBatchNorm,
        nn.LayerNorm,
        nn.RMSNorm,
    ]
    inputs = [(8, 4), (4, 4, 3, 3), (2, 4, 2, 3, 3)] * 2 + [(4, 4, 3, 3)] * 2 + [(3, 2, 4), (3, 4)]
    for layer, shape in zip(ours[:8], inputs):
        trained(layer, *shape, steps=2)
    _randomise_affine(ours).eval()
    xs = [torch.randn(shape) for shape in inputs]
    with torch.no_grad():
        eval_out = [layer(x) for layer, x in zip(ours, xs)]
    params = [list(layer.parameters()) + list(layer.buffers()) for layer in ours]
    reverted = B.revert_model(ours)
    assert reverted is ours  # in place on the children
    for layer, cls, x, y, tensors in zip(reverted, expected, xs, eval_out, params):
        assert type(layer) is cls
        assert not layer.training
        assert all(
            a is b for a, b in zip(list(layer.parameters()) + list(layer.buffers()), tensors)
        )
        with torch.no_grad():
            torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)
    # The root itself.
    root = B.BatchRenorm2d(4, momentum=0.3)
    assert type(B.revert_model(root)) is nn.BatchNorm2d
    assert B.revert_model(root).momentum == 0.3


# --- torch.export: save/load, training mode ---------------------------------


def test_exported_program_save_load_eval(tmp_path):
    torch.manual_seed(0)
    model = _issue_model()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    targets = {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"}
    assert {"bnext.batch_norm_infer.default", "bnext.layer_norm_fwd.default"} <= targets
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), model(x))


@pytest.mark.parametrize("layer", ["batchnorm", "batchrenorm"])
def test_exported_program_training_mode_updates_buffers(layer, tmp_path):
    # In training the graph holds bnext::batch_norm_train / batch_renorm_train
    # and the in-place bnext::batch_norm_update_stats: the exported program
    # updates the running statistics exactly as eager does, also after
    # save/load, and after run_decompositions (functionalised: the updates
    # become outputs that ep.module() writes back).
    torch.manual_seed(0)
    make = {
        "batchnorm": lambda: B.BatchNorm2d(4),
        "batchrenorm": lambda: B.BatchRenorm2d(4, r_max=1.5, d_max=0.5),
    }[layer]
    model = trained(make(), 4, 4, 3, 3).train()
    xs = [torch.randn(4, 4, 3, 3) * 2 + 1 for _ in range(2)]
    eager = copy.deepcopy(model)
    ep = torch.export.export(copy.deepcopy(model), (xs[0],))
    assert "bnext.batch_norm_update_stats.default" in {
        str(n.target) for n in ep.graph.nodes if n.op == "call_function"
    }
    path = tmp_path / "train.pt2"
    torch.export.save(ep, path)
    programs = [ep.module(), torch.export.load(path).module(), ep.run_decompositions().module()]
    expected = [eager(x).detach() for x in xs]
    for gm in programs:
        gm.load_state_dict(model.state_dict())  # the state before the steps (shared buffers)
        for x, y in zip(xs, expected):
            assert torch.equal(gm(x), y)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(gm, name), getattr(eager, name)), name


# --- AOTInductor -----------------------------------------------------------

_LOADER = r"""
import json, sys, torch
how, package, program, io_path, lib = sys.argv[1:6]
data = torch.load(io_path)


def run(load):
    try:
        y = load()(data["x"])
        return {"ok": bool(torch.equal(y, data["y"])), "torch_bnext": "torch_bnext" in sys.modules}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def aoti():
    return torch._inductor.aoti_load_package(package)


def exported():
    return torch.export.load(program).module()


results = {}
if how == "import":
    import torch_bnext  # noqa: F401
    results["import"] = run(aoti)
    results["import_exported"] = run(exported)
else:  # nothing loaded, then only the operator library (no torch_bnext package)
    results["nothing"] = run(aoti)
    results["nothing_exported"] = run(exported)
    torch.ops.load_library(lib)
    results["load_library"] = run(aoti)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_aoti_package_runs_our_kernels(tmp_path, record_property):
    # Small model: the C++ compile of the package dominates (about 12 s on 2 cores; the whole
    # test about 35 s).
    torch.manual_seed(0)
    model = _randomise_affine(
        nn.Sequential(trained(B.BatchNorm2d(4), 4, 4, 3, 3), B.LayerNorm(3), B.RMSNorm(3))
    )
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        y = model(x)
    start = time.perf_counter()
    ep = torch.export.export(model, (x,))
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    compile_s = time.perf_counter() - start
    record_property("aoti_export_and_compile_s", compile_s)
    print(f"\n[deploy] AOTI export + compile: {compile_s:.1f} s")
    assert torch.equal(torch._inductor.aoti_load_package(package)(x), y)

    # In fresh processes, concurrently: what a user must load first.
    io_path, program = tmp_path / "io.pt", tmp_path / "program.pt2"
    torch.save({"x": x, "y": y}, io_path)
    torch.export.save(ep, program)
    script = tmp_path / "load.py"
    script.write_text(_LOADER)
    lib = torch_bnext._C.__file__
    root = os.path.dirname(os.path.dirname(torch_bnext.__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), how, package, str(program), str(io_path), lib],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for how in ("import", "library")
    ]
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.update(json.loads(out.strip().splitlines()[-1]))
    # `import torch_bnext` (or loading its operator library) is required, for
    # AOTI packages and saved exported programs alike.
    assert results["import"] == results["import_exported"] == {"ok": True, "torch_bnext": True}
    assert results["load_library"] == {"ok": True, "torch_bnext": False}
    assert not results["nothing"]["ok"]
    assert "bnext::batch_norm_infer" in results["nothing"]["error"], results["nothing"]
    assert not results["nothing_exported"]["ok"]
    # (its log, not its message, names bnext::batch_norm_infer)
    assert "deserializing" in results["nothing_exported"]["error"], results["nothing_exported"]
    total_s = time.perf_counter() - start
    record_property("aoti_total_s", total_s)
    print(
        f"[deploy] AOTI total: {total_s:.1f} s; without the import: "
        f"{results['nothing']['error'][:120]}"
    )
