"""Rewriting models onto bn_triton's layers: convert_batchnorm (class swap, in place) and
fuse_batchnorm_activations (a batch norm and the activation after it, found in nn.Sequential
and, with torch.fx, in forward code such as ResNet's relu(bn(x) + identity))."""
from __future__ import annotations

import operator
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .epilogue import Activation, activation_of_module
from .ghost import (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, GhostBatchNormAct1d,
                    GhostBatchNormAct2d, GhostBatchNormAct3d)
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                      BatchNormAct3d)
from .renorm import (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormAct1d,
                     BatchRenormAct2d, BatchRenormAct3d)

_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                 nn.BatchNorm3d: BatchNorm3d}
_FUSED_CLASSES = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)
# What convert_batchnorm(sync=True) turns into bn_triton's sync layers (exactly these classes).
_TO_SYNC = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNorm1d,
            BatchNorm2d, BatchNorm3d, *_FUSED_CLASSES)
# The batch norms fusion may replace: exactly these classes (a subclass may compute anything).
_FUSED = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d,
          nn.BatchNorm3d: BatchNormAct3d, BatchNorm1d: BatchNormAct1d,
          BatchNorm2d: BatchNormAct2d, BatchNorm3d: BatchNormAct3d,
          # The variants keep their statistics: their fused forms (r_max, d_max, the limits
          # buffer or virtual_batch_size come along with the layer's state).
          BatchRenorm1d: BatchRenormAct1d, BatchRenorm2d: BatchRenormAct2d,
          BatchRenorm3d: BatchRenormAct3d, GhostBatchNorm1d: GhostBatchNormAct1d,
          GhostBatchNorm2d: GhostBatchNormAct2d, GhostBatchNorm3d: GhostBatchNormAct3d}


def convert_batchnorm(module: nn.Module, sync: bool = False,
                      process_group: Optional[object] = None) -> nn.Module:
    """Make every torch.nn.BatchNorm1d/2d/3d in `module` (itself and nested) bn_triton's, and
    return `module`.

    The layers are converted in place: each keeps its parameters, buffers, hooks, training flag,
    device and dtype (an optimizer built before still holds the same parameters), and only
    its class changes. Only layers of exactly torch's three classes change: bn_triton's layers,
    nn.SyncBatchNorm and user subclasses of torch's classes are left as they are.

    sync=True: every nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm and bn_triton batch norm becomes
    bn_triton.SyncBatchNorm, and every BatchNormAct a SyncBatchNormAct (a fused layer stays
    fused), synchronizing over process_group (None: the whole world), the same way."""
    from .sync import SyncBatchNorm, SyncBatchNormAct

    for layer in module.modules():
        if sync and type(layer) in _TO_SYNC:
            layer.__class__ = SyncBatchNormAct if type(layer) in _FUSED_CLASSES \
                else SyncBatchNorm
            layer.process_group = process_group
        elif not sync and type(layer) in _REPLACEMENTS:
            layer.__class__ = _REPLACEMENTS[type(layer)]
    return module


def fuse_batchnorm_activations(model: nn.Module) -> nn.Module:
    """`model` with every batch norm that feeds only a supported activation (or only an add
    that feeds only one: relu(bn(x) + identity)) replaced by bn_triton's BatchNormAct layer.

    - In an nn.Sequential, a batch norm directly followed by an activation module becomes the
      fused layer and the activation an nn.Identity, in place (indices and state_dict keys
      stay).
    - Elsewhere the model is traced with torch.fx (modules of torch.nn and bn_triton's stay
      calls); a graph with fused patterns comes back as a torch.fx.GraphModule holding the same
      submodules under the same names, the fused layers new modules sharing the batch norms'
      parameters and buffers (the given model itself is left computing as before). A model
      fx cannot trace has its children fused one by one instead.

    What it cannot prove safe stays unfused: a batch norm whose output is used anywhere else,
    a layer or activation with hooks, a batch norm subclass, an activation it does not know,
    and an add whose result is used elsewhere. A residual of another shape or dtype than the
    batch norm's output (a broadcast add) is added unfused by the layer at run time. The
    model's results do not change (beyond rounding: the fused layer rounds once)."""
    if isinstance(model, nn.Sequential):
        _fuse_sequential(model)
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable (data-dependent control flow, say)
        for name, child in model.named_children():
            fused = fuse_batchnorm_activations(child)
            if fused is not child:
                setattr(model, name, fused)
        return model
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    if not _fuse_graph(gm):
        return model
    _copy_training_flags(model, gm)
    return gm


