"""The backward of the backward: batch_norm_backward's map written in torch's differentiable ops,
so that autograd can take a gradient of bn_triton's gradients (a gradient penalty, gradgradcheck),
as it can of torch's own batch norm.

The kernels compute the first derivative; this module only runs when autograd differentiates
that derivative (create_graph=True, then a second backward). It recomputes, per channel over
the M values of the batch,

    mean = Σx / M,  invstd = 1/sqrt(Σ(x - mean)² / M + eps)     (training; else the constants
                                                                  from the running statistics)
    x̂ = (x - mean)·invstd,  z = γ·x̂ + β (+ residual),  dz = dy·act'(z)
    sum_dy = Σdz,  sum_dy_xhat = Σdz·x̂
    dx = γ·invstd·(dz - sum_dy/M - x̂·sum_dy_xhat/M)   (training; else dz·γ·invstd)
    dγ = sum_dy_xhat,  dβ = sum_dy,  d(residual) = dz

with the statistics as functions of x (in training they are, and the forward marked its saved
mean and invstd non-differentiable for that reason), and act'(z) taken from where the kernels
take it (epilogue.dz_source): recomputed from x (and the residual), or read from the saved
output, whose own gradient autograd then carries back through the forward. The vector-Jacobian
product of that map with the incoming gradients is the double backward, exact for every
activation. The memory-saving mode keeps neither x nor z and SyncBatchNorm's statistics span
other ranks: both refuse a double backward with a clear error instead of a wrong value, as does
a third derivative.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .epilogue import Activation, dz_source, torch_activation

# torch's SELU constants (and kernels/activations.py's).
SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
# torch's hardsigmoid_backward slope, float32(1/6) in every dtype.
HARDSIGMOID_SLOPE = 0.16666667163372040
THIRD_DERIVATIVE = ("bn_triton's batch norm supports first and second derivatives; a third "
                    "(create_graph=True through a double backward) is not supported")


def _act_grad_from_output(output: torch.Tensor, activation: Activation) -> torch.Tensor:
    """act'(z) as a function of y = act(z), as kernels/activations.grad_from_output has it."""
    one = torch.ones((), dtype=output.dtype, device=output.device)
    if activation.name == "identity":
        return one.expand_as(output)
    if activation.name == "relu":
        return (output > 0).to(output.dtype)
    if activation.name == "leaky_relu":
        return torch.where(output > 0, one, activation.param)
    if activation.name == "celu":
        return torch.where(output > 0, one, output / activation.param + 1)
    if activation.name == "selu":
        return torch.where(output > 0, SELU_SCALE * one, output + SELU_SCALE * SELU_ALPHA)
    return torch.where(output > 0, one, output + activation.param)  # elu, alpha > 0


