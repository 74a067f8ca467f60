"""Normalize, scale and shift: Algorithm 1, lines 3-4, of arXiv:1502.03167, and the inference
transform of its section 3.1 when the statistics are the running ones.

The statistics come in through the prologue: in training each program combines the Welford
partials (taken around a pivot, see stats.py) of its channels (all programs of a channel compute the same values in the same order)
and the programs of split 0 write mean/invstd for backward and update the running statistics;
in eval they are read from running_mean/running_var. No separate combine launch is needed.
"""
import triton
import triton.language as tl

from .stats import channel_pivot, combine_welford_partials, inverse_std, tile_offsets


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr, weight_ptr, bias_ptr, mean_ptr, invstd_ptr,
    part_mean_ptr, part_m2_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    C, S, M, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    momentum, momentum_lo, eps, eps_lo,
    stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS_P2: tl.constexpr,
    BATCH_STATS: tl.constexpr, UPDATE_RUNNING: tl.constexpr, MOMENTUM_FROM_COUNT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, INT64: tl.constexpr,
):
    """y[n, c, s] = (x[n, c, s] - mean[c])·invstd[c]·γ[c] + β[c],  invstd = 1/sqrt(var + eps).

    Grid (cdiv(C, BLOCK_C), num_splits); program (pid_c, k) normalizes the tiles of split k.
    x, y: (N, C, S), any strides (y may differ from x). weight, bias: (C,) or absent (γ = 1,
    β = 0). mean, invstd: (C,) outputs in the accumulation dtype (float32, float64 for float64 x).
    BATCH_STATS: mean and var = M2/M from the partials (C, num_splits) of welford_partials_kernel;
      with UPDATE_RUNNING, split 0 also sets, with f = momentum, or 1/num_batches_tracked when
      MOMENTUM_FROM_COUNT (torch's cumulative average for momentum=None, read on the device):
        running_mean = (1 - f)·running_mean + f·mean
        running_var  = (1 - f)·running_var  + f·var·M/(M - 1)      (unbiased, as torch)
    otherwise: mean = running_mean, var = running_var (the inference transform).
    x - mean is formed as (x - pivot) - (mean - pivot) from the unrounded mean - pivot of the
    partials, so a large common offset cancels before anything is rounded.
    momentum and eps arrive as float32 pairs (value, remainder) whose sum is the float64
    argument: Triton passes Python floats as float32, which float64 input must not inherit."""
    acc_dtype = mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C

    if BATCH_STATS:
        pivot = channel_pivot(x_ptr, pid_c, C, stride_xc, BLOCK_C, INT64).to(acc_dtype)
        mean_from_pivot, var = combine_welford_partials(
            part_mean_ptr, part_m2_ptr, pid_c, C, S, tiles_per_n, num_tiles, tiles_per_split,
            num_splits, M, BLOCK_C, BLOCK_S, SPLITS_P2)
        mean = pivot + mean_from_pivot
    else:
        pivot = tl.zeros([BLOCK_C], acc_dtype)
        mean_from_pivot = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
        mean = mean_from_pivot
        var = tl.load(running_var_ptr + c, mask=c_mask, other=1.0).to(acc_dtype)
    invstd = inverse_std(var + eps_lo, eps)

    if split == 0:
        tl.store(mean_ptr + c, mean, mask=c_mask)
        tl.store(invstd_ptr + c, invstd, mask=c_mask)
        if UPDATE_RUNNING:
            if MOMENTUM_FROM_COUNT:
                factor = 1.0 / tl.load(num_batches_tracked_ptr).to(acc_dtype)
            else:
                factor = tl.zeros([BLOCK_C], acc_dtype) + momentum + momentum_lo
            running_mean = tl.load(running_mean_ptr + c, mask=c_mask).to(acc_dtype)
            running_var = tl.load(running_var_ptr + c, mask=c_mask).to(acc_dtype)
            count = tl.zeros([BLOCK_C], acc_dtype) + M  # M exactly, in the accumulation type
            unbiased_var = var * (count / (count - 1.0))
            running_mean = (1.0 - factor) * running_mean + factor * mean
            running_var = (1.0 - factor) * running_var + factor * unbiased_var
            tl.store(running_mean_ptr + c, running_mean.to(running_mean_ptr.dtype.element_ty),
                     mask=c_mask)
            tl.store(running_var_ptr + c, running_var.to(running_var_ptr.dtype.element_ty),
                     mask=c_mask)

    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
    else:
        shift = tl.zeros([BLOCK_C], acc_dtype)

    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        x_offsets, mask = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_xn, stride_xc,
                                       stride_xs, BLOCK_C, BLOCK_S, INT64)
        y_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_yn, stride_yc,
                                    stride_ys, BLOCK_C, BLOCK_S, INT64)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(acc_dtype)
        y = ((x - pivot[:, None]) - mean_from_pivot[:, None]) * scale[:, None] + shift[:, None]
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
