"""torch_bnext.fuse: a torch.fx pass that fuses Batch Norm with the activation
(and the residual add) that follow it in models written with separate
modules, such as torchvision's ResNet (``bn -> relu``, and ``bn -> add ->
relu`` at the end of each block)."""

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, adopt_tensors
from .modules.batch_norm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, fused_activation

# The Batch Norm classes the pass replaces, torch.nn's and our drop-ins, but
# no other subclass (its forward may do more).
_FUSED_CLASS = {
    nn.BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d,
    BatchNorm1d: BatchNormAct1d,
    BatchNorm2d: BatchNormAct2d,
    BatchNorm3d: BatchNormAct3d,
}
# Activations called as functions or methods: the module that computes them.
_FUNCTIONAL_ACTS = {
    F.relu: nn.ReLU,
    torch.relu: nn.ReLU,
    "relu": nn.ReLU,
    F.silu: nn.SiLU,
    F.hardswish: nn.Hardswish,
    F.relu6: nn.ReLU6,
}
_ADDS = (operator.add, operator.iadd, torch.add)


def _activation_module(node: fx.Node, modules: dict) -> Optional[nn.Module]:
    """The activation that `node` applies to its first argument, as a module
    the fused layer can hold, or None when the kernels cannot fuse it."""
    if node.op == "call_module":
        act = modules[node.target]
        return act if fused_activation(act) is not None else None
    if node.op in ("call_function", "call_method") and node.target in _FUNCTIONAL_ACTS:
        if len(node.args) != 1 or any(k != "inplace" for k in node.kwargs):
            return None
        return _FUNCTIONAL_ACTS[node.target]()
    if node.op == "call_function" and node.target is F.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return nn.LeakyReLU(slope) if isinstance(slope, (int, float)) else None
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _residual_of(add: fx.Node, bn: fx.Node) -> Optional[fx.Node]:
    """The other operand of `add` = bn + other (or other + bn), a tensor node."""
    if add.op != "call_function" or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None
    a, b = add.args
    other = b if a is bn else a if b is bn else None
    return other if isinstance(other, fx.Node) and other is not bn else None


def fuse(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model``'s forward as a torch.fx GraphModule in which every
    Batch Norm (torch.nn's BatchNorm1d/2d/3d or ours) whose output feeds only
    an activation the kernels fuse, or only ``+ residual`` whose sum feeds
    only such an activation, is one torch_bnext BatchNormAct layer:
    ``act(bn(x) [+ residual])`` in one pass. The fused layer takes the Batch
    Norm's place and its very Parameters and buffers, so ``state_dict`` keys
    and optimisers are unchanged; the activation modules are shared, not
    copied. Nothing else changes (a Batch Norm with other users is left
    alone).

    Raises RuntimeError naming the reason when torch.fx cannot trace the
    model (data-dependent control flow, for one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; the reason is in the message
        raise RuntimeError(
            f"torch_bnext.fuse: torch.fx cannot trace {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}. Fuse layers by hand (torch_bnext.BatchNormAct2d takes "
            "a residual) or trace a submodule that fx can."
        ) from exc
    modules = dict(traced.named_modules())
    calls = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for bn in list(traced.graph.nodes):
        if bn.op != "call_module" or calls[bn.target] != 1 or len(bn.args) != 1 or bn.kwargs:
            continue
        fused_class = _FUSED_CLASS.get(type(modules[bn.target]))
        nxt = _only_user(bn)
        if fused_class is None or nxt is None:
            continue
        residual = _residual_of(nxt, bn)
        act_node = _only_user(nxt) if residual is not None else nxt
        if act_node is None or act_node.args[:1] != ((nxt if residual is not None else bn),):
            continue
        act = _activation_module(act_node, modules)
        if act is None:
            continue
        _replace(traced, bn, modules[bn.target], fused_class, act, residual, act_node)
        for dead in (act_node, nxt, bn) if residual is not None else (act_node, bn):
            if not dead.users:
                traced.graph.erase_node(dead)
    traced.graph.lint()
    traced.recompile()
    return traced


def _replace(traced, bn_node, bn, fused_class, act, residual, act_node) -> None:
    fused = fused_class(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        act_layer=act,
        device="meta",
    )
    adopt_tensors(fused, bn)
    traced.set_submodule(bn_node.target, fused)
    with traced.graph.inserting_before(act_node):
        args = (bn_node.args[0],) if residual is None else (bn_node.args[0], residual)
        new = traced.graph.call_module(bn_node.target, args)
    act_node.replace_all_uses_with(new)
