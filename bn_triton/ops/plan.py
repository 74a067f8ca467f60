"""The plan of a call: shapes and strides in, a Plan out (pure Python, nothing launched).

Tensors are seen as (N, C, S) through their strides (see kernels/__init__.py). A call takes the
slab path (whole channels in one program's registers, one pass) when its channels fit in the
register budget below, the split path (the M axis of each channel cut into splits) otherwise.
The launch wrappers (launch.py) size grids and pass constexprs from the Plan alone.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple

import torch
import triton

Strides = Tuple[int, int, int]

# Values in one [BLOCK_C, BLOCK_S] tile of the split path, counted in float32: 16 per thread at
# 4 warps, i.e. four 128-bit loads per thread per tensor (8 KiB a tile), which keeps enough
# bytes in flight per SM without spilling the kernels that hold x and dy tiles at once. Half
# tiles hold as many bytes, twice the values (2048 of them kept 16 KiB in flight an SM, under
# the ~24 KiB an H200 needs; ptxas fits 4096 in at most 185 registers, no spills).
MAX_TILE = 2048
# The float64 backward of a fused activation: its values take two registers each, and
# libdevice's float64 erf/exp/tanh spill a full tile (gelu_tanh: 8 to 56 bytes on sm_80/90);
# half a tile fits in 136-157 registers.
MAX_TILE_FLOAT64_ACTIVATION = MAX_TILE // 2
# Rows of a split tile when channels are the contiguous dim (channels_last, 2-D input): one
# full 128-byte line of channels (32 float32), which leaves rows along S to fill the tile and
# more channel blocks to fill the GPU.
ROW_BYTES_CHANNELS_LAST = 128
# Values of a channel each split of a latency-bound call covers at least: a program also loads
# a few values per channel (pivot, γ, β, statistics, its partials: about 10), which stay under
# ~2%. A bandwidth-bound call (WAVE_BYTES) splits shorter where its waves need it: those
# per-channel loads are the same addresses for every program of a block, L2 hits.
MIN_SPLIT_VALUES = 512
# Programs per SM the split heuristic aims for: enough resident warps to cover DRAM latency. A
# tile is 8 KiB, so 4 programs loading one tensor (batch_stats, normalize) keep 32 KiB an SM
# in flight, above the ~24 KiB an H200 needs (benchmarks/waves.py), and the split kernels'
# registers let an SM hold 3 to 5 of them at once (tests/test_compile.py).
PROGRAMS_PER_SM = 4
# Programs per SM a launch of WAVE_BYTES or more gets at least where its tiles (split) or
# channels (slab) allow: with fewer, the last wave leaves SMs idle while it drains (1.5 waves
# of equal programs keep a third of the SMs idle for the second half).
MIN_PROGRAMS_PER_SM = 2
# Bytes of the call's tensors (x, y; dy, x, dx; ...: what a slab moves, the least any launch of
# the call does) from which it is bandwidth-bound: from there splits may be as short as the
# PROGRAMS_PER_SM target needs, and a slab narrows its channels towards MIN_PROGRAMS_PER_SM.
# Smaller calls are latency-bound: splits of MIN_SPLIT_VALUES at least, slabs with the
# widest rows, as before issue 17.
WAVE_BYTES = 4 * 2**20
# Without a GPU (the interpreter) plan as on an H100 SXM, so that counted launches and traffic
# are those the GPU would see.
H100_SM_COUNT = 132
# The slab path holds a program's whole [BLOCK_C, BLOCK_N, BLOCK_S] slab in registers, one
# register a value (two for float64). The budgets, in float32 values a program, fill an SM's
# register file (64K 32-bit registers) with one 16-warp program: the forward holds one tensor
# (x), 64 values a thread; the backward two (x and dy), 32 values each. ptxas fits both
# without spilling for every layout, dtype and flag (tests/test_compile.py); twice either
# spills. float64 values take two registers and 64-bit addressing leaves less room: a quarter
# as many (half spills).
MAX_SLAB_FORWARD = 32768
MAX_SLAB_BACKWARD = 16384
# Values a slab program aims for when channels are small: several channels per program.
SLAB_TARGET = 4096
# Rows of a channels-contiguous slab (channels_last, 2-D input) are BLOCK_C channels wide.
# They are a full 32-byte DRAM sector when the slab fits, and narrow to 16 bytes when it
# would not: one 128-bit access a row still, half of each sector. The other half is the
# neighbouring channel block's, which runs at the same time, so L2 should serve it and DRAM
# move each sector once (expected; not yet measured on a GPU). Narrower rows would give up
# 128-bit accesses and three quarters of every sector, so the channels-contiguous slab stops
# there: M ≤ 8192 (float32) / 4096 (half) forward, 4096 / 2048 backward.
SECTOR_BYTES = 32
MIN_ROW_BYTES = 16


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of sums and saved statistics: float32, or float64 for float64 input (ATen's)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ncs_strides(t: torch.Tensor) -> Optional[Strides]:
    """Strides (n, c, s) of t seen as (N, C, S), S the flattened spatial dims, or None when the
    spatial dims do not flatten to one stride (a sliced H or W, say). Dims of size 1 are
    ignored, as torch's contiguity checks do; with S = 1 the s-stride is taken equal to the
    n-stride so that the batch can merge into S (see Plan)."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    kept = [(size, stride) for size, stride in zip(sizes, strides) if size != 1]
    for (_, outer), (inner_size, inner) in zip(kept, kept[1:]):
        if outer != inner * inner_size:
            return None
    stride_s = kept[-1][1] if kept else t.stride(0)
    return t.stride(0), t.stride(1), stride_s


