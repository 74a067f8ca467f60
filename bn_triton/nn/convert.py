"""Rewriting models onto bn_triton's layers: convert_batchnorm (class swap, in place) and
fuse_batchnorm_activations (a batch norm and the activation after it, found in nn.Sequential
and, with torch.fx, in forward code such as ResNet's relu(bn(x) + identity)), looking past the
placeholders (nn.Identity, dropouts, timm's DropBlock and DropPath) that models put between a
batch norm and its activation."""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops import epilogue
from ..ops.epilogue import Activation, activation_of_module
from .ghost import (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, GhostBatchNormAct1d,
                    GhostBatchNormAct2d, GhostBatchNormAct3d)
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                      BatchNormAct3d)
from .renorm import (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormAct1d,
                     BatchRenormAct2d, BatchRenormAct3d)
from .sync import SyncBatchNormAct, to_sync

_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                 nn.BatchNorm3d: BatchNorm3d}
# The batch norms fusion may replace: exactly these classes (a subclass may compute anything).
_FUSED = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d,
          nn.BatchNorm3d: BatchNormAct3d, BatchNorm1d: BatchNormAct1d,
          BatchNorm2d: BatchNormAct2d, BatchNorm3d: BatchNormAct3d,
          # The variants keep their statistics: their fused forms (r_max, d_max, the limits
          # buffer or virtual_batch_size come along with the layer's state).
          BatchRenorm1d: BatchRenormAct1d, BatchRenorm2d: BatchRenormAct2d,
          BatchRenorm3d: BatchRenormAct3d, GhostBatchNorm1d: GhostBatchNormAct1d,
          GhostBatchNorm2d: GhostBatchNormAct2d, GhostBatchNorm3d: GhostBatchNormAct3d}

# timm's modules, found by the module that defines them (timm is never imported here: a model
# holding one has imported it). timm 0.9+ defines them in timm.layers, older releases in
# timm.models.layers.
_TIMM_PACKAGES = ("timm.layers", "timm.models.layers")
# timm's norm + act layers -> bn_triton's counterpart (convert_batchnorm(timm=True)) and its
# synced one (with sync=True); None where bn_triton has none at sync=False (timm's
# SyncBatchNormAct stays unless sync=True, as torch's nn.SyncBatchNorm does).
# FrozenBatchNormAct2d has no bn_triton counterpart and is left as it is.
_TIMM_NORM_ACT = {"BatchNormAct1d": BatchNormAct1d, "BatchNormAct2d": BatchNormAct2d,
                  "BatchNormAct3d": BatchNormAct3d, "SyncBatchNormAct": None}
# timm's own activation modules (its create_act_layer's gelu, sigmoid, tanh, and the fallbacks
# it uses where torch lacks a native one) -> the activation they compute.
_TIMM_ACTIVATIONS = {
    "activations": {"Swish": "silu", "Sigmoid": "sigmoid", "Tanh": "tanh", "GELU": "gelu",
                    "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu",
                    "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid", "Mish": "mish",
                    "HardMish": "hard_mish"},
    "activations_me": {"SwishMe": "silu", "MishMe": "mish", "HardSwishMe": "hardswish",
                       "HardSigmoidMe": "hardsigmoid", "HardMishMe": "hard_mish"},
}


def _timm_class(module: nn.Module, submodule: str) -> Optional[str]:
    """The class name of `module` where timm's `submodule` (e.g. 'drop') defines its class
    (exactly: a subclass defined elsewhere is not timm's), or None."""
    where = type(module).__module__
    for package in _TIMM_PACKAGES:
        if where == f"{package}.{submodule}":
            return type(module).__name__
    return None


