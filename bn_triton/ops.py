"""Launch wrappers, one per kernel: view -> allocate -> grid -> launch.

Argument checking that mirrors torch's lives in functional.py and runs before anything here;
these wrappers only derive shapes, strides and launch parameters. Tensors are seen as (N, C, S)
through their strides (see kernels/__init__.py); no hot path copies a contiguous or
channels-last tensor.
"""
from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction

from . import kernels

Strides = Tuple[int, int, int]

# Values in one [BLOCK_C, BLOCK_S] tile of the split path: 16 per thread at 4 warps, i.e. four
# 128-bit loads of float32 (two of half) per thread per tensor, which keeps enough bytes in
# flight per SM on an H100 without spilling the kernels that hold x and dy tiles at once.
MAX_TILE = 2048
# Rows of a split tile when channels are the contiguous dim (channels_last, 2-D input): one
# full 128-byte line of channels (32 float32), which leaves rows along S to fill the tile and
# more channel blocks to fill the GPU.
ROW_BYTES_CHANNELS_LAST = 128
# Values of a channel each split covers at least: a program also loads a few values per
# channel (pivot, γ, β, statistics, its partials: about 10), which stay under ~2%.
MIN_SPLIT_VALUES = 512
# Split partials the last program of a channel block combines at once ([BLOCK_C, SPLITS_P2]).
MAX_COMBINE_TILE = 4096
# Programs per SM the split heuristic aims for: enough resident warps to cover DRAM latency.
PROGRAMS_PER_SM = 4
# Without a GPU (the interpreter) plan as on an H100 SXM, so that counted launches and traffic
# are those the GPU would see.
H100_SM_COUNT = 132
NUM_WARPS = 4
# The slab path holds a program's whole [BLOCK_C, BLOCK_N, BLOCK_S] slab in registers, one
# register a value (two for float64). The budgets, in float32 values a program, fill an SM's
# register file (64K 32-bit registers) with one 16-warp program: the forward holds one tensor
# (x), 64 values a thread; the backward two (x and dy), 32 values each. ptxas fits both
# without spilling for every layout, dtype and flag (tests/test_compile.py); twice either
# spills. float64 values take two registers and 64-bit addressing leaves less room: a quarter
# as many (half spills).
MAX_SLAB_FORWARD = 32768
MAX_SLAB_BACKWARD = 16384
# Autotune configs of a slab kernel hold at most this many values a thread per live tensor
# (more spill): forward, backward.
MAX_SLAB_VALUES_PER_THREAD = {"forward_slab_kernel": 64, "backward_slab_kernel": 32}
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


