"""Normalize, scale and shift: Algorithm 1, lines 3-4, of arXiv:1502.03167, and the inference
transform of its section 3.1 when the statistics are the running ones; with an epilogue that
fuses what follows a batch norm in a network: y = act(x̂·γ + β + residual).

- normalize_kernel streams x -> y with per-channel statistics read from memory: those of
  batch_stats_kernel (split path, training) or the running ones (eval). 2 element-sizes
  (3 with a residual).
- forward_slab_kernel does the whole training forward in one launch when a channel's M values
  fit in one program's registers (small M): it loads the slab once, reduces it, updates the
  running statistics and writes y from registers. 2 element-sizes (3 with a residual), 1 launch.

The epilogue is constexpr flags, not other kernels: HAS_RESIDUAL adds residual[n, c, s] (read
through its own strides) after the affine, ACTIVATION names the activation (activations.py),
ABS_WEIGHT scales by |γ| + eps (the memory-saving mode, see channel_scale).

x - mean is formed as (x - pivot) - (mean - pivot) with pivot = x[0, c, 0] and mean - pivot
unrounded, so a large common offset cancels before anything is rounded (see stats.py).
"""
import triton
import triton.language as tl

from . import activations
from .stats import (SPLIT_COUNTS, channel_pivot, channel_scale, channel_shift, divide,
                    ghost_run, inverse_std, renorm_affine, renorm_factors, run_offset,
                    split_range, tile_offsets, update_running_stats)


