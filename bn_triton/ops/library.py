"""The torch.library operators of bn_triton: schemas, fake kernels and autograd, nothing else.

    bn_triton::batch_norm_forward(input, weight?, bias?, running_mean(a!)?, running_var(b!)?,
                                  num_batches_tracked?, training, momentum, eps)
        -> (output, mean, invstd)
    bn_triton::batch_norm_backward(grad_output, input, weight?, mean, invstd, training,
                                   output_mask[3], bias_dtype?)
        -> (grad_input, grad_weight, grad_bias)

(the schemas in full, with the epilogue's arguments, are the functions below), their
SyncBatchNorm forms sync_batch_norm_forward/backward, and Batch Renormalization's
batch_renorm_forward/backward and sync_batch_renorm_forward/backward, which add the (2,)
renorm_limits (r_max, d_max) and return and take the (2, C) r and d, and ghost batch norm's
ghost_batch_norm_forward/backward, which take virtual_batch_size and whose mean and invstd
are (num_runs, C).

These are what Dynamo, AOTAutograd, torch.export and the ATen switch (switch.py) see: Python
launch code and Triton's interpreter run inside the ops' kernels, never under a tracer. The ops
take arguments already checked against torch's rules (functional.py); below them everything is
shapes, strides and launches (launch.py).

Why `custom_op` and not `triton_op` + `wrap_triton`: a triton_op is traced by Inductor into its
own generated code, which helps where Inductor can add something to the kernels. Here it would
not: a call already runs in one or two launches whose plan is chosen in Python from the strides,
the split path keeps a per-stream ticket buffer alive across calls, and the tests run the same
ops on CPU tensors through Triton's interpreter, which Inductor cannot compile. An opaque op
keeps all of that out of every trace, and Inductor schedules it like an ATen kernel.

Why the forward is an op plus a thin autograd.Function, not `register_autograd`: the training
forward writes the running statistics in the same launch that computes the batch statistics
(the slab path is one launch in all), so the op mutates its inputs, and register_autograd
refuses ops that do. A functional form (the op returns the new statistics, copied into the
buffers by the caller) would add two copy launches per layer in eager mode, where the slab path
exists to save launches. So `BatchNormFunction` calls one op forward and one op backward; Dynamo
traces it into the graph as those two calls. The backward op mutates nothing and does use
register_autograd: its own backward (a second derivative, double_backward.py) is the same map
in torch's differentiable ops, so a gradient penalty works as with torch's batch norm.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import collectives, double_backward, forward_ad, launch
from ..dispatch import TORCH, backend
from .epilogue import IDENTITY, Activation, dz_source
from .plan import accumulation_dtype, empty_output

DOUBLE_BACKWARD_SYNC = (
    "bn_triton's SyncBatchNorm does not support double backward (a gradient of its gradient): "
    "its statistics span the ranks of the process group")
DOUBLE_BACKWARD_RENORM = (
    "bn_triton's Batch Renormalization does not support double backward (a gradient of its "
    "gradient)")
DOUBLE_BACKWARD_VARIANT = (
    "bn_triton's ghost batch norm does not support double backward (a gradient of its "
    "gradient)")
DOUBLE_BACKWARD_MEMORY_EFFICIENT = (
    "bn_triton's batch norm with memory_efficient=True does not support double backward (a "
    "gradient of its gradient): it keeps neither x nor z; pass memory_efficient=False")


def _require_kernels(op: str, input: torch.Tensor) -> None:
    if backend(input) == TORCH:
        raise RuntimeError(
            f"bn_triton::{op} runs Triton kernels: on CUDA tensors, or on CPU tensors when "
            f"TRITON_INTERPRET=1 was set before triton was imported; got a {input.device.type} "
            f"tensor (bn_triton.batch_norm and the modules take torch's own kernel there)")


@torch.library.custom_op("bn_triton::batch_norm_forward", mutates_args=("running_mean",
                                                                         "running_var"))
def batch_norm_forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                       running_var: Optional[torch.Tensor],
                       num_batches_tracked: Optional[torch.Tensor], training: bool,
                       momentum: float, eps: float, residual: Optional[torch.Tensor] = None,
                       activation: str = "identity", activation_param: float = 0.0,
                       memory_efficient: bool = False, activation_param2: float = 0.0
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """output = act(BN(input) + residual), and the statistics backward needs: mean and
    invstd = 1/sqrt(var + eps), (C,) in the accumulation dtype (float32; float64 for float64
    input), as ATen saves them.

    training: batch statistics; running_mean/running_var, when given, are updated in place with
    factor `momentum`, or 1/num_batches_tracked read on the device when num_batches_tracked is
    given (a module's momentum=None; the op only reads it). Otherwise the running statistics
    normalize and nothing is written. activation, activation_param, activation_param2 (last,
    so that calls and saved programs from before it keep their meaning): epilogue.Activation;
    memory_efficient scales by |γ| + eps. The output takes plan.output_format(input)."""
    _require_kernels("batch_norm_forward", input)
    return launch.batch_norm_forward(input, weight, bias, running_mean, running_var,
                                     num_batches_tracked, training, momentum, eps, residual,
                                     Activation(activation, activation_param,
                                                activation_param2), memory_efficient)


def _forward_fake(input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output and the (C,) statistics a forward op returns for `input`."""
    mean = input.new_empty((input.shape[1],), dtype=accumulation_dtype(input.dtype))
    return empty_output(input), mean, torch.empty_like(mean)


@batch_norm_forward.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
      eps, residual=None, activation="identity", activation_param=0.0, memory_efficient=False,
      activation_param2=0.0):
    return _forward_fake(input)