def tile_shape(C: int, S: int, channels_contiguous: bool, element_size: int) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of the tiles, at most MAX_TILE values.

    Lanes run along the contiguous dim so that loads coalesce (and vectorize when aligned):
    along S for NCHW-like input, along C for channels_last and 2-D input. The other dim takes
    what is left, so that few values per channel (7x7 maps) or few channels (C = 3) still fill
    the tile."""
    if channels_contiguous:
        block_c = min(triton.next_power_of_2(C), ROW_BYTES_CHANNELS_LAST // element_size)
        block_s = min(triton.next_power_of_2(S), MAX_TILE // block_c)
    else:
        block_s = min(triton.next_power_of_2(S), MAX_TILE)
        block_c = min(triton.next_power_of_2(C), MAX_TILE // block_s)
    return block_c, block_s


def slab_shape(N: int, C: int, S: int, channels_contiguous: bool, element_size: int,
               max_values: int) -> Optional[Tuple[int, int, int]]:
    """(BLOCK_C, BLOCK_N, BLOCK_S) of a slab holding whole channels, or None when the smallest
    useful slab exceeds max_values float32 values (a quarter as many float64); then the split
    path runs.

    BLOCK_N ≥ N and BLOCK_S ≥ S (powers of two). Channels per program: as many as keep the slab
    near SLAB_TARGET; for channels-contiguous input at least a sector's worth (SECTOR_BYTES)
    where that fits, and never fewer than MIN_ROW_BYTES' worth."""
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

    @property
    def M(self) -> int:
        return self.N * self.S

    @property
    def slab(self) -> bool:
        return self.BLOCK_N is not None

    @property
    def SPLITS_P2(self) -> int:
        return triton.next_power_of_2(self.num_splits)

    @property
    def grid(self) -> Tuple[int, ...]:
        c_blocks = triton.cdiv(self.C, self.BLOCK_C)
        return (c_blocks,) if self.slab else (c_blocks, self.num_splits)

    @property
    def slab_num_warps(self) -> int:
        """Warps of a slab program: 16 to 64 slab values a thread, 4 to 16 warps."""
        values = self.BLOCK_C * self.BLOCK_N * self.BLOCK_S
        return max(4, min(16, values // 512))

    def split_args(self) -> dict:
        return dict(C=self.C, S=self.S, tiles_per_n=self.tiles_per_n, num_tiles=self.num_tiles,
                    tiles_per_split=self.tiles_per_split, num_splits=self.num_splits)


def make_plan(shape: Sequence[int], strides: Sequence[Strides], device: torch.device,
              element_size: int = 4, max_slab: Optional[int] = None) -> Plan:
    """Plan a call over tensors of one shape (N, C, *spatial) with the given (n, c, s) strides:
    a slab when whole channels fit in max_slab values (see slab_shape; None: never), splits
    otherwise."""
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    if all(stride_n == S * stride_s for stride_n, _, stride_s in strides):
        N, S = 1, N * S
        strides = [(0, stride_c, stride_s) for _, stride_c, stride_s in strides]
    contiguous = [stride_c == 1 and stride_s != 1 for _, stride_c, stride_s in strides]
    channels_contiguous = contiguous[0]
    if max_slab is not None and len(set(contiguous)) > 1:
        # Tensors that run along different dims (x channels_last, dy contiguous, say) meet in
        # registers through a layout conversion in shared memory, which needs registers of its
        # own: half the slab (a full one spills).
        max_slab //= 2
    slab = (slab_shape(N, C, S, channels_contiguous, element_size, max_slab)
            if max_slab is not None else None)
    if slab is not None:
        block_c, block_n, block_s = slab
        extents = (block_c, block_n, block_s)
    else:
        block_c, block_s = tile_shape(C, S, channels_contiguous, element_size)
        tiles_per_n = triton.cdiv(S, block_s)
        extents = (block_c, N, tiles_per_n * block_s)
    # The largest offset a tile may form, masked lanes included.
    c_pad = triton.cdiv(C, block_c) * block_c
    largest = max((extents[1] - 1) * sn + (c_pad - 1) * sc + (extents[2] - 1) * ss
                  for sn, sc, ss in strides)
    common = dict(N=N, C=C, S=S, strides=tuple(strides), BLOCK_C=block_c, BLOCK_S=block_s,
                  INT64=largest >= 2**31)
    if slab is not None:
        return Plan(**common, BLOCK_N=block_n)
    num_tiles = N * tiles_per_n
    c_blocks = triton.cdiv(C, block_c)
    max_splits = max(1, MAX_COMBINE_TILE // block_c)
    target = PROGRAMS_PER_SM * _sm_count(device)
    splits = max(1, min(num_tiles, max_splits, triton.cdiv(target, c_blocks),
                        N * S // MIN_SPLIT_VALUES))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)  # no split is left empty
    return Plan(**common, tiles_per_n=tiles_per_n, num_tiles=num_tiles,
                tiles_per_split=tiles_per_split, num_splits=splits)


_TICKETS = {}


def tickets(device: torch.device, count: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least `count` tickets for this device and stream. The
    kernels leave it zeroed (the last program of each channel block resets its ticket), so it
    is allocated once, not per call; one per stream keeps concurrent streams apart."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buffer = _TICKETS.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _TICKETS[key] = buffer
    return buffer


# Autotuning, on a GPU only: the warps (and pipelining stages) of each kernel, keyed on its tile
# shape and split count, which bucket (M, C, layout), and on the dtypes (Triton adds those).
# Tile shapes stay with the plan: they set the grid, and the traffic model counts on them.
# A kernel that updates the running statistics is tuned with restore_value, so benchmarking
# its configs leaves one update, not one per trial; the tickets need nothing (every run
# leaves them zeroed). Under the interpreter, or with BN_TRITON_AUTOTUNE=0, the fixed
# heuristic (NUM_WARPS, Plan.slab_num_warps) runs instead: autotuning there has nothing to time.
SPLIT_KEY = ["BLOCK_C", "BLOCK_S", "num_splits", "INT64"]
SLAB_KEY = ["BLOCK_C", "BLOCK_N", "BLOCK_S", "INT64"]
SPLIT_CONFIGS = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (2, 3)]
SLAB_CONFIGS = [triton.Config({}, num_warps=w) for w in (8, 16)]
RUNNING = ["running_mean_ptr", "running_var_ptr"]
TUNING = {  # kernel name -> (key, configs, restore_value)
    "batch_stats_kernel": (SPLIT_KEY, SPLIT_CONFIGS, RUNNING),
    "normalize_kernel": (SPLIT_KEY, SPLIT_CONFIGS, []),
    "forward_slab_kernel": (SLAB_KEY, SLAB_CONFIGS, RUNNING),
    "dy_sums_kernel": (SPLIT_KEY, SPLIT_CONFIGS, []),
    "input_grad_kernel": (SPLIT_KEY, SPLIT_CONFIGS, []),
    "backward_slab_kernel": (SLAB_KEY, SLAB_CONFIGS, []),
}


def candidate_configs(name: str, configs: Sequence[triton.Config], meta: dict) -> list:
    """The configs of kernel `name` worth timing for a launch with constexprs `meta`: for a
    slab kernel, those whose threads hold at most MAX_SLAB_VALUES_PER_THREAD values each (the
    widest config stays if none does)."""
    if name not in MAX_SLAB_VALUES_PER_THREAD:
        return list(configs)
    values = meta["BLOCK_C"] * meta["BLOCK_N"] * meta["BLOCK_S"]
    kept = [config for config in configs
            if values // (32 * config.num_warps) <= MAX_SLAB_VALUES_PER_THREAD[name]]
    return kept or [max(configs, key=lambda config: config.num_warps)]


def tuned(name: str, do_bench: Optional[Callable] = None):
    """Kernel `name` wrapped in triton.autotune over its TUNING entry (do_bench: Triton's
    own benchmarker when None), timing only its candidate_configs."""
    key, configs, restore_value = TUNING[name]

    def prune(configs, named_args, **meta):
        return candidate_configs(name, configs, {**named_args, **meta})

    return triton.autotune(configs=configs, key=key, restore_value=restore_value,
                           prune_configs_by={"early_config_prune": prune},
                           do_bench=do_bench)(getattr(kernels, name))


def _launchers() -> dict:
    interpreted = isinstance(kernels.normalize_kernel, InterpretedFunction)
    if interpreted or os.environ.get("BN_TRITON_AUTOTUNE") == "0":
        return {name: getattr(kernels, name) for name in TUNING}
    return {name: tuned(name) for name in TUNING}


LAUNCHERS = _launchers()


def _launch(name: str, grid, num_warps: int, **arguments) -> None:
    """Launch kernel `name`: the autotuner picks warps and stages where it runs, the heuristic
    num_warps elsewhere."""
    kernel = LAUNCHERS[name]
    options = {} if isinstance(kernel, Autotuner) else {"num_warps": num_warps}
    kernel[grid](**arguments, **options)


def _float64_pair(name: str, value: float) -> dict:
    """value as float32 + float32 remainder (Triton passes Python floats as float32): the
    float64 kernels add both back and see the float64 value to 2⁻⁴⁸ relative."""
    value = float(value)
    high = struct.unpack("f", struct.pack("f", value))[0]  # rounded to float32, no tensor
    return {name: high, f"{name}_lo": value - high}


def _strides(name: str, strides: Strides) -> dict:
    return {f"stride_{name}n": strides[0], f"stride_{name}c": strides[1],
            f"stride_{name}s": strides[2]}


def _running_args(running_mean, running_var, num_batches_tracked, momentum) -> dict:
    update = running_mean is not None
    return dict(running_mean_ptr=running_mean, running_var_ptr=running_var,
                num_batches_tracked_ptr=num_batches_tracked,
                **_float64_pair("momentum", 0.0 if momentum is None else momentum),
                UPDATE_RUNNING=update, MOMENTUM_FROM_COUNT=update and momentum is None)


def batch_statistics(x: torch.Tensor, plan: Plan, mean: torch.Tensor, invstd: torch.Tensor,
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
                eps: float) -> torch.Tensor:
    """Launch batch_stats_kernel: writes mean, invstd (and the running statistics, if given);
    returns centre = mean - x[0, c, 0] for normalize_kernel."""
    part_mean = torch.empty(plan.C, plan.num_splits, dtype=mean.dtype, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    centre = torch.empty_like(mean)
    _launch("batch_stats_kernel", plan.grid, NUM_WARPS, x_ptr=x, part_mean_ptr=part_mean,
        part_m2_ptr=part_m2, tickets_ptr=tickets(x.device, plan.grid[0]), mean_ptr=mean,
        invstd_ptr=invstd, centre_ptr=centre,
        **_running_args(running_mean, running_var, num_batches_tracked, momentum),
        **plan.split_args(), M=plan.M, **_float64_pair("eps", eps),
        **_strides("x", plan.strides[0]), BLOCK_C=plan.BLOCK_C, BLOCK_S=plan.BLOCK_S,
        SPLITS_P2=plan.SPLITS_P2, INT64=plan.INT64)
    return centre


def normalize(x: torch.Tensor, y: torch.Tensor, plan: Plan, weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
              centre: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
              running_var: Optional[torch.Tensor], eps: float) -> None:
    """Launch normalize_kernel: y from batch statistics (centre given: mean, invstd, centre
    from batch_statistics) or from the running ones (then mean and invstd are written)."""
    _launch("normalize_kernel", plan.grid, NUM_WARPS, x_ptr=x, y_ptr=y, weight_ptr=weight,
        bias_ptr=bias, mean_ptr=mean, invstd_ptr=invstd, centre_ptr=centre,
        running_mean_ptr=running_mean, running_var_ptr=running_var, **plan.split_args(),
        **_float64_pair("eps", eps), **_strides("x", plan.strides[0]),
        **_strides("y", plan.strides[1]), BLOCK_C=plan.BLOCK_C, BLOCK_S=plan.BLOCK_S,
        BATCH_STATS=centre is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        INT64=plan.INT64)


def forward_slab(x: torch.Tensor, y: torch.Tensor, plan: Plan, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                 running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                 num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
                 eps: float) -> None:
    """Launch forward_slab_kernel: the whole training forward in one pass."""
    _launch("forward_slab_kernel", plan.grid, plan.slab_num_warps, x_ptr=x, y_ptr=y,
        weight_ptr=weight, bias_ptr=bias, mean_ptr=mean, invstd_ptr=invstd,
        **_running_args(running_mean, running_var, num_batches_tracked, momentum), C=plan.C,
        N=plan.N, S=plan.S, M=plan.M, **_float64_pair("eps", eps),
        **_strides("x", plan.strides[0]), **_strides("y", plan.strides[1]), BLOCK_C=plan.BLOCK_C,
        BLOCK_N=plan.BLOCK_N, BLOCK_S=plan.BLOCK_S, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, INT64=plan.INT64)


def dy_sums(x: torch.Tensor, dy: torch.Tensor, plan: Plan, mean: torch.Tensor,
            invstd: torch.Tensor, grad_weight: Optional[torch.Tensor],
            grad_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch dy_sums_kernel: writes grad_weight / grad_bias (those given); returns the dx
    coefficients mean_dy, mean_dy_xhat (C,)."""
    part_sum_dy = torch.empty(plan.C, plan.num_splits, dtype=mean.dtype, device=x.device)
    part_sum_dy_xmu = torch.empty_like(part_sum_dy)
    mean_dy, mean_dy_xhat = torch.empty_like(mean), torch.empty_like(mean)
    _launch("dy_sums_kernel", plan.grid, NUM_WARPS, x_ptr=x, dy_ptr=dy, mean_ptr=mean,
        invstd_ptr=invstd, part_sum_dy_ptr=part_sum_dy, part_sum_dy_xmu_ptr=part_sum_dy_xmu,
        tickets_ptr=tickets(x.device, plan.grid[0]), mean_dy_ptr=mean_dy,
        mean_dy_xhat_ptr=mean_dy_xhat, grad_weight_ptr=grad_weight, grad_bias_ptr=grad_bias,
        **plan.split_args(), **_float64_pair("inv_count", 1.0 / plan.M),
        **_strides("x", plan.strides[0]), **_strides("dy", plan.strides[1]), BLOCK_C=plan.BLOCK_C,
        BLOCK_S=plan.BLOCK_S, SPLITS_P2=plan.SPLITS_P2, WRITE_GRAD_WEIGHT=grad_weight is not None,
        WRITE_GRAD_BIAS=grad_bias is not None, INT64=plan.INT64)
    return mean_dy, mean_dy_xhat


def input_grad(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, plan: Plan,
               weight: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
               coefficients: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Launch input_grad_kernel: dx with batch statistics (coefficients from dy_sums) or with
    constant ones (coefficients None; x is not read)."""
    mean_dy, mean_dy_xhat = coefficients if coefficients is not None else (None, None)
    _launch("input_grad_kernel", plan.grid, NUM_WARPS, x_ptr=x, dy_ptr=dy, dx_ptr=dx,
        weight_ptr=weight, mean_ptr=mean, invstd_ptr=invstd, mean_dy_ptr=mean_dy,
        mean_dy_xhat_ptr=mean_dy_xhat, **plan.split_args(), **_strides("x", plan.strides[0]),
        **_strides("dy", plan.strides[1]), **_strides("dx", plan.strides[2]), BLOCK_C=plan.BLOCK_C,
        BLOCK_S=plan.BLOCK_S, BATCH_STATS=coefficients is not None, HAS_WEIGHT=weight is not None,
        INT64=plan.INT64)


def backward_slab(x: torch.Tensor, dy: torch.Tensor, dx: Optional[torch.Tensor], plan: Plan,
                  weight: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                  batch_stats: bool, grad_weight: Optional[torch.Tensor],
                  grad_bias: Optional[torch.Tensor]) -> None:
    """Launch backward_slab_kernel: dγ, dβ and dx (those given) in one pass."""
    dx_strides = plan.strides[2] if dx is not None else (0, 0, 0)
    _launch("backward_slab_kernel", plan.grid, plan.slab_num_warps, x_ptr=x, dy_ptr=dy, dx_ptr=dx,
        weight_ptr=weight, mean_ptr=mean, invstd_ptr=invstd, grad_weight_ptr=grad_weight,
        grad_bias_ptr=grad_bias, C=plan.C, N=plan.N, S=plan.S, M=plan.M,
        **_strides("x", plan.strides[0]), **_strides("dy", plan.strides[1]),
        **_strides("dx", dx_strides), BLOCK_C=plan.BLOCK_C, BLOCK_N=plan.BLOCK_N,
        BLOCK_S=plan.BLOCK_S, BATCH_STATS=batch_stats, HAS_WEIGHT=weight is not None,
        WRITE_GRAD_WEIGHT=grad_weight is not None, WRITE_GRAD_BIAS=grad_bias is not None,
        WRITE_GRAD_INPUT=dx is not None, INT64=plan.INT64)


def kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself when its spatial dims flatten to one stride, else a contiguous copy: the one
    copy made, for views such as x[:, :, ::2] that no single s-stride describes."""
    return t if ncs_strides(t) is not None else t.contiguous()


def batch_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                       running_var: Optional[torch.Tensor],
                       num_batches_tracked: Optional[torch.Tensor], batch_stats: bool,
                       momentum: Optional[float], eps: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, invstd for a kernel-ready, non-empty x. Training: one slab launch when whole
    channels fit in registers, else statistics then normalize (two). Eval: one launch."""
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[1], dtype=accumulation_dtype(x.dtype), device=x.device)
    invstd = torch.empty_like(mean)
    strides = [ncs_strides(x), ncs_strides(y)]
    if not batch_stats:
        plan = make_plan(x.shape, strides, x.device, x.element_size())
        normalize(x, y, plan, weight, bias, mean, invstd, None, running_mean, running_var, eps)
        return y, mean, invstd
    plan = make_plan(x.shape, strides, x.device, x.element_size(), MAX_SLAB_FORWARD)
    if plan.slab:
        forward_slab(x, y, plan, weight, bias, mean, invstd, running_mean, running_var,
                     num_batches_tracked, momentum, eps)
    else:
        centre = batch_statistics(x, plan, mean, invstd, running_mean, running_var,
                                  num_batches_tracked, momentum, eps)
        normalize(x, y, plan, weight, bias, mean, invstd, centre, None, None, eps)
    return y, mean, invstd


def batch_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                        mean: torch.Tensor, invstd: torch.Tensor, batch_stats: bool,
                        output_mask: Tuple[bool, bool, bool], bias_dtype: Optional[torch.dtype]
                        ) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dγ, dβ) for a kernel-ready, non-empty x, each only where output_mask asks; dγ and
    dβ in the dtypes of weight and bias. dy may have any layout.

    One slab launch when whole channels fit in registers; otherwise the sums (only when dx
    uses batch statistics or dγ/dβ are asked for) and a streaming dx."""
    want_dx, want_dw, want_db = output_mask
    dy = kernel_ready(dy)
    dx = torch.empty_like(x) if want_dx else None
    grad_weight = torch.empty_like(weight) if want_dw else None
    grad_bias = torch.empty(x.shape[1], dtype=bias_dtype, device=x.device) if want_db else None
    strides = [ncs_strides(x), ncs_strides(dy)] + ([ncs_strides(dx)] if want_dx else [])
    need_sums = (want_dx and batch_stats) or want_dw or want_db
    plan = make_plan(x.shape, strides, x.device, x.element_size(),
                     MAX_SLAB_BACKWARD if need_sums else None)
    if plan.slab:
        backward_slab(x, dy, dx, plan, weight, mean, invstd, batch_stats, grad_weight,
                      grad_bias)
        return dx, grad_weight, grad_bias
    coefficients = None
    if need_sums:
        coefficients = dy_sums(x, dy, plan, mean, invstd, grad_weight, grad_bias)
    if want_dx:
        input_grad(x, dy, dx, plan, weight, mean, invstd,
                   coefficients if batch_stats else None)
    return dx, grad_weight, grad_bias
