"""bn_triton.batch_norm: torch.nn.functional.batch_norm's signature, semantics and errors,
computed by the Triton kernels."""
import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .dispatch import TORCH, backend
from .ops import library
from .ops.epilogue import (IDENTITY, Activation, check_memory_efficient, parse_activation,
                           torch_activation)
from .ops.plan import accumulation_dtype, kernel_ready

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
               running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, activation: Optional[str] = None,
               activation_kwargs: Optional[Mapping[str, object]] = None,
               residual: Optional[torch.Tensor] = None,
               memory_efficient: bool = False) -> torch.Tensor:
    """Drop-in for torch.nn.functional.batch_norm; with the keywords, the fused
    act(batch_norm(input) + residual) in the launches of batch norm alone.

    activation: None (identity) or a name of bn_triton.ops.epilogue.ACTIVATIONS ("relu",
    "leaky_relu", "elu", "celu", "selu", "relu6", "hardtanh", "hardsigmoid", "hardswish",
    "hard_mish", "silu", "quick_gelu", "mish", "gelu", "gelu_tanh", "sigmoid", "tanh"), its
    parameters in activation_kwargs ({"negative_slope": 0.01} for leaky_relu, {"alpha": 1.0}
    for elu and celu, {"min_val": -1.0, "max_val": 1.0} for hardtanh).
    residual: a tensor of the input's shape, dtype and device, in any memory format, added
    after the affine and before the activation. memory_efficient: save the output instead of
    the input for backward (In-Place ABN); it scales by |γ| + eps and takes an invertible
    activation and no residual (see bn_triton.ops.epilogue).

    Runs the Triton kernels where bn_triton.backend(input) says so, the same composition of
    torch's ops otherwise. Bad arguments raise torch's exception types (ValueError for the
    activation and the mode) before any kernel runs or any buffer is written."""
    act = parse_activation(activation, activation_kwargs)
    check_epilogue_args(input, residual, act, memory_efficient)
    if backend(input) == TORCH:
        return composed_batch_norm(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps, residual, act, memory_efficient)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    return apply_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps, residual=residual, activation=act,
                            memory_efficient=memory_efficient)


def check_epilogue_args(input: torch.Tensor, residual: Optional[torch.Tensor],
                        activation: Activation, memory_efficient: bool) -> None:
    """Raise for a residual that does not match the input, or a memory-saving mode that cannot
    recover x̂ from the output."""
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a Tensor, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise RuntimeError(f"residual must have the input's shape {tuple(input.shape)}, "
                               f"got {tuple(residual.shape)}")
        if residual.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but residual "
                               f"is on {residual.device} and input is on {input.device}")
        if residual.dtype != input.dtype:
            raise RuntimeError(f"residual must have the input's dtype {input.dtype}, got "
                               f"{residual.dtype}")
    if memory_efficient:
        check_memory_efficient(activation, residual is not None)


def composed_batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                        running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], training: bool, momentum: float,
                        eps: float, residual: Optional[torch.Tensor] = None,
                        activation: Activation = IDENTITY,
                        memory_efficient: bool = False) -> torch.Tensor:
    """act(F.batch_norm(...) + residual) in torch's ops: what the fused call computes, where
    no kernel serves it (a CPU tensor without the interpreter, an empty input)."""
    if memory_efficient and weight is not None:
        weight = weight.abs() + eps
    output = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                          eps)
    if residual is not None:
        output = output + residual
    return torch_activation(activation)(output)