def loads_as_scalars(shape: Sequence[int], strides: Optional[Strides], element_size: int) -> bool:
    """Whether a slab of this tensor loads its rows one value at a time: rows run along S
    (channels strided) and S values are not a whole number of 16-byte vectors (7x7 maps), so
    no access can be wider than a value and each needs an address of its own."""
    if strides is None or (strides[1] == 1 and strides[2] != 1):  # rows along C
        return False
    return math.prod(shape[2:]) * element_size % 16 != 0


def tile_shape(C: int, S: int, channels_contiguous: bool, element_size: int,
               max_tile: int = MAX_TILE) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of the tiles, at most max_tile values.

    Lanes run along the contiguous dim so that loads coalesce (and vectorize when aligned):
    along S for NCHW-like input, along C for channels_last and 2-D input. The other dim takes
    what is left, so that few values per channel (7x7 maps) or few channels (C = 3) still fill
    the tile."""
    if channels_contiguous:
        block_c = min(triton.next_power_of_2(C), ROW_BYTES_CHANNELS_LAST // element_size)
        block_s = min(triton.next_power_of_2(S), max_tile // block_c)
    else:
        block_s = min(triton.next_power_of_2(S), max_tile)
        block_c = min(triton.next_power_of_2(C), max_tile // block_s)
    return block_c, block_s


def vector_width(S: int, block_c: int, block_s: int, strides: Sequence[Strides],
                 element_size: int) -> int:
    """The hint of the split kernels' tile rows (kernels/stats.tile_offsets): where rows run
    along S in every tensor of the call (stride_s = 1), the most values up to 16 bytes' worth
    that S, BLOCK_S and every n- and c-stride are multiples of, so that rows load and store as
    128-bit accesses where the launch's specialization (multiples of 16 only) cannot see it:
    S = 196 in float32 has stride_c = 196, a multiple of 4. 1 otherwise. The wide accesses
    still need 16-byte aligned pointers, which Triton specializes on. Not for one-row tiles
    (BLOCK_C = 1, S > 1024): Triton 3.9's coalescing pass asserts on the hints there
    (AxisInfo: divisibility.size() == contiguity.size()), and their rows are long enough
    that a multiple-of-16 S is seen anyway."""
    if block_c == 1 or any(stride_s != 1 for _, _, stride_s in strides):
        return 1
    vector = max(1, 16 // element_size)
    values = [S, block_s] + [stride for sn, sc, _ in strides for stride in (sn, sc)]
    while vector > 1 and any(value % vector for value in values):
        vector //= 2
    return vector


def slab_shape(N: int, C: int, S: int, channels_contiguous: bool, element_size: int,
               max_values: int, min_programs: int = 1) -> Optional[Tuple[int, int, int]]:
    """(BLOCK_C, BLOCK_N, BLOCK_S) of a slab holding whole channels, or None when the smallest
    useful slab exceeds max_values float32 values (a quarter as many float64); then the split
    path runs.

    BLOCK_N ≥ N and BLOCK_S ≥ S (powers of two). Channels per program: as many as keep the slab
    near SLAB_TARGET; for channels-contiguous input at least a sector's worth (SECTOR_BYTES)
    where that fits, and never fewer than MIN_ROW_BYTES' worth. Fewer (halving, down to one
    channel or MIN_ROW_BYTES' worth) where that gives min_programs programs or comes closer."""
    if element_size > 4:
        max_values //= 4
    per_channel = triton.next_power_of_2(N) * triton.next_power_of_2(S)
    channels = triton.next_power_of_2(C)
    fitting = max_values // per_channel  # a power of two, or 0
    min_channels = 1
    if channels_contiguous:
        narrowest = min(channels, max(1, MIN_ROW_BYTES // element_size))
        widest = min(channels, max(1, SECTOR_BYTES // element_size))
        if fitting < narrowest:
            return None
        min_channels = min(widest, fitting)
    elif fitting < 1:
        return None
    block_c = max(min_channels, min(channels, SLAB_TARGET // per_channel))
    narrowest = min(channels, max(1, MIN_ROW_BYTES // element_size)) if channels_contiguous else 1
    while block_c > narrowest and triton.cdiv(C, block_c) < min_programs:
        block_c //= 2
    return block_c, triton.next_power_of_2(N), triton.next_power_of_2(S)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SM_COUNT


@dataclass(frozen=True)
class Plan:
    """How one call walks its tensors: the (N, C, S) view, and either a slab (whole channels per
    program, grid (cdiv(C, BLOCK_C),)) or splits (grid (cdiv(C, BLOCK_C), num_splits)).

    When every tensor of the call has stride_n == S·stride_s (channels_last, 2-D input, C = 1
    or N = 1), the batch merges into S: (N, C, S) -> (1, C, N·S), so a tile runs across
    samples and tiles along S stay long."""
    N: int
    C: int
    S: int
    strides: Tuple[Strides, ...]
    BLOCK_C: int
    BLOCK_S: int
    INT64: bool
    # slab path
    BLOCK_N: Optional[int] = None
    # split path
    tiles_per_n: int = 0
    num_tiles: int = 0
    tiles_per_split: int = 0
    num_splits: int = 1
    # Values every tile row starts at a multiple of, and S is one of (see vector_width).
    VECTOR: int = 1

    def __hash__(self) -> int:  # a key of every launch's constants cache: hashed once
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, field.name) for field in fields(self)))

    @property
    def M(self) -> int:
        return self.N * self.S

    @property
    def slab(self) -> bool:
        return self.BLOCK_N is not None

    @property
    def SPLITS_P2(self) -> int:
        """A power of two ≥ num_splits (the kernels no longer take it: they combine the
        partials in chunks of the tile's own size, kernels/stats.COMBINE_TILE)."""
        return triton.next_power_of_2(self.num_splits)

    @functools.cached_property  # read by every launch: triton.cdiv is slow in Triton 3.9
    def grid(self) -> Tuple[int, ...]:
        c_blocks = triton.cdiv(self.C, self.BLOCK_C)
        return (c_blocks,) if self.slab else (c_blocks, self.num_splits)

    @functools.cached_property
    def slab_num_warps(self) -> int:
        """Warps of a slab program: 16 to 64 slab values a thread, 4 to 16 warps."""
        values = self.BLOCK_C * self.BLOCK_N * self.BLOCK_S
        return max(4, min(16, values // 512))

    def split_args(self) -> dict:
        """The split kernels' shape arguments (VECTOR among them, a constexpr)."""
        return dict(C=self.C, S=self.S, tiles_per_n=self.tiles_per_n, num_tiles=self.num_tiles,
                    tiles_per_split=self.tiles_per_split, num_splits=self.num_splits,
                    VECTOR=self.VECTOR)


def make_plan(shape: Sequence[int], strides: Sequence[Strides], device: torch.device,
              element_size: int = 4, max_slab: Optional[int] = None,
              max_tile: int = MAX_TILE) -> Plan:
    """Plan a call over tensors of one shape (N, C, *spatial) with the given (n, c, s) strides:
    a slab when whole channels fit in max_slab values (see slab_shape; None: never), splits
    of tiles of at most max_tile values otherwise."""
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    if all(stride_n == S * stride_s for stride_n, _, stride_s in strides):
        N, S = 1, N * S
        strides = [(0, stride_c, stride_s) for _, stride_c, stride_s in strides]
    contiguous = [stride_c == 1 and stride_s != 1 for _, stride_c, stride_s in strides]
    channels_contiguous = contiguous[0]
    if len(set(contiguous)) > 1:
        # Tensors that run along different dims (x channels_last, dy contiguous, say) meet in
        # registers through a layout conversion in shared memory, which needs registers of its
        # own: half the slab (a full one spills). In a split tile one of them loads as scalars
        # at stride C, each value with its own address: half a tile too (a full one spilled
        # 4 bytes in dy_sums_kernel on sm_80 under Triton 3.6).
        max_tile //= 2
        if max_slab is not None:
            max_slab //= 2
    bandwidth_bound = N * C * S * element_size * len(strides) >= WAVE_BYTES
    slab = None
    if max_slab is not None:
        wave = MIN_PROGRAMS_PER_SM * _sm_count(device) if bandwidth_bound else 1
        slab = slab_shape(N, C, S, channels_contiguous, element_size, max_slab, wave)
    if slab is not None:
        block_c, block_n, block_s = slab
        extents = (block_c, block_n, block_s)
    else:
        # max_tile counts float32 values: a half tile holds as many bytes (twice the values),
        # except where its rows are scalars (odd S along the rows: 7x7 maps), each value an
        # address of its own: 4096 of them spilled 192 bytes (dy_sums with relu and a
        # residual, bfloat16, sm_90).
        wide = element_size < 4 and (channels_contiguous or S % 2 == 0)
        block_c, block_s = tile_shape(C, S, channels_contiguous, element_size,
                                      max_tile * (4 // element_size) if wide else max_tile)
        tiles_per_n = triton.cdiv(S, block_s)
        extents = (block_c, N, tiles_per_n * block_s)
    # The largest offset a tile may form, masked lanes included, and the largest index along
    # a channel (its padded extent, N·padded S, bounds every split's value count): past 2³¹
    # either, the kernels form every index in int64.
    c_pad = triton.cdiv(C, block_c) * block_c
    largest = max((extents[1] - 1) * sn + (c_pad - 1) * sc + (extents[2] - 1) * ss
                  for sn, sc, ss in strides)
    largest = max(largest, extents[1] * extents[2])
    common = dict(N=N, C=C, S=S, strides=tuple(strides), BLOCK_C=block_c, BLOCK_S=block_s,
                  INT64=largest >= 2**31)
    if slab is not None:
        return Plan(**common, BLOCK_N=block_n)
    num_tiles = N * tiles_per_n
    c_blocks = triton.cdiv(C, block_c)
    target = PROGRAMS_PER_SM * _sm_count(device)
    # Where the call is bandwidth-bound MIN_SPLIT_VALUES yields to the target: the bytes in
    # flight (benchmarks/waves.py) need the programs more than the splits need the length.
    floor = triton.cdiv(target, c_blocks) if bandwidth_bound else 1
    splits = max(1, min(num_tiles, triton.cdiv(target, c_blocks),
                        max(N * S // MIN_SPLIT_VALUES, floor)))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    if triton.cdiv(num_tiles, tiles_per_split) < min(splits, floor):
        # Rounding tiles per split up fell under the floor: round down (≥ 1, splits ≤
        # num_tiles), which gives splits to 2·splits.
        tiles_per_split = num_tiles // splits
    splits = triton.cdiv(num_tiles, tiles_per_split)  # no split is left empty
    return Plan(**common, VECTOR=vector_width(S, block_c, block_s, strides, element_size),
                tiles_per_n=tiles_per_n, num_tiles=num_tiles,
                tiles_per_split=tiles_per_split, num_splits=splits)


def kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself when its spatial dims flatten to one stride, else a contiguous copy: the one
    copy made, for views such as x[:, :, ::2] that no single s-stride describes."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t  # the common layouts, without walking the strides
    return t if ncs_strides(t) is not None else t.contiguous()


def output_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format of what a batch norm of t returns (y, and grad_input for x = t), as
    torch's CPU kernels choose it: channels_last (channels_last_3d) for input that is exactly
    that, contiguous for everything else (sliced, permuted or transposed input included).
    The kernels write any such output in place (its spatial dims flatten to one stride)."""
    if not t.is_contiguous():
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def empty_output(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of t's shape and dtype in output_format(t): y for x = t, or
    grad_input. The fake (meta) kernels of the ops call this too, so their strides are the
    real ones."""
    return torch.empty_like(t, memory_format=output_format(t))
