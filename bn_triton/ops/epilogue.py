"""The fused epilogue of a batch norm, y = act(x̂·γ + β + residual): which activations exist,
their parameters, and what backward must keep to differentiate them.

The kernels compute act and act' (kernels/activations.py); this module decides, from the
activation alone, what forward saves and where backward's dz = dy·act'(z) comes from:

- no activation ("identity"): dz = dy, nothing to keep beyond what batch norm keeps (x);
- no residual: z = x̂·γ + β is recomputed from x, which backward reads anyway, so the
  activation costs neither memory nor traffic;
- with a residual, z also needs the residual: where act' is a function of the output (relu,
  leaky_relu with slope ≥ 0, elu with alpha > 0, celu, selu) backward reads the saved output
  instead, otherwise the saved residual (one read either way). The clamps (relu6, hardtanh,
  hardsigmoid) take z: their act' is a function of the exact output, but the saved one is
  rounded to the output dtype, where z within half an ulp inside a bound reads as the bound,
  and a bound the dtype cannot represent (hardtanh's min_val = 0.1 in float16) misreads every
  clamped value; the others (hardswish, hard_mish, mish, silu, quick_gelu, the gelus, sigmoid,
  tanh) are not functions of their output at all;
- memory_efficient (In-Place ABN, Rota Bulò et al., CVPR 2018): only the output is kept, and
  x̂ = (act⁻¹(y) - β)/γ̂ is recovered from it, for the invertible activations (identity,
  leaky_relu with slope > 0, elu with alpha > 0, celu, selu). γ̂ = |γ| + eps, as that paper
  does, so that a weight at or near zero never makes the inversion divide by zero. The clamps
  (relu6, hardtanh, hardsigmoid) are not invertible: every value past a bound maps to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

# name -> its parameters' (keyword, default) pairs, in the order of Activation.param and
# Activation.param2; () for a parameterless activation. The names are torch's functions' and
# timm's (create_act_layer: quick_gelu, hard_mish; hard_sigmoid and hard_swish are ALIASES).
ACTIVATIONS = {
    "identity": (), "relu": (), "leaky_relu": (("negative_slope", 0.01),),
    "elu": (("alpha", 1.0),), "celu": (("alpha", 1.0),), "selu": (), "relu6": (),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)), "hardsigmoid": (), "hardswish": (),
    "hard_mish": (), "silu": (), "quick_gelu": (), "mish": (), "gelu": (), "gelu_tanh": (),
    "sigmoid": (), "tanh": (),
}


@dataclass(frozen=True)
class Activation:
    """An activation by name, with its parameters: param is leaky_relu's negative_slope, elu's
    and celu's alpha, hardtanh's min_val; param2 is hardtanh's max_val; 0.0 where unused."""
    name: str = "identity"
    param: float = 0.0
    param2: float = 0.0

    @property
    def grad_from_output(self) -> bool:
        """Whether act'(z) is taken from the saved y = act(z) (see the module docstring)."""
        return (self.name in ("identity", "relu", "celu", "selu")
                or (self.name == "leaky_relu" and self.param >= 0)
                or (self.name == "elu" and self.param > 0))

    @property
    def invertible(self) -> bool:
        """Whether z can be recovered from y = act(z)."""
        return (self.name in ("identity", "celu", "selu")
                or (self.name == "leaky_relu" and self.param > 0)
                or (self.name == "elu" and self.param > 0))


IDENTITY = Activation()


def _number(name: str, keyword: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"activation {name!r}: {keyword} must be a finite number, got {value!r}")
    return float(value)


def parse_activation(activation: Optional[str],
                     activation_kwargs: Optional[Mapping[str, object]] = None) -> Activation:
    """The Activation named `activation` (None: identity) with `activation_kwargs`; ValueError
    for an unknown name, an unknown keyword, a parameter that is not a finite number, celu's
    alpha = 0 (torch's celu divides by it) or hardtanh's max_val ≤ min_val (nn.Hardtanh
    refuses it)."""
    name = "identity" if activation is None else activation
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    kwargs = dict(activation_kwargs or {})
    spec = ACTIVATIONS[name]
    allowed = tuple(keyword for keyword, _ in spec)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        takes = ("no parameters" if not allowed else
                 "only " + " and ".join(repr(keyword) for keyword in allowed))
        raise ValueError(f"activation {name!r} takes {takes}, got {', '.join(map(repr, unknown))}")
    values = [_number(name, keyword, kwargs.get(keyword, default)) for keyword, default in spec]
    if name == "celu" and values[0] == 0:
        raise ValueError("activation 'celu': alpha must not be 0 (celu divides by it)")
    if name == "hardtanh" and not values[1] > values[0]:
        raise ValueError(f"activation 'hardtanh': max_val must be greater than min_val, got "
                         f"min_val={values[0]}, max_val={values[1]}")
    return Activation(name, *values)