def composed_batch_renorm(input: torch.Tensor, running_mean: torch.Tensor,
                          running_var: torch.Tensor, weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], momentum: float, eps: float,
                          renorm_limits: torch.Tensor,
                          residual: Optional[torch.Tensor] = None,
                          activation: Activation = IDENTITY) -> torch.Tensor:
    """Batch Renormalization's training forward (arXiv:1702.03275, Algorithm 1) in torch's
    ops, where no kernel serves it (a CPU tensor without the interpreter, torch.func's
    transforms): μ_B, σ²_B (biased) of the batch; r = clip(σ_B/σ, 1/r_max, r_max) and
    d = clip((μ_B - running_mean)/σ, -d_max, d_max) without gradient, σ from the running
    variance before this batch; act(γ·(x̂·r + d) + β + residual); then torch's running update
    (unbiased variance). In the accumulation dtype, cast once to the input's."""
    dtype = accumulation_dtype(input.dtype)
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    x = input.to(dtype)
    var, mean = torch.var_mean(x, dims, correction=0)
    with torch.no_grad():
        r_max, d_max = renorm_limits.to(dtype).unbind()
        std = torch.sqrt(running_var.to(dtype) + eps)
        r = torch.clamp(torch.sqrt(var + eps) / std, 1.0 / r_max, r_max)
        d = torch.clamp((mean - running_mean.to(dtype)) / std, -d_max, d_max)
        count = x.numel() // x.size(1)
        running_mean.copy_((1 - momentum) * running_mean + momentum * mean)
        running_var.copy_((1 - momentum) * running_var + momentum * var * count / (count - 1))
    z = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    z = z * r.reshape(shape) + d.reshape(shape)
    if weight is not None:
        z = z * weight.to(dtype).reshape(shape)
    if bias is not None:
        z = z + bias.to(dtype).reshape(shape)
    z = z.to(input.dtype)
    if residual is not None:
        z = z + residual
    return torch_activation(activation)(z)


def composed_ghost_batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                              running_var: Optional[torch.Tensor],
                              weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              momentum: float, eps: float, virtual_batch_size: int,
                              residual: Optional[torch.Tensor] = None,
                              activation: Activation = IDENTITY) -> torch.Tensor:
    """Ghost batch norm's training forward in torch's ops, where no kernel serves it: each
    chunk of torch.split(input, virtual_batch_size) normalized by F.batch_norm with its own
    statistics, then one running update with the mean over the chunks of their means and
    unbiased variances (torch's momentum rule)."""
    chunks = torch.split(input, virtual_batch_size)
    output = torch.cat([F.batch_norm(chunk, None, None, weight, bias, True, 0.0, eps)
                        for chunk in chunks])
    if running_mean is not None:
        dims = [0, *range(2, input.dim())]
        with torch.no_grad():
            stats = [torch.var_mean(chunk.to(accumulation_dtype(input.dtype)), dims,
                                    correction=1) for chunk in chunks]
            var = torch.stack([v for v, _ in stats]).mean(0)
            mean = torch.stack([m for _, m in stats]).mean(0)
            running_mean.copy_((1 - momentum) * running_mean + momentum * mean)
            running_var.copy_((1 - momentum) * running_var + momentum * var)
    if residual is not None:
        output = output + residual
    return torch_activation(activation)(output)