def convert_batchnorm(module: nn.Module, sync: bool = False,
                      process_group: Optional[object] = None, timm: bool = False) -> nn.Module:
    """Make every torch.nn.BatchNorm1d/2d/3d in `module` (itself and nested) bn_triton's, and
    return `module`.

    The layers are converted in place: each keeps its parameters, buffers, hooks, training flag,
    device and dtype (an optimizer built before still holds the same parameters), and only
    its class changes. Only layers of exactly torch's three classes change: bn_triton's layers,
    nn.SyncBatchNorm and user subclasses of torch's classes are left as they are.

    sync=True: every nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm and bn_triton batch norm becomes
    bn_triton.SyncBatchNorm, and every BatchNormAct a SyncBatchNormAct (a fused layer stays
    fused), synchronizing over process_group (None: the whole world), the same way.

    timm=True: timm's BatchNormAct2d (and BatchNormAct1d/3d where the installed timm has
    them) become bn_triton's BatchNormAct of that dimension, fused, and with sync=True these
    and timm's SyncBatchNormAct become bn_triton's SyncBatchNormAct, in place and keeping
    their state_dict. The activation is timm's `act` submodule's (nn.Identity, or apply_act
    False: none); the layer loses its `act` and `drop` submodules, whose work the kernels do.
    A layer stays timm's where its act is one bn_triton does not fuse, its `drop` is not an
    identity in every mode (dropout with p > 0, DropBlock or DropPath with drop_prob > 0:
    bn_triton's layer has no place for it between the affine and the activation), or its
    act or drop has hooks. timm's FrozenBatchNormAct2d has no bn_triton counterpart and
    stays. Off by default: the converted layers are no longer timm's class, and timm's own
    helpers that look for it (freeze_batch_norm_2d, convert_sync_batchnorm) would take them
    for plain batch norms and drop the activation. Without timm imported (no model then
    holds its layers) the option does nothing; bn_triton never imports timm."""
    for layer in list(module.modules()):
        if timm and _timm_class(layer, "norm_act") in _TIMM_NORM_ACT:
            target = SyncBatchNormAct if sync else _TIMM_NORM_ACT[type(layer).__name__]
            activation = _activation_of_timm_layer(layer)
            if target is None or activation is None:
                continue
            for name in ("act", "drop"):
                layer._modules.pop(name, None)
            layer.__class__ = target
            _set_activation(layer, activation)
            if sync:
                layer.process_group = process_group
        elif sync and to_sync(layer, process_group):
            pass
        elif not sync and type(layer) in _REPLACEMENTS:
            layer.__class__ = _REPLACEMENTS[type(layer)]
    return module


def _activation_of_timm_layer(layer: nn.Module) -> Optional[Activation]:
    """What timm's norm + act layer applies after its batch norm, as bn_triton's Activation,
    or None where bn_triton's layer cannot compute the same (see convert_batchnorm)."""
    if set(layer._modules) - {"act", "drop"} or not isinstance(
            layer, nn.modules.batchnorm._BatchNorm):
        return None
    drop, act = layer._modules.get("drop"), layer._modules.get("act")
    if drop is not None and _placeholder_kind(drop) != _IDENTITY:
        return None
    if act is None:
        return epilogue.IDENTITY
    if _has_hooks(act):
        return None
    activation = _activation_of_module(act, allow_identity=True)
    if getattr(layer, "apply_act", True) is False:
        # No activation applied: timm's layer then holds an nn.Identity; one that says so
        # and holds another act is not one to guess about.
        return epilogue.IDENTITY if activation == epilogue.IDENTITY else None
    return activation


