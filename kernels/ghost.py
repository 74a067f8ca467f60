"""Ghost batch norm (Hoffer, Hubara and Soudry, 2017, arXiv:1705.08741): each consecutive run
of virtual_batch_size samples (torch.split's chunks, the last may be shorter) normalized with
its own statistics. The batch-norm kernels do the runs themselves, one more grid dimension
(their GHOST flag: stats.ghost_run, stats.run_offset) writing (num_runs, C) rows; the two
kernels here finish what spans the runs, each in one launch over the channels:

- ghost_running_update_kernel: the one running-statistic update of a forward, with the
  unweighted mean over the runs of their means and of their unbiased variances;
- sum_runs_kernel: dγ and dβ, the sums over the runs of each run's.

Both add the runs in order 0, 1, ..., num_runs - 1, lane-wise: the same bits every time.
"""
import triton
import triton.language as tl

from .stats import divide


@triton.jit
def ghost_running_update_kernel(
    mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    C, num_runs, M, M_last, momentum, momentum_lo,
    BLOCK_C: tl.constexpr, MOMENTUM_FROM_COUNT: tl.constexpr,
):
    """running_mean ← (1 - f)·running_mean + f·(1/G)·Σ_g mean_g,
    running_var ← (1 - f)·running_var + f·(1/G)·Σ_g var_g·M_g/(M_g - 1),
    G = num_runs, M_g the values per channel of run g (M, and M_last for the last), var_g the
    biased variance; f = momentum (a float32 pair), or 1/num_batches_tracked read on the
    device (MOMENTUM_FROM_COUNT). Grid (cdiv(C, BLOCK_C),). mean, var: (num_runs, C) in the
    accumulation dtype; running_mean, running_var: (C,), any float dtype."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_dtype = mean_ptr.dtype.element_ty
    sum_mean = tl.zeros([BLOCK_C], acc_dtype)
    sum_var = tl.zeros([BLOCK_C], acc_dtype)
    count = tl.zeros([BLOCK_C], acc_dtype) + M
    unbiased = divide(count, count - 1.0)
    for run in range(num_runs):
        if run == num_runs - 1:
            count = tl.zeros([BLOCK_C], acc_dtype) + M_last
            unbiased = divide(count, count - 1.0)
        sum_mean += tl.load(mean_ptr + run * C + c, mask=c_mask, other=0.0)
        sum_var += tl.load(var_ptr + run * C + c, mask=c_mask, other=0.0) * unbiased
    runs = tl.zeros([BLOCK_C], acc_dtype) + num_runs
    if MOMENTUM_FROM_COUNT:
        factor = divide(tl.zeros([BLOCK_C], acc_dtype) + 1.0,
                        tl.load(num_batches_tracked_ptr).to(acc_dtype))
    else:
        factor = tl.zeros([BLOCK_C], acc_dtype) + momentum + momentum_lo
    running_mean = tl.load(running_mean_ptr + c, mask=c_mask).to(acc_dtype)
    running_var = tl.load(running_var_ptr + c, mask=c_mask).to(acc_dtype)
    running_mean = (1.0 - factor) * running_mean + factor * divide(sum_mean, runs)
    running_var = (1.0 - factor) * running_var + factor * divide(sum_var, runs)
    tl.store(running_mean_ptr + c, running_mean.to(running_mean_ptr.dtype.element_ty),
             mask=c_mask)
    tl.store(running_var_ptr + c, running_var.to(running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def sum_runs_kernel(
    grad_weight_runs_ptr, grad_bias_runs_ptr, grad_weight_ptr, grad_bias_ptr, C, num_runs,
    BLOCK_C: tl.constexpr, WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
):
    """grad_weight[c] = Σ_g grad_weight_runs[g, c] and grad_bias likewise (each when asked),
    in their own dtypes: γ and β are shared by every run. Grid (cdiv(C, BLOCK_C),);
    *_runs: (num_runs, C) in the accumulation dtype."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if WRITE_GRAD_WEIGHT:
        total = tl.zeros([BLOCK_C], grad_weight_runs_ptr.dtype.element_ty)
        for run in range(num_runs):
            total += tl.load(grad_weight_runs_ptr + run * C + c, mask=c_mask, other=0.0)
        tl.store(grad_weight_ptr + c, total.to(grad_weight_ptr.dtype.element_ty), mask=c_mask)
    if WRITE_GRAD_BIAS:
        total = tl.zeros([BLOCK_C], grad_bias_runs_ptr.dtype.element_ty)
        for run in range(num_runs):
            total += tl.load(grad_bias_runs_ptr + run * C + c, mask=c_mask, other=0.0)
        tl.store(grad_bias_ptr + c, total.to(grad_bias_ptr.dtype.element_ty), mask=c_mask)
