"""SyncBatchNorm's forward and backward across the ranks of a process group, over
torch.distributed (NCCL on GPUs, gloo on CPUs): one all_gather of every rank's
(count, mean, var) forward, merged here in rank order by one kernel launch; one all_reduce of
(Σdz, Σdz·x̂) backward. The ops in library.py call these with the process group's name (an op
cannot take a ProcessGroup).

Chan et al.'s pairwise formula merges rank k's (n_k, m_k, M2_k = n_k·var_k) into the running
(n, m, M2):  δ = m_k - m,  n' = n + n_k,  m' = m + δ·n_k/n',  M2' = M2 + M2_k + δ²·n·n_k/n'.
It is exact for uneven batch sizes and skips a rank with an empty batch (n_k = 0) by
construction; every rank merges the same gathered numbers in the same order (float64), so every
rank holds the same bits and the same input gives them again. merge_statistics_kernel
(kernels/merge.py) does it, with the running-statistic update, in one launch whatever the
world size: a loop of torch ops took 40 ATen ops at one rank and 152 at eight.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import triton

from . import launch, tuning
from .epilogue import Activation
from .launch import _float64_pair, _written_in_place
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


# Channels a program of merge_statistics_kernel merges, and its warps: one channel a thread.
# Its work is world·3 float64 loads and a few flops per channel, and its float64 divisions
# expand to long subroutines: two channels a thread (256 at 4 warps) spill 8 bytes on sm_80.
# A C = 2048 layer gets 16 programs; any size gives the same bits (channels are independent).
MERGE_BLOCK_C = 128
MERGE_NUM_WARPS = 4


def merge_block_c(C: int) -> int:
    """BLOCK_C of merge_statistics_kernel: C rounded up to a power of two, capped at
    MERGE_BLOCK_C (see there)."""
    return min(triton.next_power_of_2(C), MERGE_BLOCK_C)


def merge_statistics(gathered: torch.Tensor, acc_dtype: torch.dtype,
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                     num_batches_tracked: Optional[torch.Tensor], momentum: float,
                     renorm: Optional[launch.Renorm] = None, eps: float = 0.0
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var, total count) over every rank, and the running statistics updated
    in place as torch's SyncBatchNorm keeps them (when given; factor momentum, or
    1/num_batches_tracked read on the device when that is given): merge_statistics_kernel,
    one launch (see the module docstring for the formula). mean and var come in acc_dtype,
    the count as a 0-d float64 tensor: nothing is read on the host. renorm (SyncBatchRenorm):
    Batch Renormalization's r and d of the merged statistics written to renorm.factors, from
    the running statistics before the update (eps the layer's)."""
    C = gathered.shape[2]
    mean = torch.empty(C, dtype=acc_dtype, device=gathered.device)
    var = torch.empty_like(mean)
    count = torch.empty((), dtype=torch.float64, device=gathered.device)
    block_c = merge_block_c(C)
    update = running_mean is not None
    stride_gw, stride_gs, stride_gc = gathered.stride()
    with _written_in_place(running_mean) as running_mean, \
            _written_in_place(running_var) as running_var:
        # enable_fp_fusion=False: no FMA contraction, so a GPU rounds every product and sum
        # as the interpreter and a loop of torch ops do (kernels/merge.py).
        tuning.launch(
            "merge_statistics_kernel", (triton.cdiv(C, block_c),), MERGE_NUM_WARPS,
            gathered.device, dict(
                C=C, world=gathered.shape[0], **_float64_pair("momentum", momentum),
                stride_gw=stride_gw, stride_gs=stride_gs, stride_gc=stride_gc, BLOCK_C=block_c,
                **_float64_pair("eps", eps), UPDATE_RUNNING=update,
                MOMENTUM_FROM_COUNT=update and num_batches_tracked is not None,
                RENORM=renorm is not None, enable_fp_fusion=False),
            gathered_ptr=gathered, mean_ptr=mean, var_ptr=var, count_ptr=count,
            running_mean_ptr=running_mean, running_var_ptr=running_var,
            num_batches_tracked_ptr=num_batches_tracked if update else None,
            renorm_ptr=None if renorm is None else renorm.factors,
            renorm_limits_ptr=None if renorm is None else renorm.limits)
    return mean, var, count


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
            memory_efficient: bool, renorm: Optional[launch.Renorm] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, mean, invstd, total count) of a training batch norm whose statistics span the
    group: this rank's statistics (one launch), one all_gather, the combination, the running
    statistics as torch's SyncBatchNorm keeps them (unbiased over the total count; factor
    momentum or 1/num_batches_tracked, on the device), then the normalize launch with the
    epilogue. An empty input takes part in the collective with a count of 0. renorm
    (SyncBatchRenorm): r and d from the merged statistics, which normalize with them."""
    gathered = gather_statistics(launch.local_statistics(input), group_name)
    mean, var, count = merge_statistics(gathered, accumulation_dtype(input.dtype), running_mean,
                                        running_var, num_batches_tracked, momentum, renorm, eps)
    # The normalize kernel with the merged statistics in place of the running ones.
    output, mean, invstd = launch.batch_norm_forward(
        input, weight, bias, mean, var, None, False, 0.0, eps, residual, activation,
        memory_efficient, renorm)
    return output, mean, invstd, count


def backward(grad_output: torch.Tensor, input: Optional[torch.Tensor],
             output: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], mean: torch.Tensor,
             invstd: torch.Tensor, count: torch.Tensor, output_mask, bias_dtype,
             group_name: str, has_residual: bool, activation: Activation,
             memory_efficient: bool, eps: float, renorm: Optional[torch.Tensor] = None
             ) -> Tuple[Optional[torch.Tensor], ...]:
    """The backward of `forward`: this rank's sums, one all_reduce when dx is asked for, dx
    with the coefficients over the total count; dγ, dβ and d(residual) stay this rank's.
    renorm: the forward's r and d (SyncBatchRenorm)."""
    def reduce(sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor):
        sum_dy, sum_dy_xhat = all_reduce_sums(sum_dy, sum_dy_xhat, group_name)
        inverse = (1.0 / count).to(sum_dy.dtype)
        return sum_dy * inverse, sum_dy_xhat * inverse

    return launch.batch_norm_backward(grad_output, input, output, residual, weight, bias, mean,
                                      invstd, True, output_mask, bias_dtype, has_residual,
                                      activation, memory_efficient, eps, reduce, renorm)