def fuse_batchnorm_activations(model: nn.Module) -> nn.Module:
    """`model` with every batch norm that feeds only a supported activation (or only an add
    that feeds only one: relu(bn(x) + identity)) replaced by bn_triton's BatchNormAct layer.

    - In an nn.Sequential, a batch norm followed by an activation module becomes the fused
      layer and the activation an nn.Identity, in place (indices and state_dict keys
      stay).
    - Elsewhere the model is traced with torch.fx (modules of torch.nn and bn_triton's stay
      calls, and so do timm's DropBlock2d, DropPath and activation modules); a graph with fused patterns comes back as a torch.fx.GraphModule holding
      the same submodules under the same names, the fused layers new modules sharing the
      batch norms' parameters and buffers (the given model itself is left computing as
      before). A model fx cannot trace has its children fused one by one instead.

    Activations: torch's modules that bn_triton fuses (epilogue.activation_of_module), timm's
    own activation modules, and in forward code their functions, in-place forms and tensor
    methods (F.relu, F.relu_, torch.relu_, x.relu_(), F.hardtanh(x, min_val, max_val),
    F.leaky_relu_, F.hardswish(x, inplace=True), ...; see _FUNCTIONS), each only where the
    installed epilogue knows the activation.

    Placeholders between the batch norm and the activation (before or after the residual
    add) are looked past and stay where they are, after the fused layer:
    - an identity in every mode: nn.Identity, a dropout with p = 0 (nn.Dropout, Dropout1d/2d/
      3d, AlphaDropout, FeatureAlphaDropout, and F.dropout... with p = 0 or training=False
      as traced), timm's DropBlock2d and DropPath and torchvision's StochasticDepth with a
      drop probability of 0;
    - a dropout with p > 0 (nn.Dropout, Dropout1d/2d/3d, F.dropout... traced with
      training=True), DropBlock2d without noise and DropPath or StochasticDepth with a drop
      probability > 0, which is an identity in eval only, and in training multiplies by a
      random mask s ≥ 0: fused across only for relu and leaky_relu, which commute with it
      (act(s·z) = s·act(z)), so that the dropout after the fused layer computes the same in
      both modes (for finite values), with the same random mask; and only where no residual
      is added after it (relu(drop(bn(x)) + r) needs the dropped value), nor in place where
      the fused layer keeps its output for backward (a residual with relu).
    Another placeholder, one with hooks, or one whose output is used elsewhere stops the
    fusion. An identity is never the fused activation: a batch norm followed by
    placeholders alone is not fused.

    What it cannot prove safe stays unfused: a batch norm whose output is used anywhere else,
    a layer or activation with hooks, a batch norm subclass, an activation it does not know,
    an add whose result is used elsewhere, and an in-place add that would write into the
    residual. A residual of another shape or dtype than the batch norm's output (a broadcast
    add) is added unfused by the layer at run time. The model's results do not change
    (beyond rounding: the fused layer rounds once)."""
    if isinstance(model, nn.Sequential):
        _fuse_sequential(model)
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):
        return model  # one call (a batch norm, a child of an untraceable model): nothing inside
    try:
        graph = tracer.trace(model)
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
    alone, and tracing into its forward could fail and leave the whole model unfused. The
    placeholders that read their training flag (timm's DropBlock2d and DropPath,
    torchvision's StochasticDepth) stay calls, so that the traced model drops in training
    and not in eval, as the model does; so do timm's activation modules (fusion knows them
    as modules, not as the ops of their forward)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, nn.modules.batchnorm._BatchNorm) or _is_drop_module(m)
                or _timm_activation_name(m) is not None or super().is_leaf_module(m, qualname))


def _fusable(module: nn.Module) -> bool:
    return type(module) in _FUSED and not _has_hooks(module)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _set_activation(layer: nn.Module, activation: Activation) -> None:
    """A fused layer's activation attributes (activation_param2: hardtanh's max_val, where the
    installed epilogue has a second parameter)."""
    layer.activation, layer.activation_param = activation.name, activation.param
    layer.activation_param2 = getattr(activation, "param2", 0.0)
    layer.memory_efficient = False


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
    _set_activation(fused, activation)
    return fused


# --- activations ---------------------------------------------------------------------------

def _make_activation(name: Optional[str], params: Optional[Dict[str, object]] = None
                     ) -> Optional[Activation]:
    """The Activation `name` with `params` by keyword (negative_slope, alpha, min_val,
    max_val) where the installed epilogue has it and takes them (epilogue.parse_activation:
    finite numbers, hardtanh's max_val > min_val, ...); None otherwise, and the call is left
    to compute (or refuse) itself, unfused."""
    if name is None or name not in epilogue.ACTIVATIONS:
        return None
    try:
        return epilogue.parse_activation(name, params)
    except ValueError:
        return None