@triton.jit
def epilogue(z, residual_ptr, residual_offsets, mask, act_param, act_param2,
             HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    """act(z + residual) of a tile or slab; z = x̂·γ + β, in the accumulation dtype."""
    if HAS_RESIDUAL:
        z += tl.load(residual_ptr + residual_offsets, mask=mask, other=0.0).to(z.dtype)
    return activations.activate(z, act_param, act_param2, ACTIVATION)


@triton.jit(do_not_specialize=SPLIT_COUNTS)
def normalize_kernel(
    x_ptr, y_ptr, residual_ptr, weight_ptr, bias_ptr, mean_ptr, invstd_ptr, centre_ptr,
    running_mean_ptr, running_var_ptr, renorm_ptr,
    C, S, tiles_per_n, num_tiles, tiles_per_split, num_splits, eps, eps_lo,
    act_param, act_param_lo, act_param2, act_param2_lo,
    num_runs, N_last, S_last, run_step_n, run_step_s,
    stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BATCH_STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, ABS_WEIGHT: tl.constexpr, RENORM: tl.constexpr,
    GHOST: tl.constexpr, INT64: tl.constexpr, VECTOR: tl.constexpr = 1,
):
    """y[n, c, s] = act((x[n, c, s] - mean[c])·invstd[c]·γ[c] + β[c] + residual[n, c, s]).

    Grid (cdiv(C, BLOCK_C), num_splits); program (pid_c, k) writes the tiles of split k.
    x, y, residual: (N, C, S), each with its own strides. weight, bias: (C,) or absent (γ = 1,
    β = 0). BATCH_STATS: invstd and centre = mean - x[0, c, 0] come from batch_stats_kernel.
    Otherwise mean = running_mean, invstd = 1/sqrt(running_var + eps) (eps a float32 pair, see
    update_running_stats), which split 0 writes to mean/invstd for backward. RENORM (with
    BATCH_STATS): Batch Renormalization, y = act(γ·(x̂·r + d) + β + residual) with r, d
    from batch_stats_kernel (renorm: (2, C)). act_param, act_param2: the activation's
    parameters, each a float32 pair. GHOST (ghost batch norm, with BATCH_STATS): grid
    (cdiv(C, BLOCK_C), num_splits, num_runs), program (pid_c, k, g) normalizes virtual batch
    g with row g of mean, invstd, centre: (num_runs, C) (see stats.ghost_run,
    stats.run_offset)."""
    acc_dtype = invstd_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    if GHOST:
        run = tl.program_id(2)
        N_run, S = ghost_run(run, num_runs, num_tiles // tiles_per_n, S, N_last, S_last)
        tiles_per_n = tl.cdiv(S, BLOCK_S)
        num_tiles = N_run * tiles_per_n
        x_ptr += run_offset(run, run_step_n, run_step_s, stride_xn, stride_xs, INT64)
        y_ptr += run_offset(run, run_step_n, run_step_s, stride_yn, stride_ys, INT64)
        if HAS_RESIDUAL:
            residual_ptr += run_offset(run, run_step_n, run_step_s, stride_rn, stride_rs, INT64)
        mean_ptr += run * C
        invstd_ptr += run * C
        centre_ptr += run * C
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C

    if BATCH_STATS:
        pivot = channel_pivot(x_ptr, pid_c, C, stride_xc, BLOCK_C, INT64).to(acc_dtype)
        centre = tl.load(centre_ptr + c, mask=c_mask, other=0.0)
        invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    else:
        pivot = tl.zeros([BLOCK_C], acc_dtype)
        centre = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
        var = tl.load(running_var_ptr + c, mask=c_mask, other=1.0).to(acc_dtype)
        invstd = inverse_std(var + eps_lo, eps)
        if split == 0:
            tl.store(mean_ptr + c, centre, mask=c_mask)
            tl.store(invstd_ptr + c, invstd, mask=c_mask)

    scale = channel_scale(weight_ptr, c, c_mask, invstd, eps, eps_lo, HAS_WEIGHT, ABS_WEIGHT)
    shift = channel_shift(bias_ptr, c, c_mask, invstd, HAS_BIAS)
    if RENORM:
        r = tl.load(renorm_ptr + c, mask=c_mask, other=1.0)
        d = tl.load(renorm_ptr + C + c, mask=c_mask, other=0.0)
        scale, shift = renorm_affine(weight_ptr, c, c_mask, scale, shift, r, d, HAS_WEIGHT)
    param = activations.parameter(act_param, act_param_lo, acc_dtype)
    param2 = activations.parameter(act_param2, act_param2_lo, acc_dtype)

    first, last = split_range(split, tiles_per_split, num_tiles, INT64)
    for tile in range(first, last):
        x_offsets, mask = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_xn, stride_xc,
                                       stride_xs, BLOCK_C, BLOCK_S, INT64, VECTOR)
        y_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_yn, stride_yc,
                                    stride_ys, BLOCK_C, BLOCK_S, INT64, VECTOR)
        r_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_rn, stride_rc,
                                    stride_rs, BLOCK_C, BLOCK_S, INT64, VECTOR)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(acc_dtype)
        z = ((x - pivot[:, None]) - centre[:, None]) * scale[:, None] + shift[:, None]
        y = epilogue(z, residual_ptr, r_offsets, mask, param, param2, HAS_RESIDUAL,
                     ACTIVATION)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def slab_offsets(pid_c, C, N, S, stride_n, stride_c, stride_s, BLOCK_C: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Offsets and mask of the whole [BLOCK_C, BLOCK_N, BLOCK_S] slab of channel block pid_c."""
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    s = tl.arange(0, BLOCK_S)
    if INT64:
        c = c.to(tl.int64)
        n = n.to(tl.int64)
        s = s.to(tl.int64)
    offsets = (c[:, None, None] * stride_c + n[None, :, None] * stride_n
               + s[None, None, :] * stride_s)
    mask = (c[:, None, None] < C) & (n[None, :, None] < N) & (s[None, None, :] < S)
    return offsets, mask


@triton.jit
def forward_slab_kernel(
    x_ptr, y_ptr, residual_ptr, weight_ptr, bias_ptr, mean_ptr, invstd_ptr,
    running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, renorm_ptr, renorm_limits_ptr,
    var_ptr, C, N, S, M, momentum, momentum_lo, eps, eps_lo, act_param, act_param_lo,
    act_param2, act_param2_lo, num_runs, N_last, S_last, run_step_n, run_step_s,
    stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, MOMENTUM_FROM_COUNT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, ABS_WEIGHT: tl.constexpr, RENORM: tl.constexpr,
    GHOST: tl.constexpr, INT64: tl.constexpr,
):
    """Training forward of whole channels held in registers, one read of x and one write of y.

    Grid (cdiv(C, BLOCK_C),); BLOCK_N ≥ N and BLOCK_S ≥ S, so a program's slab holds every one
    of the M = N·S values of its channels. With x' = x - pivot (pivot = x[0, c, 0]):
        centre = Σ x'/M,  var = Σ (x' - centre)²/M,  mean = pivot + centre,
        y = act((x' - centre)·invstd·γ + β + residual),  invstd = 1/sqrt(var + eps),
    an exact two-pass variance over registers. Writes mean and invstd (accumulation dtype),
    and with UPDATE_RUNNING the running statistics (see update_running_stats). RENORM: Batch
    Renormalization, y = act(γ·(x̂·r + d) + β + residual), r and d (stats.renorm_factors, from
    the running statistics before the update) written to renorm: (2, C). GHOST (ghost batch
    norm): grid (cdiv(C, BLOCK_C), num_runs), program (pid_c, g) does the above for virtual
    batch g alone (stats.ghost_run, stats.run_offset) into row g of mean, invstd and var:
    (num_runs, C); the running statistics are left to ghost_running_update_kernel."""
    acc_dtype = mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    if GHOST:
        run = tl.program_id(1)
        N, S = ghost_run(run, num_runs, N, S, N_last, S_last)
        M = N * S
        x_ptr += run_offset(run, run_step_n, run_step_s, stride_xn, stride_xs, INT64)
        y_ptr += run_offset(run, run_step_n, run_step_s, stride_yn, stride_ys, INT64)
        if HAS_RESIDUAL:
            residual_ptr += run_offset(run, run_step_n, run_step_s, stride_rn, stride_rs, INT64)
        mean_ptr += run * C
        invstd_ptr += run * C
        var_ptr += run * C
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C

    x_offsets, mask = slab_offsets(pid_c, C, N, S, stride_xn, stride_xc, stride_xs,
                                   BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    pivot = channel_pivot(x_ptr, pid_c, C, stride_xc, BLOCK_C, INT64).to(acc_dtype)
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(acc_dtype)
    x = tl.where(mask, x - pivot[:, None, None], 0.0)
    total = tl.zeros([BLOCK_C], acc_dtype) + M
    centre = divide(tl.sum(tl.sum(x, axis=2), axis=1), total)
    x = tl.where(mask, x - centre[:, None, None], 0.0)
    var = divide(tl.sum(tl.sum(x * x, axis=2), axis=1), total)
    invstd = inverse_std(var + eps_lo, eps)
    mean = pivot + centre
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(invstd_ptr + c, invstd, mask=c_mask)
    if GHOST:
        tl.store(var_ptr + c, var, mask=c_mask)
    if RENORM:  # before the update: r and d are relative to the statistics so far
        r, d = renorm_factors(running_mean_ptr, running_var_ptr, renorm_limits_ptr, c, c_mask,
                              mean, invstd, eps, eps_lo)
        tl.store(renorm_ptr + c, r, mask=c_mask)
        tl.store(renorm_ptr + C + c, d, mask=c_mask)
    if UPDATE_RUNNING:
        update_running_stats(running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, c,
                             c_mask, mean, var, M, momentum, momentum_lo, MOMENTUM_FROM_COUNT)

    scale = channel_scale(weight_ptr, c, c_mask, invstd, eps, eps_lo, HAS_WEIGHT, ABS_WEIGHT)
    shift = channel_shift(bias_ptr, c, c_mask, invstd, HAS_BIAS)
    if RENORM:
        scale, shift = renorm_affine(weight_ptr, c, c_mask, scale, shift, r, d, HAS_WEIGHT)
    z = x * scale[:, None, None] + shift[:, None, None]
    r_offsets, _ = slab_offsets(pid_c, C, N, S, stride_rn, stride_rc, stride_rs,
                                BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    param = activations.parameter(act_param, act_param_lo, acc_dtype)
    param2 = activations.parameter(act_param2, act_param2_lo, acc_dtype)
    y = epilogue(z, residual_ptr, r_offsets, mask, param, param2, HAS_RESIDUAL, ACTIVATION)
    y_offsets, _ = slab_offsets(pid_c, C, N, S, stride_yn, stride_yc, stride_ys,
                                BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