@torch.library.custom_op("bn_triton::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad_output: torch.Tensor, input: Optional[torch.Tensor],
                        output: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        mean: torch.Tensor, invstd: torch.Tensor, training: bool,
                        output_mask: List[bool], bias_dtype: Optional[torch.dtype],
                        has_residual: bool = False, activation: str = "identity",
                        activation_param: float = 0.0, memory_efficient: bool = False,
                        eps: float = 0.0, activation_param2: float = 0.0
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_input, grad_weight, grad_bias, grad_residual from what the forward kept (input; or
    output alone, memory_efficient; with output or residual where a residual and an
    activation meet, see epilogue.dz_source), mean and invstd: with batch statistics
    (training) or constant ones. Only what output_mask asks for is computed; the others come
    back as empty (0,) tensors (an op cannot return None), and so does grad_residual where it
    equals grad_output (no activation). grad_input and grad_residual take output_format of the
    input, grad_weight weight's dtype, grad_bias bias_dtype."""
    reference = output if memory_efficient else input
    _require_kernels("batch_norm_backward", reference)
    grads = launch.batch_norm_backward(grad_output, input, output, residual, weight, bias, mean,
                                       invstd, training, output_mask, bias_dtype, has_residual,
                                       Activation(activation, activation_param,
                                                  activation_param2),
                                       memory_efficient, eps)
    return tuple(grad if grad is not None else reference.new_empty((0,)) for grad in grads)


@batch_norm_backward.register_fake
def _backward_fake(grad_output, input, output, residual, weight, bias, mean, invstd, training,
                   output_mask, bias_dtype, has_residual=False, activation="identity",
                   activation_param=0.0, memory_efficient=False, eps=0.0, activation_param2=0.0):
    want_dx, want_dw, want_db, want_dr = output_mask
    reference = output if memory_efficient else input
    channels = (reference.shape[1],)
    writes_dz = has_residual and activation != "identity"
    return (empty_output(reference) if want_dx else reference.new_empty((0,)),
            weight.new_empty(channels) if want_dw else reference.new_empty((0,)),
            reference.new_empty(channels, dtype=bias_dtype) if want_db
            else reference.new_empty((0,)),
            empty_output(reference) if want_dr and writes_dz else reference.new_empty((0,)))


@torch.library.custom_op("bn_triton::sync_batch_norm_forward",
                         mutates_args=("running_mean", "running_var"))
def sync_batch_norm_forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                            running_var: Optional[torch.Tensor],
                            num_batches_tracked: Optional[torch.Tensor], momentum: float,
                            eps: float, group_name: str, residual: Optional[torch.Tensor] = None,
                            activation: str = "identity", activation_param: float = 0.0,
                            memory_efficient: bool = False, activation_param2: float = 0.0
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch_norm_forward in training whose statistics span the ranks of the process group
    named group_name (collectives.forward: one all_gather): output, mean, invstd over every
    rank, and their total count (a 0-d float64 tensor) for backward."""
    _require_kernels("sync_batch_norm_forward", input)
    return collectives.forward(input, weight, bias, running_mean, running_var,
                               num_batches_tracked, momentum, eps, group_name, residual,
                               Activation(activation, activation_param, activation_param2),
                               memory_efficient)


@sync_batch_norm_forward.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
      group_name, residual=None, activation="identity", activation_param=0.0,
      memory_efficient=False, activation_param2=0.0):
    return (*_forward_fake(input), input.new_empty((), dtype=torch.float64))


@torch.library.custom_op("bn_triton::sync_batch_norm_backward", mutates_args=())
def sync_batch_norm_backward(grad_output: torch.Tensor, input: Optional[torch.Tensor],
                             output: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                             weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                             mean: torch.Tensor, invstd: torch.Tensor, count: torch.Tensor,
                             output_mask: List[bool], bias_dtype: Optional[torch.dtype],
                             group_name: str, has_residual: bool = False,
                             activation: str = "identity", activation_param: float = 0.0,
                             memory_efficient: bool = False, eps: float = 0.0,
                             activation_param2: float = 0.0
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch_norm_backward of sync_batch_norm_forward (collectives.backward: one all_reduce
    when grad_input is asked for); grad_weight, grad_bias, grad_residual are this rank's."""
    reference = output if memory_efficient else input
    _require_kernels("sync_batch_norm_backward", reference)
    grads = collectives.backward(grad_output, input, output, residual, weight, bias, mean,
                                 invstd, count, output_mask, bias_dtype, group_name,
                                 has_residual,
                                 Activation(activation, activation_param, activation_param2),
                                 memory_efficient, eps)
    return tuple(grad if grad is not None else reference.new_empty((0,)) for grad in grads)


@sync_batch_norm_backward.register_fake
def _(grad_output, input, output, residual, weight, bias, mean, invstd, count, output_mask,
      bias_dtype, group_name, has_residual=False, activation="identity", activation_param=0.0,
      memory_efficient=False, eps=0.0, activation_param2=0.0):
    return _backward_fake(grad_output, input, output, residual, weight, bias, mean, invstd,
                          True, output_mask, bias_dtype, has_residual, activation,
                          activation_param, memory_efficient, eps, activation_param2)


@torch.library.custom_op("bn_triton::batch_renorm_forward",
                         mutates_args=("running_mean", "running_var"))
def batch_renorm_forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                         running_var: torch.Tensor, num_batches_tracked: Optional[torch.Tensor],
                         renorm_limits: torch.Tensor, momentum: float, eps: float,
                         residual: Optional[torch.Tensor] = None, activation: str = "identity",
                         activation_param: float = 0.0, activation_param2: float = 0.0
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch Renormalization's training forward (arXiv:1702.03275, Algorithm 1): output =
    act(γ·(x̂·r + d) + β + residual), mean, invstd as batch_norm_forward's, and renorm, the
    (2, C) r and d (accumulation dtype) computed from the running statistics before the
    update with the limits renorm_limits = (r_max, d_max), read on the device. The running
    statistics are updated as batch_norm_forward updates them."""
    _require_kernels("batch_renorm_forward", input)
    factors = torch.empty(2, input.shape[1], dtype=accumulation_dtype(input.dtype),
                          device=input.device)
    output, mean, invstd = launch.batch_norm_forward(
        input, weight, bias, running_mean, running_var, num_batches_tracked, True, momentum,
        eps, residual, Activation(activation, activation_param, activation_param2),
        renorm=launch.Renorm(factors, renorm_limits))
    return output, mean, invstd, factors


@batch_renorm_forward.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, renorm_limits,
      momentum, eps, residual=None, activation="identity", activation_param=0.0,
      activation_param2=0.0):
    output, mean, invstd = _forward_fake(input)
    return output, mean, invstd, mean.new_empty((2, input.shape[1]))


@torch.library.custom_op("bn_triton::batch_renorm_backward", mutates_args=())
def batch_renorm_backward(grad_output: torch.Tensor, input: torch.Tensor,
                          output: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                          weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          mean: torch.Tensor, invstd: torch.Tensor, renorm: torch.Tensor,
                          output_mask: List[bool], bias_dtype: Optional[torch.dtype],
                          has_residual: bool = False, activation: str = "identity",
                          activation_param: float = 0.0, eps: float = 0.0,
                          activation_param2: float = 0.0
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch_norm_backward (training) of batch_renorm_forward, r and d held constant: dx
    carries γ·r, dγ = r·Σdz·x̂ + d·Σdz, dβ = Σdz; the same outputs and conventions."""
    _require_kernels("batch_renorm_backward", input)
    grads = launch.batch_norm_backward(grad_output, input, output, residual, weight, bias, mean,
                                       invstd, True, output_mask, bias_dtype, has_residual,
                                       Activation(activation, activation_param,
                                                  activation_param2), False, eps,
                                       renorm=renorm)
    return tuple(grad if grad is not None else input.new_empty((0,)) for grad in grads)


@batch_renorm_backward.register_fake
def _(grad_output, input, output, residual, weight, bias, mean, invstd, renorm, output_mask,
      bias_dtype, has_residual=False, activation="identity", activation_param=0.0, eps=0.0,
      activation_param2=0.0):
    return _backward_fake(grad_output, input, output, residual, weight, bias, mean, invstd,
                          True, output_mask, bias_dtype, has_residual, activation,
                          activation_param, False, eps, activation_param2)


@torch.library.custom_op("bn_triton::sync_batch_renorm_forward",
                         mutates_args=("running_mean", "running_var"))
def sync_batch_renorm_forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                              bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                              running_var: torch.Tensor,
                              num_batches_tracked: Optional[torch.Tensor],
                              renorm_limits: torch.Tensor, momentum: float, eps: float,
                              group_name: str, residual: Optional[torch.Tensor] = None,
                              activation: str = "identity", activation_param: float = 0.0,
                              activation_param2: float = 0.0
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor, torch.Tensor]:
    """batch_renorm_forward whose statistics span the ranks of the process group named
    group_name (SyncBatchRenorm): output, mean, invstd and the total count as
    sync_batch_norm_forward's, and the (2, C) r and d of the merged statistics."""
    _require_kernels("sync_batch_renorm_forward", input)
    factors = torch.empty(2, input.shape[1], dtype=accumulation_dtype(input.dtype),
                          device=input.device)
    output, mean, invstd, count = collectives.forward(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
        group_name, residual, Activation(activation, activation_param, activation_param2),
        False, launch.Renorm(factors, renorm_limits))
    return output, mean, invstd, count, factors


