"""Per-channel mean and variance of a mini-batch: Algorithm 1, lines 1-2, of arXiv:1502.03167.

Split path (large M). The M values of a channel are cut into num_splits contiguous runs of tiles
so that a tensor with few channels and many values per channel still gives every SM work. Each
program reduces its run to Welford partials (count, mean, M2 = Σ(x - mean)²), merging one tile
at a time with Chan's formula, then takes an integer ticket for its channel block; the program
that takes the last ticket combines the block's partials in a fixed order and writes the final
statistics (and the running-statistic update). Consumers read O(C) values, and no separate
combine launch is needed. The only atomics are those integer tickets: sums never depend on
which program finishes first, so the same input gives the same bits.

Nothing here computes E[x²] - E[x]², which cancels catastrophically when |mean| >> std in
float32. All sums run on x - pivot, pivot = x[0, c, 0] (the same for every program of a
channel): with x = 1e4 + N(0, 1) a float32 tile mean near 1e4 is rounded by ~5e-4, which Chan's
between-tile term δ² turns into a 1e-5 relative error of var; around the pivot the means are
O(std) and that error disappears.
"""
import triton
import triton.language as tl

# Split partials the last program of a channel block combines at once, [BLOCK_C, CHUNK]: 8 a
# thread at 4 warps, so that the combine needs fewer registers than the tile loop (a whole
# [BLOCK_C, SPLITS_P2] of 4096 took 254 registers on sm_90, which held the whole kernel to
# two programs an SM: registers are allocated for a kernel's fullest point).
COMBINE_TILE = tl.constexpr(1024)
# The split kernels' tile and split counts: loop bounds only, so Triton need not specialize on
# them (divisible by 16, equal to 1). Specialized, nearly every layer of a network was a
# compilation of its own (issue 17's cold start).
SPLIT_COUNTS = ["tiles_per_n", "num_tiles", "tiles_per_split", "num_splits"]


@triton.jit
def split_range(split, tiles_per_split, num_tiles, INT64: tl.constexpr):
    """[first, last): the tiles of split `split`, in int64 when INT64 so that every index
    derived from a tile number (tile_offsets, tile_values) is formed in 64 bits."""
    if INT64:
        split = split.to(tl.int64)
    first = split * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, num_tiles)


@triton.jit
def tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_n, stride_c, stride_s,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
                 VECTOR: tl.constexpr = 1):
    """Offsets and mask of tile `tile` of channel block `pid_c`: a [BLOCK_C, BLOCK_S] block.

    Tiles are numbered n-major: tile = n·tiles_per_n + j covers s in [j·BLOCK_S, (j+1)·BLOCK_S)
    of sample n. With INT64 (an offset, a channel's padded extent or its value count reaches
    2³¹, see plan.make_plan) the tile number is widened before anything is formed from it, so
    no intermediate (n, j·BLOCK_S, s) wraps in 32 bits. VECTOR (plan.Plan.VECTOR): every row
    starts at a multiple of VECTOR values and S is one, so the mask is constant over VECTOR
    lanes: hints that let a row load as VECTOR-wide accesses where the specialization cannot
    see it (S = 196: stride_c = 196 is no multiple of 16, but of 4)."""
    if INT64:
        tile = tl.cast(tile, tl.int64)  # a tensor on a GPU, a Python int in the interpreter
    n = tile // tiles_per_n
    s = (tile % tiles_per_n) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        c = c.to(tl.int64)
    rows = n * stride_n + c[:, None] * stride_c
    mask = (c[:, None] < C) & (s[None, :] < S)
    if VECTOR > 1:
        rows = tl.multiple_of(rows, [VECTOR, VECTOR])
        mask = tl.max_constancy(mask, [1, VECTOR])
    return rows + s[None, :] * stride_s, mask


@triton.jit
def ghost_run(run, num_runs, N, S, N_last, S_last):
    """(N, S) of virtual batch `run` in the plan's (N, C, S) view (ghost batch norm): every run
    but the last holds the plan's own; the last may be shorter (torch.split's last chunk),
    N_last samples, or S_last values where the plan merged the batch into S."""
    last = run == num_runs - 1
    return tl.where(last, N_last, N), tl.where(last, S_last, S)


@triton.jit
def run_offset(run, run_step_n, run_step_s, stride_n, stride_s, INT64: tl.constexpr):
    """Where virtual batch `run` starts in a tensor with these strides: run·run_step_n samples
    in (run_step_s values along S where the plan merged the batch into S), in int64 when
    INT64."""
    if INT64:
        run = run.to(tl.int64)
    return run * run_step_n * stride_n + run * run_step_s * stride_s