def _activation_of_module(module: nn.Module, allow_identity: bool = False
                          ) -> Optional[Activation]:
    """The activation a module computes: torch's (epilogue.activation_of_module) or timm's
    own classes; None for another module, and for an identity unless allow_identity."""
    activation = activation_of_module(module)
    if activation is None:
        activation = _make_activation(_timm_activation_name(module))
    if activation is None or activation.name not in epilogue.ACTIVATIONS:
        return None
    if activation.name == "identity" and not allow_identity:
        return None
    return activation


def _timm_activation_name(module: nn.Module) -> Optional[str]:
    """The activation one of timm's own activation modules computes (exactly its class)."""
    for submodule, names in _TIMM_ACTIVATIONS.items():
        name = names.get(_timm_class(module, submodule))
        if name is not None:
            return name
    return None


class _Signature(NamedTuple):
    """How a function or method that is an activation takes its arguments after the input:
    `positional` ((keyword, default), in order), then `keyword_only`. `params` are the
    keywords that become the Activation's parameters (epilogue.parse_activation's keywords);
    `fixed` keywords must keep their value; every other keyword (inplace) changes nothing the
    fused layer computes."""
    name: str
    positional: Tuple[Tuple[str, object], ...] = ()
    keyword_only: Tuple[Tuple[str, object], ...] = ()
    params: Tuple[str, ...] = ()
    fixed: Tuple[Tuple[str, object], ...] = ()


_INPLACE = (("inplace", False),)
_HARDTANH = (("min_val", -1.0), ("max_val", 1.0))
# elu_ is torch._C._nn.elu_, which also takes elu's scale and input_scale (SELU's).
_ELU_ = (("alpha", 1.0), ("scale", 1.0), ("input_scale", 1.0))


def _signatures() -> Dict[Callable, _Signature]:
    """Every function of torch that is an activation bn_triton may fuse, with its signature
    (those the installed torch has)."""
    table = {
        "relu": (F.relu, _Signature("relu", _INPLACE)),
        "relu_": (F.relu_, _Signature("relu")),  # torch.relu_ too: the same builtin
        "torch.relu": (torch.relu, _Signature("relu")),
        "torch.relu_": (torch.relu_, _Signature("relu")),
        "relu6": (F.relu6, _Signature("relu6", _INPLACE)),
        "hardtanh": (F.hardtanh, _Signature("hardtanh", _HARDTANH + _INPLACE,
                                            params=("min_val", "max_val"))),
        "hardtanh_": (F.hardtanh_, _Signature("hardtanh", _HARDTANH,
                                              params=("min_val", "max_val"))),
        "hardswish": (F.hardswish, _Signature("hardswish", _INPLACE)),
        "hardsigmoid": (F.hardsigmoid, _Signature("hardsigmoid", _INPLACE)),
        "mish": (getattr(F, "mish", None), _Signature("mish", _INPLACE)),
        "silu": (F.silu, _Signature("silu", _INPLACE)),
        # gelu: the name is approximate's ('none': gelu, 'tanh': gelu_tanh)
        "gelu": (F.gelu, _Signature("gelu", keyword_only=(("approximate", "none"),))),
        "sigmoid": (F.sigmoid, _Signature("sigmoid")),
        "torch.sigmoid": (torch.sigmoid, _Signature("sigmoid")),
        "torch.sigmoid_": (torch.sigmoid_, _Signature("sigmoid")),
        "tanh": (F.tanh, _Signature("tanh")),
        "torch.tanh": (torch.tanh, _Signature("tanh")),
        "torch.tanh_": (torch.tanh_, _Signature("tanh")),
        "leaky_relu": (F.leaky_relu, _Signature("leaky_relu", (("negative_slope", 0.01),)
                                                + _INPLACE, params=("negative_slope",))),
        "leaky_relu_": (F.leaky_relu_, _Signature("leaky_relu", (("negative_slope", 0.01),),
                                                  params=("negative_slope",))),
        "elu": (F.elu, _Signature("elu", (("alpha", 1.0),) + _INPLACE, params=("alpha",))),
        "elu_": (F.elu_, _Signature("elu", _ELU_, params=("alpha",),
                                    fixed=(("scale", 1.0), ("input_scale", 1.0)))),
        "celu": (F.celu, _Signature("celu", (("alpha", 1.0),) + _INPLACE, params=("alpha",))),
        "torch.celu": (torch.celu, _Signature("celu", (("alpha", 1.0),), params=("alpha",))),
        "celu_": (F.celu_, _Signature("celu", (("alpha", 1.0),), params=("alpha",))),
        "selu": (F.selu, _Signature("selu", _INPLACE)),
        "torch.selu": (torch.selu, _Signature("selu")),
        "selu_": (F.selu_, _Signature("selu")),  # torch.selu_ too
    }
    return {function: signature for function, signature in table.values()
            if function is not None}