@sync_batch_renorm_forward.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, renorm_limits,
      momentum, eps, group_name, residual=None, activation="identity", activation_param=0.0,
      activation_param2=0.0):
    output, mean, invstd = _forward_fake(input)
    return (output, mean, invstd, input.new_empty((), dtype=torch.float64),
            mean.new_empty((2, input.shape[1])))


@torch.library.custom_op("bn_triton::sync_batch_renorm_backward", mutates_args=())
def sync_batch_renorm_backward(grad_output: torch.Tensor, input: torch.Tensor,
                               output: Optional[torch.Tensor],
                               residual: Optional[torch.Tensor],
                               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                               mean: torch.Tensor, invstd: torch.Tensor, count: torch.Tensor,
                               renorm: torch.Tensor, output_mask: List[bool],
                               bias_dtype: Optional[torch.dtype], group_name: str,
                               has_residual: bool = False, activation: str = "identity",
                               activation_param: float = 0.0, eps: float = 0.0,
                               activation_param2: float = 0.0
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    """sync_batch_norm_backward of sync_batch_renorm_forward, r and d held constant."""
    _require_kernels("sync_batch_renorm_backward", input)
    grads = collectives.backward(grad_output, input, output, residual, weight, bias, mean,
                                 invstd, count, output_mask, bias_dtype, group_name,
                                 has_residual,
                                 Activation(activation, activation_param, activation_param2),
                                 False, eps, renorm)
    return tuple(grad if grad is not None else input.new_empty((0,)) for grad in grads)


@sync_batch_renorm_backward.register_fake
def _(grad_output, input, output, residual, weight, bias, mean, invstd, count, renorm,
      output_mask, bias_dtype, group_name, has_residual=False, activation="identity",
      activation_param=0.0, eps=0.0, activation_param2=0.0):
    return _backward_fake(grad_output, input, output, residual, weight, bias, mean, invstd,
                          True, output_mask, bias_dtype, has_residual, activation,
                          activation_param, False, eps, activation_param2)


@torch.library.custom_op("bn_triton::ghost_batch_norm_forward",
                         mutates_args=("running_mean", "running_var"))
def ghost_batch_norm_forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                             running_var: Optional[torch.Tensor],
                             num_batches_tracked: Optional[torch.Tensor],
                             virtual_batch_size: int, momentum: float, eps: float,
                             residual: Optional[torch.Tensor] = None,
                             activation: str = "identity", activation_param: float = 0.0,
                             activation_param2: float = 0.0
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ghost batch norm's training forward (kernels/ghost.py): output = act(BN_run(x) +
    residual) with every run of virtual_batch_size samples (torch.split's) normalized by its
    own statistics, mean and invstd (num_runs, C); the running statistics, when given,
    updated once with the mean over the runs of their means and unbiased variances."""
    _require_kernels("ghost_batch_norm_forward", input)
    return launch.ghost_batch_norm_forward(input, weight, bias, running_mean, running_var,
                                           num_batches_tracked, virtual_batch_size, momentum,
                                           eps, residual,
                                           Activation(activation, activation_param,
                                                      activation_param2))


@ghost_batch_norm_forward.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, virtual_batch_size,
      momentum, eps, residual=None, activation="identity", activation_param=0.0,
      activation_param2=0.0):
    num_runs = -(-input.shape[0] // virtual_batch_size)
    mean = input.new_empty((num_runs, input.shape[1]), dtype=accumulation_dtype(input.dtype))
    return empty_output(input), mean, torch.empty_like(mean)


@torch.library.custom_op("bn_triton::ghost_batch_norm_backward", mutates_args=())
def ghost_batch_norm_backward(grad_output: torch.Tensor, input: torch.Tensor,
                              output: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                              weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              mean: torch.Tensor, invstd: torch.Tensor,
                              virtual_batch_size: int, output_mask: List[bool],
                              bias_dtype: Optional[torch.dtype], has_residual: bool = False,
                              activation: str = "identity", activation_param: float = 0.0,
                              eps: float = 0.0, activation_param2: float = 0.0
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """batch_norm_backward (training) of ghost_batch_norm_forward: each run's dx from its
    own statistics and sums, dγ and dβ over every run; the same outputs and conventions."""
    _require_kernels("ghost_batch_norm_backward", input)
    grads = launch.batch_norm_backward(grad_output, input, output, residual, weight, bias, mean,
                                       invstd, True, output_mask, bias_dtype, has_residual,
                                       Activation(activation, activation_param,
                                                  activation_param2), False, eps,
                                       virtual_batch_size=virtual_batch_size)
    return tuple(grad if grad is not None else input.new_empty((0,)) for grad in grads)


@ghost_batch_norm_backward.register_fake
def _(grad_output, input, output, residual, weight, bias, mean, invstd, virtual_batch_size,
      output_mask, bias_dtype, has_residual=False, activation="identity", activation_param=0.0,
      eps=0.0, activation_param2=0.0):
    return _backward_fake(grad_output, input, output, residual, weight, bias, mean, invstd,
                          True, output_mask, bias_dtype, has_residual, activation,
                          activation_param, False, eps, activation_param2)


def _no_variant_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_VARIANT)


def _no_renorm_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_RENORM)


for _op in ("batch_renorm_backward", "sync_batch_renorm_backward"):
    torch.library.register_autograd(f"bn_triton::{_op}", _no_renorm_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
torch.library.register_autograd("bn_triton::ghost_batch_norm_backward",
                                _no_variant_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _setup_backward_of_backward(ctx, inputs, output):
    (grad_output, input, output_, residual, weight, bias, mean, invstd, training, _, _,
     has_residual, activation, activation_param, memory_efficient, eps, *rest) = inputs
    ctx.save_for_backward(grad_output, input, output_, residual, weight, bias, mean, invstd)
    ctx.training, ctx.eps, ctx.has_residual = training, eps, has_residual
    ctx.activation = Activation(activation, activation_param, rest[0] if rest else 0.0)
    ctx.num_inputs = len(inputs)
    ctx.memory_efficient = memory_efficient


def _backward_of_backward(ctx, *grads_of_grads):
    """Autograd's gradient of batch_norm_backward (a second derivative): double_backward."""
    if ctx.memory_efficient:
        raise RuntimeError(DOUBLE_BACKWARD_MEMORY_EFFICIENT)
    grads = double_backward.backward_of_backward(
        ctx.saved_tensors, grads_of_grads, ctx.training, ctx.eps, ctx.has_residual,
        ctx.activation)
    return (*grads, *[None] * (ctx.num_inputs - len(grads)))


torch.library.register_autograd("bn_triton::batch_norm_backward", _backward_of_backward,
                                setup_context=_setup_backward_of_backward)


class BatchNormBackwardFunction(torch.autograd.Function):
    """batch_norm_backward under torch.func's transforms: the op's autograd from
    register_autograd is an autograd.Function without setup_context, which the transforms
    refuse, so inside them the op runs below autograd through this one, whose backward is
    the same double backward, whose vmap is the op's batching rule and whose jvp is forward
    mode through double_backward.grads_in_torch (jacfwd of jacrev: hessian)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, output, residual, weight, bias, mean, invstd, training,
                output_mask, bias_dtype, has_residual, activation, activation_param,
                memory_efficient, eps, activation_param2):
        # output_mask comes as a string ("1101"): torch's generated vmap rule, with a jvp,
        # lines a list argument's items up with the tangents.
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.bn_triton.batch_norm_backward(
                grad_output, input, output, residual, weight, bias, mean, invstd, training,
                _mask(output_mask), bias_dtype, has_residual, activation, activation_param,
                memory_efficient, eps, activation_param2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_backward_of_backward(ctx, inputs, output)
        ctx.output_mask = _mask(inputs[9])
        ctx.save_for_forward(*inputs[:8])

    @staticmethod
    def backward(ctx, *grads_of_grads):
        return _backward_of_backward(ctx, *grads_of_grads)

    @staticmethod
    def jvp(ctx, *tangents):
        if ctx.memory_efficient:
            raise RuntimeError(DOUBLE_BACKWARD_MEMORY_EFFICIENT)
        primals = ctx.saved_tensors
        tangents = tangents[:8]

        def grads(*tensors):
            return double_backward.grads_in_torch(*tensors, ctx.training, ctx.eps,
                                                  ctx.has_residual, ctx.activation)

        # Only tensors with a tangent vary; the others enter as constants.
        varying = [i for i, t in enumerate(tangents) if t is not None and primals[i] is not None]

        def of_varying(*values):
            tensors = list(primals)
            for i, value in zip(varying, values):
                tensors[i] = value
            return grads(*tensors)

        _, t_grads = torch.func.jvp(of_varying, tuple(primals[i] for i in varying),
                                    tuple(tangents[i] for i in varying))
        reference = primals[1]
        return tuple(t.to(like.dtype) if wanted else reference.new_empty((0,))
                     for t, wanted, like in zip(t_grads, ctx.output_mask,
                                                (reference, primals[4] if primals[4] is not None
                                                 else reference, reference, reference)))


def _mask(flags: str) -> List[bool]:
    return [flag == "1" for flag in flags]


def _mask_string(output_mask: Sequence[bool]) -> str:
    return "".join("1" if wanted else "0" for wanted in output_mask)


class SyncBatchNormBackwardFunction(torch.autograd.Function):
    """sync_batch_norm_backward under torch.func's transforms (see BatchNormBackwardFunction):
    the op below autograd, its vmap the op's batching rule, no double backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, output, residual, weight, bias, mean, invstd, count,
                output_mask, bias_dtype, group_name, has_residual, activation,
                activation_param, memory_efficient, eps, activation_param2):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.bn_triton.sync_batch_norm_backward(
                grad_output, input, output, residual, weight, bias, mean, invstd, count,
                _mask(output_mask), bias_dtype, group_name, has_residual, activation,
                activation_param, memory_efficient, eps, activation_param2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx, *grads)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_SYNC)