def grads_in_torch(grad_output: torch.Tensor, input: torch.Tensor,
                   output: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   mean: torch.Tensor, invstd: torch.Tensor, training: bool, eps: float,
                   has_residual: bool, activation: Activation
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dγ, dβ, d(residual)) of the batch norm, differentiable in every tensor argument, in
    the accumulation dtype of mean (float32, or float64)."""
    acc = mean.dtype
    channels = input.shape[1]
    dims = [0, *range(2, input.dim())]
    shape = [1, channels] + [1] * (input.dim() - 2)
    count = input.numel() // channels
    x = input.to(acc)
    if training:
        mean = x.mean(dims)
        invstd = torch.rsqrt(x.var(dims, unbiased=False) + eps)
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    gamma = weight.to(acc).view(shape) if weight is not None else torch.ones((), dtype=acc,
                                                                             device=x.device)
    dy = grad_output.to(acc)
    source = dz_source(activation, has_residual, memory_efficient=False)
    if source == "dy":
        dz = dy
    elif source == "output":
        dz = dy * _act_grad_from_output(output.to(acc), activation)
    else:
        z = xhat * gamma
        if bias is not None:
            z = z + bias.to(acc).view(shape)
        if source == "x_residual":
            z = z + residual.to(acc)
        if activation.name == "hardsigmoid":
            # torch's hardsigmoid_backward has no derivative of its own: act' written out, a
            # constant in z (torch's float32(1/6) slope, as the kernels take it).
            dz = dy * ((z > -3) & (z < 3)).to(acc) * HARDSIGMOID_SLOPE
        elif torch._C._are_functorch_transforms_active():  # requires_grad_ is refused there
            _, act_vjp = torch.func.vjp(torch_activation(activation), z)
            dz, = act_vjp(dy)
        else:
            if not z.requires_grad:  # only dy is differentiated: act'(z) is a constant
                z = z.detach().requires_grad_()
            dz, = torch.autograd.grad(torch_activation(activation)(z), z, dy, create_graph=True)
    sum_dy = dz.sum(dims)
    sum_dy_xhat = (dz * xhat).sum(dims)
    scale = gamma * invstd.view(shape)
    if training:
        dx = (dz - sum_dy.view(shape) / count - xhat * (sum_dy_xhat.view(shape) / count)) * scale
    else:
        dx = dz * scale
    return dx, sum_dy_xhat, sum_dy, dz


def backward_of_backward(tensors: Sequence[Optional[torch.Tensor]],
                         grads_of_grads: Sequence[Optional[torch.Tensor]], training: bool,
                         eps: float, has_residual: bool, activation: Activation
                         ) -> Tuple[Optional[torch.Tensor], ...]:
    """The gradients with respect to `tensors` = (grad_output, input, output, residual, weight,
    bias, mean, invstd) of Σ grads_of_grads·(dx, dγ, dβ, d(residual)), over the outputs with an
    incoming gradient (one the op did not compute came back empty, and so does its gradient).
    None where a tensor takes none."""
    if torch._C._are_functorch_transforms_active():
        return _functorch_backward_of_backward(tensors, grads_of_grads, training, eps,
                                               has_residual, activation)
    if torch.is_grad_enabled():
        raise RuntimeError(THIRD_DERIVATIVE)
    differentiable = [i for i, tensor in enumerate(tensors[:6])
                      if tensor is not None and tensor.requires_grad]
    # Fresh leaves: each tensor's own partial derivative. dy and the output depend on x through
    # the graph outside (y = BN(x), dy = ∂loss/∂y); autograd adds those paths itself, so
    # following them here too would count them twice.
    leaves = [tensor.detach().requires_grad_(i in differentiable) if tensor is not None
              else None for i, tensor in enumerate(tensors)]
    with torch.enable_grad():
        grads = grads_in_torch(*leaves, training, eps, has_residual, activation)
    pairs = [(grad, incoming) for grad, incoming in zip(grads, grads_of_grads)
             if incoming is not None and incoming.numel() > 0 and grad.requires_grad]
    result: list = [None] * len(tensors)
    if pairs and differentiable:
        found = torch.autograd.grad([grad for grad, _ in pairs],
                                    [leaves[i] for i in differentiable],
                                    [incoming.to(grad.dtype) for grad, incoming in pairs],
                                    allow_unused=True)
        for i, grad in zip(differentiable, found):
            result[i] = grad
    return tuple(result)


def _functorch_backward_of_backward(tensors, grads_of_grads, training, eps, has_residual,
                                    activation) -> Tuple[Optional[torch.Tensor], ...]:
    """backward_of_backward under torch.func's transforms (grad of grad, MAML's outer step,
    hessian): torch.func.vjp of grads_in_torch, itself differentiable by the transforms
    above it, so that no order is refused. Every tensor argument of the first six is
    differentiated (the transforms tell which results they use)."""
    varying = [i for i, tensor in enumerate(tensors[:6]) if tensor is not None]
    pairs = [i for i, incoming in enumerate(grads_of_grads)
             if incoming is not None and incoming.numel() > 0]
    result: list = [None] * len(tensors)
    if not pairs:
        return tuple(result)

    def grads_of(*values):
        leaves = list(tensors)
        for i, value in zip(varying, values):
            leaves[i] = value
        grads = grads_in_torch(*leaves, training, eps, has_residual, activation)
        return tuple(grads[i] for i in pairs)

    outputs, vjp_fn = torch.func.vjp(grads_of, *(tensors[i] for i in varying))
    found = vjp_fn(tuple(grads_of_grads[i].to(out.dtype) for i, out in zip(pairs, outputs)))
    for i, grad in zip(varying, found):
        result[i] = grad.to(tensors[i].dtype)
    return tuple(result)
