"""Backward of batch normalization (arXiv:1502.03167, section 3, the chain rule through
Algorithm 1) and of its fused epilogue y = act(z), z = x̂·γ + β + residual, x̂ = (x - mean)·invstd:

    dz = dy·act'(z)                                 (dz = dy without an activation)
    dβ = Σ dz,   dγ = Σ dz·x̂,   d(residual) = dz,
    dx = γ·invstd·(dz - Σdz/M - x̂·Σ(dz·x̂)/M)      batch statistics (training)
    dx = γ·invstd·dz                              constant statistics (eval, running stats)

Where dz comes from (DZ_FROM, a constexpr): "dy" (no activation, or dz already computed);
"x": z recomputed from x, which backward reads anyway, so an activation costs no traffic;
"x_residual": z recomputed from x and the saved residual; "output": act'(z) from the saved
output y (relu, leaky_relu, elu, celu, selu), read instead of the residual. XHAT_FROM_OUTPUT is the
memory-saving mode (In-Place ABN, Rota Bulò et al., CVPR 2018): x is not kept, x̂ is recovered
from y as (act⁻¹(y) - β)/γ̂ with γ̂ = |γ| + eps, never zero, and dγ = Σ dz·x̂·sign(γ).

- dy_sums_kernel + input_grad_kernel (split path, large M): per-split Σdz and Σdz·(x - mean)
  whose last program per channel block combines them (see stats.py), then a streaming dx.
  x and dy are read twice: 5 element-sizes in 2 launches. With a residual, dy_sums writes dz
  (= d(residual)) and input_grad reads it in place of dy: 7 element sizes, one for the read
  act'(z) needs and one for the write of d(residual).
- backward_slab_kernel (small M): a program holds whole channels of x and dy in registers,
  reduces and writes dx from them: 3 element-sizes in 1 launch (5 with a residual).
Forward saves x (or y in the memory-saving mode), mean and invstd; x̂ is recomputed.

RENORM (Batch Renormalization, arXiv:1702.03275): z = γ·(x̂·r + d) + β with per-channel r, d
saved by the forward and held constant; the kernels above with γ·r in place of γ in dx and in
z, and dγ = r·Σdz·x̂ + d·Σdz (see channel_terms, store_affine_grads). Same traffic.
"""
import triton
import triton.language as tl

from . import activations
from .forward import slab_offsets
from .stats import (COMBINE_TILE, SPLIT_COUNTS, channel_scale, channel_shift, divide,
                    finished_last, ghost_run, renorm_affine, run_offset, split_range,
                    tile_offsets)


@triton.jit
def grad_z_and_centred(dy, x_ptr, x_offsets, y_ptr, y_offsets, residual_ptr, residual_offsets,
                       mask, mean, scale, shift, inv_scale, param, param2,
                       acc_dtype: tl.constexpr,
                       LOAD_X: tl.constexpr, ACTIVATION: tl.constexpr, DZ_FROM: tl.constexpr,
                       XHAT_FROM_OUTPUT: tl.constexpr):
    """(dz, x - mean) of a tile or a slab, zero where masked. mean, scale = γ·invstd (γ̂·invstd
    with XHAT_FROM_OUTPUT), shift = β and inv_scale = 1/scale (used with XHAT_FROM_OUTPUT)
    come broadcast to the tile's shape. Without LOAD_X
    (dx with constant statistics, nothing to recompute) x is not read and x - mean is 0."""
    if XHAT_FROM_OUTPUT:
        y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(acc_dtype)
        z = activations.inverse(y, param, param2, ACTIVATION)
        centred = (z - shift) * inv_scale
        if ACTIVATION == "identity":
            dz = dy
        else:
            dz = dy * activations.grad_from_output(y, param, param2, ACTIVATION)
    else:
        if LOAD_X:
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(acc_dtype)
            centred = x - mean
        else:
            centred = tl.zeros(dy.shape, acc_dtype)
        if DZ_FROM == "dy":
            dz = dy
        elif DZ_FROM == "output":
            y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(acc_dtype)
            dz = dy * activations.grad_from_output(y, param, param2, ACTIVATION)
        else:
            z = centred * scale + shift
            if DZ_FROM == "x_residual":
                z += tl.load(residual_ptr + residual_offsets, mask=mask, other=0.0).to(acc_dtype)
            dz = dy * activations.grad(z, param, param2, ACTIVATION)
    return tl.where(mask, dz, 0.0), tl.where(mask, centred, 0.0)