torch.library.register_autograd("bn_triton::sync_batch_norm_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _save_for_backward(ctx, input: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                       output: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                       count: Optional[torch.Tensor], training: bool, eps: float,
                       activation: Activation, memory_efficient: bool,
                       group_name: Optional[str], renorm: Optional[torch.Tensor] = None,
                       virtual_batch_size: Optional[int] = None) -> None:
    """What backward needs, on ctx: mean, invstd, weight and what epilogue.dz_source names (x,
    never x̂; or y alone in the memory-saving mode; y or the residual where a residual meets
    an activation)."""
    dz_from = dz_source(activation, residual is not None, memory_efficient)
    keep_output = memory_efficient or dz_from == "output"
    keep_bias = memory_efficient or dz_from in ("x", "x_residual")
    ctx.save_for_backward(None if memory_efficient else input,
                          output if keep_output else None,
                          residual if dz_from == "x_residual" else None, weight,
                          bias if keep_bias else None, mean, invstd, count, renorm)
    ctx.group_name = group_name
    ctx.virtual_batch_size = virtual_batch_size if training else None
    ctx.training, ctx.eps = training, eps
    ctx.activation, ctx.activation_param = activation.name, activation.param
    ctx.activation_param2 = activation.param2
    ctx.epilogue_activation = activation  # the object itself: a frozen dataclass is slow to build
    ctx.memory_efficient, ctx.has_residual = memory_efficient, residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _input_grads(ctx, grad_output: torch.Tensor, through_ops: bool):
    """(grad_input, grad_weight, grad_bias, grad_residual) from what _save_for_backward kept,
    each None where autograd does not ask for it (ctx.needs_input_grad: input, weight, bias
    first, the residual tenth). through_ops: by the backward ops (differentiable again, and
    what a trace records), else by the launches themselves."""
    input, output, residual, weight, bias, mean, invstd, count, renorm = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # Without an activation d(residual) is grad_output itself: no kernel writes it.
    residual_from_kernel = ctx.has_residual and ctx.activation != "identity"
    output_mask = [needs[0], needs[1], needs[2], needs[9] and residual_from_kernel]
    epilogue = (ctx.has_residual, ctx.activation, ctx.activation_param, ctx.memory_efficient,
                ctx.eps, ctx.activation_param2)
    transformed = torch._C._are_functorch_transforms_active()
    if ctx.virtual_batch_size is not None and through_ops:
        grads = torch.ops.bn_triton.ghost_batch_norm_backward(
            grad_output, input, output, residual, weight, bias, mean, invstd,
            ctx.virtual_batch_size, output_mask, ctx.bias_dtype, ctx.has_residual,
            ctx.activation, ctx.activation_param, ctx.eps, ctx.activation_param2)
    elif renorm is not None and ctx.group_name is not None:
        grads = torch.ops.bn_triton.sync_batch_renorm_backward(
            grad_output, input, output, residual, weight, bias, mean, invstd, count, renorm,
            output_mask, ctx.bias_dtype, ctx.group_name, ctx.has_residual, ctx.activation,
            ctx.activation_param, ctx.eps, ctx.activation_param2)
    elif renorm is not None and through_ops:  # (torch.func runs renorm in torch's ops)
        grads = torch.ops.bn_triton.batch_renorm_backward(
            grad_output, input, output, residual, weight, bias, mean, invstd, renorm,
            output_mask, ctx.bias_dtype, ctx.has_residual, ctx.activation,
            ctx.activation_param, ctx.eps, ctx.activation_param2)
    elif ctx.group_name is not None and transformed:
        grads = SyncBatchNormBackwardFunction.apply(
            grad_output, input, output, residual, weight, bias, mean, invstd, count,
            _mask_string(output_mask), ctx.bias_dtype, ctx.group_name, *epilogue)
    elif ctx.group_name is not None:
        grads = torch.ops.bn_triton.sync_batch_norm_backward(
            grad_output, input, output, residual, weight, bias, mean, invstd, count,
            output_mask, ctx.bias_dtype, ctx.group_name, *epilogue)
    elif through_ops and transformed:
        grads = BatchNormBackwardFunction.apply(
            grad_output, input, output, residual, weight, bias, mean, invstd, ctx.training,
            _mask_string(output_mask), ctx.bias_dtype, *epilogue)
    elif through_ops:
        grads = torch.ops.bn_triton.batch_norm_backward(
            grad_output, input, output, residual, weight, bias, mean, invstd, ctx.training,
            output_mask, ctx.bias_dtype, *epilogue)
    else:
        grads = launch.batch_norm_backward(
            grad_output, input, output, residual, weight, bias, mean, invstd, ctx.training,
            output_mask, ctx.bias_dtype, ctx.has_residual,
            ctx.epilogue_activation, ctx.memory_efficient, ctx.eps, renorm=renorm,
            virtual_batch_size=ctx.virtual_batch_size)
    grad_input, grad_weight, grad_bias, grad_residual = [
        grad if wanted else None for grad, wanted in zip(grads, output_mask)]
    if needs[9] and not residual_from_kernel:
        grad_residual = grad_output
    return grad_input, grad_weight, grad_bias, grad_residual