class _Tracer(fx.Tracer):
    """torch's tracer, with user subclasses of torch's BatchNorm kept as calls too, as torch's
    classes and bn_triton's layers (modules.traced_as_leaf) are: fusion leaves a subclass
    alone, and tracing into its forward could fail and leave the whole model unfused."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(
            m, qualname)


def _fusable(module: nn.Module) -> bool:
    return type(module) in _FUSED and not _has_hooks(module)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def fused_layer(bn: nn.Module, activation: Activation) -> nn.Module:
    """A BatchNormAct layer of bn's dimension sharing bn's parameters and buffers (the same
    tensors), with its hyperparameters and training flag."""
    cls = _FUSED[type(bn)]
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    fused.__dict__.update({k: v for k, v in bn.__dict__.items()
                           if k not in ("_parameters", "_buffers", "_modules")})
    fused._parameters = dict(bn._parameters)
    fused._buffers = dict(bn._buffers)
    fused._modules = dict(bn._modules)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
                  "_load_state_dict_pre_hooks"):
        if hasattr(bn, hooks):
            setattr(fused, hooks, type(getattr(bn, hooks))())
    fused.activation, fused.activation_param = activation.name, activation.param
    fused.memory_efficient = False
    return fused


def _fuse_sequential(sequential: nn.Sequential) -> None:
    layers = list(sequential._modules.items())
    for (bn_name, bn), (act_name, act) in zip(layers, layers[1:]):
        activation = activation_of_module(act)
        if activation is None or not _fusable(bn) or _has_hooks(act):
            continue
        bn.__class__ = _FUSED[type(bn)]
        bn.activation, bn.activation_param = activation.name, activation.param
        bn.memory_efficient = False
        sequential._modules[act_name] = nn.Identity()


# Functions and methods that are an activation, with how to read their parameter.
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu",
              torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
              F.tanh: "tanh", F.leaky_relu: "leaky_relu", F.elu: "elu"}
_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_ADDS = (operator.add, operator.iadd, torch.add)


def _activation_of_node(node: fx.Node, gm: fx.GraphModule, source: fx.Node
                        ) -> Optional[Activation]:
    """The activation `node` applies to `source` (its only tensor input), or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        activation = activation_of_module(module)
        if activation is None or _has_hooks(module) or node.args != (source,) or node.kwargs:
            return None
        return activation
    if node.op == "call_method":
        name = _METHODS.get(node.target)
        return Activation(name) if name and node.args == (source,) and not node.kwargs else None
    if node.op != "call_function" or node.args[:1] != (source,):
        return None
    name = _FUNCTIONS.get(node.target)
    if name is None:
        return None
    options = dict(zip(("param",), node.args[1:]), **node.kwargs)
    options.pop("inplace", None)
    if name == "leaky_relu":
        return Activation(name, float(options.pop("negative_slope", options.pop("param", 0.01))))
    if name == "elu":
        return Activation(name, float(options.pop("alpha", options.pop("param", 1.0))))
    if name == "gelu":
        approximate = options.pop("approximate", "none")
        name = "gelu_tanh" if approximate == "tanh" else "gelu"
    if options or name not in ("relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh"):
        return None
    return Activation(name)


def _fuse_graph(gm: fx.GraphModule) -> bool:
    """Rewrite bn -> act and bn -> add(·, residual) -> act in gm's graph; whether any was."""
    fused_any = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _fusable(gm.get_submodule(node.target)):
            continue
        if len(node.args) != 1 or node.kwargs or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        residual, act_node = None, user
        if user.op == "call_function" and user.target in _ADDS and len(user.users) == 1:
            operands = list(user.args[:2])
            if user.kwargs or len(user.args) != 2 or operands.count(node) != 1:
                continue
            residual = operands[1] if operands[0] is node else operands[0]
            if not isinstance(residual, fx.Node):
                continue
            act_node = next(iter(user.users))
        activation = _activation_of_node(act_node, gm, user if residual is not None else node)
        if activation is None:
            continue
        bn = gm.get_submodule(node.target)
        parent_name, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, name,
                fused_layer(bn, activation))
        if residual is not None:
            # The residual may be computed after the batch norm (ResNet's downsample): the
            # fused call takes the add's place, after both of its inputs.
            node.args = (node.args[0], residual)
            user.prepend(node)
        act_node.replace_all_uses_with(node)
        gm.graph.erase_node(act_node)
        if residual is not None:
            gm.graph.erase_node(user)
        fused_any = True
    if fused_any:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return fused_any


def _copy_training_flags(model: nn.Module, gm: fx.GraphModule) -> None:
    """The GraphModule's own containers take the training flags of the modules they stand
    for (a model may hold frozen layers in eval mode)."""
    originals: Dict[str, nn.Module] = dict(model.named_modules())
    for name, module in gm.named_modules():
        original = originals.get(name)
        if original is not None and type(module) is nn.Module:
            module.training = original.training
    gm.training = model.training


__all__ = ["convert_batchnorm", "fuse_batchnorm_activations", "fused_layer"]
