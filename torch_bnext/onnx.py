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

The legacy TorchScript exporter (dynamo=False) has a global registry:
``register_legacy_symbolics()`` fills it (onnx_translations() calls it too).

Export in eval mode. bnext::batch_norm_train is translated (eval uses it for
layers with track_running_stats=False), bnext::batch_renorm_train and
batch_norm_update_stats refuse with a message asking for model.eval(). In
training mode torch 2.14's exporter fails before reaching our translation of
the running-statistics update (a KeyError on the auto_functionalized_v2 node
that wraps any in-place custom operator); the error names
bnext.batch_norm_update_stats.
"""

from __future__ import annotations

from typing import Sequence

import torch

_ops = torch.ops.bnext

__all__ = ["onnx_translations", "register_legacy_symbolics"]

_FIRST_RMS_NORMALIZATION_OPSET = 23
_MIN_OPSET = 17  # LayerNormalization
_TRAINING_MESSAGE = (
    "{op} is a training-mode operator of torch_bnext and has no ONNX translation: ONNX export "
    "of torch_bnext's Batch Norm / Batch Renorm layers is supported in eval mode only. Call "
    "model.eval() before torch.onnx.export (in eval mode the layers use bnext::batch_norm_infer, "
    "which exports as BatchNormalization)."
)


def _check_opset(opset_version) -> int:
    if isinstance(opset_version, bool) or not isinstance(opset_version, int):
        raise TypeError(f"opset_version must be an int, got {opset_version!r}")
    if opset_version < _MIN_OPSET:
        raise ValueError(
            f"torch_bnext's ONNX translations need opset_version >= {_MIN_OPSET} "
            f"(LayerNormalization), got {opset_version}"
        )
    return opset_version


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


def _param_dtype(dtypes: set, stats_dtype, float_, double_):
    """The one dtype BatchNormalization takes for both weight and bias (our
    kernel accepts two): theirs if they agree, else the wider; the statistics'
    dtype when both are absent. Dtypes are those of either exporter."""
    if not dtypes:
        return stats_dtype
    if len(dtypes) == 1:
        return next(iter(dtypes))
    return double_ if double_ in dtypes else float_


def onnx_translations(opset_version: int = 18) -> dict:
    """The ``custom_translation_table`` for torch.onnx.export(dynamo=True):
    {torch.ops.bnext.<op>.default: ONNX translation} for the operators of
    eval mode (batch_norm_infer; batch_norm_train, which Batch Norm with
    track_running_stats=False uses in eval; layer_norm_fwd; rms_norm_fwd),
    plus entries for the training-only operators (batch_renorm_train,
    batch_norm_update_stats) that fail with a message asking for model.eval().

    `opset_version` must be the one given to torch.onnx.export (>= 17):
    RMSNorm becomes one RMSNormalization node from 23 on, its decomposition
    before. Requires the onnxscript package (as torch.onnx.export does).
    Also registers the legacy exporter's symbolic functions
    (register_legacy_symbolics)."""
    opset_version = _check_opset(opset_version)
    import onnx_ir as ir
    from onnxscript import opset18 as op

    use_rms_normalization = opset_version >= _FIRST_RMS_NORMALIZATION_OPSET
    if use_rms_normalization:
        from onnxscript.onnx_opset import opset23 as op23

    FLOAT, DOUBLE = ir.DataType.FLOAT, ir.DataType.DOUBLE

    def opmath(dtype):
        # Our kernels compute (and return row statistics) in float32, or
        # float64 for float64 input.
        return DOUBLE if dtype == DOUBLE else FLOAT

    def cast(value, dtype):
        return value if value is None or value.dtype == dtype else op.Cast(value, to=dtype)

    def ones(dtype, shape):
        return op.Expand(op.Constant(value=ir.tensor([1], dtype=dtype)), shape)

    def leading_shape(input, axis):
        # The row statistics' shape: input.shape[:axis] (possibly ()).
        return op.Shape(input, end=axis)

    def batch_norm(input, mean, var, stats_dtype, weight, bias, eps):
        # BatchNormalization takes the parameters (T1) and the statistics (T2)
        # in dtypes of their own, as our kernel does (half input with float32
        # parameters): a single node, which runtimes fuse into a preceding Conv.
        # The kernel also accepts weight and bias of different dtypes; the
        # node wants one dtype for both: the wider.
        pdtype = _param_dtype({p.dtype for p in (weight, bias) if p is not None}, stats_dtype,
                              FLOAT, DOUBLE)
        channels = op.Shape(mean)
        if weight is None:
            weight = ones(pdtype, channels)
        if bias is None:
            bias = op.Expand(op.Constant(value=ir.tensor([0], dtype=pdtype)), channels)
        weight, bias = cast(weight, pdtype), cast(bias, pdtype)
        return op.BatchNormalization(input, weight, bias, mean, var, epsilon=eps,
                                     training_mode=0)

    def batch_norm_infer(input, mean, var, weight=None, bias=None, eps: float = 1e-5):
        # bnext::batch_norm_infer(input, mean, var, weight?, bias?, eps) -> Tensor.
        # (mean, var) must share a dtype in the node: the wider one.
        stats_dtype = mean.dtype
        if mean.dtype != var.dtype:
            stats_dtype = DOUBLE if DOUBLE in (mean.dtype, var.dtype) else FLOAT
            mean, var = cast(mean, stats_dtype), cast(var, stats_dtype)
        return batch_norm(input, mean, var, stats_dtype, weight, bias, eps)

    def batch_norm_train(input, weight=None, bias=None, eps: float = 1e-5):
        # bnext::batch_norm_train -> (out, mean, var): normalisation with the
        # batch's statistics (biased variance), which eval mode uses too when
        # the layer tracks no running statistics (track_running_stats=False).
        # mean and var: (C,), in the opmath dtype.
        stat = opmath(input.dtype)
        rank = len(input.shape)
        axes = op.Constant(value=ir.tensor([0] + list(range(2, rank)), dtype=ir.DataType.INT64))
        x = cast(input, stat)
        mean = op.ReduceMean(x, axes, keepdims=1)
        centered = op.Sub(x, mean)
        var = op.ReduceMean(op.Mul(centered, centered), axes, keepdims=1)
        flat = op.Constant(value=ir.tensor([-1], dtype=ir.DataType.INT64))
        mean, var = op.Reshape(mean, flat), op.Reshape(var, flat)
        return batch_norm(input, mean, var, stat, weight, bias, eps), mean, var

    def layer_norm_fwd(input, normalized_shape: Sequence[int], weight=None, bias=None,
                       eps: float = 1e-5):
        # bnext::layer_norm_fwd -> (out, mean, rstd); mean and rstd have the
        # input's leading shape, in the opmath dtype.
        axis = -len(normalized_shape)
        params = [p for p in (weight, bias) if p is not None]
        # LayerNormalization wants X, Scale and B of one dtype. Half input
        # with float32 parameters: normalise in float32, round once, as the
        # kernel does.
        compute = input.dtype
        if any(p.dtype != input.dtype for p in params):
            compute = opmath(input.dtype) if all(
                p.dtype in (input.dtype, opmath(input.dtype)) for p in params) else DOUBLE
        x = cast(input, compute)
        if weight is None:
            weight = ones(compute, op.Shape(input, start=axis))
        y, mean, inv_std = op.LayerNormalization(
            x, cast(weight, compute), cast(bias, compute), axis=axis, epsilon=eps)
        stat_dtype = opmath(input.dtype)
        lead = leading_shape(input, axis)
        return (
            cast(y, input.dtype),
            cast(op.Reshape(mean, lead), stat_dtype),
            cast(op.Reshape(inv_std, lead), stat_dtype),
        )

    def rms_norm_fwd(input, normalized_shape: Sequence[int], weight=None, eps: float = 1e-6):
        # bnext::rms_norm_fwd -> (out, rstd); rstd has the input's leading
        # shape, in the opmath dtype. As torch: normalise in the opmath dtype,
        # multiply by the weight in the wider of that and the weight's dtype,
        # round once to the input's dtype.
        n = len(normalized_shape)
        axis = -n
        stat = opmath(input.dtype)
        x = cast(input, stat)
        axes = op.Constant(value=ir.tensor(list(range(-n, 0)), dtype=ir.DataType.INT64))
        mean_square = op.ReduceMean(op.Mul(x, x), axes, keepdims=1)
        # eps as a 1-element tensor, not a scalar: the exporter's optimiser
        # (onnxscript's add_0 rule) deletes Add(x, c) for a scalar |c| <= 1e-8,
        # such as float64's default eps, which turns all-zero rows into NaN.
        rstd = op.Reciprocal(op.Sqrt(op.Add(mean_square, op.Constant(
            value=ir.tensor([eps], dtype=stat)))))
        # float64 is left to the decomposition: onnxruntime's RMSNormalization
        # computes in float32 (its stash_type) whatever the input.
        if use_rms_normalization:
            _check_exporting_opset(opset_version)
        if use_rms_normalization and input.dtype != DOUBLE and (
                weight is None or weight.dtype in (input.dtype, FLOAT)):
            # One dtype for X and scale (onnxruntime's expansion of the node
            # fails on half X with float32 scale): float32 when they differ,
            # which is torch's computation dtype anyway.
            compute = input.dtype if weight is None else weight.dtype
            scale = weight if weight is not None else ones(
                compute, op.Shape(input, start=axis))
            y = op23.RMSNormalization(cast(input, compute), scale, axis=axis, epsilon=eps)
        else:
            y = op.Mul(x, rstd)
            if weight is not None:
                wide = DOUBLE if DOUBLE in (stat, weight.dtype) else stat
                y = op.Mul(cast(y, wide), cast(weight, wide))
        # rstd is dropped by the exporter's optimiser where unused.
        return cast(y, input.dtype), op.Reshape(rstd, leading_shape(input, axis))

    def training_op(name):
        def refuse(*args, **kwargs):
            raise RuntimeError(_TRAINING_MESSAGE.format(op=name))

        refuse.__name__ = name.replace("::", "_").replace(".", "_")
        return refuse

    table = {
        _ops.batch_norm_infer.default: batch_norm_infer,
        _ops.batch_norm_train.default: batch_norm_train,
        _ops.layer_norm_fwd.default: layer_norm_fwd,
        _ops.rms_norm_fwd.default: rms_norm_fwd,
    }
    for packet in ("batch_renorm_train", "batch_norm_update_stats"):
        op_packet = getattr(_ops, packet, None)
        if op_packet is None:
            continue
        for overload in op_packet.overloads():
            target = getattr(op_packet, overload)
            table[target] = training_op(target.name())
    register_legacy_symbolics()
    return table


# --- legacy TorchScript exporter (torch.onnx.export(..., dynamo=False)) -----

_LEGACY_REGISTERED = False


def register_legacy_symbolics() -> None:
    """Registers, once, the symbolic functions of bnext::batch_norm_infer,
    batch_norm_train, layer_norm_fwd and rms_norm_fwd with the legacy
    TorchScript exporter (torch.onnx.export(..., dynamo=False), deprecated by
    torch; its registry is global), for opset_version >= 17 (below: an error
    saying so). The training-only operators get symbolics that fail with a
    message asking for model.eval()."""
    global _LEGACY_REGISTERED
    if _LEGACY_REGISTERED:
        return
    from torch.onnx import register_custom_op_symbolic

    for name, fn in _legacy_symbolics().items():
        register_custom_op_symbolic(name, fn, _MIN_OPSET)
        # Below opset 17 (no LayerNormalization): a clear error, not the
        # exporter's "unsupported operator".
        register_custom_op_symbolic(name, _legacy_opset_too_low(name), 1)
    _LEGACY_REGISTERED = True


def _legacy_opset_too_low(name):
    def refuse(g, *args):
        raise RuntimeError(
            f"torch_bnext exports {name} to ONNX with opset_version >= {_MIN_OPSET}; got "
            f"{g.opset}. Pass opset_version={_MIN_OPSET} or higher to torch.onnx.export."
        )

    return refuse


def _legacy_symbolics():
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import JitScalarType

    FLOAT, DOUBLE = JitScalarType.FLOAT, JitScalarType.DOUBLE

    def dtype_of(value):
        return JitScalarType.from_value(value, JitScalarType.UNDEFINED)

    def opmath(dtype):
        return DOUBLE if dtype == DOUBLE else FLOAT

    def cast(g, value, dtype):
        if value is None or dtype_of(value) == dtype:
            return value
        return g.op("Cast", value, to_i=dtype.onnx_type())

    def const(g, values, dtype):
        return g.op("Constant", value_t=torch.tensor(values, dtype=dtype.dtype()))

    def ones(g, dtype, shape):
        return g.op("Expand", const(g, [1], dtype), shape)

    def lead(g, input, axis):
        return g.op("Shape", input, end_i=axis)

    def optional(value):
        return None if sh._is_none(value) else value

    def batch_norm(g, input, mean, var, stats_dtype, weight, bias, eps):
        pdtype = _param_dtype({dtype_of(p) for p in (weight, bias) if p is not None}, stats_dtype,
                              FLOAT, DOUBLE)
        channels = g.op("Shape", mean)
        if weight is None:
            weight = ones(g, pdtype, channels)
        if bias is None:
            bias = g.op("Expand", const(g, [0], pdtype), channels)
        return g.op("BatchNormalization", input, cast(g, weight, pdtype), cast(g, bias, pdtype),
                    mean, var, epsilon_f=eps)

    @sh.parse_args("v", "v", "v", "v", "v", "f")
    def batch_norm_infer(g, input, mean, var, weight, bias, eps):
        stats_dtype = dtype_of(mean)
        if dtype_of(mean) != dtype_of(var):
            stats_dtype = DOUBLE if DOUBLE in (dtype_of(mean), dtype_of(var)) else FLOAT
            mean, var = cast(g, mean, stats_dtype), cast(g, var, stats_dtype)
        return batch_norm(g, input, mean, var, stats_dtype, optional(weight), optional(bias), eps)

    @sh.parse_args("v", "v", "v", "f")
    def batch_norm_train(g, input, weight, bias, eps):
        # As in onnx_translations: the batch's statistics (biased variance).
        stat = opmath(dtype_of(input))
        axes = [0] + list(range(2, sh._get_tensor_rank(input)))
        x = cast(g, input, stat)

        def reduce_mean(v):
            if g.opset >= 18:
                return g.op("ReduceMean", v, g.op(
                    "Constant", value_t=torch.tensor(axes, dtype=torch.int64)), keepdims_i=1)
            return g.op("ReduceMean", v, axes_i=axes, keepdims_i=1)

        mean = reduce_mean(x)
        centered = g.op("Sub", x, mean)
        var = reduce_mean(g.op("Mul", centered, centered))
        flat = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        mean, var = g.op("Reshape", mean, flat), g.op("Reshape", var, flat)
        return (batch_norm(g, input, mean, var, stat, optional(weight), optional(bias), eps),
                mean, var)

    @sh.parse_args("v", "is", "v", "v", "f")
    def layer_norm_fwd(g, input, normalized_shape, weight, bias, eps):
        weight, bias = optional(weight), optional(bias)
        axis = -len(normalized_shape)
        xdtype = dtype_of(input)
        params = [p for p in (weight, bias) if p is not None]
        compute = xdtype
        if any(dtype_of(p) != xdtype for p in params):
            compute = opmath(xdtype) if all(
                dtype_of(p) in (xdtype, opmath(xdtype)) for p in params) else DOUBLE
        x = cast(g, input, compute)
        if weight is None:
            weight = ones(g, compute, g.op("Shape", input, start_i=axis))
        inputs = [x, cast(g, weight, compute)] + ([cast(g, bias, compute)] if bias is not None
                                                 else [])
        y, mean, inv_std = g.op("LayerNormalization", *inputs, axis_i=axis, epsilon_f=eps,
                                outputs=3)
        stat = opmath(xdtype)
        shape = lead(g, input, axis)
        return (cast(g, y, xdtype), cast(g, g.op("Reshape", mean, shape), stat),
                cast(g, g.op("Reshape", inv_std, shape), stat))

    @sh.parse_args("v", "is", "v", "f")
    def rms_norm_fwd(g, input, normalized_shape, weight, eps):
        weight = optional(weight)
        n = len(normalized_shape)
        xdtype = dtype_of(input)
        stat = opmath(xdtype)
        x = cast(g, input, stat)
        axes = list(range(-n, 0))
        square = g.op("Mul", x, x)
        if g.opset >= 18:  # axes became an input in opset 18
            mean_square = g.op("ReduceMean", square, g.op(
                "Constant", value_t=torch.tensor(axes, dtype=torch.int64)), keepdims_i=1)
        else:
            mean_square = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
        # A 1-element eps, as in onnx_translations (see there).
        rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_square, const(g, [eps], stat))))
        y = g.op("Mul", x, rstd)
        if weight is not None:
            wdtype = DOUBLE if dtype_of(weight) == DOUBLE else stat
            y = g.op("Mul", cast(g, y, wdtype), cast(g, weight, wdtype))
        return cast(g, y, xdtype), g.op("Reshape", rstd, lead(g, input, -n))

    def training_op(name):
        def refuse(g, *args):
            raise RuntimeError(_TRAINING_MESSAGE.format(op=name))

        return refuse

    table = {
        "bnext::batch_norm_infer": batch_norm_infer,
        "bnext::batch_norm_train": batch_norm_train,
        "bnext::layer_norm_fwd": layer_norm_fwd,
        "bnext::rms_norm_fwd": rms_norm_fwd,
    }
    for name in ("batch_renorm_train", "batch_norm_update_stats"):
        table[f"bnext::{name}"] = training_op(f"bnext::{name}")
    return table