class BatchNormFunction(torch.autograd.Function):
    """y = act(batch_norm(x) + residual) through the two ops: what every tracer, mode and
    transform sees (see batch_norm). Backward computes only the gradients autograd asks
    for. Under torch.func's transforms and forward-mode AD, TransformedBatchNormFunction."""

    @staticmethod
    def forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
                training: bool, momentum: float, eps: float, residual: Optional[torch.Tensor],
                activation: str, activation_param: float, activation_param2: float,
                memory_efficient: bool, group_name: Optional[str]):
        if group_name is not None:  # SyncBatchNorm: also the total count across the ranks
            return torch.ops.bn_triton.sync_batch_norm_forward(
                input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                eps, group_name, residual, activation, activation_param, memory_efficient,
                activation_param2)
        return torch.ops.bn_triton.batch_norm_forward(
            input, weight, bias, running_mean, running_var, num_batches_tracked, training,
            momentum, eps, residual, activation, activation_param, memory_efficient,
            activation_param2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, weight, bias, _, _, _, training, _, eps, residual, activation, activation_param,
         activation_param2, memory_efficient, group_name) = inputs
        output, mean, invstd, *count = output
        ctx.mark_non_differentiable(mean, invstd, *count)
        _save_for_backward(ctx, input, weight, bias, residual, output, mean, invstd,
                           count[0] if count else None, training, eps,
                           Activation(activation, activation_param, activation_param2),
                           memory_efficient, group_name)

    @staticmethod
    def backward(ctx, grad_output, *_grad_statistics):
        if grad_output is None:  # only the (non-differentiable) statistics reached the loss
            return (None,) * 15
        grad_input, grad_weight, grad_bias, grad_residual = _input_grads(ctx, grad_output, True)
        return (grad_input, grad_weight, grad_bias, None, None, None, None, None, None,
                grad_residual, None, None, None, None, None)

