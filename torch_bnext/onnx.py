"""ONNX export of models that use torch_bnext's layers (eval mode).

torch.onnx.export(dynamo=True) builds its table of ONNX translations afresh
for every export, from torch's own library plus the export's
``custom_translation_table``; a library cannot add to it globally. So::

    onnx_program = torch.onnx.export(
        model.eval(), (x,), dynamo=True, opset_version=18,
        custom_translation_table=torch_bnext.onnx_translations(opset_version=18))

Our operators become standard ONNX nodes that any ONNX runtime runs:
BatchNormalization (Batch Norm and Batch Renorm in eval), LayerNormalization,
and RMSNormalization from opset 23 (its decomposition into
ReduceMean/Sqrt/Reciprocal/Mul below 23). Pass the same opset_version to both
calls.

The deprecated TorchScript exporter (dynamo=False) has a global registry,
which only ``register_legacy_symbolics()`` (torch_bnext.onnx_legacy) fills.
Both exporters drive the same translations below, through a small graph
builder of their own.

Export in eval mode. bnext::batch_norm_train is translated (eval uses it for
layers with track_running_stats=False), bnext::batch_renorm_train and
batch_norm_update_stats refuse with a message asking for model.eval(). In
training mode torch 2.14's exporter fails before reaching our translation of
the running-statistics update (a KeyError on the auto_functionalized_v2 node
that wraps any in-place custom operator); the error names
bnext.batch_norm_update_stats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_ops = torch.ops.bnext

__all__ = ["onnx_translations", "register_legacy_symbolics"]

_FIRST_RMS_NORMALIZATION_OPSET = 23
_MIN_OPSET = 17  # LayerNormalization
_TRAINING_OPS = (
    "batch_renorm_train",
    "batch_norm_update_stats",
    "batch_renorm_act_train",
    "batch_norm_act_train_",
)
_TRAINING_MESSAGE = (
    "{op} is a training-mode operator of torch_bnext and has no ONNX translation: ONNX export "
    "of torch_bnext's Batch Norm / Batch Renorm layers is supported in eval mode only. Call "
    "model.eval() before torch.onnx.export (in eval mode the layers use bnext::batch_norm_infer, "
    "which exports as BatchNormalization)."
)


# --- the translations, for either exporter -----------------------------------
#
# `g` is the exporter's graph builder: g.op(op_type, *inputs, outputs=1,
# **attributes) adds a node; g.constant(values, dtype), g.cast(value, dtype),
# g.dtype(value), g.rank(value), g.reduce_mean(value, axes) (ReduceMean's axes
# moved from attribute to input in opset 18); g.opset is the model's opset;
# g.FLOAT, g.DOUBLE, g.INT64 are dtypes in the exporter's own type.


def _opmath(g, dtype):
    # Our kernels compute (and return row statistics) in float32, or float64
    # for float64 input.
    return g.DOUBLE if dtype == g.DOUBLE else g.FLOAT


def _wider(g, dtypes):
    return g.DOUBLE if g.DOUBLE in dtypes else g.FLOAT


def _cast(g, value, dtype):
    return value if value is None or g.dtype(value) == dtype else g.cast(value, dtype)


def _filled(g, fill, dtype, shape):
    return g.op("Expand", g.constant([fill], dtype), shape)


def _leading_shape(g, input, axis):
    # The row statistics' shape: input.shape[:axis] (possibly ()).
    return g.op("Shape", input, end=axis)


def _batch_norm(g, input, mean, var, stats_dtype, weight, bias, eps):
    # BatchNormalization takes the parameters (T1) and the statistics (T2) in
    # dtypes of their own, as our kernel does (half input with float32
    # parameters): a single node, which runtimes fuse into a preceding Conv.
    # The kernel also accepts weight and bias of different dtypes; the node
    # wants one dtype for both: theirs if they agree, else the wider (the
    # statistics' if both are absent).
    dtypes = {g.dtype(p) for p in (weight, bias) if p is not None} or {stats_dtype}
    pdtype = dtypes.pop() if len(dtypes) == 1 else _wider(g, dtypes)
    channels = g.op("Shape", mean)
    weight = _filled(g, 1, pdtype, channels) if weight is None else _cast(g, weight, pdtype)
    bias = _filled(g, 0, pdtype, channels) if bias is None else _cast(g, bias, pdtype)
    return g.op("BatchNormalization", input, weight, bias, mean, var, epsilon=eps, training_mode=0)


def _batch_norm_infer(g, input, mean, var, weight, bias, eps):
    # bnext::batch_norm_infer -> Tensor. (mean, var) must share a dtype in the
    # node: the wider one.
    stats_dtype = g.dtype(mean)
    if g.dtype(var) != stats_dtype:
        stats_dtype = _wider(g, (stats_dtype, g.dtype(var)))
        mean, var = _cast(g, mean, stats_dtype), _cast(g, var, stats_dtype)
    return _batch_norm(g, input, mean, var, stats_dtype, weight, bias, eps)


def _batch_norm_train(g, input, weight, bias, eps):
    # bnext::batch_norm_train -> (out, mean, var): normalisation with the
    # batch's statistics (biased variance), which eval mode uses too when the
    # layer tracks no running statistics (track_running_stats=False). mean and
    # var: (C,), in the opmath dtype.
    stat = _opmath(g, g.dtype(input))
    x = _cast(g, input, stat)
    axes = [0] + list(range(2, g.rank(input)))
    mean = g.reduce_mean(x, axes)
    centered = g.op("Sub", x, mean)
    var = g.reduce_mean(g.op("Mul", centered, centered), axes)
    flat = g.constant([-1], g.INT64)
    mean, var = g.op("Reshape", mean, flat), g.op("Reshape", var, flat)
    return _batch_norm(g, input, mean, var, stat, weight, bias, eps), mean, var


def _activation(g, x, activation, param):
    # The activation (and its parameter) of bnext::batch_norm_act_*, as ONNX
    # nodes in x's dtype.
    dtype = g.dtype(x)
    if activation == "identity":
        return x
    if activation == "relu":
        return g.op("Relu", x)
    if activation == "leaky_relu":
        return g.op("LeakyRelu", x, alpha=param)
    if activation == "elu":
        return g.op("Elu", x, alpha=param)
    if activation == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    if activation == "hardswish":
        return g.op("HardSwish", x)
    if activation == "relu6":
        return g.op("Clip", x, g.constant(0.0, dtype), g.constant(6.0, dtype))
    if activation in ("gelu", "gelu_tanh"):
        if g.opset >= _FIRST_RMS_NORMALIZATION_OPSET:  # Gelu is opset 20's
            return g.op("Gelu", x, approximate="tanh" if activation == "gelu_tanh" else "none")
        half = g.op("Mul", x, g.constant(0.5, dtype))
        if activation == "gelu":
            inner = g.op("Erf", g.op("Mul", x, g.constant(0.7071067811865476, dtype)))
        else:
            cube = g.op("Mul", g.op("Mul", x, x), x)
            poly = g.op("Add", x, g.op("Mul", cube, g.constant(0.044715, dtype)))
            inner = g.op("Tanh", g.op("Mul", poly, g.constant(0.7978845608028654, dtype)))
        return g.op("Mul", half, g.op("Add", inner, g.constant(1.0, dtype)))
    raise ValueError(f"no ONNX translation for activation {activation!r}")


def _then_act(g, y, residual, activation, param):
    if residual is not None:
        y = g.op("Add", y, residual)
    return _activation(g, y, activation, param)


def _layer_norm_fwd(g, input, normalized_shape, weight, bias, eps):
    # bnext::layer_norm_fwd -> (out, mean, rstd); mean and rstd have the
    # input's leading shape, in the opmath dtype.
    axis = -len(normalized_shape)
    dtype = g.dtype(input)
    stat = _opmath(g, dtype)
    # LayerNormalization wants X, Scale and B of one dtype. Half input with
    # float32 parameters: normalise in float32, round once, as the kernel does.
    param_dtypes = {g.dtype(p) for p in (weight, bias) if p is not None}
    compute = dtype
    if param_dtypes - {dtype}:
        compute = stat if param_dtypes <= {dtype, stat} else g.DOUBLE
    if weight is None:
        weight = _filled(g, 1, compute, g.op("Shape", input, start=axis))
    y, mean, inv_std = g.op(
        "LayerNormalization",
        _cast(g, input, compute),
        _cast(g, weight, compute),
        _cast(g, bias, compute),
        axis=axis,
        epsilon=eps,
        outputs=3,
    )
    lead = _leading_shape(g, input, axis)
    return (
        _cast(g, y, dtype),
        _cast(g, g.op("Reshape", mean, lead), stat),
        _cast(g, g.op("Reshape", inv_std, lead), stat),
    )


def _rms_norm_fwd(g, input, normalized_shape, weight, eps):
    # bnext::rms_norm_fwd -> (out, rstd); rstd has the input's leading shape,
    # in the opmath dtype. As torch: normalise in the opmath dtype, multiply
    # by the weight in the wider of that and the weight's dtype, round once to
    # the input's dtype.
    axis = -len(normalized_shape)
    dtype = g.dtype(input)
    stat = _opmath(g, dtype)
    x = _cast(g, input, stat)
    mean_square = g.reduce_mean(g.op("Mul", x, x), list(range(axis, 0)))
    # eps as a 1-element tensor, not a scalar: the dynamo exporter's optimiser
    # (onnxscript's add_0 rule) deletes Add(x, c) for a scalar |c| <= 1e-8,
    # such as float64's default eps, which turns all-zero rows into NaN.
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_square, g.constant([eps], stat))))
    weight_dtype = None if weight is None else g.dtype(weight)
    # float64 is left to the decomposition: onnxruntime's RMSNormalization
    # computes in float32 (its stash_type) whatever the input.
    if (
        g.opset >= _FIRST_RMS_NORMALIZATION_OPSET
        and dtype != g.DOUBLE
        and weight_dtype in (None, dtype, g.FLOAT)
    ):
        # One dtype for X and scale (onnxruntime's expansion of the node fails
        # on half X with float32 scale): float32 when they differ, which is
        # torch's computation dtype anyway.
        compute = dtype if weight is None else weight_dtype
        if weight is None:
            weight = _filled(g, 1, compute, g.op("Shape", input, start=axis))
        y = g.op("RMSNormalization", _cast(g, input, compute), weight, axis=axis, epsilon=eps)
    else:
        y = g.op("Mul", x, rstd)
        if weight is not None:
            wide = _wider(g, (stat, weight_dtype))
            y = g.op("Mul", _cast(g, y, wide), _cast(g, weight, wide))
    # rstd is dropped by the exporter's optimiser where unused.
    return _cast(g, y, dtype), g.op("Reshape", rstd, _leading_shape(g, input, axis))


def _channels_first(g, translate, input, *args):
    # The _2d ops (normalised over dim 1): the row translation between two
    # Transposes; the statistics already have the transposed leading shape.
    rank = g.rank(input)
    rows = g.op("Transpose", input, perm=[0, *range(2, rank), 1])
    y, *stats = translate(g, rows, [-1], *args)
    return (g.op("Transpose", y, perm=[0, rank - 1, *range(1, rank - 1)]), *stats)


def _refuse_training_op(name):
    def refuse(*args, **kwargs):
        raise RuntimeError(_TRAINING_MESSAGE.format(op=name))

    refuse.__name__ = name.replace("::", "_").replace(".", "_")
    return refuse


# --- torch.onnx.export(dynamo=True) ------------------------------------------


class _OnnxscriptGraph:
    def __init__(self, opset_version: int):
        import onnx_ir as ir
        from onnxscript.onnx_opset import opset18, opset23

        self._ir = ir
        self.opset = opset_version
        self._op = opset23 if opset_version >= _FIRST_RMS_NORMALIZATION_OPSET else opset18
        self.FLOAT, self.DOUBLE, self.INT64 = (
            ir.DataType.FLOAT,
            ir.DataType.DOUBLE,
            ir.DataType.INT64,
        )

    def op(self, op_type, *inputs, outputs=1, **attributes):
        # onnxscript knows each op's outputs from its schema.
        return getattr(self._op, op_type)(*inputs, **attributes)

    def constant(self, values, dtype):
        return self._op.Constant(value=self._ir.tensor(values, dtype=dtype))

    def cast(self, value, dtype):
        return self._op.Cast(value, to=dtype)

    def dtype(self, value):
        return value.dtype

    def rank(self, value):
        return len(value.shape)

    def reduce_mean(self, value, axes):
        return self._op.ReduceMean(value, self.constant(axes, self.INT64), keepdims=1)


def _check_exporting_opset(opset_version: int) -> None:
    """Best effort (torch's private state, absent in other versions): refuse
    to put RMSNormalization into a model of an older opset, which runtimes
    would reject."""
    try:
        from torch.onnx._internal.exporter import _core

        exporting = _core.current_tracer.opset.version
    except Exception:
        return
    if isinstance(exporting, int) and exporting < _FIRST_RMS_NORMALIZATION_OPSET:
        raise ValueError(
            f"torch_bnext.onnx_translations(opset_version={opset_version}) emits "
            f"RMSNormalization (opset {_FIRST_RMS_NORMALIZATION_OPSET}), but the model is being "
            f"exported at opset {exporting}: pass the same opset_version to "
            "torch_bnext.onnx_translations() and torch.onnx.export()"
        )


def onnx_translations(opset_version: int = 18) -> dict:
    """The ``custom_translation_table`` for torch.onnx.export(dynamo=True):
    {torch.ops.bnext.<op>.default: ONNX translation} for the operators of
    eval mode (batch_norm_infer; batch_norm_train, which Batch Norm with
    track_running_stats=False uses in eval; their forms with an activation,
    batch_norm_act_infer / batch_norm_act_train: BatchNormalization, the
    residual's Add, then the activation's node(s); layer_norm_fwd; rms_norm_fwd; their
    dim-1 forms layer_norm_2d_fwd, rms_norm_2d_fwd),
    plus entries for the training-only operators (batch_renorm_train,
    batch_norm_update_stats) that fail with a message asking for model.eval().

    `opset_version` must be the one given to torch.onnx.export (>= 17):
    RMSNorm becomes one RMSNormalization node from 23 on, its decomposition
    before. Requires the onnxscript package (as torch.onnx.export does).
    Registers nothing globally."""
    if isinstance(opset_version, bool) or not isinstance(opset_version, int):
        raise TypeError(f"opset_version must be an int, got {opset_version!r}")
    if opset_version < _MIN_OPSET:
        raise ValueError(
            f"torch_bnext's ONNX translations need opset_version >= {_MIN_OPSET} "
            f"(LayerNormalization), got {opset_version}"
        )
    g = _OnnxscriptGraph(opset_version)

    # The exporter binds each op's arguments by these signatures: annotated
    # ones are ONNX attributes, the others tensors (None: an absent input).
    def batch_norm_infer(input, mean, var, weight=None, bias=None, eps: float = 1e-5):
        return _batch_norm_infer(g, input, mean, var, weight, bias, eps)

    def batch_norm_train(input, weight=None, bias=None, eps: float = 1e-5):
        return _batch_norm_train(g, input, weight, bias, eps)

    def batch_norm_act_infer(
        input,
        mean,
        var,
        weight=None,
        bias=None,
        residual=None,
        eps: float = 1e-5,
        activation: str = "relu",
        activation_param: float = 0.0,
    ):
        y = _batch_norm_infer(g, input, mean, var, weight, bias, eps)
        return _then_act(g, y, residual, activation, activation_param)

    def batch_norm_act_train(
        input,
        weight=None,
        bias=None,
        residual=None,
        eps: float = 1e-5,
        activation: str = "relu",
        activation_param: float = 0.0,
    ):
        y, mean, var = _batch_norm_train(g, input, weight, bias, eps)
        return _then_act(g, y, residual, activation, activation_param), mean, var

    def layer_norm_fwd(
        input, normalized_shape: Sequence[int], weight=None, bias=None, eps: float = 1e-5
    ):
        return _layer_norm_fwd(g, input, normalized_shape, weight, bias, eps)

    def rms_norm_fwd(input, normalized_shape: Sequence[int], weight=None, eps: float = 1e-6):
        if opset_version >= _FIRST_RMS_NORMALIZATION_OPSET:
            _check_exporting_opset(opset_version)
        return _rms_norm_fwd(g, input, normalized_shape, weight, eps)

    def layer_norm_2d_fwd(input, weight=None, bias=None, eps: float = 1e-6):
        return _channels_first(g, _layer_norm_fwd, input, weight, bias, eps)

    def rms_norm_2d_fwd(input, weight=None, eps: float = 1e-6):
        if opset_version >= _FIRST_RMS_NORMALIZATION_OPSET:
            _check_exporting_opset(opset_version)
        return _channels_first(g, _rms_norm_fwd, input, weight, eps)

    table = {
        _ops.batch_norm_infer.default: batch_norm_infer,
        _ops.batch_norm_train.default: batch_norm_train,
        _ops.batch_norm_act_infer.default: batch_norm_act_infer,
        _ops.batch_norm_act_train.default: batch_norm_act_train,
        _ops.layer_norm_fwd.default: layer_norm_fwd,
        _ops.rms_norm_fwd.default: rms_norm_fwd,
        _ops.layer_norm_2d_fwd.default: layer_norm_2d_fwd,
        _ops.rms_norm_2d_fwd.default: rms_norm_2d_fwd,
    }
    for name in _TRAINING_OPS:
        packet = getattr(_ops, name)
        for overload in packet.overloads():
            target = getattr(packet, overload)
            table[target] = _refuse_training_op(target.name())
    return table


def register_legacy_symbolics() -> None:
    """Opts in to the deprecated TorchScript exporter: see
    torch_bnext.onnx_legacy.register_legacy_symbolics."""
    from .onnx_legacy import register_legacy_symbolics as register

    register()
