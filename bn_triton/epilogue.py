"""The fused epilogue of a batch norm, y = act(x̂·γ + β + residual): which activations exist,
their parameters, and what backward must keep to differentiate them.

The kernels compute act and act' (kernels/activations.py); this module decides, from the
activation alone, what forward saves and where backward's dz = dy·act'(z) comes from:

- no activation ("identity"): dz = dy, nothing to keep beyond what batch norm keeps (x);
- no residual: z = x̂·γ + β is recomputed from x, which backward reads anyway, so the
  activation costs neither memory nor traffic;
- with a residual, z also needs the residual: where act' is a function of the output (relu,
  leaky_relu with slope ≥ 0, elu with alpha > 0) backward reads the saved output instead,
  otherwise the saved residual;
- memory_efficient (In-Place ABN, Rota Bulò et al., CVPR 2018): only the output is kept, and
  x̂ = (act⁻¹(y) - β)/γ̂ is recovered from it, for the invertible activations (identity,
  leaky_relu with slope > 0, elu with alpha > 0). γ̂ = |γ| + eps, as that paper does, so that
  a weight at or near zero never makes the inversion divide by zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

# name -> (its parameter's keyword, default), or None for a parameterless activation.
ACTIVATIONS = {
    "identity": None, "relu": None, "leaky_relu": ("negative_slope", 0.01),
    "elu": ("alpha", 1.0), "silu": None, "gelu": None, "gelu_tanh": None, "sigmoid": None,
    "tanh": None,
}


@dataclass(frozen=True)
class Activation:
    """An activation by name, with its parameter (leaky_relu's negative_slope, elu's alpha;
    0.0 for the others)."""
    name: str = "identity"
    param: float = 0.0

    @property
    def grad_from_output(self) -> bool:
        """Whether act'(z) is a function of y = act(z)."""
        return (self.name in ("identity", "relu")
                or (self.name == "leaky_relu" and self.param >= 0)
                or (self.name == "elu" and self.param > 0))

    @property
    def invertible(self) -> bool:
        """Whether z can be recovered from y = act(z)."""
        return (self.name == "identity" or (self.name == "leaky_relu" and self.param > 0)
                or (self.name == "elu" and self.param > 0))


IDENTITY = Activation()


def parse_activation(activation: Optional[str],
                     activation_kwargs: Optional[Mapping[str, object]] = None) -> Activation:
    """The Activation named `activation` (None: identity) with `activation_kwargs`; ValueError
    for an unknown name, an unknown keyword, or a parameter that is not a finite number."""
    name = "identity" if activation is None else activation
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    kwargs = dict(activation_kwargs or {})
    spec = ACTIVATIONS[name]
    allowed = () if spec is None else (spec[0],)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"activation {name!r} takes "
                         f"{'no parameters' if not allowed else 'only ' + repr(allowed[0])}, "
                         f"got {', '.join(map(repr, unknown))}")
    if spec is None:
        return Activation(name)
    keyword, default = spec
    value = kwargs.get(keyword, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"activation {name!r}: {keyword} must be a finite number, got {value!r}")
    return Activation(name, float(value))


def check_memory_efficient(activation: Activation, has_residual: bool) -> None:
    """ValueError unless the memory-saving mode can recover x̂ from the output alone."""
    if not activation.invertible:
        raise ValueError(
            f"memory_efficient=True needs an invertible activation (identity, leaky_relu with "
            f"negative_slope > 0, elu with alpha > 0) to recover its input from the output; "
            f"got {activation.name!r}" + (f" with parameter {activation.param}"
                                          if activation.name in ("leaky_relu", "elu") else ""))
    if has_residual:
        raise ValueError("memory_efficient=True recovers x̂ from the output alone, which a "
                         "residual added before the activation prevents (it would have to be "
                         "kept too, saving nothing); pass memory_efficient=False")


def dz_source(activation: Activation, has_residual: bool, memory_efficient: bool) -> str:
    """Where backward's dz comes from (the kernels' DZ_FROM): 'dy', 'x', 'x_residual' or
    'output' (see the module docstring)."""
    if memory_efficient:
        return "output"
    if activation.name == "identity":
        return "dy"
    if not has_residual:
        return "x"
    return "output" if activation.grad_from_output else "x_residual"


def torch_activation(activation: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same activation as torch's function (the unfused composition, and the tests')."""
    name, param = activation.name, activation.param
    return {
        "identity": lambda t: t,
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, param),
        "elu": lambda t: F.elu(t, param),
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
    }[name]


# timm's names and torch's activation modules, for act_layer and for model fusion.
ALIASES = {"swish": "silu", "none": "identity"}
MODULES = {nn.Identity: "identity", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
           nn.SiLU: "silu", nn.GELU: "gelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
# Keywords of torch's activation modules (and timm's act_kwargs) that change nothing here.
IGNORED_KWARGS = ("inplace",)


def activation_of_layer(act_layer: Union[str, type, nn.Module, None],
                        act_kwargs: Optional[Mapping[str, object]] = None) -> Activation:
    """The Activation of timm's act_layer: a name ('relu', 'silu', 'swish', ...), one of
    torch's activation module classes (nn.ReLU, nn.SiLU, nn.GELU, ...) or an instance, with
    act_kwargs as that class takes them (negative_slope, alpha, approximate; inplace is
    ignored). ValueError for anything else."""
    kwargs = {k: v for k, v in dict(act_kwargs or {}).items() if k not in IGNORED_KWARGS}
    if act_layer is None:
        return parse_activation(None, kwargs)
    if isinstance(act_layer, str):
        name = act_layer.lower().replace("-", "_")
        return parse_activation(ALIASES.get(name, name), kwargs)
    if isinstance(act_layer, nn.Module):
        activation = activation_of_module(act_layer)
        if activation is None or kwargs:
            raise ValueError(f"act_layer {act_layer!r} is not an activation bn_triton fuses"
                             if activation is None else "act_kwargs with an act_layer instance")
        return activation
    if isinstance(act_layer, type) and act_layer in MODULES:
        name = MODULES[act_layer]
        if name == "gelu":
            approximate = kwargs.pop("approximate", "none")
            if approximate not in ("none", "tanh"):
                raise ValueError(f"nn.GELU approximate must be 'none' or 'tanh', got "
                                 f"{approximate!r}")
            name = "gelu_tanh" if approximate == "tanh" else "gelu"
        return parse_activation(name, kwargs)
    raise ValueError(f"act_layer must be a name of {', '.join(ACTIVATIONS)} or one of torch's "
                     f"activation modules ({', '.join(c.__name__ for c in MODULES)}), got "
                     f"{act_layer!r}")


def activation_of_module(module: nn.Module) -> Optional[Activation]:
    """The Activation a torch activation module computes (exactly its class, not a
    subclass), or None."""
    name = MODULES.get(type(module))
    if name is None:
        return None
    if name == "leaky_relu":
        return Activation(name, float(module.negative_slope))
    if name == "elu":
        return Activation(name, float(module.alpha))
    if name == "gelu":
        return Activation("gelu_tanh" if module.approximate == "tanh" else "gelu")
    return Activation(name)