class TransformedBatchNormFunction(BatchNormFunction):
    """BatchNormFunction with forward mode (jvp: forward_ad.py) and vmap (the ops' batching
    rules, batching.py), for calls under torch.func's transforms or forward-mode AD. A class
    of its own because Dynamo refuses to trace an autograd.Function that defines jvp: compiled
    graphs keep BatchNormFunction."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        BatchNormFunction.setup_context(ctx, inputs, output)
        input, weight, bias, residual = inputs[0], inputs[1], inputs[2], inputs[9]
        _, mean, invstd, *count = output
        ctx.save_for_forward(input, weight, bias, residual, mean, invstd, *count)
        # Tangents (and gradients) of what has none stay None, not zeros: jvp tells the
        # tangent of a running statistic from its absence.
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, t_input, t_weight, t_bias, t_running_mean, t_running_var, _t_count,
            _training, _momentum, _eps, t_residual, *_flags):
        """Forward mode: the output's tangent (forward_ad.output_tangent); the statistics
        are not differentiable."""
        input, weight, bias, residual, mean, invstd, *count = ctx.saved_tensors
        if (not ctx.training and (t_running_mean is not None or t_running_var is not None)
                and not torch._C._are_functorch_transforms_active()):
            raise RuntimeError(forward_ad.NOT_DIFFERENTIABLE_RUNNING)
        t_output = forward_ad.output_tangent(
            t_input, t_weight, t_bias, t_residual, input, weight, bias, residual, mean, invstd,
            ctx.training, ctx.eps, ctx.epilogue_activation,
            ctx.memory_efficient, ctx.group_name, count[0] if count else None)
        if t_output is None:  # tangents on the running statistics alone: no effect
            t_output = torch.zeros_like(input)
        return (t_output, None, None, *([None] if ctx.group_name is not None else []))


class BatchRenormFunction(torch.autograd.Function):
    """Batch Renormalization in training through its two ops (batch_renorm_forward and
    batch_renorm_backward): what every tracer and mode sees, as BatchNormFunction is for
    batch norm. r and d carry no gradient (arXiv:1702.03275)."""

    @staticmethod
    def forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                running_var: torch.Tensor, num_batches_tracked: Optional[torch.Tensor],
                renorm_limits: torch.Tensor, momentum: float, eps: float,
                residual: Optional[torch.Tensor], activation: str, activation_param: float,
                activation_param2: float, group_name: Optional[str]):
        if group_name is not None:  # SyncBatchRenorm: also the total count across the ranks
            return torch.ops.bn_triton.sync_batch_renorm_forward(
                input, weight, bias, running_mean, running_var, num_batches_tracked,
                renorm_limits, momentum, eps, group_name, residual, activation,
                activation_param, activation_param2)
        return torch.ops.bn_triton.batch_renorm_forward(
            input, weight, bias, running_mean, running_var, num_batches_tracked, renorm_limits,
            momentum, eps, residual, activation, activation_param, activation_param2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, weight, bias, *_, eps, residual, activation, activation_param, activation_param2,
         group_name) = inputs
        output, mean, invstd, *count, factors = output
        ctx.mark_non_differentiable(mean, invstd, factors, *count)
        _save_for_backward(ctx, input, weight, bias, residual, output, mean, invstd,
                           count[0] if count else None, True, eps,
                           Activation(activation, activation_param, activation_param2), False,
                           group_name, factors)

    @staticmethod
    def backward(ctx, grad_output, *_grad_statistics):
        if grad_output is None:
            return (None,) * 14
        grad_input, grad_weight, grad_bias, grad_residual = _input_grads(ctx, grad_output, True)
        return (grad_input, grad_weight, grad_bias, None, None, None, None, None, None,
                grad_residual, None, None, None, None)


class GhostBatchNormFunction(torch.autograd.Function):
    """Ghost batch norm in training through its two ops (ghost_batch_norm_forward and
    ghost_batch_norm_backward): what every tracer and mode sees."""

    @staticmethod
    def forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
                virtual_batch_size: int, momentum: float, eps: float,
                residual: Optional[torch.Tensor], activation: str, activation_param: float,
                activation_param2: float):
        return torch.ops.bn_triton.ghost_batch_norm_forward(
            input, weight, bias, running_mean, running_var, num_batches_tracked,
            virtual_batch_size, momentum, eps, residual, activation, activation_param,
            activation_param2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, weight, bias, _, _, _, virtual_batch_size, _, eps, residual, activation,
         activation_param, activation_param2) = inputs
        output, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        _save_for_backward(ctx, input, weight, bias, residual, output, mean, invstd, None, True,
                           eps, Activation(activation, activation_param, activation_param2),
                           False, None, None,
                           virtual_batch_size)

    @staticmethod
    def backward(ctx, grad_output, *_grad_statistics):
        if grad_output is None:
            return (None,) * 13
        grad_input, grad_weight, grad_bias, grad_residual = _input_grads(ctx, grad_output, True)
        return (grad_input, grad_weight, grad_bias, None, None, None, None, None, None,
                grad_residual, None, None, None)


class EagerBatchNormFunction(torch.autograd.Function):
    """BatchNormFunction's forward and backward with the launches called directly: the same
    kernels, saved tensors and gradients, without the two custom-op dispatches and the
    per-call signature binding of a setup_context Function (together about 150 µs of host
    time a layer, more than an H100 spends in its kernels). Only for calls that nothing
    traces or intercepts (see batch_norm). The backward goes through the backward op where
    autograd records it (create_graph), which keeps the second derivative."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
                training: bool, momentum: float, eps: float, residual: Optional[torch.Tensor],
                activation: Activation, memory_efficient: bool,
                renorm_limits: Optional[torch.Tensor],
                virtual_batch_size: Optional[int]) -> torch.Tensor:
        output, mean, invstd, factors = _launch_forward(
            input, weight, bias, running_mean, running_var, num_batches_tracked, training,
            momentum, eps, residual, activation, memory_efficient, renorm_limits,
            virtual_batch_size)
        _save_for_backward(ctx, input, weight, bias, residual, output, mean, invstd, None,
                           training, eps, activation, memory_efficient, None, factors,
                           virtual_batch_size)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, grad_weight, grad_bias, grad_residual = _input_grads(
            ctx, grad_output, torch.is_grad_enabled())
        return (grad_input, grad_weight, grad_bias, None, None, None, None, None, None,
                grad_residual, None, None, None, None)