@triton.jit
def tile_values(tile, tiles_per_n, S, BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Values of a channel in tile `tile`: BLOCK_S, or what is left of S in a sample's last."""
    if INT64:
        tile = tl.cast(tile, tl.int64)  # a tensor on a GPU, a Python int in the interpreter
    return tl.minimum(S - (tile % tiles_per_n) * BLOCK_S, BLOCK_S)


@triton.jit
def channel_pivot(x_ptr, pid_c, C, stride_xc, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """pivot[c] = x[0, c, 0] for the channels of block pid_c: a value of each channel that every
    program sees alike, subtracted before summing (see the module docstring)."""
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        c = c.to(tl.int64)
    return tl.load(x_ptr + c * stride_xc, mask=c < C, other=0.0)


@triton.jit
def split_counts(splits, tiles_per_split, num_tiles, tiles_per_n, S, BLOCK_S: tl.constexpr,
                 INT64: tl.constexpr):
    """Number of values each split of a channel covers, for the split indices `splits`.

    Split k owns tiles [k·tiles_per_split, min((k+1)·tiles_per_split, num_tiles)); every tile is
    BLOCK_S values except the last one of each sample, which holds S - (tiles_per_n - 1)·BLOCK_S.
    The tiles t < T that are last of a sample number T // tiles_per_n, hence the closed form.
    In int64 when INT64: a split's count may pass 2³¹ (S does in the type it arrives in)."""
    if INT64:
        splits = splits.to(tl.int64)
    first = splits * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    last = tl.maximum(last, first)
    n_last_tiles = last // tiles_per_n - first // tiles_per_n
    short = (BLOCK_S - S % BLOCK_S) % BLOCK_S  # = tiles_per_n·BLOCK_S - S, tiles_per_n = ⌈S/BLOCK_S⌉
    return (last - first) * BLOCK_S - n_last_tiles * short


@triton.jit
def split_partials(part_a_ptr, part_b_ptr, c, c_mask, first_split, tiles_per_split, num_tiles,
                   tiles_per_n, S, num_splits, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
                   LOAD_B: tl.constexpr, INT64: tl.constexpr):
    """(part_a, part_b, counts) of splits [first_split, first_split + CHUNK) of channels
    c: [BLOCK_C, CHUNK] partials ((C, num_splits) buffers, zero past num_splits; part_b
    only with LOAD_B, else 0) and each split's value count, in part_a's dtype."""
    k = first_split + tl.arange(0, CHUNK)
    part_mask = c_mask[:, None] & (k[None, :] < num_splits)
    part_offsets = c[:, None] * num_splits + k[None, :]
    part_a = tl.load(part_a_ptr + part_offsets, mask=part_mask, other=0.0)
    if LOAD_B:
        part_b = tl.load(part_b_ptr + part_offsets, mask=part_mask, other=0.0)
    else:
        part_b = tl.zeros(part_a.shape, part_a.dtype)
    counts = split_counts(k, tiles_per_split, num_tiles, tiles_per_n, S, BLOCK_S, INT64)
    return part_a, part_b, counts.to(part_a.dtype)  # 0 past num_splits: no tiles


@triton.jit
def finished_last(tickets_ptr, pid_c, num_splits, epoch):
    """Whether this program is the last of the num_splits programs of channel block pid_c to
    get here, by an int64 ticket per block: the launch's epoch (from the host, see
    launch.Tickets) in the high 32 bits, arrivals in the low 32.

    Fast path: one acq_rel atomic add. The word normally holds (epoch, 0), left by the last
    program of the launch before on this buffer, which writes (epoch + 1, 0). Any other epoch
    (a poisoned buffer, a stray increment, launches reordered between threads) is stale:
    the programs that see it claim the word with a compare-and-swap, the first to succeed
    restarts it at (epoch, 1) and discards the stale count, the others add to it. So a ticket
    that drifted is right again at the next launch, and this one is right too.

    Ordering: the barrier before the ticket puts every thread's partial stores before the
    atomic's release; the acq_rel atomics (gpu scope) make them visible to the last program,
    whose threads read them after the barrier that follows."""
    tl.debug_barrier()
    ticket_ptr = tickets_ptr + pid_c
    base = epoch.to(tl.int64) << 32
    old = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    stale = (old >> 32) != epoch
    arrivals = old - base + 1
    seen = old + 1  # the word after this program's add, if nobody else moved it
    while stale:
        claimed = tl.where((seen >> 32) == epoch, seen + 1, base + 1)
        found = tl.atomic_cas(ticket_ptr, seen, claimed, sem="acq_rel", scope="gpu")
        stale = found != seen
        arrivals = claimed - base
        seen = found
    is_last = arrivals == num_splits
    if is_last:
        next_epoch = (epoch.to(tl.int64) + 1) & 2147483647  # 31 bits, as launch.EPOCHS
        tl.atomic_xchg(ticket_ptr, next_epoch << 32, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    return is_last


@triton.jit
def divide(numerator, denominator):
    """numerator / denominator correctly rounded: float32 `/` compiles to an approximate
    division on NVIDIA (div.full.f32, 2 ulp); div_rn is float32 only, and float64 `/` is
    already IEEE (div.rn.f64)."""
    if numerator.dtype == tl.float64:
        return numerator / denominator
    else:
        return tl.math.div_rn(numerator, denominator)


@triton.jit
def inverse_std(var, eps):
    """invstd = 1/sqrt(var + eps), var in the accumulation dtype: a correctly rounded square
    root, then a correctly rounded division, as CUDA's 1.0f / sqrtf(x) under nvcc's defaults
    (tl.sqrt is approximate for float32 on NVIDIA; sqrt_rn is float32 only, and tl.sqrt of
    float64 is already exact)."""
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return divide(tl.zeros(var.shape, var.dtype) + 1.0, tl.sqrt_rn(var + eps))


@triton.jit
def channel_scale(weight_ptr, c, c_mask, invstd, eps, eps_lo, HAS_WEIGHT: tl.constexpr,
                  ABS_WEIGHT: tl.constexpr):
    """scale = γ·invstd per channel (γ = 1 when absent), in invstd's dtype: forward's
    y = (x - mean)·scale + β and backward's dx = scale·(...). ABS_WEIGHT (the memory-saving
    mode) takes γ̂ = |γ| + eps instead (eps a float32 pair): never zero, so x̂ = (z - β)/γ̂ can
    be recovered."""
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(invstd.dtype)
        if ABS_WEIGHT:
            weight = tl.abs(weight) + eps + eps_lo
        return invstd * weight
    else:
        return invstd


@triton.jit
def channel_shift(bias_ptr, c, c_mask, like, HAS_BIAS: tl.constexpr):
    """shift = β per channel (0 when absent), in the dtype and shape of `like`."""
    if HAS_BIAS:
        return tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(like.dtype)
    else:
        return tl.zeros(like.shape, like.dtype)


@triton.jit
def renorm_factors(running_mean_ptr, running_var_ptr, renorm_limits_ptr, c, c_mask, mean,
                   invstd, eps, eps_lo):
    """Batch Renormalization's correction (Ioffe 2017, arXiv:1702.03275, Algorithm 1) of every
    channel, from the running statistics before this batch updates them:
        σ_B = sqrt(var + eps),  σ = sqrt(running_var + eps),
        r = clip(σ_B/σ, 1/r_max, r_max),  d = clip((mean - running_mean)/σ, -d_max, d_max),
    σ_B/σ taken as invstd_running/invstd (both correctly rounded, see inverse_std). r and d
    are constants of the backward (no gradient flows through them). renorm_limits: (r_max,
    d_max), read on the device (a schedule changes them every step: no recompilation, no
    host value). With r_max = 1 and d_max = 0, r = 1 and d = 0 exactly: batch norm's bits."""
    acc_dtype = invstd.dtype
    running_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
    running_var = tl.load(running_var_ptr + c, mask=c_mask, other=1.0).to(acc_dtype)
    invstd_running = inverse_std(running_var + eps_lo, eps)
    r_limit = tl.zeros(invstd.shape, acc_dtype) + tl.load(renorm_limits_ptr).to(acc_dtype)
    d_limit = tl.zeros(invstd.shape, acc_dtype) + tl.load(renorm_limits_ptr + 1).to(acc_dtype)
    r = divide(invstd_running, tl.where(c_mask, invstd, 1.0))
    r = tl.minimum(tl.maximum(r, divide(tl.zeros(r.shape, acc_dtype) + 1.0, r_limit)), r_limit)
    d = tl.minimum(tl.maximum((mean - running_mean) * invstd_running, -d_limit), d_limit)
    return r, d


@triton.jit
def renorm_affine(weight_ptr, c, c_mask, scale, shift, r, d, HAS_WEIGHT: tl.constexpr):
    """scale·r and shift + γ·d: batch norm's per-channel affine turned into Batch
    Renormalization's, y = γ·(x̂·r + d) + β = (x - mean)·(γ·invstd·r) + (β + γ·d)."""
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(scale.dtype)
        return scale * r, shift + weight * d
    else:
        return scale * r, shift + d


@triton.jit
def update_running_stats(running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, c, c_mask,
                         mean, var, M, momentum, momentum_lo,
                         MOMENTUM_FROM_COUNT: tl.constexpr):
    """torch's running averages, with f = momentum, or 1/num_batches_tracked (read on the
    device) for momentum=None:
        running_mean = (1 - f)·running_mean + f·mean
        running_var  = (1 - f)·running_var  + f·var·M/(M - 1)     (unbiased, as torch)
    momentum arrives as a float32 pair (value, remainder): float64 buffers see the float64 value."""
    acc_dtype = mean.dtype
    if MOMENTUM_FROM_COUNT:
        factor = divide(tl.zeros(mean.shape, acc_dtype) + 1.0,
                        tl.load(num_batches_tracked_ptr).to(acc_dtype))
    else:
        factor = tl.zeros(mean.shape, acc_dtype) + momentum + momentum_lo
    count = tl.zeros(mean.shape, acc_dtype) + M  # M exactly, in the accumulation type
    running_mean = tl.load(running_mean_ptr + c, mask=c_mask).to(acc_dtype)
    running_var = tl.load(running_var_ptr + c, mask=c_mask).to(acc_dtype)
    running_mean = (1.0 - factor) * running_mean + factor * mean
    running_var = (1.0 - factor) * running_var + factor * var * divide(count, count - 1.0)
    tl.store(running_mean_ptr + c, running_mean.to(running_mean_ptr.dtype.element_ty), mask=c_mask)
    tl.store(running_var_ptr + c, running_var.to(running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize=["epoch", *SPLIT_COUNTS])
def batch_stats_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, tickets_ptr, epoch,
    mean_ptr, invstd_ptr, centre_ptr, var_ptr, running_mean_ptr, running_var_ptr,
    num_batches_tracked_ptr, renorm_ptr, renorm_limits_ptr,
    C, S, M, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    momentum, momentum_lo, eps, eps_lo,
    num_runs, N_last, S_last, run_step_n, run_step_s,
    stride_xn, stride_xc, stride_xs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, MOMENTUM_FROM_COUNT: tl.constexpr, WRITE_VAR: tl.constexpr,
    RENORM: tl.constexpr, GHOST: tl.constexpr, INT64: tl.constexpr, VECTOR: tl.constexpr = 1,
):
    """mean, invstd = 1/sqrt(var + eps) (biased var) of every channel, and the running update.

    Grid (cdiv(C, BLOCK_C), num_splits). Program (pid_c, k) reduces split k of its channels to
    part_mean[c, k] (mean of x - pivot) and part_m2[c, k] = Σ (x - pivot - part_mean)², merging
    a tile of b values with mean m_t and M2_t into the running (n_a, m_a, M2_a) by Chan et al.:
    δ = m_t - m_a,  n = n_a + b,  m_a += δ·b/n,  M2_a += M2_t + δ²·n_a·b/n.
    The last program of the block combines the num_splits partials with counts n_k:
    mean - pivot = Σ n_k·m_k / M,   M2 = Σ (M2_k + n_k·(m_k - (mean - pivot))²),   var = M2/M,
    over [BLOCK_C, CHUNK] chunks of them in a fixed order (CHUNK = COMBINE_TILE // BLOCK_C,
    whatever num_splits: one compilation for every split count), and writes mean, invstd,
    centre = mean - pivot (unrounded, for normalize_kernel), with WRITE_VAR var, and with
    UPDATE_RUNNING the running statistics; with RENORM, first Batch Renormalization's r and d
    (renorm_factors) to renorm: (2, C), r then d. x: (N, C, S), any strides, any float dtype.
    part_*: (C, num_splits); mean, invstd, centre, var: (C,), all in the accumulation dtype
    (float32, float64 for float64 x). tickets: int64, one per channel block, with this launch's epoch (see finished_last).
    Divisions are correctly rounded (see divide).
    GHOST (ghost batch norm): grid (cdiv(C, BLOCK_C), num_splits, num_runs); program
    (pid_c, k, g) does the above for virtual batch g alone (see ghost_run, run_offset), with
    its own partials, tickets and (C,) rows of mean, invstd, centre, var: (num_runs, C)."""
    acc_dtype = part_mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    if GHOST:
        run = tl.program_id(2)
        N_run, S = ghost_run(run, num_runs, M // S, S, N_last, S_last)
        tiles_per_n = tl.cdiv(S, BLOCK_S)
        num_tiles = N_run * tiles_per_n
        M = N_run * S
        x_ptr += run_offset(run, run_step_n, run_step_s, stride_xn, stride_xs, INT64)
        part_mean_ptr += run * C * num_splits
        part_m2_ptr += run * C * num_splits
        tickets_ptr += run * tl.num_programs(0)
        mean_ptr += run * C
        invstd_ptr += run * C
        centre_ptr += run * C
        var_ptr += run * C
    first, last = split_range(split, tiles_per_split, num_tiles, INT64)

    pivot = channel_pivot(x_ptr, pid_c, C, stride_xc, BLOCK_C, INT64).to(acc_dtype)
    count = tl.zeros([BLOCK_C], acc_dtype)  # the same for every channel of the block
    mean = tl.zeros([BLOCK_C], acc_dtype)
    m2 = tl.zeros([BLOCK_C], acc_dtype)
    for tile in range(first, last):
        offsets, mask = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_xn, stride_xc,
                                     stride_xs, BLOCK_C, BLOCK_S, INT64, VECTOR)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
        x = tl.where(mask, x - pivot[:, None], 0.0)
        tile_count = tile_values(tile, tiles_per_n, S, BLOCK_S, INT64).to(acc_dtype)
        tile_mean = divide(tl.sum(x, axis=1), tile_count)
        centred = tl.where(mask, x - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=1)
        new_count = count + tile_count
        delta = tile_mean - mean
        mean += delta * divide(tile_count, new_count)
        m2 += tile_m2 + delta * delta * divide(count * tile_count, new_count)
        count = new_count

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    tl.store(part_mean_ptr + c * num_splits + split, mean, mask=c_mask)
    tl.store(part_m2_ptr + c * num_splits + split, m2, mask=c_mask)

    if finished_last(tickets_ptr, pid_c, num_splits, epoch):
        # Two passes over the partials, CHUNK columns at a time in a fixed order, summed
        # lane-wise and reduced once: Σ n_k·m_k first, then around the centre it gives.
        CHUNK: tl.constexpr = COMBINE_TILE // BLOCK_C  # the tile's alone, as in dy_sums
        total = tl.zeros([BLOCK_C], acc_dtype) + M
        lane_sum = tl.zeros([BLOCK_C, CHUNK], acc_dtype)
        for first_split in range(0, num_splits, CHUNK):
            part_mean, _, counts = split_partials(
                part_mean_ptr, part_m2_ptr, c, c_mask, first_split, tiles_per_split,
                num_tiles, tiles_per_n, S, num_splits, BLOCK_S, CHUNK, False, INT64)
            lane_sum += part_mean * counts[None, :]
        centre = divide(tl.sum(lane_sum, axis=1), total)
        lane_sum = tl.zeros([BLOCK_C, CHUNK], acc_dtype)
        for first_split in range(0, num_splits, CHUNK):
            part_mean, part_m2, counts = split_partials(
                part_mean_ptr, part_m2_ptr, c, c_mask, first_split, tiles_per_split,
                num_tiles, tiles_per_n, S, num_splits, BLOCK_S, CHUNK, True, INT64)
            spread = part_mean - centre[:, None]
            lane_sum += part_m2 + counts[None, :] * spread * spread
        var = divide(tl.sum(lane_sum, axis=1), total)
        mean = pivot + centre
        invstd = inverse_std(var + eps_lo, eps)
        tl.store(mean_ptr + c, mean, mask=c_mask)
        tl.store(invstd_ptr + c, invstd, mask=c_mask)
        tl.store(centre_ptr + c, centre, mask=c_mask)
        if WRITE_VAR:  # a rank's statistics, for SyncBatchNorm to combine across ranks
            tl.store(var_ptr + c, var, mask=c_mask)
        if RENORM:  # before the update: r and d are relative to the statistics so far
            r, d = renorm_factors(running_mean_ptr, running_var_ptr, renorm_limits_ptr, c,
                                  c_mask, mean, invstd, eps, eps_lo)
            tl.store(renorm_ptr + c, r, mask=c_mask)
            tl.store(renorm_ptr + C + c, d, mask=c_mask)
        if UPDATE_RUNNING:
            update_running_stats(running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, c,
                                 c_mask, mean, var, M, momentum, momentum_lo, MOMENTUM_FROM_COUNT)