# Functions (call_function targets) and tensor methods (call_method targets; the input is
# self) that are an activation.
_FUNCTIONS = _signatures()
_METHODS = {"relu": _Signature("relu"), "relu_": _Signature("relu"),
            "sigmoid": _Signature("sigmoid"), "sigmoid_": _Signature("sigmoid"),
            "tanh": _Signature("tanh"), "tanh_": _Signature("tanh")}


def _bind(signature: _Signature, args: Tuple, kwargs: Dict[str, object]
          ) -> Optional[Dict[str, object]]:
    """The arguments after the input by keyword, defaults filled in; None where they do not
    fit the signature or one is not a constant (a value computed in the graph)."""
    bound = dict(signature.positional + signature.keyword_only)
    if len(args) > len(signature.positional):
        return None
    given = set()
    for (keyword, _), value in zip(signature.positional, args):
        bound[keyword] = value
        given.add(keyword)
    for keyword, value in kwargs.items():
        if keyword not in bound or keyword in given:
            return None
        bound[keyword] = value
    if not all(value is None or isinstance(value, (bool, int, float, str))
               for value in bound.values()):
        return None
    return bound


def _activation_of_call(signature: _Signature, args: Tuple, kwargs: Dict[str, object]
                        ) -> Optional[Activation]:
    bound = _bind(signature, args, kwargs)
    if bound is None or any(bound[keyword] != value for keyword, value in signature.fixed):
        return None
    if not isinstance(bound.get("inplace", False), bool):
        return None
    name = signature.name
    if name == "gelu":
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(bound["approximate"])
    return _make_activation(name, {keyword: bound[keyword] for keyword in signature.params})