def check_memory_efficient(activation: Activation, has_residual: bool) -> None:
    """ValueError unless the memory-saving mode can recover x̂ from the output alone."""
    if not activation.invertible:
        raise ValueError(
            f"memory_efficient=True needs an invertible activation (identity, leaky_relu with "
            f"negative_slope > 0, elu with alpha > 0, celu, selu) to recover its input from the "
            f"output; got {activation.name!r}" + (f" with parameter {activation.param}"
                                                  if activation.name in ("leaky_relu", "elu")
                                                  else ""))
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


def _quick_gelu(t: torch.Tensor) -> torch.Tensor:
    """timm's quick_gelu."""
    return t * torch.sigmoid(1.702 * t)


def _hard_mish(t: torch.Tensor) -> torch.Tensor:
    """timm's hard_mish."""
    return 0.5 * t * (t + 2).clamp(min=0, max=2)


def torch_activation(activation: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same activation as torch's function (the unfused composition, and the tests');
    timm's formula for quick_gelu and hard_mish, which torch does not have."""
    name, param, param2 = activation.name, activation.param, activation.param2
    return {
        "identity": lambda t: t,
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, param),
        "elu": lambda t: F.elu(t, param),
        "celu": lambda t: F.celu(t, param),
        "selu": F.selu,
        "relu6": F.relu6,
        "hardtanh": lambda t: F.hardtanh(t, param, param2),
        "hardsigmoid": F.hardsigmoid,
        "hardswish": F.hardswish,
        "hard_mish": _hard_mish,
        "silu": F.silu,
        "quick_gelu": _quick_gelu,
        "mish": F.mish,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
    }[name]


# timm's names and torch's activation modules, for act_layer and for model fusion. MODULES is
# looked up by exact type: nn.ReLU6 subclasses nn.Hardtanh and maps to relu6.
ALIASES = {"swish": "silu", "none": "identity", "hard_sigmoid": "hardsigmoid",
           "hard_swish": "hardswish"}
MODULES = {nn.Identity: "identity", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
           nn.CELU: "celu", nn.SELU: "selu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh",
           nn.Hardsigmoid: "hardsigmoid", nn.Hardswish: "hardswish", nn.SiLU: "silu",
           nn.Mish: "mish", nn.GELU: "gelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
# Keywords of torch's activation modules (and timm's act_kwargs) that change nothing here.
IGNORED_KWARGS = ("inplace",)


def activation_of_layer(act_layer: Union[str, type, nn.Module, None],
                        act_kwargs: Optional[Mapping[str, object]] = None) -> Activation:
    """The Activation of timm's act_layer: a name ('relu', 'silu', 'swish', ...), one of
    torch's activation module classes (nn.ReLU, nn.SiLU, nn.GELU, ...) or an instance, with
    act_kwargs as that class takes them (negative_slope, alpha, min_val and max_val,
    approximate; inplace is ignored). ValueError for anything else."""
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
    subclass), or None; None too for parameters the fused layer would refuse (celu's alpha =
    0, hardtanh's max_val ≤ min_val, one that is not finite), which torch's module is left to
    compute (or refuse) itself."""
    name = MODULES.get(type(module))
    if name is None:
        return None
    if name == "gelu":
        return Activation("gelu_tanh" if module.approximate == "tanh" else "gelu")
    keywords = {"leaky_relu": ("negative_slope",), "elu": ("alpha",), "celu": ("alpha",),
                "hardtanh": ("min_val", "max_val")}.get(name, ())
    try:
        return parse_activation(name, {keyword: getattr(module, keyword)
                                       for keyword in keywords})
    except ValueError:
        return None
