"""SyncBatchNorm's forward and backward across the ranks of a process group, over
torch.distributed (NCCL on GPUs, gloo on CPUs): one all_gather of every rank's
(count, mean, var) forward, combined here in rank order; one all_reduce of (Σdz, Σdz·x̂)
backward. The ops in library.py call these with the process group's name (an op cannot take
a ProcessGroup).

Chan et al.'s pairwise formula merges rank k's (n_k, m_k, M2_k = n_k·var_k) into the running
(n, m, M2):  δ = m_k - m,  n' = n + n_k,  m' = m + δ·n_k/n',  M2' = M2 + M2_k + δ²·n·n_k/n'.
It is exact for uneven batch sizes and skips a rank with an empty batch (n_k = 0) by
construction; every rank merges the same gathered numbers in the same order (float64), so every
rank holds the same bits and the same input gives them again.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from . import launch
from .epilogue import Activation
from .plan import accumulation_dtype


def process_group(group_name: str):
    """The ProcessGroup of that name (torch's functional collectives resolve names the same
    way)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def gather_statistics(local: torch.Tensor, group_name: str) -> torch.Tensor:
    """(world, 3, C): every rank's (count, mean, var), in rank order; one all_gather."""
    group = process_group(group_name)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local.contiguous(), group=group)
    return torch.stack(gathered)


def combine(gathered: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var, total count) over every rank, float64: Chan's merge in rank order
    (see the module docstring). The count is a 0-d tensor: nothing is read on the host."""
    count = torch.zeros_like(gathered[0, 0])
    mean = torch.zeros_like(count)
    m2 = torch.zeros_like(count)
    for rank_count, rank_mean, rank_var in gathered:
        total = count + rank_count
        share = torch.where(total > 0, rank_count / total.clamp_min(1), 0.0)
        delta = rank_mean - mean
        mean = mean + delta * share
        m2 = m2 + rank_var * rank_count + delta * delta * count * share
        count = total
    return mean, m2 / count.clamp_min(1), count[0]


def all_reduce_sums(sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor, group_name: str
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Σdz, Σdz·x̂) summed over every rank: one all_reduce of both."""
    sums = torch.stack([sum_dy, sum_dy_xhat])
    dist.all_reduce(sums, group=process_group(group_name))
    return sums[0], sums[1]


def forward(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
            num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float,
            group_name: str, residual: Optional[torch.Tensor], activation: Activation,
            memory_efficient: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, mean, invstd, total count) of a training batch norm whose statistics span the
    group: this rank's statistics (one launch), one all_gather, the combination, the running
    statistics as torch's SyncBatchNorm keeps them (unbiased over the total count; factor
    momentum or 1/num_batches_tracked, on the device), then the normalize launch with the
    epilogue. An empty input takes part in the collective with a count of 0."""
    gathered = gather_statistics(launch.local_statistics(input), group_name)
    mean, var, count = combine(gathered)
    if running_mean is not None:
        factor = momentum if num_batches_tracked is None else 1.0 / num_batches_tracked.double()
        unbiased = var * count / (count - 1)
        running_mean.copy_((1 - factor) * running_mean.double() + factor * mean)
        running_var.copy_((1 - factor) * running_var.double() + factor * unbiased)
    acc_dtype = accumulation_dtype(input.dtype)
    # The normalize kernel with the combined statistics in place of the running ones.
    output, mean, invstd = launch.batch_norm_forward(
        input, weight, bias, mean.to(acc_dtype), var.to(acc_dtype), None, False, 0.0, eps,
        residual, activation, memory_efficient)
    return output, mean, invstd, count


def backward(grad_output: torch.Tensor, input: Optional[torch.Tensor],
             output: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], mean: torch.Tensor,
             invstd: torch.Tensor, count: torch.Tensor, output_mask, bias_dtype,
             group_name: str, has_residual: bool, activation: Activation,
             memory_efficient: bool, eps: float) -> Tuple[Optional[torch.Tensor], ...]:
    """The backward of `forward`: this rank's sums, one all_reduce when dx is asked for, dx
    with the coefficients over the total count; dγ, dβ and d(residual) stay this rank's."""
    def reduce(sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor):
        sum_dy, sum_dy_xhat = all_reduce_sums(sum_dy, sum_dy_xhat, group_name)
        inverse = (1.0 / count).to(sum_dy.dtype)
        return sum_dy * inverse, sum_dy_xhat * inverse

    return launch.batch_norm_backward(grad_output, input, output, residual, weight, bias, mean,
                                      invstd, True, output_mask, bias_dtype, has_residual,
                                      activation, memory_efficient, eps, reduce)
