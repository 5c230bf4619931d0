"""Opt-in support for torch's deprecated TorchScript exporter
(torch.onnx.export(..., dynamo=False)), whose registry of symbolic functions
is global::

    torch_bnext.onnx.register_legacy_symbolics()
    torch.onnx.export(model.eval(), (x,), f, dynamo=False, opset_version=17)

The symbolics run torch_bnext.onnx's translations, the ones the dynamo
exporter uses, on a graph builder over this exporter's GraphContext.
"""

from __future__ import annotations

import torch
from torch.onnx import JitScalarType, register_custom_op_symbolic
from torch.onnx import symbolic_helper as sh

from .onnx import (
    _MIN_OPSET,
    _TRAINING_OPS,
    _batch_norm_infer,
    _batch_norm_train,
    _layer_norm_fwd,
    _refuse_training_op,
    _rms_norm_fwd,
)

__all__ = ["register_legacy_symbolics"]


class _TorchScriptGraph:
    FLOAT, DOUBLE, INT64 = JitScalarType.FLOAT, JitScalarType.DOUBLE, JitScalarType.INT64

    def __init__(self, g):
        self._g = g
        self.opset = g.opset

    def op(self, op_type, *inputs, outputs=1, **attributes):
        # ONNX omits absent trailing inputs; the exporter types attributes by
        # a suffix (only ints, lists of ints and floats occur here).
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        typed = {f"{k}_{'f' if isinstance(v, float) else 'i'}": v for k, v in attributes.items()}
        return self._g.op(op_type, *inputs, outputs=outputs, **typed)

    def constant(self, values, dtype):
        return self._g.op("Constant", value_t=torch.tensor(values, dtype=dtype.dtype()))

    def cast(self, value, dtype):
        return self._g.op("Cast", value, to_i=dtype.onnx_type())

    def dtype(self, value):
        return JitScalarType.from_value(value, JitScalarType.UNDEFINED)

    def rank(self, value):
        return sh._get_tensor_rank(value)

    def reduce_mean(self, value, axes):
        if self.opset >= 18:
            return self.op("ReduceMean", value, self.constant(axes, self.INT64), keepdims=1)
        return self.op("ReduceMean", value, axes=axes, keepdims=1)


def _optional(value):
    return None if sh._is_none(value) else value


@sh.parse_args("v", "v", "v", "v", "v", "f")
def _batch_norm_infer_symbolic(g, input, mean, var, weight, bias, eps):
    return _batch_norm_infer(
        _TorchScriptGraph(g), input, mean, var, _optional(weight), _optional(bias), eps
    )


@sh.parse_args("v", "v", "v", "f")
def _batch_norm_train_symbolic(g, input, weight, bias, eps):
    return _batch_norm_train(_TorchScriptGraph(g), input, _optional(weight), _optional(bias), eps)


@sh.parse_args("v", "is", "v", "v", "f")
def _layer_norm_fwd_symbolic(g, input, normalized_shape, weight, bias, eps):
    return _layer_norm_fwd(
        _TorchScriptGraph(g), input, normalized_shape, _optional(weight), _optional(bias), eps
    )


@sh.parse_args("v", "is", "v", "f")
def _rms_norm_fwd_symbolic(g, input, normalized_shape, weight, eps):
    return _rms_norm_fwd(_TorchScriptGraph(g), input, normalized_shape, _optional(weight), eps)


def _opset_too_low(name):
    # A clear error rather than the exporter's "unsupported operator".
    def refuse(g, *args):
        raise RuntimeError(
            f"torch_bnext exports {name} to ONNX with opset_version >= {_MIN_OPSET}; got "
            f"{g.opset}. Pass opset_version={_MIN_OPSET} or higher to torch.onnx.export."
        )

    return refuse


def register_legacy_symbolics() -> None:
    """Registers the symbolic functions of bnext::batch_norm_infer,
    batch_norm_train, layer_norm_fwd and rms_norm_fwd with the legacy
    TorchScript exporter, for opset_version >= 17 (below: an error saying
    so). The training-only operators get symbolics that fail with a message
    asking for model.eval(). Calling it again changes nothing."""
    symbolics = {
        "bnext::batch_norm_infer": _batch_norm_infer_symbolic,
        "bnext::batch_norm_train": _batch_norm_train_symbolic,
        "bnext::layer_norm_fwd": _layer_norm_fwd_symbolic,
        "bnext::rms_norm_fwd": _rms_norm_fwd_symbolic,
    }
    for name in _TRAINING_OPS:
        symbolics[f"bnext::{name}"] = _refuse_training_op(f"bnext::{name}")
    for name, symbolic in symbolics.items():
        register_custom_op_symbolic(name, symbolic, _MIN_OPSET)
        register_custom_op_symbolic(name, _opset_too_low(name), 1)
