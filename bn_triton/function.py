"""The torch.autograd.Function of batch normalization over the Triton kernels."""
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import ops


class BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x); saves x, weight, mean and invstd (never x̂ or y) for backward.

    Forward takes arguments that functional.py has already checked against torch's rules, and a
    non-empty x whose spatial dims flatten to one stride (ops.kernel_ready). Backward is
    once-differentiable: a double backward raises torch's error rather than returning a wrong
    value."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                num_batches_tracked: Optional[torch.Tensor], batch_stats: bool,
                momentum: Optional[float], eps: float) -> torch.Tensor:
        y, mean, invstd = ops.batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                 num_batches_tracked, batch_stats, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.batch_stats = batch_stats
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        output_mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                       ctx.needs_input_grad[2])
        grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
            grad_output, x, weight, mean, invstd, ctx.batch_stats, output_mask, ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None
