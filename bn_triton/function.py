"""The torch.autograd.Function of batch normalization over the Triton kernels."""
from typing import Optional, Tuple

import torch

from . import ops


class BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x); saves x, weight, mean and invstd (never x̂ or y) for backward.

    Forward takes arguments that functional.py has already checked against torch's rules, and a
    non-empty x whose spatial dims flatten to one stride (ops.kernel_ready)."""

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
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = BatchNormBackwardFunction.apply(
            grad_output, x, weight, mean, invstd, ctx.batch_stats, tuple(ctx.needs_input_grad[:3]),
            ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class BatchNormBackwardFunction(torch.autograd.Function):
    """The backward kernels as a node of their own. Under create_graph=True it joins the graph
    through dy, x and weight, so that any second derivative reaches its backward and raises,
    whichever way it is taken (torch's once_differentiable misses gradients taken with respect
    to x or weight when dy is a constant, and would silently drop them)."""

    @staticmethod
    def forward(ctx, grad_output: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                mean: torch.Tensor, invstd: torch.Tensor, batch_stats: bool,
                output_mask: Tuple[bool, bool, bool], bias_dtype: Optional[torch.dtype]):
        return ops.batch_norm_backward(grad_output, x, weight, mean, invstd, batch_stats,
                                       output_mask, bias_dtype)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("bn_triton.batch_norm does not support double backward (a gradient "
                           "of its gradient); use torch.nn.functional.batch_norm for that")