@triton.jit
def channel_terms(weight_ptr, bias_ptr, mean_ptr, invstd_ptr, renorm_ptr, c, c_mask, C, eps,
                  eps_lo, act_param, act_param_lo, act_param2, act_param2_lo,
                  HAS_WEIGHT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, XHAT_FROM_OUTPUT: tl.constexpr,
                  RENORM: tl.constexpr):
    """What every backward kernel reads per channel: mean, invstd, scale = γ·invstd (γ̂·invstd
    with XHAT_FROM_OUTPUT, see channel_scale), shift = β, inv_scale = 1/scale (1 in masked-off
    channels: no 1/0) and the activation's two parameters, in the accumulation dtype. With
    RENORM (Batch Renormalization), z = γ·(x̂·r + d) + β: scale is γ·invstd·r and shift
    β + γ·d, so dx = scale·(...) carries γ·r, as Algorithm 1 of arXiv:1702.03275
    differentiates with r and d held constant."""
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    scale = channel_scale(weight_ptr, c, c_mask, invstd, eps, eps_lo, HAS_WEIGHT,
                          XHAT_FROM_OUTPUT)
    shift = channel_shift(bias_ptr, c, c_mask, invstd, HAS_BIAS)
    if RENORM:
        r = tl.load(renorm_ptr + c, mask=c_mask, other=1.0)
        d = tl.load(renorm_ptr + C + c, mask=c_mask, other=0.0)
        scale, shift = renorm_affine(weight_ptr, c, c_mask, scale, shift, r, d, HAS_WEIGHT)
    inv_scale = divide(tl.zeros(scale.shape, scale.dtype) + 1.0, tl.where(c_mask, scale, 1.0))
    param = activations.parameter(act_param, act_param_lo, invstd.dtype)
    param2 = activations.parameter(act_param2, act_param2_lo, invstd.dtype)
    return mean, invstd, scale, shift, inv_scale, param, param2


@triton.jit
def tile_grad_z(dy_ptr, x_ptr, y_ptr, residual_ptr, pid_c, tile, tiles_per_n, C, S,
                stride_dyn, stride_dyc, stride_dys, stride_xn, stride_xc, stride_xs,
                stride_yn, stride_yc, stride_ys, stride_rn, stride_rc, stride_rs,
                mean, scale, shift, inv_scale, param, param2, LOAD_X: tl.constexpr,
                ACTIVATION: tl.constexpr, DZ_FROM: tl.constexpr,
                XHAT_FROM_OUTPUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                INT64: tl.constexpr, VECTOR: tl.constexpr):
    """(dz, x - mean, mask) of tile `tile` (see stats.tile_offsets) of the split path, each
    tensor read through its own strides (see grad_z_and_centred)."""
    dy_offsets, mask = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_dyn, stride_dyc,
                                    stride_dys, BLOCK_C, BLOCK_S, INT64, VECTOR)
    x_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_xn, stride_xc,
                                stride_xs, BLOCK_C, BLOCK_S, INT64, VECTOR)
    y_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_yn, stride_yc,
                                stride_ys, BLOCK_C, BLOCK_S, INT64, VECTOR)
    r_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_rn, stride_rc,
                                stride_rs, BLOCK_C, BLOCK_S, INT64, VECTOR)
    dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(mean.dtype)
    dz, centred = grad_z_and_centred(
        dy, x_ptr, x_offsets, y_ptr, y_offsets, residual_ptr, r_offsets, mask,
        mean[:, None], scale[:, None], shift[:, None], inv_scale[:, None], param, param2,
        mean.dtype, LOAD_X, ACTIVATION, DZ_FROM, XHAT_FROM_OUTPUT)
    return dz, centred, mask


