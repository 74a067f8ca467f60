"""Backward of batch normalization (arXiv:1502.03167, section 3, the chain rule through
Algorithm 1), with x̂ = (x - mean)·invstd:

    dβ = Σ dy,   dγ = Σ dy·x̂,
    dx = γ·invstd·(dy - Σdy/M - x̂·Σ(dy·x̂)/M)      batch statistics (training)
    dx = γ·invstd·dy                              constant statistics (eval, running stats)

- dy_sums_kernel + input_grad_kernel (split path, large M): per-split Σdy and Σdy·(x - mean)
  whose last program per channel block combines them (see stats.py), then a streaming dx.
  x and dy are read twice: 5 element-sizes in 2 launches.
- backward_slab_kernel (small M): a program holds whole channels of x and dy in registers,
  reduces and writes dx from them: 3 element-sizes in 1 launch.
Only x, mean and invstd are saved by forward; x̂ is recomputed, never stored.
"""
import triton
import triton.language as tl

from .forward import slab_offsets
from .stats import channel_scale, finished_last, tile_offsets


@triton.jit
def dy_sums_kernel(
    x_ptr, dy_ptr, mean_ptr, invstd_ptr, part_sum_dy_ptr, part_sum_dy_xmu_ptr, tickets_ptr,
    mean_dy_ptr, mean_dy_xhat_ptr, grad_weight_ptr, grad_bias_ptr,
    C, S, inv_count, inv_count_lo, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS_P2: tl.constexpr,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr, INT64: tl.constexpr,
):
    """sum_dy = Σ dy and sum_dy_xhat = invstd·Σ dy·(x - mean) of every channel.

    Grid (cdiv(C, BLOCK_C), num_splits). Program (pid_c, k) stores its split's sums in
    part_sum_dy[c, k], part_sum_dy_xmu[c, k]; the last program of the block (an integer
    ticket, see stats.finished_last) adds the num_splits partials in a fixed order and writes
    grad_weight = sum_dy_xhat, grad_bias = sum_dy (each when asked, in its own dtype) and the
    dx coefficients mean_dy = sum_dy/M, mean_dy_xhat = sum_dy_xhat/M (accumulation dtype), with
    1/M given as inv_count + inv_count_lo.
    x, dy: (N, C, S), each with its own strides. mean, invstd: (C,)."""
    acc_dtype = mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)

    # Lane-wise sums over the tiles, reduced across the block once after the loop: no
    # barrier inside the loop.
    lane_sum_dy = tl.zeros([BLOCK_C, BLOCK_S], acc_dtype)
    lane_sum_dy_xmu = tl.zeros([BLOCK_C, BLOCK_S], acc_dtype)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        x_offsets, mask = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_xn, stride_xc,
                                       stride_xs, BLOCK_C, BLOCK_S, INT64)
        dy_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_dyn, stride_dyc,
                                     stride_dys, BLOCK_C, BLOCK_S, INT64)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(acc_dtype)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(acc_dtype)
        lane_sum_dy += dy
        lane_sum_dy_xmu += tl.where(mask, dy * (x - mean[:, None]), 0.0)
    tl.store(part_sum_dy_ptr + c * num_splits + split, tl.sum(lane_sum_dy, axis=1), mask=c_mask)
    tl.store(part_sum_dy_xmu_ptr + c * num_splits + split, tl.sum(lane_sum_dy_xmu, axis=1),
             mask=c_mask)

    if finished_last(tickets_ptr, pid_c, num_splits):
        k = tl.arange(0, SPLITS_P2)
        part_mask = c_mask[:, None] & (k[None, :] < num_splits)
        part_offsets = c[:, None] * num_splits + k[None, :]
        sum_dy = tl.sum(tl.load(part_sum_dy_ptr + part_offsets, mask=part_mask, other=0.0),
                        axis=1)
        invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
        sum_dy_xhat = invstd * tl.sum(
            tl.load(part_sum_dy_xmu_ptr + part_offsets, mask=part_mask, other=0.0), axis=1)
        # 1/M from the host (a float32 pair, see update_running_stats): a float64 division is
        # a called slow path whose stack frame spills here.
        count_inverse = tl.zeros([BLOCK_C], acc_dtype) + inv_count + inv_count_lo
        tl.store(mean_dy_ptr + c, sum_dy * count_inverse, mask=c_mask)
        tl.store(mean_dy_xhat_ptr + c, sum_dy_xhat * count_inverse, mask=c_mask)
        if WRITE_GRAD_WEIGHT:
            tl.store(grad_weight_ptr + c, sum_dy_xhat.to(grad_weight_ptr.dtype.element_ty),
                     mask=c_mask)
        if WRITE_GRAD_BIAS:
            tl.store(grad_bias_ptr + c, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def input_grad_kernel(
    x_ptr, dy_ptr, dx_ptr, weight_ptr, mean_ptr, invstd_ptr, mean_dy_ptr, mean_dy_xhat_ptr,
    C, S, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BATCH_STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, INT64: tl.constexpr,
):
    """dx = γ·invstd·(dy - mean_dy - (x - mean)·invstd·mean_dy_xhat) with batch statistics
    (BATCH_STATS, coefficients from dy_sums_kernel), dx = γ·invstd·dy otherwise (x unread).

    Grid (cdiv(C, BLOCK_C), num_splits). x, dy, dx: (N, C, S), each with its own strides;
    weight: (C,) or absent (γ = 1); mean, invstd, mean_dy, mean_dy_xhat: (C,)."""
    acc_dtype = invstd_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    scale = channel_scale(weight_ptr, c, c_mask, invstd, HAS_WEIGHT)
    if BATCH_STATS:
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
        mean_dy = tl.load(mean_dy_ptr + c, mask=c_mask, other=0.0)
        xmu_coef = invstd * tl.load(mean_dy_xhat_ptr + c, mask=c_mask, other=0.0)

    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        dy_offsets, mask = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_dyn, stride_dyc,
                                        stride_dys, BLOCK_C, BLOCK_S, INT64)
        dx_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_dxn, stride_dxc,
                                     stride_dxs, BLOCK_C, BLOCK_S, INT64)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(acc_dtype)
        if BATCH_STATS:
            x_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_xn, stride_xc,
                                        stride_xs, BLOCK_C, BLOCK_S, INT64)
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(acc_dtype)
            dy = dy - mean_dy[:, None] - (x - mean[:, None]) * xmu_coef[:, None]
        dx = dy * scale[:, None]
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_slab_kernel(
    x_ptr, dy_ptr, dx_ptr, weight_ptr, mean_ptr, invstd_ptr, grad_weight_ptr, grad_bias_ptr,
    C, N, S, M,
    stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BATCH_STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr, WRITE_GRAD_WEIGHT: tl.constexpr,
    WRITE_GRAD_BIAS: tl.constexpr, WRITE_GRAD_INPUT: tl.constexpr, INT64: tl.constexpr,
):
    """dγ, dβ and dx of whole channels held in registers: one read of x and dy, one write of dx.

    Grid (cdiv(C, BLOCK_C),); BLOCK_N ≥ N and BLOCK_S ≥ S (see forward_slab_kernel). Computes
    sum_dy and sum_dy_xhat from the slab, writes grad_weight/grad_bias when asked, then dx
    (WRITE_GRAD_INPUT) with batch statistics (BATCH_STATS) or constant ones, as in the module
    docstring. x, dy, dx: (N, C, S), each with its own strides; weight: (C,) or absent."""
    acc_dtype = mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)

    x_offsets, mask = slab_offsets(pid_c, C, N, S, stride_xn, stride_xc, stride_xs,
                                   BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    dy_offsets, _ = slab_offsets(pid_c, C, N, S, stride_dyn, stride_dyc, stride_dys,
                                 BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(acc_dtype)
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(acc_dtype)
    xmu = tl.where(mask, x - mean[:, None, None], 0.0)
    sum_dy = tl.sum(tl.sum(dy, axis=2), axis=1)
    sum_dy_xhat = invstd * tl.sum(tl.sum(dy * xmu, axis=2), axis=1)
    if WRITE_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + c, sum_dy_xhat.to(grad_weight_ptr.dtype.element_ty),
                 mask=c_mask)
    if WRITE_GRAD_BIAS:
        tl.store(grad_bias_ptr + c, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=c_mask)

    if WRITE_GRAD_INPUT:
        scale = channel_scale(weight_ptr, c, c_mask, invstd, HAS_WEIGHT)
        if BATCH_STATS:
            mean_dy = sum_dy / M
            xmu_coef = invstd * sum_dy_xhat / M
            dy = dy - mean_dy[:, None, None] - xmu * xmu_coef[:, None, None]
        dx = dy * scale[:, None, None]
        dx_offsets, _ = slab_offsets(pid_c, C, N, S, stride_dxn, stride_dxc, stride_dxs,
                                     BLOCK_C, BLOCK_N, BLOCK_S, INT64)
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
