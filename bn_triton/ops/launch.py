"""Launch wrappers, one per kernel: view -> allocate -> grid -> launch; and the two calls that
string them together, batch_norm_forward and batch_norm_backward.

Argument checking that mirrors torch's runs above this (functional.py, library.py); these
functions only derive shapes, strides and launch parameters from a Plan (plan.py) and start
kernels through tuning.launch. No hot path copies a contiguous or channels-last tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import struct
import threading
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import triton

from . import plan as planning
from .epilogue import IDENTITY, Activation, dz_source
from .plan import (Plan, Strides, accumulation_dtype, empty_output, kernel_ready, make_plan,
                   ncs_strides)
from .tuning import NUM_WARPS, launch

# Eager ticket buffers, one per (device, stream): see Tickets.
_TICKETS: Dict[Tuple[torch.device, int], "Tickets"] = {}
_TICKETS_LOCK = threading.Lock()
# Plans and launch constants remembered (per shape, strides, flags): about one model's worth
# of layers many times over; the cache starts again when full.
CACHED_LAUNCHES = 4096
_PLANS: Dict[tuple, Tuple[Plan, "NamedStrides"]] = {}
# Ticket epochs live in 31 bits (finished_last keeps them in an int64's high half).
EPOCHS = 2**31


class Tickets:
    """The int64 ticket words of the split path (kernels/stats.finished_last), one per channel
    block, and the epoch the next launch on them takes.

    A launch passes its epoch; its last program of each block leaves (epoch + 1, 0) for the
    next one, which finds its own epoch there and takes the one-atomic fast path. A word with
    any other epoch is stale and is reclaimed in the kernel, so a buffer that drifted (a
    stray increment, launches on it reordered between threads) is right at the next launch.
    Eager buffers are kept per (device, stream), allocated once, not per call. Inside
    CUDA-graph capture every launch gets a buffer of its own, zeroed in the graph (epoch 0),
    so that a replay, on any stream, never shares words with eager launches or with another
    graph, and no graph holds a buffer that a later grow frees."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.next_epoch = 1
        self.lock = threading.Lock()

    def take(self) -> int:
        """The next launch's epoch: 1 to 2³¹ - 1, then 1 again. 0 is capture's (a zeroed
        buffer), so a zeroed or mostly zero eager word is stale, never a count."""
        with self.lock:
            epoch = self.next_epoch
            self.next_epoch = epoch + 1 if epoch + 1 < EPOCHS else 1
            return epoch


def tickets(device: torch.device, count: int) -> Tuple[torch.Tensor, int]:
    """(ticket buffer of at least `count` words, epoch) for a launch on `device`'s current
    stream (see Tickets)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, dtype=torch.int64, device=device), 0
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    entry = _TICKETS.get(key)
    if entry is None or entry.buffer.numel() < count:
        with _TICKETS_LOCK:
            entry = _TICKETS.get(key)
            if entry is None or entry.buffer.numel() < count:
                entry = _TICKETS[key] = Tickets(
                    torch.zeros(max(count, 1024), dtype=torch.int64, device=device))
    return entry.buffer, entry.take()


# Split partials kept per (device, stream) on a GPU, per thread on the CPU: see split_partials.
_PARTIALS: Dict[tuple, Dict[tuple, Tuple[torch.Tensor, torch.Tensor]]] = {}


def split_partials(device: torch.device, channels: int, num_splits: int,
                   dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two (channels, num_splits) buffers for one split launch's partials. Only that launch
    writes and reads them (its last program of each channel block combines them), so a
    buffer is free again when the launch ends: the next launch on the same stream runs after
    it on a GPU, and the interpreter runs launches to the end on the calling thread. So they
    are allocated once per stream (per thread on the CPU) and shape, not per call; inside
    CUDA-graph capture each launch gets its own, as the tickets do."""
    def fresh():
        return tuple(torch.empty(channels, num_splits, dtype=dtype, device=device)
                     for _ in range(2))

    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return fresh()
        key = (device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device, threading.get_ident())
    buffers = _PARTIALS.get(key)
    if buffers is None:
        buffers = _PARTIALS.setdefault(key, {})
    pair = buffers.get((channels, num_splits, dtype))
    if pair is None:
        pair = fresh()
        if type(pair[0]) is not torch.Tensor:  # a fake or traced tensor: never kept
            return pair
        if len(buffers) >= 256:  # a model's split shapes are a few dozen: start again
            buffers.clear()
        buffers[(channels, num_splits, dtype)] = pair
    return pair


def _float64_pair(name: str, value: float) -> dict:
    """value as float32 + float32 remainder (Triton passes Python floats as float32): the
    float64 kernels add both back and see the float64 value to 2⁻⁴⁸ relative."""
    value = float(value)
    high = struct.unpack("f", struct.pack("f", value))[0]  # rounded to float32, no tensor
    return {name: high, f"{name}_lo": value - high}


def _strides(strides: Dict[str, Strides], *names: str) -> dict:
    """stride_<name>n/c/s of each named tensor as the plan sees it; (0, 0, 0) for one the
    call does not have (its kernel flags keep it unread)."""
    args = {}
    for name in names:
        n, c, s = strides.get(name, (0, 0, 0))
        args.update({f"stride_{name}n": n, f"stride_{name}c": c, f"stride_{name}s": s})
    return args


def _epilogue_args(activation: Activation) -> dict:
    return dict(ACTIVATION=activation.name, **_float64_pair("act_param", activation.param),
                **_float64_pair("act_param2", activation.param2))


