"""Forward-mode derivatives of bn_triton's batch norm: the tangent of y = act(BN(x) + residual).

Per channel, over its M values, batch norm's Jacobian with respect to x is symmetric:

    J = (γ·invstd / M)·(M·I − 1·1ᵀ − x̂·x̂ᵀ)                       (training; γ·invstd·I in eval)

so the tangent map t_x ↦ J·t_x is the backward's map with dy := t_x, and the backward kernels
compute it (batch_norm_backward with only grad_input asked, no activation):

    t_z = γ·invstd·(t_x − mean(t_x) − x̂·mean(t_x·x̂)) + x̂·t_γ + t_β (+ t_residual)
    t_y = act′(z)·t_z

(eval: t_z = γ·invstd·t_x + x̂·t_γ + t_β; the memory-saving mode's scale |γ| + eps takes the
tangent sign(γ)·t_γ). act′(z) is taken by torch's forward mode through torch's activation at
z = γ·x̂ + β (+ residual), recomputed in the accumulation dtype.

Tangents of the running statistics: with batch statistics the output does not depend on them;
in eval it does, and torch refuses dual running statistics there ("not differentiable wrt
running_mean and running_var"); bn_triton raises the same RuntimeError. Under torch.func.jvp
torch's decomposition gives them no effect, and so does bn_triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from .epilogue import Activation, torch_activation

NOT_DIFFERENTIABLE_RUNNING = (
    "batch_norm is not differentiable wrt running_mean and running_var, they cannot have "
    "forward grad defined")


def output_tangent(t_input: Optional[torch.Tensor], t_weight: Optional[torch.Tensor],
                   t_bias: Optional[torch.Tensor], t_residual: Optional[torch.Tensor],
                   input: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                   mean: torch.Tensor, invstd: torch.Tensor, training: bool, eps: float,
                   activation: Activation, memory_efficient: bool,
                   group_name: Optional[str] = None,
                   count: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """t_y for the tangents given (None: no tangent), in the input's dtype; None when none is
    given. mean and invstd are those the forward used (batch or running statistics)."""
    if t_input is None and t_weight is None and t_bias is None and t_residual is None:
        return None
    acc = mean.dtype
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    gamma = weight
    t_gamma = t_weight
    if memory_efficient and weight is not None:
        gamma = weight.abs() + eps
        if t_weight is not None:
            t_gamma = torch.sign(weight) * t_weight
    xhat = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
    t_z = torch.zeros((), dtype=acc, device=input.device)
    if t_input is not None:
        # J·t_x by the backward kernels: grad_input of dy := t_x, identity epilogue.
        mask = [True, False, False, False]
        if group_name is not None:
            t_xhat = torch.ops.bn_triton.sync_batch_norm_backward(
                t_input, input, None, None, gamma, None, mean, invstd, count, mask, None,
                group_name)[0]
        else:
            t_xhat = torch.ops.bn_triton.batch_norm_backward(
                t_input, input, None, None, gamma, None, mean, invstd, training, mask,
                None)[0]
        t_z = t_z + t_xhat.to(acc)
    if t_gamma is not None:
        t_z = t_z + xhat * t_gamma.to(acc).view(shape)
    if t_bias is not None:
        t_z = t_z + t_bias.to(acc).view(shape)
    if t_residual is not None:
        t_z = t_z + t_residual.to(acc)
    t_z = t_z.expand(input.shape)
    if activation.name != "identity":
        z = xhat
        if gamma is not None:
            z = z * gamma.to(acc).view(shape)
        if bias is not None:
            z = z + bias.to(acc).view(shape)
        if residual is not None:
            z = z + residual.to(acc)
        _, t_z = torch.func.jvp(torch_activation(activation), (z,), (t_z,))
    return t_z.to(input.dtype)
