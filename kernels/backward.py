"""Backward of batch normalization (arXiv:1502.03167, section 3, the chain rule through
Algorithm 1), with x̂ = (x - mean)·invstd:

    dβ = Σ dy,   dγ = Σ dy·x̂,
    dx = γ·invstd·(dy - Σdy/M - x̂·Σ(dy·x̂)/M)      batch statistics (training)
    dx = γ·invstd·dy                              constant statistics (eval, running stats)

Two kernels: per-split partial sums (Σdy and Σdy·(x - mean), from which Σdy·x̂ = invstd·Σdy·(x - mean)),
then a kernel that combines them in its prologue, writes dγ/dβ from split 0 and dx. Only x, mean
and invstd are saved by forward; x̂ is recomputed, never stored.
"""
import triton
import triton.language as tl

from .stats import tile_offsets


@triton.jit
def dy_partials_kernel(
    x_ptr, dy_ptr, mean_ptr, part_sum_dy_ptr, part_sum_dy_xmu_ptr,
    C, S, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """part_sum_dy[c, k] = Σ dy,  part_sum_dy_xmu[c, k] = Σ dy·(x - mean[c]), over split k.

    Grid (cdiv(C, BLOCK_C), num_splits). x, dy: (N, C, S), each with its own strides.
    mean: (C,); partials: (C, num_splits) contiguous, in mean's dtype (the accumulation type)."""
    acc_dtype = mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)

    sum_dy = tl.zeros([BLOCK_C], acc_dtype)
    sum_dy_xmu = tl.zeros([BLOCK_C], acc_dtype)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        x_offsets, mask = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_xn, stride_xc,
                                       stride_xs, BLOCK_C, BLOCK_S, INT64)
        dy_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_dyn, stride_dyc,
                                     stride_dys, BLOCK_C, BLOCK_S, INT64)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(acc_dtype)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(acc_dtype)
        sum_dy += tl.sum(dy, axis=1)
        sum_dy_xmu += tl.sum(tl.where(mask, dy * (x - mean[:, None]), 0.0), axis=1)

    tl.store(part_sum_dy_ptr + c * num_splits + split, sum_dy, mask=c_mask)
    tl.store(part_sum_dy_xmu_ptr + c * num_splits + split, sum_dy_xmu, mask=c_mask)


@triton.jit
def input_grad_kernel(
    x_ptr, dy_ptr, dx_ptr, weight_ptr, mean_ptr, invstd_ptr,
    part_sum_dy_ptr, part_sum_dy_xmu_ptr, grad_weight_ptr, grad_bias_ptr,
    C, S, M, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS_P2: tl.constexpr,
    HAS_PARTIALS: tl.constexpr, BATCH_STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr, WRITE_GRAD_INPUT: tl.constexpr,
    INT64: tl.constexpr,
):
    """dγ, dβ and dx of the channels of block pid_c, split by split (see the module docstring).

    Grid (cdiv(C, BLOCK_C), num_splits). HAS_PARTIALS: the prologue sums the (C, num_splits)
    partials of dy_partials_kernel in a fixed order, giving sum_dy and
    sum_dy_xhat = invstd·Σdy·(x - mean); split 0 writes grad_weight = sum_dy_xhat and
    grad_bias = sum_dy (in their own dtypes) when asked. WRITE_GRAD_INPUT: every split writes
    its tiles of dx, with batch statistics (BATCH_STATS, needs the partials) or constant ones.
    x, dy, dx: (N, C, S), each with its own strides; weight: (C,) or absent (γ = 1)."""
    acc_dtype = mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)

    if HAS_PARTIALS:
        k = tl.arange(0, SPLITS_P2)
        part_mask = c_mask[:, None] & (k[None, :] < num_splits)
        part_offsets = c[:, None] * num_splits + k[None, :]
        sum_dy = tl.sum(tl.load(part_sum_dy_ptr + part_offsets, mask=part_mask, other=0.0), axis=1)
        sum_dy_xhat = invstd * tl.sum(
            tl.load(part_sum_dy_xmu_ptr + part_offsets, mask=part_mask, other=0.0), axis=1)
        if split == 0:
            if WRITE_GRAD_WEIGHT:
                tl.store(grad_weight_ptr + c,
                         sum_dy_xhat.to(grad_weight_ptr.dtype.element_ty), mask=c_mask)
            if WRITE_GRAD_BIAS:
                tl.store(grad_bias_ptr + c, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=c_mask)

    if WRITE_GRAD_INPUT:
        scale = invstd
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
        if BATCH_STATS:
            mean_dy = sum_dy / M
            mean_dy_xhat_invstd = sum_dy_xhat * invstd / M
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
                # x̂·Σ(dy·x̂)/M = (x - mean)·invstd·Σ(dy·x̂)/M
                dy = dy - mean_dy[:, None] - (x - mean[:, None]) * mean_dy_xhat_invstd[:, None]
            dx = dy * scale[:, None]
            tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