def _running_flags(momentum: float, update: bool, from_count: bool) -> dict:
    """The running update's constants: factor `momentum`, or 1/num_batches_tracked read on
    the device (from_count: momentum=None)."""
    return dict(**_float64_pair("momentum", momentum), UPDATE_RUNNING=update,
                MOMENTUM_FROM_COUNT=update and from_count)


class Renorm(NamedTuple):
    """Batch Renormalization in a training forward: the (2, C) buffer the kernels write r and
    d to (accumulation dtype; the backward reads it) and the (2,) tensor of (r_max, d_max),
    read on the device."""
    factors: torch.Tensor
    limits: torch.Tensor


def _renorm_ptrs(renorm: Optional[Renorm]) -> dict:
    return dict(renorm_ptr=None if renorm is None else renorm.factors,
                renorm_limits_ptr=None if renorm is None else renorm.limits)


class GhostRuns(NamedTuple):
    """Ghost batch norm's virtual batches as the kernels walk them (kernels/ghost.py): one
    grid row each, in the plan of a full run. num_runs of them; the last holds N_last samples
    (S_last values along S where the plan merged the batch into S); run g starts
    g·run_step_n samples (g·run_step_s values along S) in."""
    num_runs: int
    N_last: int
    S_last: int
    run_step_n: int
    run_step_s: int


