"""Per-channel mean and variance of a mini-batch: Algorithm 1, lines 1-2, of arXiv:1502.03167.

The M values of a channel are cut into SPLITS contiguous runs of tiles so that a tensor with few
channels and many values per channel still gives every SM work. Each program reduces its run to
Welford partials (count, mean, M2 = Σ(x - mean)²) by merging one tile at a time with Chan's
formula; the consumer kernel combines the SPLITS partials of a channel in a fixed order. Nothing
here computes E[x²] - E[x]², which cancels catastrophically when |mean| >> std in float32, and
nothing uses atomics, so the same input gives the same bits.

All sums run on x - pivot, pivot = x[0, c, 0] (the same for every program of a channel). With
x = 1e4 + N(0, 1) a float32 tile mean near 1e4 is rounded by ~5e-4, which Chan's between-tile
term δ² turns into a 1e-5 relative error of var; around the pivot the means are O(std) and
that error disappears. The partials hold means of x - pivot.
"""
import triton
import triton.language as tl


@triton.jit
def tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_n, stride_c, stride_s,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Offsets and mask of tile `tile` of channel block `pid_c`: a [BLOCK_C, BLOCK_S] block.

    Tiles are numbered n-major: tile = n·tiles_per_n + j covers s in [j·BLOCK_S, (j+1)·BLOCK_S)
    of sample n. Offsets are int64 when INT64 (a tensor spans 2³¹ elements or more)."""
    n = tile // tiles_per_n
    s = (tile % tiles_per_n) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        n = n.to(tl.int64)
        s = s.to(tl.int64)
        c = c.to(tl.int64)
    offsets = n * stride_n + c[:, None] * stride_c + s[None, :] * stride_s
    mask = (c[:, None] < C) & (s[None, :] < S)
    return offsets, mask


@triton.jit
def channel_pivot(x_ptr, pid_c, C, stride_xc, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """pivot[c] = x[0, c, 0] for the channels of block pid_c: a value of each channel that every
    program sees alike, subtracted before summing (see the module docstring)."""
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        c = c.to(tl.int64)
    return tl.load(x_ptr + c * stride_xc, mask=c < C, other=0.0)


@triton.jit
def split_counts(splits, tiles_per_split, num_tiles, tiles_per_n, S, BLOCK_S: tl.constexpr):
    """Number of values each split of a channel covers, for the split indices `splits`.

    Split k owns tiles [k·tiles_per_split, min((k+1)·tiles_per_split, num_tiles)); every tile is
    BLOCK_S values except the last one of each sample, which holds S - (tiles_per_n - 1)·BLOCK_S.
    The tiles t < T that are last of a sample number T // tiles_per_n, hence the closed form."""
    first = splits * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    last = tl.maximum(last, first)
    n_last_tiles = last // tiles_per_n - first // tiles_per_n
    short = tiles_per_n * BLOCK_S - S
    return (last - first) * BLOCK_S - n_last_tiles * short


@triton.jit
def welford_partials_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr,
    C, S, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    stride_xn, stride_xc, stride_xs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Welford partials of one split: part_mean[c, k] = mean of x[c] - pivot[c] over split k,
    and part_m2[c, k] = Σ (x - pivot - part_mean[c, k])² over the same values.

    Grid (cdiv(C, BLOCK_C), num_splits). x: (N, C, S), any strides, any float dtype;
    part_mean, part_m2: (C, num_splits) contiguous, float32 (float64 for float64 x), which is
    also the accumulation type. A tile of b values with mean m_t and M2_t merges into the
    running (n_a, m_a, M2_a) by Chan et al.:  δ = m_t - m_a,  n = n_a + b,
    m_a += δ·b/n,  M2_a += M2_t + δ²·n_a·b/n."""
    acc_dtype = part_mean_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)

    pivot = channel_pivot(x_ptr, pid_c, C, stride_xc, BLOCK_C, INT64).to(acc_dtype)
    count = tl.zeros([BLOCK_C], acc_dtype)  # the same for every channel of the block
    mean = tl.zeros([BLOCK_C], acc_dtype)
    m2 = tl.zeros([BLOCK_C], acc_dtype)
    for tile in range(first, last):
        offsets, mask = tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_xn, stride_xc,
                                     stride_xs, BLOCK_C, BLOCK_S, INT64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
        x = tl.where(mask, x - pivot[:, None], 0.0)
        tile_count = tl.minimum(S - (tile % tiles_per_n) * BLOCK_S, BLOCK_S).to(acc_dtype)
        tile_mean = tl.sum(x, axis=1) / tile_count
        centred = tl.where(mask, x - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=1)
        new_count = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / new_count)
        m2 += tile_m2 + delta * delta * (count * tile_count / new_count)
        count = new_count

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    tl.store(part_mean_ptr + c * num_splits + split, mean, mask=c_mask)
    tl.store(part_m2_ptr + c * num_splits + split, m2, mask=c_mask)


@triton.jit
def combine_welford_partials(
    part_mean_ptr, part_m2_ptr, pid_c, C, S, tiles_per_n, num_tiles, tiles_per_split, num_splits,
    M, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """Mean (of x - pivot) and biased variance of the channels of block pid_c from their
    num_splits partials.

    With counts n_k, means m_k and M2_k of the splits (Σ n_k = M):
    mean = Σ n_k·m_k / M,   M2 = Σ (M2_k + n_k·(m_k - mean)²),   var = M2 / M.
    Both sums run over a fixed [BLOCK_C, SPLITS_P2] tile, so the order never changes.
    Returns (mean, var), each [BLOCK_C] in the partials' dtype."""
    acc_dtype = part_mean_ptr.dtype.element_ty
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.arange(0, SPLITS_P2)
    mask = (c[:, None] < C) & (k[None, :] < num_splits)
    offsets = c[:, None] * num_splits + k[None, :]
    part_mean = tl.load(part_mean_ptr + offsets, mask=mask, other=0.0)
    part_m2 = tl.load(part_m2_ptr + offsets, mask=mask, other=0.0)
    counts = split_counts(k, tiles_per_split, num_tiles, tiles_per_n, S, BLOCK_S).to(acc_dtype)
    mean = tl.sum(part_mean * counts[None, :], axis=1) / M
    spread = part_mean - mean[:, None]
    m2 = tl.sum(part_m2 + counts[None, :] * spread * spread, axis=1)
    return mean, m2 / M


@triton.jit
def inverse_std(var, eps):
    """invstd = 1/sqrt(var + eps), var in the accumulation dtype, with a correctly rounded square root (tl.sqrt is approximate
    for float32 on NVIDIA; sqrt_rn is float32 only, and tl.sqrt of float64 is already exact)."""
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return 1.0 / tl.sqrt_rn(var + eps)