def _activation_of_node(node: fx.Node, gm: fx.GraphModule, source: fx.Node
                        ) -> Optional[Activation]:
    """The activation `node` applies to `source` (its only tensor input), or None. An
    identity is none: fusing it gains nothing."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        activation = _activation_of_module(module)
        if activation is None or _has_hooks(module) or node.args != (source,) or node.kwargs:
            return None
        return activation
    if node.op == "call_method":
        signature = _METHODS.get(node.target)
    elif node.op == "call_function":
        signature = _FUNCTIONS.get(node.target)
    else:
        return None
    if signature is None or not node.args or node.args[0] is not source:
        return None
    return _activation_of_call(signature, node.args[1:], node.kwargs)


# --- placeholders --------------------------------------------------------------------------

# What a placeholder computes: _IDENTITY, its input in every mode; _SCALES, its input in eval
# and a non-negative random multiple of it in training (dropout's mask / (1 - p)), in place
# where _SCALES_IN_PLACE.
_IDENTITY, _SCALES, _SCALES_IN_PLACE = "identity", "scales", "scales in place"
# The activations that commute with such a scaling, act(s·z) = s·act(z) for s ≥ 0.
_COMMUTE_WITH_SCALING = ("relu", "leaky_relu")
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ALPHA_DROPOUTS = (nn.AlphaDropout, nn.FeatureAlphaDropout)
# F.dropout and kin, (input, p, training, inplace): the default of training, and whether
# they scale (the alpha dropouts do not: they also shift what they drop).
_DROPOUT_FUNCTIONS = {F.dropout: (True, True), F.dropout1d: (True, True),
                      F.dropout2d: (True, True), F.dropout3d: (True, True),
                      F.alpha_dropout: (False, False), F.feature_alpha_dropout: (False, False)}
_DROPOUT_SIGNATURES = {function: _Signature("dropout", (("p", 0.5), ("training", training),
                                                        ("inplace", False)))
                       for function, (training, _) in _DROPOUT_FUNCTIONS.items()}


def _is_drop_module(module: nn.Module) -> bool:
    """timm's DropBlock2d and DropPath, torchvision's StochasticDepth (exactly)."""
    return (_timm_class(module, "drop") in ("DropBlock2d", "DropPath")
            or (type(module).__name__ == "StochasticDepth"
                and type(module).__module__ == "torchvision.ops.stochastic_depth"))


def _scales(in_place: object) -> str:
    return _SCALES_IN_PLACE if in_place else _SCALES


def _placeholder_kind(module: nn.Module) -> Optional[str]:
    """What the placeholder module computes (see _IDENTITY), or None for another module or
    one with hooks."""
    if _has_hooks(module):
        return None
    cls = type(module)
    if cls is nn.Identity:
        return _IDENTITY
    if cls in _DROPOUTS or cls in _ALPHA_DROPOUTS:
        if module.p == 0:
            return _IDENTITY
        return _scales(module.inplace) if cls in _DROPOUTS else None
    if _timm_class(module, "drop") == "DropPath":
        return _IDENTITY if not module.drop_prob else _SCALES
    if _timm_class(module, "drop") == "DropBlock2d":
        if not module.drop_prob:
            return _IDENTITY
        return None if getattr(module, "with_noise", False) else _scales(
            getattr(module, "inplace", False))
    if cls.__name__ == "StochasticDepth" and cls.__module__ == \
            "torchvision.ops.stochastic_depth":
        return _IDENTITY if module.p == 0 else _SCALES
    return None


def _placeholder_of_node(node: fx.Node, gm: fx.GraphModule, source: fx.Node) -> Optional[str]:
    """What `node` computes of `source` if it is a placeholder (see _IDENTITY), or None."""
    if node.op == "call_module":
        if node.args != (source,) or node.kwargs:
            return None
        return _placeholder_kind(gm.get_submodule(node.target))
    if node.op != "call_function" or node.target not in _DROPOUT_SIGNATURES \
            or not node.args or node.args[0] is not source:
        return None
    bound = _bind(_DROPOUT_SIGNATURES[node.target], node.args[1:], node.kwargs)
    if bound is None or isinstance(bound["p"], bool) \
            or not isinstance(bound["p"], (int, float)):
        return None
    if bound["p"] == 0 or bound["training"] is False:  # an identity as traced
        return _IDENTITY
    if bound["training"] is not True or not _DROPOUT_FUNCTIONS[node.target][1]:
        return None
    return _scales(bound["inplace"])


def _looks_past(kinds: List[str], activation: Activation, residual_after: bool,
                keeps_output: bool) -> bool:
    """Whether the fused layer, followed by placeholders of these kinds, computes what the
    placeholders then the activation did (see fuse_batchnorm_activations)."""
    for kind in kinds:
        if kind == _IDENTITY:
            continue
        if activation.name not in _COMMUTE_WITH_SCALING or residual_after:
            return False
        if kind == _SCALES_IN_PLACE and keeps_output:
            return False
    return True


def _keeps_output(activation: Activation, has_residual: bool) -> bool:
    """Whether the fused layer keeps its output for backward (then nothing may write into it
    in place)."""
    return epilogue.dz_source(activation, has_residual, False) == "output"


# --- nn.Sequential -------------------------------------------------------------------------

def _fuse_sequential(sequential: nn.Sequential) -> None:
    layers = list(sequential._modules.items())
    for i, (_, bn) in enumerate(layers):
        if not _fusable(bn):
            continue
        j, kinds = i + 1, []
        while j < len(layers) and _placeholder_kind(layers[j][1]) is not None:
            kinds.append(_placeholder_kind(layers[j][1]))
            j += 1
        if j == len(layers):
            continue
        act_name, act = layers[j]
        activation = _activation_of_module(act)
        if activation is None or _has_hooks(act) or not _looks_past(
                kinds, activation, False, _keeps_output(activation, False)):
            continue
        bn.__class__ = _FUSED[type(bn)]
        _set_activation(bn, activation)
        sequential._modules[act_name] = nn.Identity()  # the placeholders stay, after bn


# --- torch.fx ------------------------------------------------------------------------------

_ADDS = (operator.add, operator.iadd, torch.add)
_IN_PLACE_ADDS = (operator.iadd,)
_ADD_METHODS = ("add", "add_")


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _follow_placeholders(value: fx.Node, gm: fx.GraphModule
                         ) -> Tuple[fx.Node, Optional[fx.Node], List[fx.Node], List[str]]:
    """From `value`, the chain of placeholders each the only user of the one before: (the
    last value, its only user or None, the placeholder nodes, their kinds)."""
    nodes, kinds = [], []
    user = _only_user(value)
    while user is not None:
        kind = _placeholder_of_node(user, gm, value)
        if kind is None:
            break
        nodes.append(user)
        kinds.append(kind)
        value, user = user, _only_user(user)
    return value, user, nodes, kinds


def _residual_of_add(add: fx.Node, value: fx.Node) -> Optional[fx.Node]:
    """The other operand of `add` where it adds `value` once and a residual node, nothing
    else (an in-place add must write into `value`, not into the residual), or None."""
    if add.op == "call_function" and add.target in _ADDS:
        in_place = add.target in _IN_PLACE_ADDS
    elif add.op == "call_method" and add.target in _ADD_METHODS:
        in_place = add.target == "add_"
    else:
        return None
    if add.kwargs or len(add.args) != 2 or list(add.args).count(value) != 1:
        return None
    if in_place and add.args[0] is not value:
        return None
    residual = add.args[1] if add.args[0] is value else add.args[0]
    return residual if isinstance(residual, fx.Node) else None


def _fuse_graph(gm: fx.GraphModule) -> bool:
    """Rewrite bn -> act and bn -> add(·, residual) -> act in gm's graph, past placeholders;
    whether any was."""
    fused_any = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _fusable(gm.get_submodule(node.target)):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        # bn -> placeholders (before) [-> add(·, residual) -> placeholders (after)] -> act
        value, user, before, kinds_before = _follow_placeholders(node, gm)
        if user is None:
            continue
        residual, add, after, kinds_after = _residual_of_add(user, value), None, [], []
        if residual is not None:
            add = user
            value, user, after, kinds_after = _follow_placeholders(add, gm)
            if user is None:
                continue
        activation = _activation_of_node(user, gm, value)
        if activation is None:
            continue
        keeps_output = _keeps_output(activation, residual is not None)
        if not (_looks_past(kinds_before, activation, residual is not None, keeps_output)
                and _looks_past(kinds_after, activation, False, keeps_output)):
            continue
        act_node = user
        bn = gm.get_submodule(node.target)
        parent_name, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, name,
                fused_layer(bn, activation))
        if residual is not None:
            # The residual may be computed after the batch norm (ResNet's downsample): the
            # fused call takes the add's place, after both of its inputs, and the
            # placeholders that were before the add (identities) follow it there.
            node.args = (node.args[0], residual)
            add.prepend(node)
            anchor = node
            for placeholder in before:
                anchor.append(placeholder)
                anchor = placeholder
            if after:
                after[0].replace_input_with(add, anchor)
            else:
                act_node.replace_input_with(add, anchor)
        chain = before + after
        act_node.replace_all_uses_with(chain[-1] if chain else node)
        gm.graph.erase_node(act_node)
        if add is not None:
            gm.graph.erase_node(add)
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