def check_ghost_args(input: torch.Tensor, virtual_batch_size: int) -> None:
    """Raise torch's error for a virtual batch with one value per channel (the whole batch's
    check, run by check_batch_norm_args, covers the rest)."""
    spatial = input.shape[2:]
    values = torch.Size(spatial).numel()
    N = input.shape[0]
    last = N - (-(-N // virtual_batch_size) - 1) * virtual_batch_size if N else 0
    for run in {min(N, virtual_batch_size), last}:
        if run and run * values == 1:
            size = torch.Size([run, input.shape[1], *spatial])
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {size}")


def check_batch_norm_args(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                          running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], training: bool, eps: float,
                          synced: bool = False) -> None:
    """Raise what torch.nn.functional.batch_norm raises for these arguments, or nothing.

    In torch's order: F.batch_norm's own checks (values per channel, eps), then, for non-empty
    input only (torch returns an empty input's output before checking anything else), those
    of its kernels. synced (SyncBatchNorm across ranks): one value per channel is allowed
    locally, as torch's SyncBatchNorm allows it."""
    if training:
        size = input.size()
        if input.dim() > 2:
            channels = size[1]  # numel // C: a tenth of the cost of building torch.Size(size[2:])
            values_per_channel = (input.numel() // channels if channels
                                  else size[0] * math.prod(size[2:]))
        else:
            values_per_channel = size[0]
        if values_per_channel == 1 and not synced:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {size}")
        if not eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:
        return
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dtype not in _FLOAT_DTYPES:
        type_name = {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
                     torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}.get(
                         input.dtype, str(input.dtype).replace("torch.", ""))
        raise NotImplementedError(f'"batch_norm" not implemented for \'{type_name}\'')
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    channels = input.size(1) if input.dim() > 1 else 0
    given = (("weight", weight), ("bias", bias), ("running_mean", running_mean),
             ("running_var", running_var))
    for name, t in given:
        if t is None:
            continue
        if t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if t.dim() != 1:
            raise RuntimeError(f"{name} should be a 1-D tensor of {channels} elements, "
                               f"got shape {tuple(t.shape)}")
    if input.dim() < 2:
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    device, dtype = input.device, input.dtype
    param_dtype, mixed = None, False
    for name, t in given:
        if t is None:
            continue
        if t.device != device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is on "
                               f"{t.device} and input is on {device}")
        if param_dtype is None:
            param_dtype = t.dtype
        elif t.dtype != param_dtype:
            mixed = True
    if param_dtype is not None and (mixed or not (
            param_dtype == dtype or (param_dtype == torch.float32 and dtype in _HALF_DTYPES))):
        found = ", ".join(f"{name}={t.dtype}" for name, t in given if t is not None)
        raise RuntimeError(f"mixed dtype: weight, bias, running_mean and running_var must share "
                           f"one dtype, the input's ({dtype})"
                           f"{' or float32' if dtype in _HALF_DTYPES else ''}; got {found}")


def apply_batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                     running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], training: bool, momentum: float,
                     eps: float, num_batches_tracked: Optional[torch.Tensor] = None, *,
                     residual: Optional[torch.Tensor] = None,
                     activation: Optional[Activation] = None,
                     memory_efficient: bool = False,
                     group_name: Optional[str] = None,
                     renorm_limits: Optional[torch.Tensor] = None,
                     virtual_batch_size: Optional[int] = None) -> torch.Tensor:
    """Batch norm (and its epilogue) of checked arguments through bn_triton's ops. With
    num_batches_tracked given, the running-average factor is 1/num_batches_tracked, read on
    the device (the modules' momentum=None). With group_name (SyncBatchNorm, training), the
    statistics span the ranks of that process group, an empty input included. With
    renorm_limits (training): Batch Renormalization (library.batch_norm), and with
    virtual_batch_size ghost batch norm, each composed of torch's ops under torch.func's
    transforms and forward-mode AD."""
    if input.numel() == 0 and group_name is None:
        # torch returns an empty input's output (a clone, scaled by γ and shifted by β) before
        # any kernel runs, and leaves the running statistics alone: take exactly that route.
        return composed_batch_norm(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps, residual, activation or IDENTITY,
                                   memory_efficient)
    # The one copy made: a view whose spatial dims no single stride describes (x[..., ::2])
    # becomes contiguous here, once, so that forward and backward read the same copy. A
    # tensor under torch.func cannot be asked its memory format (vmap: "NYI"): the ops' vmap
    # rules fold it into a plain tensor, and the launches make that kernel-ready.
    transformed = (torch._C._are_functorch_transforms_active()
                   or torch.autograd.forward_ad._current_level >= 0)
    if (renorm_limits is not None or virtual_batch_size is not None) and training and \
            transformed:
        if num_batches_tracked is not None:
            momentum = 1.0 / float(num_batches_tracked)
        if virtual_batch_size is not None:
            return composed_ghost_batch_norm(input, running_mean, running_var, weight, bias,
                                             momentum, eps, virtual_batch_size, residual,
                                             activation or IDENTITY)
        return composed_batch_renorm(input, running_mean, running_var, weight, bias, momentum,
                                     eps, renorm_limits, residual, activation or IDENTITY)
    if not torch._C._are_functorch_transforms_active():
        input = kernel_ready(input)
    return library.batch_norm(input, weight, bias, running_mean, running_var,
                              num_batches_tracked, training, momentum, eps, residual,
                              activation, memory_efficient, group_name, renorm_limits,
                              virtual_batch_size)