def ghost_runs(plan: Plan, batch: int, virtual_batch_size: int, spatial: int) -> GhostRuns:
    """The GhostRuns of a batch of `batch` samples (`spatial` values each per channel) cut into
    runs of virtual_batch_size, as torch.split cuts it, for the plan of one full run."""
    num_runs = -(-batch // virtual_batch_size)
    last = batch - (num_runs - 1) * virtual_batch_size
    if plan.N == 1 and plan.S == virtual_batch_size * spatial and all(
            stride_n == 0 for stride_n, _, _ in plan.strides):
        # The plan merged the batch into S (channels_last, 2-D input): runs follow one
        # another along S.
        return GhostRuns(num_runs, 1, last * spatial, 0, virtual_batch_size * spatial)
    return GhostRuns(num_runs, last, spatial, virtual_batch_size, 0)


def _ghost_args(plan: Plan, runs: Optional[GhostRuns]) -> dict:
    """The kernels' ghost arguments: those of `runs`, or one run that is the whole plan."""
    if runs is None:
        return dict(num_runs=1, N_last=plan.N, S_last=plan.S, run_step_n=0, run_step_s=0,
                    GHOST=False)
    return dict(runs._asdict(), GHOST=True)


def _grid(plan: Plan, runs: Optional[GhostRuns]) -> Tuple[int, ...]:
    return plan.grid if runs is None else plan.grid + (runs.num_runs,)


def _running_ptrs(running_mean, running_var, num_batches_tracked) -> dict:
    """The running update's tensors: num_batches_tracked only where it gives the factor."""
    from_count = running_mean is not None and num_batches_tracked is not None
    return dict(running_mean_ptr=running_mean, running_var_ptr=running_var,
                num_batches_tracked_ptr=num_batches_tracked if from_count else None)


class NamedStrides(dict):
    """name -> (n, c, s) strides of a call's tensors as its plan sees them; a key of the
    launch-constants caches, so hashed once (it is never changed once made)."""

    __slots__ = ("_hash",)

    def __hash__(self) -> int:
        try:
            return self._hash
        except AttributeError:
            self._hash = hash(tuple(self.items()))
            return self._hash


def batch_statistics(x: torch.Tensor, plan: Plan, strides: Dict[str, Strides],
                     mean: torch.Tensor, invstd: torch.Tensor,
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                     num_batches_tracked: Optional[torch.Tensor], momentum: float,
                     eps: float, var: Optional[torch.Tensor] = None,
                     renorm: Optional[Renorm] = None,
                     runs: Optional[GhostRuns] = None) -> torch.Tensor:
    """Launch batch_stats_kernel: writes mean, invstd (the biased var too, if given, the
    running statistics, if given, and Batch Renormalization's r and d, if asked); returns
    centre = mean - x[0, c, 0] for normalize_kernel. runs (ghost batch norm): every virtual
    batch's, into (num_runs, C) rows."""
    device = x.device
    rows = 1 if runs is None else runs.num_runs
    part_mean, part_m2 = split_partials(device, rows * plan.C, plan.num_splits, mean.dtype)
    centre = torch.empty_like(mean)
    ticket_words, epoch = tickets(device, rows * plan.grid[0])
    constants = _batch_stats_constants(
        plan, strides, momentum, eps, running_mean is not None,
        num_batches_tracked is not None, var is not None, renorm is not None, runs)
    launch("batch_stats_kernel", _grid(plan, runs), NUM_WARPS, device, constants, x_ptr=x,
           part_mean_ptr=part_mean, part_m2_ptr=part_m2, tickets_ptr=ticket_words,
           epoch=epoch, mean_ptr=mean, invstd_ptr=invstd, centre_ptr=centre, var_ptr=var,
           **_running_ptrs(running_mean, running_var, num_batches_tracked),
           **_renorm_ptrs(renorm))
    return centre


@functools.lru_cache(maxsize=CACHED_LAUNCHES)
def _batch_stats_constants(plan: Plan, strides: NamedStrides, momentum: float, eps: float,
                           update: bool, from_count: bool, write_var: bool,
                           renorm: bool, runs: Optional[GhostRuns]) -> dict:
    return dict(**_running_flags(momentum, update, from_count), **plan.split_args(), M=plan.M,
                **_float64_pair("eps", eps), **_strides(strides, "x"),
                **_ghost_args(plan, runs),
                BLOCK_C=plan.BLOCK_C, BLOCK_S=plan.BLOCK_S,
                WRITE_VAR=write_var, RENORM=renorm, INT64=plan.INT64)


def normalize(x: torch.Tensor, y: torch.Tensor, residual: Optional[torch.Tensor], plan: Plan,
              strides: Dict[str, Strides], weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
              centre: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
              running_var: Optional[torch.Tensor], eps: float, activation: Activation,
              abs_weight: bool, renorm: Optional[torch.Tensor] = None,
              runs: Optional[GhostRuns] = None) -> None:
    """Launch normalize_kernel: y from batch statistics (centre given: mean, invstd, centre
    from batch_statistics) or from the running ones (then mean and invstd are written);
    renorm: the r and d of batch_statistics (Batch Renormalization)."""
    constants = _normalize_constants(plan, strides, eps, centre is not None,
                                     weight is not None, bias is not None,
                                     residual is not None, abs_weight, activation,
                                     renorm is not None, runs)
    launch("normalize_kernel", _grid(plan, runs), NUM_WARPS, x.device, constants, x_ptr=x,
           y_ptr=y,
           residual_ptr=residual, weight_ptr=weight, bias_ptr=bias, mean_ptr=mean,
           invstd_ptr=invstd, centre_ptr=centre, running_mean_ptr=running_mean,
           running_var_ptr=running_var, renorm_ptr=renorm)


@functools.lru_cache(maxsize=CACHED_LAUNCHES)
def _normalize_constants(plan: Plan, strides: NamedStrides, eps: float, batch_stats: bool,
                         has_weight: bool, has_bias: bool, has_residual: bool,
                         abs_weight: bool, activation: Activation, renorm: bool,
                         runs: Optional[GhostRuns]) -> dict:
    return dict(**plan.split_args(), **_float64_pair("eps", eps), **_ghost_args(plan, runs),
                **_strides(strides, "x", "y", "r"), BLOCK_C=plan.BLOCK_C,
                BLOCK_S=plan.BLOCK_S, BATCH_STATS=batch_stats, HAS_WEIGHT=has_weight,
                HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, ABS_WEIGHT=abs_weight,
                **_epilogue_args(activation), RENORM=renorm, INT64=plan.INT64)


def forward_slab(x: torch.Tensor, y: torch.Tensor, residual: Optional[torch.Tensor],
                 plan: Plan, strides: Dict[str, Strides], weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                 running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                 num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float,
                 activation: Activation, abs_weight: bool,
                 renorm: Optional[Renorm] = None, runs: Optional[GhostRuns] = None,
                 var: Optional[torch.Tensor] = None) -> None:
    """Launch forward_slab_kernel: the whole training forward in one pass (Batch
    Renormalization's too, renorm given)."""
    constants = _forward_slab_constants(
        plan, strides, momentum, eps, running_mean is not None,
        num_batches_tracked is not None, weight is not None, bias is not None,
        residual is not None, abs_weight, activation, renorm is not None, runs)
    launch("forward_slab_kernel", _grid(plan, runs), plan.slab_num_warps, x.device, constants,
           x_ptr=x, y_ptr=y, residual_ptr=residual, weight_ptr=weight, bias_ptr=bias,
           mean_ptr=mean, invstd_ptr=invstd, var_ptr=var,
           **_running_ptrs(running_mean, running_var, num_batches_tracked),
           **_renorm_ptrs(renorm))


@functools.lru_cache(maxsize=CACHED_LAUNCHES)
def _forward_slab_constants(plan: Plan, strides: NamedStrides, momentum: float, eps: float,
                            update: bool, from_count: bool, has_weight: bool, has_bias: bool,
                            has_residual: bool, abs_weight: bool,
                            activation: Activation, renorm: bool,
                            runs: Optional[GhostRuns]) -> dict:
    return dict(**_running_flags(momentum, update, from_count), C=plan.C, N=plan.N, S=plan.S,
                **_ghost_args(plan, runs),
                M=plan.M, **_float64_pair("eps", eps), **_strides(strides, "x", "y", "r"),
                BLOCK_C=plan.BLOCK_C, BLOCK_N=plan.BLOCK_N, BLOCK_S=plan.BLOCK_S,
                HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual,
                ABS_WEIGHT=abs_weight, **_epilogue_args(activation), RENORM=renorm,
                INT64=plan.INT64)


def dy_sums(saved: Dict[str, torch.Tensor], plan: Plan, strides: Dict[str, Strides],
            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], mean: torch.Tensor,
            invstd: torch.Tensor, grad_weight: Optional[torch.Tensor],
            grad_bias: Optional[torch.Tensor], grad_residual: Optional[torch.Tensor],
            eps: float, activation: Activation, dz_from: str, xhat_from_output: bool,
            renorm: Optional[torch.Tensor] = None, inv_count: Optional[float] = None,
            runs: Optional[GhostRuns] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch dy_sums_kernel: writes grad_weight / grad_bias / grad_residual (those given);
    returns the dx coefficients mean_dy, mean_dy_xhat (C,): the sums times inv_count (1/M
    when None; 1.0 gives the raw sums). `saved` holds dy and what the forward kept: x, y (the
    output) and r (the residual), by name; renorm: Batch Renormalization's (2, C) r and d
    from the forward; runs (ghost batch norm): every virtual batch's, mean, invstd, the
    coefficients and grad_weight, grad_bias in (num_runs, C) rows."""
    device = mean.device
    rows = 1 if runs is None else runs.num_runs
    part_sum_dy, part_sum_dy_xmu = split_partials(device, rows * plan.C, plan.num_splits,
                                                  mean.dtype)
    mean_dy, mean_dy_xhat = torch.empty_like(mean), torch.empty_like(mean)
    ticket_words, epoch = tickets(device, rows * plan.grid[0])
    constants = _dy_sums_constants(
        plan, strides, 1.0 / plan.M if inv_count is None else inv_count, eps,
        weight is not None, bias is not None, dz_from, xhat_from_output,
        grad_residual is not None, grad_weight is not None, grad_bias is not None, activation,
        renorm is not None, runs)
    launch("dy_sums_kernel", _grid(plan, runs), NUM_WARPS, device, constants,
           x_ptr=saved.get("x"), y_ptr=saved.get("y"), residual_ptr=saved.get("r"),
           dy_ptr=saved["dy"], grad_residual_ptr=grad_residual, weight_ptr=weight,
           bias_ptr=bias, mean_ptr=mean, invstd_ptr=invstd, renorm_ptr=renorm,
           part_sum_dy_ptr=part_sum_dy,
           part_sum_dy_xmu_ptr=part_sum_dy_xmu, tickets_ptr=ticket_words, epoch=epoch,
           mean_dy_ptr=mean_dy, mean_dy_xhat_ptr=mean_dy_xhat, grad_weight_ptr=grad_weight,
           grad_bias_ptr=grad_bias)
    return mean_dy, mean_dy_xhat


@functools.lru_cache(maxsize=CACHED_LAUNCHES)
def _dy_sums_constants(plan: Plan, strides: NamedStrides, inv_count: float, eps: float,
                       has_weight: bool, has_bias: bool, dz_from: str, xhat_from_output: bool,
                       write_grad_residual: bool, write_grad_weight: bool,
                       write_grad_bias: bool, activation: Activation, renorm: bool,
                       runs: Optional[GhostRuns]) -> dict:
    last_count = plan.M if runs is None else runs.N_last * runs.S_last
    return dict(**plan.split_args(), **_float64_pair("inv_count", inv_count),
                **_float64_pair("inv_count_last", inv_count * plan.M / last_count),
                **_ghost_args(plan, runs),
                **_float64_pair("eps", eps),
                **_strides(strides, "x", "y", "r", "dy", "dr"), BLOCK_C=plan.BLOCK_C,
                BLOCK_S=plan.BLOCK_S, HAS_WEIGHT=has_weight,
                HAS_BIAS=has_bias, DZ_FROM=dz_from, XHAT_FROM_OUTPUT=xhat_from_output,
                WRITE_GRAD_RESIDUAL=write_grad_residual, WRITE_GRAD_WEIGHT=write_grad_weight,
                WRITE_GRAD_BIAS=write_grad_bias, **_epilogue_args(activation),
                RENORM=renorm, INT64=plan.INT64)


def input_grad(saved: Dict[str, torch.Tensor], dx: torch.Tensor, plan: Plan,
               strides: Dict[str, Strides], weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
               coefficients: Optional[Tuple[torch.Tensor, torch.Tensor]], eps: float,
               activation: Activation, dz_from: str, xhat_from_output: bool,
               renorm: Optional[torch.Tensor] = None,
               runs: Optional[GhostRuns] = None) -> None:
    """Launch input_grad_kernel: dx with batch statistics (coefficients from dy_sums) or with
    constant ones (coefficients None; x is read only to recompute z); renorm as dy_sums."""
    mean_dy, mean_dy_xhat = coefficients if coefficients is not None else (None, None)
    constants = _input_grad_constants(plan, strides, eps, coefficients is not None,
                                      weight is not None, bias is not None, dz_from,
                                      xhat_from_output, activation, renorm is not None, runs)
    launch("input_grad_kernel", _grid(plan, runs), NUM_WARPS, mean.device, constants,
           x_ptr=saved.get("x"), y_ptr=saved.get("y"), residual_ptr=saved.get("r"),
           dy_ptr=saved["dy"], dx_ptr=dx, weight_ptr=weight, bias_ptr=bias, mean_ptr=mean,
           invstd_ptr=invstd, renorm_ptr=renorm, mean_dy_ptr=mean_dy,
           mean_dy_xhat_ptr=mean_dy_xhat)


@functools.lru_cache(maxsize=CACHED_LAUNCHES)
def _input_grad_constants(plan: Plan, strides: NamedStrides, eps: float, batch_stats: bool,
                          has_weight: bool, has_bias: bool, dz_from: str,
                          xhat_from_output: bool, activation: Activation,
                          renorm: bool, runs: Optional[GhostRuns]) -> dict:
    return dict(**_float64_pair("eps", eps), **plan.split_args(), **_ghost_args(plan, runs),
                **_strides(strides, "x", "y", "r", "dy", "dx"), BLOCK_C=plan.BLOCK_C,
                BLOCK_S=plan.BLOCK_S, BATCH_STATS=batch_stats, HAS_WEIGHT=has_weight,
                HAS_BIAS=has_bias, DZ_FROM=dz_from, XHAT_FROM_OUTPUT=xhat_from_output,
                **_epilogue_args(activation), RENORM=renorm, INT64=plan.INT64)


def backward_slab(saved: Dict[str, torch.Tensor], dx: Optional[torch.Tensor], plan: Plan,
                  strides: Dict[str, Strides], weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                  batch_stats: bool, grad_weight: Optional[torch.Tensor],
                  grad_bias: Optional[torch.Tensor], grad_residual: Optional[torch.Tensor],
                  eps: float, activation: Activation, dz_from: str,
                  xhat_from_output: bool, renorm: Optional[torch.Tensor] = None,
                  runs: Optional[GhostRuns] = None) -> None:
    """Launch backward_slab_kernel: dγ, dβ, d(residual) and dx (those given) in one pass;
    renorm as dy_sums."""
    constants = _backward_slab_constants(
        plan, strides, eps, batch_stats, weight is not None, bias is not None, dz_from,
        xhat_from_output, grad_weight is not None, grad_bias is not None, dx is not None,
        grad_residual is not None, activation, renorm is not None, runs)
    launch("backward_slab_kernel", _grid(plan, runs), plan.slab_num_warps, mean.device,
           constants,
           x_ptr=saved.get("x"), y_ptr=saved.get("y"), residual_ptr=saved.get("r"),
           dy_ptr=saved["dy"], dx_ptr=dx, grad_residual_ptr=grad_residual, weight_ptr=weight,
           bias_ptr=bias, mean_ptr=mean, invstd_ptr=invstd, renorm_ptr=renorm,
           grad_weight_ptr=grad_weight,
           grad_bias_ptr=grad_bias)


@functools.lru_cache(maxsize=CACHED_LAUNCHES)
def _backward_slab_constants(plan: Plan, strides: NamedStrides, eps: float, batch_stats: bool,
                             has_weight: bool, has_bias: bool, dz_from: str,
                             xhat_from_output: bool, write_grad_weight: bool,
                             write_grad_bias: bool, write_grad_input: bool,
                             write_grad_residual: bool, activation: Activation,
                             renorm: bool, runs: Optional[GhostRuns]) -> dict:
    named = strides
    return dict(C=plan.C, N=plan.N, S=plan.S, M=plan.M, **_float64_pair("eps", eps),
                **_ghost_args(plan, runs),
                **_strides(named, "x", "y", "r", "dy", "dx", "dr"), BLOCK_C=plan.BLOCK_C,
                BLOCK_N=plan.BLOCK_N, BLOCK_S=plan.BLOCK_S, BATCH_STATS=batch_stats,
                HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, DZ_FROM=dz_from,
                XHAT_FROM_OUTPUT=xhat_from_output, WRITE_GRAD_WEIGHT=write_grad_weight,
                WRITE_GRAD_BIAS=write_grad_bias, WRITE_GRAD_INPUT=write_grad_input,
                WRITE_GRAD_RESIDUAL=write_grad_residual, **_epilogue_args(activation),
                RENORM=renorm, INT64=plan.INT64, X_LIKE_DY="x" in named and named["x"] == named["dy"])


def _plan(shape: Sequence[int], tensors: Dict[str, torch.Tensor], device: torch.device,
          element_size: int, max_slab: Optional[int], max_tile: int = planning.MAX_TILE
          ) -> Tuple[Plan, Dict[str, Strides]]:
    """make_plan over the named tensors of a call, and their strides as the plan sees them;
    remembered per (shape, names, strides, device, element size, budgets), so that a layer's
    every call after its first plans in one dict lookup."""
    key = (tuple(shape), tuple(tensors), tuple(t.stride() for t in tensors.values()), device,
           element_size, max_slab, max_tile)
    planned = _PLANS.get(key)
    if planned is None:
        plan = make_plan(shape, [ncs_strides(t) for t in tensors.values()], device,
                         element_size, max_slab, max_tile)
        planned = plan, NamedStrides(zip(tensors, plan.strides))
        if len(_PLANS) >= CACHED_LAUNCHES:
            _PLANS.clear()
        _PLANS[key] = planned
    return planned


def batch_norm_forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                       running_var: Optional[torch.Tensor],
                       num_batches_tracked: Optional[torch.Tensor], training: bool,
                       momentum: float, eps: float, residual: Optional[torch.Tensor] = None,
                       activation: Activation = IDENTITY, memory_efficient: bool = False,
                       renorm: Optional[Renorm] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act(BN(x) + residual), mean, invstd of checked arguments
    (bn_triton::batch_norm_forward; bn_triton::batch_renorm_forward with renorm).

    Training: batch statistics, one slab launch when whole channels fit in registers, else
    statistics then normalize (two); the running statistics (when given) are updated in place
    with factor `momentum`, or 1/num_batches_tracked read on the device when that is given.
    Eval: the running statistics, one launch. Empty input launches nothing. memory_efficient
    scales by |γ| + eps (see epilogue.py). renorm (training, with running statistics): Batch
    Renormalization, y = act(γ·(x̂·r + d) + β + residual), r and d written to renorm.factors
    from the running statistics before the update; the same launches. In eval, renorm's
    factors are given (SyncBatchRenorm: the merged statistics and their r and d normalize)."""
    x = kernel_ready(input)
    y = empty_output(input)
    device = x.device
    mean = torch.empty(x.shape[1], dtype=accumulation_dtype(x.dtype), device=device)
    invstd = torch.empty_like(mean)
    if x.numel() == 0:
        if training:  # the statistics of no values
            mean.fill_(float("nan")), invstd.fill_(float("nan"))
        else:
            mean.copy_(running_mean), invstd.copy_(torch.rsqrt(running_var.to(mean.dtype) + eps))
        return y, mean, invstd
    weight, bias = _contiguous(weight), _contiguous(bias)
    tensors = {"x": x, "y": y}
    if residual is not None:
        tensors["r"] = kernel_ready(residual)
    epilogue = dict(activation=activation, abs_weight=memory_efficient)
    if renorm is not None:
        epilogue["renorm"] = renorm
    if _strided(running_mean) or _strided(running_var):
        with _written_in_place(running_mean) as running_mean, \
                _written_in_place(running_var) as running_var:
            _forward_launches(x, y, tensors, weight, bias, mean, invstd, running_mean,
                              running_var, num_batches_tracked, training, momentum, eps,
                              epilogue)
    else:
        _forward_launches(x, y, tensors, weight, bias, mean, invstd, running_mean, running_var,
                          num_batches_tracked, training, momentum, eps, epilogue)
    return y, mean, invstd


def _forward_launches(x, y, tensors, weight, bias, mean, invstd, running_mean, running_var,
                      num_batches_tracked, training, momentum, eps, epilogue) -> None:
    """batch_norm_forward's launches, on running statistics the kernels can index."""
    renorm = epilogue.pop("renorm", None)
    if not training:
        plan, strides = _plan(x.shape, tensors, x.device, x.element_size(), None)
        normalize(x, y, tensors.get("r"), plan, strides, weight, bias, mean, invstd, None,
                  running_mean, running_var, eps, **epilogue,
                  renorm=None if renorm is None else renorm.factors)
        return
    # A residual is a second slab-sized tensor in registers: half the slab (a full one
    # spills 68 bytes on sm_80/sm_90; the backward's third tensor fits, see below).
    budget = planning.MAX_SLAB_FORWARD // (2 if "r" in tensors else 1)
    plan, strides = _plan(x.shape, tensors, x.device, x.element_size(), budget)
    if plan.slab:
        forward_slab(x, y, tensors.get("r"), plan, strides, weight, bias, mean, invstd,
                     running_mean, running_var, num_batches_tracked, momentum, eps,
                     **epilogue, renorm=renorm)
    else:
        centre = batch_statistics(x, plan, strides, mean, invstd, running_mean, running_var,
                                  num_batches_tracked, momentum, eps, renorm=renorm)
        normalize(x, y, tensors.get("r"), plan, strides, weight, bias, mean, invstd, centre,
                  None, None, eps, **epilogue,
                  renorm=None if renorm is None else renorm.factors)


def ghost_batch_norm_forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                             running_var: Optional[torch.Tensor],
                             num_batches_tracked: Optional[torch.Tensor],
                             virtual_batch_size: int, momentum: float, eps: float,
                             residual: Optional[torch.Tensor] = None,
                             activation: Activation = IDENTITY
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ghost batch norm's training forward of checked, non-empty arguments
    (bn_triton::ghost_batch_norm_forward): y = act(BN_run(x) + residual), each run of
    virtual_batch_size samples (torch.split's, the last may be shorter) normalized with its own
    statistics, returned as (num_runs, C) mean and invstd; then, running statistics given, one
    update with the mean over the runs of their means and unbiased variances
    (kernels/ghost.py). The launches of batch norm over one more grid dimension, planned for
    one full run, plus the update's."""
    x = kernel_ready(input)
    y = empty_output(input)
    device, (N, C) = x.device, x.shape[:2]
    spatial = math.prod(x.shape[2:])
    virtual_batch_size = min(virtual_batch_size, N)  # one run: the plan of the batch itself
    num_runs = -(-N // virtual_batch_size)
    mean = torch.empty(num_runs, C, dtype=accumulation_dtype(x.dtype), device=device)
    invstd, var = torch.empty_like(mean), torch.empty_like(mean)
    weight, bias = _contiguous(weight), _contiguous(bias)
    tensors = {"x": x, "y": y}
    if residual is not None:
        tensors["r"] = kernel_ready(residual)
    budget = planning.MAX_SLAB_FORWARD // (2 if "r" in tensors else 1)
    plan, strides = _ghost_plan((virtual_batch_size, *x.shape[1:]), tensors, device,
                                x.element_size(), budget)
    runs = ghost_runs(plan, N, virtual_batch_size, spatial)
    if plan.slab:
        forward_slab(x, y, tensors.get("r"), plan, strides, weight, bias, mean, invstd, None,
                     None, None, momentum, eps, activation, False, runs=runs, var=var)
    else:
        centre = batch_statistics(x, plan, strides, mean, invstd, None, None, None, momentum,
                                  eps, var, runs=runs)
        normalize(x, y, tensors.get("r"), plan, strides, weight, bias, mean, invstd, centre,
                  None, None, eps, activation, False, runs=runs)
    if running_mean is not None:
        with _written_in_place(running_mean) as running_mean, \
                _written_in_place(running_var) as running_var:
            block_c = min(triton.next_power_of_2(C), GHOST_BLOCK_C)
            launch("ghost_running_update_kernel", (triton.cdiv(C, block_c),), NUM_WARPS,
                   device, _ghost_update_constants(C, num_runs, plan.M,
                                                   runs.N_last * runs.S_last, momentum,
                                                   num_batches_tracked is not None, block_c),
                   mean_ptr=mean, var_ptr=var, running_mean_ptr=running_mean,
                   running_var_ptr=running_var, num_batches_tracked_ptr=num_batches_tracked)
    return y, mean, invstd


# Channels a program of the ghost kernels adds up over the runs (one a thread at 4 warps).
GHOST_BLOCK_C = 128


@functools.lru_cache(maxsize=CACHED_LAUNCHES)
def _ghost_update_constants(C: int, num_runs: int, M: int, M_last: int, momentum: float,
                            from_count: bool, block_c: int) -> dict:
    return dict(C=C, num_runs=num_runs, M=M, M_last=M_last, **_float64_pair("momentum", momentum),
                BLOCK_C=block_c, MOMENTUM_FROM_COUNT=from_count)


def _ghost_plan(run_shape: Sequence[int], tensors: Dict[str, torch.Tensor],
                device: torch.device, element_size: int, max_slab: Optional[int],
                max_tile: int = planning.MAX_TILE) -> Tuple[Plan, "NamedStrides"]:
    """_plan for one full run of ghost batch norm, with int64 offsets wherever a later run
    needs them, and without the VECTOR hint where the last run's extent breaks it."""
    plan, strides = _plan(run_shape, tensors, device, element_size, max_slab, max_tile)
    whole = max(sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
                for t in tensors.values()) >= 2**31
    if (whole and not plan.INT64) or plan.VECTOR > 1:
        key = (plan, whole)
        ghost_plan = _GHOST_PLANS.get(key)
        if ghost_plan is None:
            if len(_GHOST_PLANS) >= CACHED_LAUNCHES:
                _GHOST_PLANS.clear()
            ghost_plan = _GHOST_PLANS[key] = dataclasses.replace(
                plan, INT64=plan.INT64 or whole, VECTOR=1)
        plan = ghost_plan
    return plan, strides


_GHOST_PLANS: Dict[Tuple[Plan, bool], Plan] = {}


def local_statistics(input: torch.Tensor) -> torch.Tensor:
    """A (3, C) float64 tensor of this rank's (count, mean, biased var) per channel, for
    SyncBatchNorm to gather and combine: batch_stats_kernel alone (one launch; its
    statistics must cross ranks before anything is normalized). Empty input: zeros."""
    x = kernel_ready(input)
    C = x.shape[1]
    statistics = torch.zeros(3, C, dtype=torch.float64, device=x.device)
    if x.numel() == 0:
        return statistics
    mean = torch.empty(C, dtype=accumulation_dtype(x.dtype), device=x.device)
    invstd, var = torch.empty_like(mean), torch.empty_like(mean)
    plan, strides = _plan(x.shape, {"x": x}, x.device, x.element_size(), None)
    batch_statistics(x, plan, strides, mean, invstd, None, None, None, 0.0, 1.0, var)
    statistics[0] = plan.M
    statistics[1], statistics[2] = mean, var
    return statistics


def batch_norm_backward(grad_output: torch.Tensor, input: Optional[torch.Tensor],
                        output: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        mean: torch.Tensor, invstd: torch.Tensor, training: bool,
                        output_mask: Sequence[bool], bias_dtype: Optional[torch.dtype],
                        has_residual: bool = False, activation: Activation = IDENTITY,
                        memory_efficient: bool = False, eps: float = 0.0,
                        reduce: Optional[Callable[[torch.Tensor, torch.Tensor],
                                                  Tuple[torch.Tensor, torch.Tensor]]] = None,
                        renorm: Optional[torch.Tensor] = None,
                        virtual_batch_size: Optional[int] = None
                        ) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dγ, dβ, d(residual)) of checked arguments (bn_triton::batch_norm_backward), each
    only where output_mask asks, else None; dγ and dβ in the dtypes of weight and bias_dtype.

    What forward kept (epilogue.dz_source): the input x, or the output y alone in the
    memory-saving mode; also y or the residual where a residual and an activation meet.
    d(residual) = dz is computed here only where dz differs from grad_output (an activation).
    dx takes output_format of the input; grad_output may have any layout.

    One slab launch when whole channels fit in registers; otherwise the sums (when dx uses
    batch statistics, dγ/dβ are asked for, or dz must be written) and a streaming dx.

    reduce (SyncBatchNorm): given, dx's batch statistics span other ranks. The sums pass
    always runs on its own: reduce takes this rank's raw (Σdz, Σdz·x̂) and returns the
    coefficients (mean_dy, mean_dy_xhat) over every rank; dγ and dβ stay this rank's. An
    empty input still calls it (the other ranks wait on its collective).

    renorm (a training forward's Batch Renormalization): the (2, C) r and d it saved; dx
    carries γ·r and dγ = r·Σdz·x̂ + d·Σdz (kernels/backward.py), in the same launches.
    virtual_batch_size (ghost batch norm, training): mean and invstd are (num_runs, C), each
    run's dx uses its own sums, and dγ, dβ add up the runs' (sum_runs_kernel)."""
    want_dx, want_dw, want_db, want_dr = output_mask
    dz_from = dz_source(activation, has_residual, memory_efficient)
    reference = output if memory_efficient else input
    saved = {"dy": kernel_ready(grad_output)}
    if memory_efficient:
        saved["y"] = kernel_ready(output)
    else:
        saved["x"] = kernel_ready(input)
        if dz_from == "output":
            saved["y"] = kernel_ready(output)
        elif dz_from == "x_residual":
            saved["r"] = kernel_ready(residual)
    weight = _contiguous(weight)
    recompute = dz_from in ("x", "x_residual") or memory_efficient
    bias = _contiguous(bias) if recompute else None
    channels, device = reference.shape[1], reference.device
    dx = empty_output(reference) if want_dx else None
    grad_weight = torch.empty(channels, dtype=weight.dtype, device=device) if want_dw else None
    grad_bias = torch.empty(channels, dtype=bias_dtype, device=device) if want_db else None
    # dz is written where it is d(residual), or (split path) handed from the sums to dx.
    writes_dz = dz_from in ("output", "x_residual") and has_residual
    grad_residual = empty_output(reference) if writes_dz and want_dr else None
    if reference.numel() == 0:  # sums over no values
        for grad in (grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
        if reduce is not None and want_dx and training:
            reduce(mean.new_zeros(channels), mean.new_zeros(channels))
        return dx, grad_weight, grad_bias, grad_residual
    tensors = dict(saved)
    if dx is not None:
        tensors["dx"] = dx
    if grad_residual is not None:
        tensors["dr"] = grad_residual
    need_sums = (want_dx and training) or want_dw or want_db or grad_residual is not None
    # A third tensor (y or the residual beside x and dy) still fits the backward slab where
    # rows load as vectors: ptxas gives 100-122 registers at 16384 values a program, no
    # spills. Where they load as scalars (7x7 maps: every value its own address) it spilled
    # 130 bytes on sm_90 (ResNet-50 b256's last stage, relu + residual), so half the slab.
    third = "y" in saved or "r" in saved
    scalar_rows = third and planning.loads_as_scalars(
        reference.shape, ncs_strides(reference), reference.element_size())
    budget = planning.MAX_SLAB_BACKWARD // (2 if scalar_rows else 1)
    max_tile = (planning.MAX_TILE_FLOAT64_ACTIVATION
                if reference.element_size() > 4 and activation.name != "identity"
                else planning.MAX_TILE)
    synced = reduce is not None and want_dx and training
    ghost = virtual_batch_size is not None and training
    if ghost:
        virtual_batch_size = min(virtual_batch_size, reference.shape[0])
    shape = ((virtual_batch_size, *reference.shape[1:]) if ghost else reference.shape)
    planner = _ghost_plan if ghost else _plan
    plan, strides = planner(shape, tensors, device, reference.element_size(),
                            budget if need_sums and not synced else None, max_tile)
    flags = dict(eps=eps, activation=activation, dz_from=dz_from,
                 xhat_from_output=memory_efficient, renorm=renorm if training else None)
    if ghost:
        flags["runs"] = ghost_runs(plan, reference.shape[0], virtual_batch_size,
                                   math.prod(reference.shape[2:]))
        final_grads = grad_weight, grad_bias
        grad_weight = None if grad_weight is None else torch.empty_like(mean)
        grad_bias = None if grad_bias is None else torch.empty_like(mean)
    if plan.slab:
        backward_slab(saved, dx, plan, strides, weight, bias, mean, invstd, training,
                      grad_weight, grad_bias, grad_residual, **flags)
        if ghost:
            return (dx, *_sum_runs(grad_weight, grad_bias, *final_grads), grad_residual)
        return dx, grad_weight, grad_bias, grad_residual
    coefficients = None
    if need_sums:
        dz = grad_residual
        if writes_dz and want_dx and dz is None:
            # A buffer to hand dz to the dx pass, which then reads it in place of dy: one
            # write and one read, as re-reading y or the residual would cost.
            dz = tensors["dr"] = empty_output(reference)
            plan, strides = planner(shape, tensors, device, reference.element_size(), None,
                                    max_tile)
        coefficients = dy_sums(saved, plan, strides, weight, bias, mean, invstd, grad_weight,
                               grad_bias, dz, **flags, inv_count=1.0 if synced else None)
        if synced:  # raw sums in, coefficients over every rank out
            coefficients = reduce(*coefficients)
        if writes_dz and want_dx:
            saved = {"x": saved["x"], "dy": dz}
            strides = NamedStrides(strides, dy=strides["dr"])
            flags.update(activation=IDENTITY, dz_from="dy")
    if want_dx:
        input_grad(saved, dx, plan, strides, weight, bias, mean, invstd,
                   coefficients if training else None, **flags)
    if ghost:
        return (dx, *_sum_runs(grad_weight, grad_bias, *final_grads), grad_residual)
    return dx, grad_weight, grad_bias, grad_residual


def _sum_runs(grad_weight_runs: Optional[torch.Tensor], grad_bias_runs: Optional[torch.Tensor],
              grad_weight: Optional[torch.Tensor], grad_bias: Optional[torch.Tensor]
              ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch sum_runs_kernel: ghost batch norm's dγ and dβ, the (num_runs, C) rows of each
    run's added up (those asked for)."""
    if grad_weight is None and grad_bias is None:
        return None, None
    runs_of = grad_weight_runs if grad_weight_runs is not None else grad_bias_runs
    num_runs, C = runs_of.shape
    block_c = min(triton.next_power_of_2(C), GHOST_BLOCK_C)
    launch("sum_runs_kernel", (triton.cdiv(C, block_c),), NUM_WARPS, runs_of.device,
           _sum_runs_constants(C, num_runs, block_c, grad_weight is not None,
                               grad_bias is not None),
           grad_weight_runs_ptr=grad_weight_runs, grad_bias_runs_ptr=grad_bias_runs,
           grad_weight_ptr=grad_weight, grad_bias_ptr=grad_bias)
    return grad_weight, grad_bias


@functools.lru_cache(maxsize=CACHED_LAUNCHES)
def _sum_runs_constants(C: int, num_runs: int, block_c: int, write_grad_weight: bool,
                        write_grad_bias: bool) -> dict:
    return dict(C=C, num_runs=num_runs, BLOCK_C=block_c, WRITE_GRAD_WEIGHT=write_grad_weight,
                WRITE_GRAD_BIAS=write_grad_bias)


def _strided(t: Optional[torch.Tensor]) -> bool:
    return t is not None and not t.is_contiguous()


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A (C,) parameter the kernels index as ptr + c: itself when contiguous, else a copy."""
    return t if t is None or t.is_contiguous() else t.contiguous()


@contextlib.contextmanager
def _written_in_place(t: Optional[torch.Tensor]):
    """A running statistic the kernels update as ptr + c: itself when contiguous, else a
    contiguous copy that is written back when the block ends (a strided view, say)."""
    if t is None or t.is_contiguous():
        yield t
        return
    work = t.contiguous()
    yield work
    t.copy_(work)
