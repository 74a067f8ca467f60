"""Launch wrappers, one per kernel: view -> allocate -> grid -> launch.

Argument checking that mirrors torch's lives in functional.py and runs before anything here;
these wrappers only derive shapes, strides and launch parameters. Tensors are seen as (N, C, S)
through their strides (see kernels/__init__.py); no hot path copies a contiguous or
channels-last tensor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton

from .kernels import (dy_partials_kernel, input_grad_kernel, normalize_kernel,
                      welford_partials_kernel)

Strides = Tuple[int, int, int]

# Values in one [BLOCK_C, BLOCK_S] tile: 16 per thread at 4 warps, i.e. four 128-bit loads of
# float32 (two of half) per thread per tensor, which keeps enough bytes in flight per SM on an
# H100 without spilling the backward kernel that holds x and dy tiles at once.
MAX_TILE = 2048
# Lanes that run along C when channels are the contiguous dim (channels_last, 2-D input):
# 128 float32 channels are a 512-byte row, four full 128-byte lines.
MAX_BLOCK_C_CHANNELS_LAST = 128
# Split partials a combining prologue holds at once ([BLOCK_C, SPLITS_P2] values per array).
MAX_COMBINE_TILE = 2048
# Programs per SM the split heuristic aims for: enough resident warps to cover DRAM latency.
PROGRAMS_PER_SM = 4
# Without a GPU (the interpreter) plan as on an H100 SXM, so that counted launches and traffic
# are those the GPU would see.
H100_SM_COUNT = 132
NUM_WARPS = 4


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


def tile_shape(C: int, S: int, channels_contiguous: bool) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of the tiles, at most MAX_TILE values.

    Lanes run along the contiguous dim so that loads coalesce (and vectorize when aligned):
    along S for NCHW-like input, along C for channels_last and 2-D input. The other dim takes
    what is left, so that few values per channel (7x7 maps) or few channels (C = 3) still fill
    the tile."""
    if channels_contiguous:
        block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C_CHANNELS_LAST)
        block_s = min(triton.next_power_of_2(S), MAX_TILE // block_c)
    else:
        block_s = min(triton.next_power_of_2(S), MAX_TILE)
        block_c = min(triton.next_power_of_2(C), MAX_TILE // block_s)
    return block_c, block_s


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SM_COUNT


@dataclass(frozen=True)
class Plan:
    """How one call walks its tensors: the (N, C, S) view, tile shape, splits and grid.

    When every tensor of the call has stride_n == S·stride_s (channels_last, 2-D input, C = 1
    or N = 1), the batch merges into S: (N, C, S) -> (1, C, N·S), so a tile runs across
    samples and tiles along S stay long."""
    C: int
    S: int
    M: int
    strides: Tuple[Strides, ...]
    BLOCK_C: int
    BLOCK_S: int
    tiles_per_n: int
    num_tiles: int
    tiles_per_split: int
    num_splits: int
    INT64: bool

    @property
    def SPLITS_P2(self) -> int:
        return triton.next_power_of_2(self.num_splits)

    @property
    def grid(self) -> Tuple[int, int]:
        return triton.cdiv(self.C, self.BLOCK_C), self.num_splits

    def tile_args(self) -> dict:
        return dict(C=self.C, S=self.S, tiles_per_n=self.tiles_per_n, num_tiles=self.num_tiles,
                    tiles_per_split=self.tiles_per_split, num_splits=self.num_splits)


def make_plan(shape: Sequence[int], strides: Sequence[Strides], device: torch.device) -> Plan:
    """Plan a call over tensors of one shape (N, C, *spatial) with the given (n, c, s) strides."""
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    if all(stride_n == S * stride_s for stride_n, _, stride_s in strides):
        N, S = 1, N * S
        strides = [(0, stride_c, stride_s) for _, stride_c, stride_s in strides]
    channels_contiguous = strides[0][1] == 1 and strides[0][2] != 1
    block_c, block_s = tile_shape(C, S, channels_contiguous)
    tiles_per_n = triton.cdiv(S, block_s)
    num_tiles = N * tiles_per_n
    c_blocks = triton.cdiv(C, block_c)
    max_splits = max(1, MAX_COMBINE_TILE // block_c)
    target = PROGRAMS_PER_SM * _sm_count(device)
    splits = max(1, min(num_tiles, max_splits, triton.cdiv(target, c_blocks)))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)  # no split is left empty
    # The largest offset a tile may form, masked lanes included.
    c_pad = c_blocks * block_c
    s_pad = tiles_per_n * block_s
    largest = max((N - 1) * sn + (c_pad - 1) * sc + (s_pad - 1) * ss for sn, sc, ss in strides)
    return Plan(C=C, S=S, M=N * S, strides=tuple(strides), BLOCK_C=block_c, BLOCK_S=block_s,
                tiles_per_n=tiles_per_n, num_tiles=num_tiles, tiles_per_split=tiles_per_split,
                num_splits=splits, INT64=largest >= 2**31)


def welford_partials(x: torch.Tensor, plan: Plan) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch welford_partials_kernel; returns part_mean, part_m2 of shape (C, num_splits)."""
    acc_dtype = accumulation_dtype(x.dtype)
    part_mean = torch.empty(plan.C, plan.num_splits, dtype=acc_dtype, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    welford_partials_kernel[plan.grid](
        x, part_mean, part_m2, **plan.tile_args(), **_strides("x", plan.strides[0]),
        BLOCK_C=plan.BLOCK_C, BLOCK_S=plan.BLOCK_S, INT64=plan.INT64, num_warps=NUM_WARPS)
    return part_mean, part_m2


def normalize(x: torch.Tensor, y: torch.Tensor, plan: Plan, weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
              partials: Optional[Tuple[torch.Tensor, torch.Tensor]],
              running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
              num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
              eps: float) -> None:
    """Launch normalize_kernel: y from x, writing mean and invstd (C,).

    partials given: batch statistics, and running stats (if given) are updated with factor
    momentum, or 1/num_batches_tracked when momentum is None. partials None: the running
    statistics are used as they are."""
    batch_stats = partials is not None
    update_running = batch_stats and running_mean is not None
    part_mean, part_m2 = partials if batch_stats else (None, None)
    normalize_kernel[plan.grid](
        x, y, weight, bias, mean, invstd, part_mean, part_m2, running_mean, running_var,
        num_batches_tracked, **plan.tile_args(), M=plan.M,
        **_float64_pair("momentum", 0.0 if momentum is None else momentum),
        **_float64_pair("eps", eps),
        **_strides("x", plan.strides[0]), **_strides("y", plan.strides[1]),
        BLOCK_C=plan.BLOCK_C, BLOCK_S=plan.BLOCK_S, SPLITS_P2=plan.SPLITS_P2,
        BATCH_STATS=batch_stats, UPDATE_RUNNING=update_running,
        MOMENTUM_FROM_COUNT=update_running and momentum is None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, INT64=plan.INT64,
        num_warps=NUM_WARPS)


def dy_partials(x: torch.Tensor, dy: torch.Tensor, mean: torch.Tensor,
                plan: Plan) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch dy_partials_kernel; returns part_sum_dy, part_sum_dy_xmu of shape (C, num_splits)."""
    part_sum_dy = torch.empty(plan.C, plan.num_splits, dtype=mean.dtype, device=x.device)
    part_sum_dy_xmu = torch.empty_like(part_sum_dy)
    dy_partials_kernel[plan.grid](
        x, dy, mean, part_sum_dy, part_sum_dy_xmu, **plan.tile_args(),
        **_strides("x", plan.strides[0]), **_strides("dy", plan.strides[1]),
        BLOCK_C=plan.BLOCK_C, BLOCK_S=plan.BLOCK_S, INT64=plan.INT64, num_warps=NUM_WARPS)
    return part_sum_dy, part_sum_dy_xmu


def input_grad(x: torch.Tensor, dy: torch.Tensor, dx: Optional[torch.Tensor], plan: Plan,
               weight: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
               partials: Optional[Tuple[torch.Tensor, torch.Tensor]], batch_stats: bool,
               grad_weight: Optional[torch.Tensor], grad_bias: Optional[torch.Tensor]) -> None:
    """Launch input_grad_kernel: dx (if given, with batch or constant statistics) and, from the
    partials, grad_weight and grad_bias (those given). Without dx one split suffices."""
    part_sum_dy, part_sum_dy_xmu = partials if partials is not None else (None, None)
    grid = plan.grid if dx is not None else (plan.grid[0], 1)
    dx_strides = plan.strides[2] if dx is not None else (0, 0, 0)
    input_grad_kernel[grid](
        x, dy, dx, weight, mean, invstd, part_sum_dy, part_sum_dy_xmu, grad_weight, grad_bias,
        **plan.tile_args(), M=plan.M, **_strides("x", plan.strides[0]),
        **_strides("dy", plan.strides[1]), **_strides("dx", dx_strides),
        BLOCK_C=plan.BLOCK_C, BLOCK_S=plan.BLOCK_S, SPLITS_P2=plan.SPLITS_P2,
        HAS_PARTIALS=partials is not None, BATCH_STATS=batch_stats,
        HAS_WEIGHT=weight is not None, WRITE_GRAD_WEIGHT=grad_weight is not None,
        WRITE_GRAD_BIAS=grad_bias is not None, WRITE_GRAD_INPUT=dx is not None,
        INT64=plan.INT64, num_warps=NUM_WARPS)


def _float64_pair(name: str, value: float) -> dict:
    """value as float32 + float32 remainder (Triton passes Python floats as float32): the
    float64 kernels add both back and see the float64 value to 2⁻⁴⁸ relative."""
    value = float(value)
    high = float(torch.tensor(value, dtype=torch.float32))
    return {name: high, f"{name}_lo": value - high}


def _strides(name: str, strides: Strides) -> dict:
    return {f"stride_{name}n": strides[0], f"stride_{name}c": strides[1],
            f"stride_{name}s": strides[2]}


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
    """y, mean, invstd for a kernel-ready, non-empty x: two launches with batch statistics
    (partials, normalize), one with running statistics."""
    y = torch.empty_like(x)
    acc_dtype = accumulation_dtype(x.dtype)
    mean = torch.empty(x.shape[1], dtype=acc_dtype, device=x.device)
    invstd = torch.empty_like(mean)
    plan = make_plan(x.shape, [ncs_strides(x), ncs_strides(y)], x.device)
    partials = welford_partials(x, plan) if batch_stats else None
    normalize(x, y, plan, weight, bias, mean, invstd, partials, running_mean, running_var,
              num_batches_tracked, momentum, eps)
    return y, mean, invstd


def batch_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                        mean: torch.Tensor, invstd: torch.Tensor, batch_stats: bool,
                        output_mask: Tuple[bool, bool, bool], bias_dtype: Optional[torch.dtype]
                        ) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dγ, dβ) for a kernel-ready, non-empty x, each only where output_mask asks; dγ and
    dβ in the dtypes of weight and bias.

    dy may have any layout. The partial sums run only when the batch statistics are in dx or
    dγ/dβ are asked for; eval's dx alone is a single launch."""
    want_dx, want_dw, want_db = output_mask
    dy = kernel_ready(dy)
    dx = torch.empty_like(x) if want_dx else None
    grad_weight = torch.empty_like(weight) if want_dw else None
    grad_bias = torch.empty(x.shape[1], dtype=bias_dtype, device=x.device) if want_db else None
    strides = [ncs_strides(x), ncs_strides(dy)] + ([ncs_strides(dx)] if want_dx else [])
    plan = make_plan(x.shape, strides, x.device)
    need_sums = (want_dx and batch_stats) or want_dw or want_db
    partials = dy_partials(x, dy, mean, plan) if need_sums else None
    input_grad(x, dy, dx, plan, weight, mean, invstd, partials, batch_stats, grad_weight,
               grad_bias)
    return dx, grad_weight, grad_bias
