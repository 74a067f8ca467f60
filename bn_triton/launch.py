"""Launch wrappers, one per kernel: view -> allocate -> grid -> launch; and the two calls that
string them together, batch_norm_forward and batch_norm_backward.

Argument checking that mirrors torch's runs above this (functional.py, library.py); these
functions only derive shapes, strides and launch parameters from a Plan (plan.py) and start
kernels through tuning.launch. No hot path copies a contiguous or channels-last tensor.
"""
from __future__ import annotations

import contextlib
import struct
from typing import Optional, Sequence, Tuple

import torch

from . import plan as planning
from .plan import (Plan, Strides, accumulation_dtype, empty_output, kernel_ready, make_plan,
                   ncs_strides)
from .tuning import NUM_WARPS, launch

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
    """The running-update arguments: factor `momentum`, or 1/num_batches_tracked read on the
    device when num_batches_tracked is given (momentum=None)."""
    update = running_mean is not None
    from_count = update and num_batches_tracked is not None
    return dict(running_mean_ptr=running_mean, running_var_ptr=running_var,
                num_batches_tracked_ptr=num_batches_tracked if from_count else None,
                **_float64_pair("momentum", momentum), UPDATE_RUNNING=update,
                MOMENTUM_FROM_COUNT=from_count)


def batch_statistics(x: torch.Tensor, plan: Plan, mean: torch.Tensor, invstd: torch.Tensor,
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                num_batches_tracked: Optional[torch.Tensor], momentum: float,
                eps: float) -> torch.Tensor:
    """Launch batch_stats_kernel: writes mean, invstd (and the running statistics, if given);
    returns centre = mean - x[0, c, 0] for normalize_kernel."""
    part_mean = torch.empty(plan.C, plan.num_splits, dtype=mean.dtype, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    centre = torch.empty_like(mean)
    launch("batch_stats_kernel", plan.grid, NUM_WARPS, x_ptr=x, part_mean_ptr=part_mean,
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
    launch("normalize_kernel", plan.grid, NUM_WARPS, x_ptr=x, y_ptr=y, weight_ptr=weight,
        bias_ptr=bias, mean_ptr=mean, invstd_ptr=invstd, centre_ptr=centre,
        running_mean_ptr=running_mean, running_var_ptr=running_var, **plan.split_args(),
        **_float64_pair("eps", eps), **_strides("x", plan.strides[0]),
        **_strides("y", plan.strides[1]), BLOCK_C=plan.BLOCK_C, BLOCK_S=plan.BLOCK_S,
        BATCH_STATS=centre is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        INT64=plan.INT64)


def forward_slab(x: torch.Tensor, y: torch.Tensor, plan: Plan, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                 running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                 num_batches_tracked: Optional[torch.Tensor], momentum: float,
                 eps: float) -> None:
    """Launch forward_slab_kernel: the whole training forward in one pass."""
    launch("forward_slab_kernel", plan.grid, plan.slab_num_warps, x_ptr=x, y_ptr=y,
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
    launch("dy_sums_kernel", plan.grid, NUM_WARPS, x_ptr=x, dy_ptr=dy, mean_ptr=mean,
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
    launch("input_grad_kernel", plan.grid, NUM_WARPS, x_ptr=x, dy_ptr=dy, dx_ptr=dx,
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
    launch("backward_slab_kernel", plan.grid, plan.slab_num_warps, x_ptr=x, dy_ptr=dy, dx_ptr=dx,
        weight_ptr=weight, mean_ptr=mean, invstd_ptr=invstd, grad_weight_ptr=grad_weight,
        grad_bias_ptr=grad_bias, C=plan.C, N=plan.N, S=plan.S, M=plan.M,
        **_strides("x", plan.strides[0]), **_strides("dy", plan.strides[1]),
        **_strides("dx", dx_strides), BLOCK_C=plan.BLOCK_C, BLOCK_N=plan.BLOCK_N,
        BLOCK_S=plan.BLOCK_S, BATCH_STATS=batch_stats, HAS_WEIGHT=weight is not None,
        WRITE_GRAD_WEIGHT=grad_weight is not None, WRITE_GRAD_BIAS=grad_bias is not None,
        WRITE_GRAD_INPUT=dx is not None, INT64=plan.INT64)


def batch_norm_forward(input: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                       running_var: Optional[torch.Tensor],
                       num_batches_tracked: Optional[torch.Tensor], training: bool,
                       momentum: float, eps: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, invstd of checked arguments (bn_triton::batch_norm_forward).

    Training: batch statistics, one slab launch when whole channels fit in registers, else
    statistics then normalize (two); the running statistics (when given) are updated in place
    with factor `momentum`, or 1/num_batches_tracked read on the device when that is given.
    Eval: the running statistics, one launch. Empty input launches nothing."""
    x = kernel_ready(input)
    y = empty_output(input)
    mean = torch.empty(x.shape[1], dtype=accumulation_dtype(x.dtype), device=x.device)
    invstd = torch.empty_like(mean)
    if x.numel() == 0:
        if training:  # the statistics of no values
            mean.fill_(float("nan")), invstd.fill_(float("nan"))
        else:
            mean.copy_(running_mean), invstd.copy_(torch.rsqrt(running_var.to(mean.dtype) + eps))
        return y, mean, invstd
    weight, bias = _contiguous(weight), _contiguous(bias)
    with _written_in_place(running_mean) as running_mean, \
            _written_in_place(running_var) as running_var:
        strides = [ncs_strides(x), ncs_strides(y)]
        if not training:
            plan = make_plan(x.shape, strides, x.device, x.element_size())
            normalize(x, y, plan, weight, bias, mean, invstd, None, running_mean, running_var,
                      eps)
            return y, mean, invstd
        plan = make_plan(x.shape, strides, x.device, x.element_size(),
                         planning.MAX_SLAB_FORWARD)
        if plan.slab:
            forward_slab(x, y, plan, weight, bias, mean, invstd, running_mean, running_var,
                         num_batches_tracked, momentum, eps)
        else:
            centre = batch_statistics(x, plan, mean, invstd, running_mean, running_var,
                                      num_batches_tracked, momentum, eps)
            normalize(x, y, plan, weight, bias, mean, invstd, centre, None, None, eps)
    return y, mean, invstd


def batch_norm_backward(grad_output: torch.Tensor, input: torch.Tensor,
                        weight: Optional[torch.Tensor], mean: torch.Tensor,
                        invstd: torch.Tensor, training: bool,
                        output_mask: Sequence[bool], bias_dtype: Optional[torch.dtype]
                        ) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dγ, dβ) of checked arguments (bn_triton::batch_norm_backward), each only where
    output_mask asks, else None; dγ and dβ in the dtypes of weight and bias_dtype. dx takes
    output_format(input); grad_output may have any layout.

    One slab launch when whole channels fit in registers; otherwise the sums (only when dx
    uses batch statistics or dγ/dβ are asked for) and a streaming dx."""
    want_dx, want_dw, want_db = output_mask
    x, dy = kernel_ready(input), kernel_ready(grad_output)
    weight = _contiguous(weight)
    dx = empty_output(input) if want_dx else None
    grad_weight = torch.empty(x.shape[1], dtype=weight.dtype, device=x.device) if want_dw else None
    grad_bias = torch.empty(x.shape[1], dtype=bias_dtype, device=x.device) if want_db else None
    if x.numel() == 0:  # sums over no values
        for grad in (grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
        return dx, grad_weight, grad_bias
    strides = [ncs_strides(x), ncs_strides(dy)] + ([ncs_strides(dx)] if want_dx else [])
    need_sums = (want_dx and training) or want_dw or want_db
    plan = make_plan(x.shape, strides, x.device, x.element_size(),
                     planning.MAX_SLAB_BACKWARD if need_sums else None)
    if plan.slab:
        backward_slab(x, dy, dx, plan, weight, mean, invstd, training, grad_weight, grad_bias)
        return dx, grad_weight, grad_bias
    coefficients = None
    if need_sums:
        coefficients = dy_sums(x, dy, plan, mean, invstd, grad_weight, grad_bias)
    if want_dx:
        input_grad(x, dy, dx, plan, weight, mean, invstd, coefficients if training else None)
    return dx, grad_weight, grad_bias


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
