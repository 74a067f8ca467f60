"""SyncBatchNorm's statistics over every rank of a process group: the per-rank (count, mean,
var) that one all_gather brought, merged into the batch statistics of Algorithm 1 (lines 1-2,
arXiv:1502.03167) over the whole distributed batch, plus the running-statistic update.

One launch, whatever the world size, in place of a loop of torch ops over the ranks (16 ATen
ops a rank; 40 at one rank and 152 at eight with the running update, bn_triton issue 16 §4).
It keeps that loop's numerics exactly: rank order, float64, the same additions and products
in the same order, so every rank holds the same bits, and so does a rerun. The launch turns
off FMA contraction (bn_triton/ops/collectives.py), so that a GPU rounds as the interpreter and
the torch loop do; the kernel does a few flops per channel and rank and is latency-bound, so
contraction would buy nothing. The float64 divisions are IEEE (div.rn.f64) on NVIDIA.
"""
import triton
import triton.language as tl

from .stats import inverse_std, renorm_factors, update_running_stats


@triton.jit
def merge_statistics_kernel(
    gathered_ptr, mean_ptr, var_ptr, count_ptr, running_mean_ptr, running_var_ptr,
    num_batches_tracked_ptr, renorm_ptr, renorm_limits_ptr,
    C, world, momentum, momentum_lo, eps, eps_lo,
    stride_gw, stride_gs, stride_gc,
    BLOCK_C: tl.constexpr, UPDATE_RUNNING: tl.constexpr, MOMENTUM_FROM_COUNT: tl.constexpr,
    RENORM: tl.constexpr,
):
    """mean, biased var and count of every channel over the ranks, and the running update.

    Grid (cdiv(C, BLOCK_C),). Program p merges channels [p·BLOCK_C, (p+1)·BLOCK_C) of the
    `world` ranks in rank order k = 0, 1, ..., world - 1, by Chan et al.'s pairwise formula on
    rank k's (n_k, m_k, var_k) and the running (n, m, M2), all float64:
        n' = n + n_k,  share = n_k/n' (0 when n' = 0),  δ = m_k - m,
        m' = m + δ·share,  M2' = M2 + var_k·n_k + δ²·n·share,
    so a rank with n_k = 0 changes nothing (share = 0) and uneven counts are exact. Then
    var = M2/max(n, 1), and with UPDATE_RUNNING torch's running averages over the total count
    (update_running_stats: unbiased var, factor momentum or 1/num_batches_tracked).
    gathered: (world, 3, C) float64, any strides, row s = 0, 1, 2 holding count, mean, biased
    var. mean, var: (C,) in the accumulation dtype (float32, float64 for float64 input), rounded
    once from float64. count: a float64 scalar, n of channel 0 (every channel has the same n),
    written by program 0. running_mean, running_var: (C,), contiguous, any float dtype.
    RENORM (SyncBatchRenorm): first Batch Renormalization's r and d of the merged statistics
    against the running ones before the update (stats.renorm_factors, in float64), to renorm:
    (2, C) in the accumulation dtype; eps: a float32 pair."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = tl.zeros([BLOCK_C], tl.float64)
    mean = tl.zeros([BLOCK_C], tl.float64)
    m2 = tl.zeros([BLOCK_C], tl.float64)
    # world is a runtime loop bound: one compiled kernel serves every group size.
    for rank in range(world):
        rank_ptr = gathered_ptr + rank * stride_gw + c * stride_gc
        rank_count = tl.load(rank_ptr, mask=c_mask, other=0.0)
        rank_mean = tl.load(rank_ptr + stride_gs, mask=c_mask, other=0.0)
        rank_var = tl.load(rank_ptr + 2 * stride_gs, mask=c_mask, other=0.0)
        total = count + rank_count
        share = tl.where(total > 0, rank_count / tl.maximum(total, 1.0), 0.0)
        delta = rank_mean - mean
        mean = mean + delta * share
        m2 = m2 + rank_var * rank_count + delta * delta * count * share
        count = total
    var = m2 / tl.maximum(count, 1.0)
    tl.store(mean_ptr + c, mean.to(mean_ptr.dtype.element_ty), mask=c_mask)
    tl.store(var_ptr + c, var.to(var_ptr.dtype.element_ty), mask=c_mask)
    tl.store(count_ptr + c * 0, count, mask=c == 0)
    if RENORM:
        invstd = inverse_std(var + eps_lo, eps)
        r, d = renorm_factors(running_mean_ptr, running_var_ptr, renorm_limits_ptr, c, c_mask,
                              mean, invstd, eps, eps_lo)
        tl.store(renorm_ptr + c, r.to(renorm_ptr.dtype.element_ty), mask=c_mask)
        tl.store(renorm_ptr + C + c, d.to(renorm_ptr.dtype.element_ty), mask=c_mask)
    if UPDATE_RUNNING:
        update_running_stats(running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, c,
                             c_mask, mean, var, count, momentum, momentum_lo,
                             MOMENTUM_FROM_COUNT)