def _launch_forward(input, weight, bias, running_mean, running_var, num_batches_tracked,
                    training, momentum, eps, residual, activation, memory_efficient,
                    renorm_limits=None, virtual_batch_size=None):
    """batch_norm_forward's launches (batch_renorm_forward's, renorm_limits given in
    training), called directly, with the op's effect on autograd's version counters: a
    running statistic written in place counts as modified. (output, mean, invstd, the renorm
    factors or None). virtual_batch_size (training): ghost batch norm's launches, whose mean
    and invstd are (num_runs, C)."""
    if virtual_batch_size is not None and training:
        output, mean, invstd = launch.ghost_batch_norm_forward(
            input, weight, bias, running_mean, running_var, num_batches_tracked,
            virtual_batch_size, momentum, eps, residual, activation)
        if running_mean is not None:
            torch.autograd.graph.increment_version((running_mean, running_var))
        return output, mean, invstd, None
    renorm = None
    if renorm_limits is not None and training:
        renorm = launch.Renorm(input.new_empty((2, input.shape[1]),
                                               dtype=accumulation_dtype(input.dtype)),
                               renorm_limits)
    output, mean, invstd = launch.batch_norm_forward(
        input, weight, bias, running_mean, running_var, num_batches_tracked, training,
        momentum, eps, residual, activation, memory_efficient, renorm)
    if training and running_mean is not None:
        torch.autograd.graph.increment_version((running_mean, running_var))
    return output, mean, invstd, None if renorm is None else renorm.factors


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def observed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether anything above the kernels may need to see a call as bn_triton's ops: Dynamo
    or export tracing, torch.jit.trace, a torch.func transform, forward-mode AD, a torch
    function or dispatch mode (FakeTensorMode, FlopCounterMode, ...), the profiler, or a
    tensor subclass (fake,
    functional, DTensor, ...). Then the call goes through the ops; a plain eager call, none
    of these, takes the launches directly. Each check is one C call or attribute read."""
    return (torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._autograd._profiler_enabled()
            or torch._C._get_tracing_state() is not None  # torch.jit.trace
            or torch.autograd.forward_ad._current_level >= 0
            or _any_subclass(tensors))


def _any_subclass(tensors) -> bool:
    """A tensor subclass, or a functorch wrapper left over from a transform that has ended
    (a "dead" wrapper, which autograd.Function.apply would unwrap; _apply_eager does not)."""
    for t in tensors:  # a loop: cheaper than any() over a generator, per call
        if t is not None and (type(t) not in _PLAIN_TYPES or _is_functorch_wrapped(t)):
            return True
    return False


def _any_requires_grad(*tensors: Optional[torch.Tensor]) -> bool:
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# EagerBatchNormFunction.apply without autograd.Function.apply's Python wrapper: the C
# implementation it ends in (torch._C._FunctionBase.apply), for the eager route only. What
# the wrapper does first is not needed there: it binds default arguments only for a
# setup_context Function (EagerBatchNormFunction has none), and outside torch.func's
# transforms (which observed() rules out) it unwraps dead functorch wrappers, which
# observed() sends to the ops instead (_any_subclass). About 10 µs a call, measured by
# benchmarks/host.py.
_apply_eager = torch._C._FunctionBase.__dict__["apply"].__get__(None, EagerBatchNormFunction)


def batch_norm(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               num_batches_tracked: Optional[torch.Tensor], training: bool, momentum: float,
               eps: float, residual: Optional[torch.Tensor] = None,
               activation: Optional[Activation] = None, memory_efficient: bool = False,
               group_name: Optional[str] = None,
               renorm_limits: Optional[torch.Tensor] = None,
               virtual_batch_size: Optional[int] = None) -> torch.Tensor:
    """The differentiable act(batch_norm(x) + residual) over the ops: batch_norm_forward's
    output (sync_batch_norm_forward's, with statistics across the ranks of the process group
    named group_name, given). activation None is the identity.

    Two routes, one result: a call that anything traces or intercepts (observed) goes through
    BatchNormFunction and the ops, which is all Dynamo, export, the modes and the transforms
    ever see; a plain eager call runs the same launches directly (EagerBatchNormFunction
    where autograd records it), which saves the ops' dispatch on every layer.

    renorm_limits (training, running statistics given): Batch Renormalization with the
    (r_max, d_max) of that (2,) tensor, through batch_renorm_forward/backward (BatchRenormFunction)
    or their launches. virtual_batch_size (training): ghost batch norm, through
    ghost_batch_norm_forward/backward (GhostBatchNormFunction) or their launches. Neither
    under torch.func's transforms (functional.py composes them there)."""
    if not training:  # eval: batch norm with the running statistics
        renorm_limits = virtual_batch_size = None
    # The activation goes in as its name and parameter, literals where there is none: under
    # torch.compile(dynamic=True) Dynamo turns a float read from a shared object into a
    # symbolic input, which it cannot lift into the autograd.Function's graph.
    if group_name is None and not observed(input, weight, bias, running_mean, running_var,
                                           num_batches_tracked, residual):
        activation = activation or IDENTITY
        if torch.is_grad_enabled() and _any_requires_grad(input, weight, bias, residual):
            return _apply_eager(
                input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                momentum, eps, residual, activation, memory_efficient, renorm_limits,
                virtual_batch_size)
        return _launch_forward(input, weight, bias, running_mean, running_var,
                               num_batches_tracked, training, momentum, eps, residual,
                               activation, memory_efficient, renorm_limits,
                               virtual_batch_size)[0]
    name, param, param2 = ((activation.name, activation.param, activation.param2) if activation
                           else ("identity", 0.0, 0.0))
    if virtual_batch_size is not None:
        return GhostBatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                            num_batches_tracked, virtual_batch_size, momentum,
                                            eps, residual, name, param, param2)[0]
    if renorm_limits is not None:
        return BatchRenormFunction.apply(input, weight, bias, running_mean, running_var,
                                         num_batches_tracked, renorm_limits, momentum, eps,
                                         residual, name, param, param2, group_name)[0]
    transformed = not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0)
    function = TransformedBatchNormFunction if transformed else BatchNormFunction
    return function.apply(input, weight, bias, running_mean, running_var,
                                   num_batches_tracked, training, momentum, eps, residual,
                                   name, param, param2, memory_efficient, group_name)[0]


from . import batching  # noqa: E402,F401  (the ops' vmap rules, registered on import)
