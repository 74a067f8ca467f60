"""The torch.library operators of bn_triton: schemas, fake kernels and autograd, nothing else.

    bn_triton::batch_norm_forward(input, weight?, bias?, running_mean(a!)?, running_var(b!)?,
                                  num_batches_tracked?, training, momentum, eps)
        -> (output, mean, invstd)
    bn_triton::batch_norm_backward(grad_output, input, weight?, mean, invstd, training,
                                   output_mask[3], bias_dtype?)
        -> (grad_input, grad_weight, grad_bias)

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
register_autograd: its own backward raises, so a double backward fails loudly on every route.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import launch
from .dispatch import TORCH, backend
from .plan import accumulation_dtype, empty_output

DOUBLE_BACKWARD = ("bn_triton's batch norm does not support double backward (a gradient of its "
                   "gradient); use torch.nn.functional.batch_norm for that")


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
                       momentum: float, eps: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """output, and the statistics backward needs: mean and invstd = 1/sqrt(var + eps), (C,) in
    the accumulation dtype (float32; float64 for float64 input), as ATen saves them.

    training: batch statistics; running_mean/running_var, when given, are updated in place with
    factor `momentum`, or 1/num_batches_tracked read on the device when num_batches_tracked is
    given (a module's momentum=None; the op only reads it). Otherwise the running statistics
    normalize and nothing is written. The output takes bn_triton.plan.output_format(input)."""
    _require_kernels("batch_norm_forward", input)
    return launch.batch_norm_forward(input, weight, bias, running_mean, running_var,
                                     num_batches_tracked, training, momentum, eps)


@batch_norm_forward.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
      eps):
    mean = input.new_empty((input.shape[1],), dtype=accumulation_dtype(input.dtype))
    return empty_output(input), mean, torch.empty_like(mean)


@torch.library.custom_op("bn_triton::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad_output: torch.Tensor, input: torch.Tensor,
                        weight: Optional[torch.Tensor], mean: torch.Tensor,
                        invstd: torch.Tensor, training: bool, output_mask: List[bool],
                        bias_dtype: Optional[torch.dtype]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_input, grad_weight, grad_bias from the saved input, mean and invstd: with batch
    statistics (training) or constant ones. Only what output_mask asks for is computed; the
    others come back as empty (0,) tensors (an op cannot return None). grad_input takes
    output_format(input), grad_weight weight's dtype, grad_bias bias_dtype."""
    _require_kernels("batch_norm_backward", input)
    grads = launch.batch_norm_backward(grad_output, input, weight, mean, invstd, training,
                                       output_mask, bias_dtype)
    return tuple(grad if grad is not None else input.new_empty((0,)) for grad in grads)


@batch_norm_backward.register_fake
def _(grad_output, input, weight, mean, invstd, training, output_mask, bias_dtype):
    want_dx, want_dw, want_db = output_mask
    channels = (input.shape[1],)
    return (empty_output(input) if want_dx else input.new_empty((0,)),
            weight.new_empty(channels) if want_dw else input.new_empty((0,)),
            input.new_empty(channels, dtype=bias_dtype) if want_db else input.new_empty((0,)))


def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD)


torch.library.register_autograd("bn_triton::batch_norm_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


class BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x) through the two ops; saves input, weight, mean and invstd (never x̂ or
    y) and computes in backward only the gradients autograd asks for."""

    @staticmethod
    def forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
                training: bool, momentum: float, eps: float):
        return torch.ops.bn_triton.batch_norm_forward(input, weight, bias, running_mean,
                                                      running_var, num_batches_tracked,
                                                      training, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, *_, training, _, _ = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training = training
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        output_mask = list(ctx.needs_input_grad[:3])
        grads = torch.ops.bn_triton.batch_norm_backward(grad_output, input, weight, mean,
                                                        invstd, ctx.training, output_mask,
                                                        ctx.bias_dtype)
        grads = [grad if wanted else None for grad, wanted in zip(grads, output_mask)]
        return (*grads, None, None, None, None, None, None)


def batch_norm(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               num_batches_tracked: Optional[torch.Tensor], training: bool, momentum: float,
               eps: float) -> torch.Tensor:
    """The differentiable batch norm over the ops: the output of batch_norm_forward."""
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                   num_batches_tracked, training, momentum, eps)[0]