@triton.jit
def store_affine_grads(grad_weight_ptr, grad_bias_ptr, weight_ptr, renorm_ptr, c, c_mask, C,
                       sum_dz, sum_dz_xhat, WRITE_GRAD_WEIGHT: tl.constexpr,
                       WRITE_GRAD_BIAS: tl.constexpr, XHAT_FROM_OUTPUT: tl.constexpr,
                       RENORM: tl.constexpr):
    """dγ = Σ dz·x̂ (times sign(γ) where the forward scaled by |γ| + eps; Σ dz·(x̂·r + d) =
    r·Σ dz·x̂ + d·Σ dz with RENORM, r and d read here rather than kept live through the
    sums), dβ = Σ dz, each when asked, in its own dtype."""
    if WRITE_GRAD_WEIGHT:
        grad_weight = sum_dz_xhat
        if RENORM:
            r = tl.load(renorm_ptr + c, mask=c_mask, other=1.0)
            d = tl.load(renorm_ptr + C + c, mask=c_mask, other=0.0)
            grad_weight = r * sum_dz_xhat + d * sum_dz
        if XHAT_FROM_OUTPUT:
            weight = tl.load(weight_ptr + c, mask=c_mask, other=0.0)
            grad_weight = tl.where(weight > 0, grad_weight, tl.where(weight < 0, -grad_weight,
                                                                       0.0))
        tl.store(grad_weight_ptr + c, grad_weight.to(grad_weight_ptr.dtype.element_ty),
                 mask=c_mask)
    if WRITE_GRAD_BIAS:
        tl.store(grad_bias_ptr + c, sum_dz.to(grad_bias_ptr.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize=["epoch", *SPLIT_COUNTS])
def dy_sums_kernel(
    x_ptr, y_ptr, residual_ptr, dy_ptr, grad_residual_ptr, weight_ptr, bias_ptr,
    mean_ptr, invstd_ptr, renorm_ptr, part_sum_dy_ptr, part_sum_dy_xmu_ptr, tickets_ptr,
    epoch, mean_dy_ptr, mean_dy_xhat_ptr, grad_weight_ptr, grad_bias_ptr,
    C, S, inv_count, inv_count_lo, eps, eps_lo, act_param, act_param_lo,
    act_param2, act_param2_lo, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    num_runs, N_last, S_last, run_step_n, run_step_s, inv_count_last, inv_count_last_lo,
    stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs, stride_dyn, stride_dyc, stride_dys,
    stride_drn, stride_drc, stride_drs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    DZ_FROM: tl.constexpr, XHAT_FROM_OUTPUT: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr, RENORM: tl.constexpr,
    GHOST: tl.constexpr, INT64: tl.constexpr, VECTOR: tl.constexpr = 1,
):
    """sum_dy = Σ dz and sum_dy_xhat = invstd·Σ dz·(x - mean) of every channel (dz = dy
    without an activation; see the module docstring).

    Grid (cdiv(C, BLOCK_C), num_splits). Program (pid_c, k) stores its split's sums in
    part_sum_dy[c, k], part_sum_dy_xmu[c, k], and with WRITE_GRAD_RESIDUAL its tiles of dz to
    grad_residual; the last program of the block (an integer ticket, see stats.finished_last)
    adds the num_splits partials in a fixed order, [BLOCK_C, CHUNK] at a time, and writes
    grad_weight and grad_bias (each when asked, in its own dtype) and the dx coefficients
    mean_dy = sum_dy/M,
    mean_dy_xhat = sum_dy_xhat/M (accumulation dtype), with 1/M given as
    inv_count + inv_count_lo. x, y, residual, dy, grad_residual: (N, C, S), each with its own
    strides. mean, invstd: (C,). GHOST (ghost batch norm): grid (cdiv(C, BLOCK_C),
    num_splits, num_runs), program (pid_c, k, g) does the above for virtual batch g alone
    (stats.ghost_run, stats.run_offset; 1/M of the last run inv_count_last), with row g of
    mean, invstd, the coefficients and grad_weight, grad_bias: (num_runs, C), which
    sum_runs_kernel adds up."""
    acc_dtype = mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    if GHOST:
        run = tl.program_id(2)
        N_run, S = ghost_run(run, num_runs, num_tiles // tiles_per_n, S, N_last, S_last)
        tiles_per_n = tl.cdiv(S, BLOCK_S)
        num_tiles = N_run * tiles_per_n
        if run == num_runs - 1:
            inv_count = inv_count_last
            inv_count_lo = inv_count_last_lo
        x_ptr += run_offset(run, run_step_n, run_step_s, stride_xn, stride_xs, INT64)
        if DZ_FROM == "output":
            y_ptr += run_offset(run, run_step_n, run_step_s, stride_yn, stride_ys, INT64)
        if DZ_FROM == "x_residual":
            residual_ptr += run_offset(run, run_step_n, run_step_s, stride_rn, stride_rs, INT64)
        dy_ptr += run_offset(run, run_step_n, run_step_s, stride_dyn, stride_dys, INT64)
        if WRITE_GRAD_RESIDUAL:
            grad_residual_ptr += run_offset(run, run_step_n, run_step_s, stride_drn,
                                            stride_drs, INT64)
        mean_ptr += run * C
        invstd_ptr += run * C
        part_sum_dy_ptr += run * C * num_splits
        part_sum_dy_xmu_ptr += run * C * num_splits
        tickets_ptr += run * tl.num_programs(0)
        mean_dy_ptr += run * C
        mean_dy_xhat_ptr += run * C
        if WRITE_GRAD_WEIGHT:
            grad_weight_ptr += run * C
        if WRITE_GRAD_BIAS:
            grad_bias_ptr += run * C
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, invstd, scale, shift, inv_scale, param, param2 = channel_terms(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, renorm_ptr, c, c_mask, C, eps, eps_lo,
        act_param, act_param_lo, act_param2, act_param2_lo, HAS_WEIGHT, HAS_BIAS,
        XHAT_FROM_OUTPUT, RENORM)

    # Lane-wise sums over the tiles, reduced across the block once after the loop: no
    # barrier inside the loop.
    lane_sum_dy = tl.zeros([BLOCK_C, BLOCK_S], acc_dtype)
    lane_sum_dy_xmu = tl.zeros([BLOCK_C, BLOCK_S], acc_dtype)
    first, last = split_range(split, tiles_per_split, num_tiles, INT64)
    for tile in range(first, last):
        dz, centred, mask = tile_grad_z(
            dy_ptr, x_ptr, y_ptr, residual_ptr, pid_c, tile, tiles_per_n, C, S, stride_dyn,
            stride_dyc, stride_dys, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc,
            stride_ys, stride_rn, stride_rc, stride_rs, mean, scale, shift, inv_scale, param,
            param2, True, ACTIVATION, DZ_FROM, XHAT_FROM_OUTPUT, BLOCK_C, BLOCK_S, INT64,
            VECTOR)
        if WRITE_GRAD_RESIDUAL:
            dr_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_drn,
                                         stride_drc, stride_drs, BLOCK_C, BLOCK_S, INT64,
                                         VECTOR)
            tl.store(grad_residual_ptr + dr_offsets,
                     dz.to(grad_residual_ptr.dtype.element_ty), mask=mask)
        lane_sum_dy += dz
        lane_sum_dy_xmu += dz * centred
    tl.store(part_sum_dy_ptr + c * num_splits + split, tl.sum(lane_sum_dy, axis=1), mask=c_mask)
    tl.store(part_sum_dy_xmu_ptr + c * num_splits + split, tl.sum(lane_sum_dy_xmu, axis=1),
             mask=c_mask)

    if finished_last(tickets_ptr, pid_c, num_splits, epoch):
        # The partials CHUNK columns at a time in a fixed order, summed lane-wise and reduced
        # once. CHUNK depends on the tile alone, not on num_splits: one compilation serves
        # every split count (masked lanes past num_splits load nothing). Half batch_stats'
        # chunk: two partials a lane here, and a full chunk spilled 4 bytes on sm_90 under
        # Triton 3.6 (ResNet-50's first batch norm, NCHW float32).
        CHUNK: tl.constexpr = max(1, COMBINE_TILE // 2 // BLOCK_C)
        part_sum_dy = tl.zeros([BLOCK_C, CHUNK], acc_dtype)
        part_sum_dy_xmu = tl.zeros([BLOCK_C, CHUNK], acc_dtype)
        for first_split in range(0, num_splits, CHUNK):
            k = first_split + tl.arange(0, CHUNK)
            part_mask = c_mask[:, None] & (k[None, :] < num_splits)
            part_offsets = c[:, None] * num_splits + k[None, :]
            part_sum_dy += tl.load(part_sum_dy_ptr + part_offsets, mask=part_mask, other=0.0)
            part_sum_dy_xmu += tl.load(part_sum_dy_xmu_ptr + part_offsets, mask=part_mask,
                                       other=0.0)
        sum_dy = tl.sum(part_sum_dy, axis=1)
        sum_dy_xhat = invstd * tl.sum(part_sum_dy_xmu, axis=1)
        # 1/M from the host (a float32 pair, see update_running_stats): a float64 division is
        # a called slow path whose stack frame spills here.
        count_inverse = tl.zeros([BLOCK_C], acc_dtype) + inv_count + inv_count_lo
        tl.store(mean_dy_ptr + c, sum_dy * count_inverse, mask=c_mask)
        tl.store(mean_dy_xhat_ptr + c, sum_dy_xhat * count_inverse, mask=c_mask)
        store_affine_grads(grad_weight_ptr, grad_bias_ptr, weight_ptr, renorm_ptr, c, c_mask, C,
                           sum_dy, sum_dy_xhat, WRITE_GRAD_WEIGHT, WRITE_GRAD_BIAS,
                           XHAT_FROM_OUTPUT, RENORM)


@triton.jit(do_not_specialize=SPLIT_COUNTS)
def input_grad_kernel(
    x_ptr, y_ptr, residual_ptr, dy_ptr, dx_ptr, weight_ptr, bias_ptr, mean_ptr, invstd_ptr,
    renorm_ptr, mean_dy_ptr, mean_dy_xhat_ptr, C, S, eps, eps_lo, act_param, act_param_lo,
    act_param2, act_param2_lo, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    num_runs, N_last, S_last, run_step_n, run_step_s,
    stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs, stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BATCH_STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    DZ_FROM: tl.constexpr, XHAT_FROM_OUTPUT: tl.constexpr, RENORM: tl.constexpr,
    GHOST: tl.constexpr, INT64: tl.constexpr, VECTOR: tl.constexpr = 1,
):
    """dx = γ·invstd·(dz - mean_dy - (x - mean)·invstd·mean_dy_xhat) with batch statistics
    (BATCH_STATS, coefficients from dy_sums_kernel), dx = γ·invstd·dz otherwise (x read only
    to recompute z).

    Grid (cdiv(C, BLOCK_C), num_splits). x, y, residual, dy, dx: (N, C, S), each with its own
    strides; weight, bias: (C,) or absent; mean, invstd, mean_dy, mean_dy_xhat: (C,).
    GHOST: grid (cdiv(C, BLOCK_C), num_splits, num_runs), program (pid_c, k, g) writes dx of
    virtual batch g from row g of mean, invstd, mean_dy, mean_dy_xhat: (num_runs, C)."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    if GHOST:
        run = tl.program_id(2)
        N_run, S = ghost_run(run, num_runs, num_tiles // tiles_per_n, S, N_last, S_last)
        tiles_per_n = tl.cdiv(S, BLOCK_S)
        num_tiles = N_run * tiles_per_n
        x_ptr += run_offset(run, run_step_n, run_step_s, stride_xn, stride_xs, INT64)
        if DZ_FROM == "output":
            y_ptr += run_offset(run, run_step_n, run_step_s, stride_yn, stride_ys, INT64)
        if DZ_FROM == "x_residual":
            residual_ptr += run_offset(run, run_step_n, run_step_s, stride_rn, stride_rs, INT64)
        dy_ptr += run_offset(run, run_step_n, run_step_s, stride_dyn, stride_dys, INT64)
        dx_ptr += run_offset(run, run_step_n, run_step_s, stride_dxn, stride_dxs, INT64)
        mean_ptr += run * C
        invstd_ptr += run * C
        mean_dy_ptr += run * C
        mean_dy_xhat_ptr += run * C
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, invstd, scale, shift, inv_scale, param, param2 = channel_terms(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, renorm_ptr, c, c_mask, C, eps, eps_lo,
        act_param, act_param_lo, act_param2, act_param2_lo, HAS_WEIGHT, HAS_BIAS,
        XHAT_FROM_OUTPUT, RENORM)
    if BATCH_STATS:
        mean_dy = tl.load(mean_dy_ptr + c, mask=c_mask, other=0.0)
        xmu_coef = invstd * tl.load(mean_dy_xhat_ptr + c, mask=c_mask, other=0.0)

    first, last = split_range(split, tiles_per_split, num_tiles, INT64)
    for tile in range(first, last):
        dz, centred, mask = tile_grad_z(
            dy_ptr, x_ptr, y_ptr, residual_ptr, pid_c, tile, tiles_per_n, C, S, stride_dyn,
            stride_dyc, stride_dys, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc,
            stride_ys, stride_rn, stride_rc, stride_rs, mean, scale, shift, inv_scale, param,
            param2, BATCH_STATS or DZ_FROM == "x" or DZ_FROM == "x_residual", ACTIVATION,
            DZ_FROM, XHAT_FROM_OUTPUT, BLOCK_C, BLOCK_S, INT64, VECTOR)
        dx_offsets, _ = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_dxn, stride_dxc,
                                     stride_dxs, BLOCK_C, BLOCK_S, INT64, VECTOR)
        if BATCH_STATS:
            dz = dz - mean_dy[:, None] - centred * xmu_coef[:, None]
        dx = dz * scale[:, None]
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_slab_kernel(
    x_ptr, y_ptr, residual_ptr, dy_ptr, dx_ptr, grad_residual_ptr, weight_ptr, bias_ptr,
    mean_ptr, invstd_ptr, renorm_ptr, grad_weight_ptr, grad_bias_ptr,
    C, N, S, M, eps, eps_lo, act_param, act_param_lo, act_param2, act_param2_lo,
    num_runs, N_last, S_last, run_step_n, run_step_s,
    stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs, stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs, stride_drn, stride_drc, stride_drs,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BATCH_STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, DZ_FROM: tl.constexpr, XHAT_FROM_OUTPUT: tl.constexpr,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
    WRITE_GRAD_INPUT: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr, RENORM: tl.constexpr,
    GHOST: tl.constexpr, INT64: tl.constexpr, X_LIKE_DY: tl.constexpr,
):
    """dγ, dβ, d(residual) and dx of whole channels held in registers: one read of x (or y) and
    dy, one write of dx.

    Grid (cdiv(C, BLOCK_C),); BLOCK_N ≥ N and BLOCK_S ≥ S (see forward_slab_kernel). Computes
    sum_dy = Σ dz and sum_dy_xhat = Σ dz·x̂ from the slab, writes grad_weight/grad_bias and
    grad_residual = dz when asked, then dx (WRITE_GRAD_INPUT) with batch statistics
    (BATCH_STATS) or constant ones, as in the module docstring. x, y, residual, dy, dx,
    grad_residual: (N, C, S), each with its own strides; weight, bias: (C,) or absent.
    X_LIKE_DY: x has dy's strides, and one set of offsets addresses both, which leaves the
    registers of the other to the slab (a full 16-warp slab of 7x7 maps, whose rows load as
    scalars, spilled 4 bytes on sm_90 under Triton 3.6 without it). GHOST (ghost batch
    norm): grid (cdiv(C, BLOCK_C), num_runs), program (pid_c, g) does the above for virtual
    batch g alone (stats.ghost_run, stats.run_offset), from row g of mean and invstd and into
    row g of grad_weight and grad_bias: (num_runs, C), which sum_runs_kernel adds up."""
    acc_dtype = mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    if GHOST:
        run = tl.program_id(1)
        N, S = ghost_run(run, num_runs, N, S, N_last, S_last)
        M = N * S
        x_ptr += run_offset(run, run_step_n, run_step_s, stride_xn, stride_xs, INT64)
        if DZ_FROM == "output":
            y_ptr += run_offset(run, run_step_n, run_step_s, stride_yn, stride_ys, INT64)
        if DZ_FROM == "x_residual":
            residual_ptr += run_offset(run, run_step_n, run_step_s, stride_rn, stride_rs, INT64)
        dy_ptr += run_offset(run, run_step_n, run_step_s, stride_dyn, stride_dys, INT64)
        if WRITE_GRAD_INPUT:
            dx_ptr += run_offset(run, run_step_n, run_step_s, stride_dxn, stride_dxs, INT64)
        if WRITE_GRAD_RESIDUAL:
            grad_residual_ptr += run_offset(run, run_step_n, run_step_s, stride_drn,
                                            stride_drs, INT64)
        mean_ptr += run * C
        invstd_ptr += run * C
        if WRITE_GRAD_WEIGHT:
            grad_weight_ptr += run * C
        if WRITE_GRAD_BIAS:
            grad_bias_ptr += run * C
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, invstd, scale, shift, inv_scale, param, param2 = channel_terms(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, renorm_ptr, c, c_mask, C, eps, eps_lo,
        act_param, act_param_lo, act_param2, act_param2_lo, HAS_WEIGHT, HAS_BIAS,
        XHAT_FROM_OUTPUT, RENORM)

    dy_offsets, mask = slab_offsets(pid_c, C, N, S, stride_dyn, stride_dyc, stride_dys,
                                    BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    if X_LIKE_DY:
        x_offsets = dy_offsets
    else:
        x_offsets, _ = slab_offsets(pid_c, C, N, S, stride_xn, stride_xc, stride_xs,
                                    BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    y_offsets, _ = slab_offsets(pid_c, C, N, S, stride_yn, stride_yc, stride_ys,
                                BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    r_offsets, _ = slab_offsets(pid_c, C, N, S, stride_rn, stride_rc, stride_rs,
                                BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(acc_dtype)
    dz, centred = grad_z_and_centred(
        dy, x_ptr, x_offsets, y_ptr, y_offsets, residual_ptr, r_offsets, mask,
        mean[:, None, None], scale[:, None, None], shift[:, None, None],
        inv_scale[:, None, None], param, param2, acc_dtype,
        WRITE_GRAD_WEIGHT or (WRITE_GRAD_INPUT and BATCH_STATS) or DZ_FROM == "x"
        or DZ_FROM == "x_residual",
        ACTIVATION, DZ_FROM, XHAT_FROM_OUTPUT)
    if WRITE_GRAD_RESIDUAL:
        dr_offsets, _ = slab_offsets(pid_c, C, N, S, stride_drn, stride_drc, stride_drs,
                                     BLOCK_C, BLOCK_N, BLOCK_S, INT64)
        tl.store(grad_residual_ptr + dr_offsets, dz.to(grad_residual_ptr.dtype.element_ty),
                 mask=mask)
    sum_dy = tl.sum(tl.sum(dz, axis=2), axis=1)
    sum_dy_xhat = invstd * tl.sum(tl.sum(dz * centred, axis=2), axis=1)
    store_affine_grads(grad_weight_ptr, grad_bias_ptr, weight_ptr, renorm_ptr, c, c_mask, C,
                       sum_dy, sum_dy_xhat, WRITE_GRAD_WEIGHT, WRITE_GRAD_BIAS,
                       XHAT_FROM_OUTPUT, RENORM)

    if WRITE_GRAD_INPUT:
        if BATCH_STATS:
            total = tl.zeros([BLOCK_C], acc_dtype) + M
            mean_dy = divide(sum_dy, total)
            xmu_coef = invstd * divide(sum_dy_xhat, total)
            dz = dz - mean_dy[:, None, None] - centred * xmu_coef[:, None, None]
        dx = dz * scale[:, None, None]
        dx_offsets, _ = slab_offsets(pid_c, C, N, S, stride_dxn, stride_dxc, stride_dxs,
                                     BLOCK_C, BLOCK_N, BLOCK_S, INT64)
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
