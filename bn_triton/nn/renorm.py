"""Batch Renormalization (Ioffe, NeurIPS 2017, arXiv:1702.03275) as layers over bn_triton's
kernels: BatchRenorm1d/2d/3d, the fused BatchRenormAct1d/2d/3d and SyncBatchRenorm.

In training, per channel (Algorithm 1 of the paper), with μ_B and the biased σ²_B of the batch:

    σ_B = sqrt(σ²_B + ε),  σ = sqrt(running_var + ε),
    r = clip(σ_B/σ, 1/r_max, r_max),  d = clip((μ_B - running_mean)/σ, -d_max, d_max),
    y = γ·((x - μ_B)/σ_B·r + d) + β,

r and d held constant in the backward (no gradient flows through them), then the running
statistics updated as torch's BatchNorm updates them (momentum, or the cumulative average for
momentum=None; unbiased variance). Eval is batch norm with the running statistics. With
r_max = 1 and d_max = 0 it is batch norm, bit for bit (r = 1 and d = 0 exactly).

The kernels are batch norm's with a constexpr flag (kernels/stats.renorm_factors): the forward
reads the running statistics for r and d before the launch that computes the batch statistics
updates them, the backward is batch norm's with γ·r in place of γ. Same launches, same bytes.

r_max and d_max are plain attributes: a training loop sets them as it goes (the paper starts
at r_max = 1, d_max = 0 and relaxes them after a warm-up; see renorm_limits). They live in a
(2,) buffer the kernels read on the device, so changing them never recompiles a
torch.compile'd model nor synchronises with the GPU; the buffer is not part of the
state_dict, whose keys are nn.BatchNorm's, so BatchNorm checkpoints load both ways.
"""
from typing import Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..dispatch import TORCH, backend
from ..ops.epilogue import Activation
from .modules import _TritonBatchNorm, _TritonBatchNormAct, recomputing, traced_as_leaf
from .sync import _TritonSyncBatchNorm, sync_group_name

RECOMPUTED = (
    "Batch Renormalization under activation checkpointing: the recomputed forward would take "
    "r and d from running statistics the first forward has already updated, and so differ "
    "from it; run BatchRenorm layers outside the checkpointed region")


def renorm_limits(step: int, warmup: int, r_ramp: int, d_ramp: int, r_max: float = 3.0,
                  d_max: float = 5.0) -> Tuple[float, float]:
    """(r_max, d_max) at training step `step` on the paper's schedule (section 4: r_max = 1
    and d_max = 0, batch norm, for the first `warmup` steps, then relaxed linearly to r_max
    over r_ramp steps and to d_max over d_ramp steps; the paper's ImageNet run: warmup 5000,
    r_max 3 by step 40k, d_max 5 by step 25k)."""
    def ramp(length: int) -> float:
        if step < warmup:
            return 0.0
        return 1.0 if length <= 0 else min(1.0, (step - warmup) / length)

    return 1.0 + (r_max - 1.0) * ramp(r_ramp), d_max * ramp(d_ramp)


def set_renorm_limits(module: nn.Module, r_max: float, d_max: float) -> int:
    """Set r_max and d_max on every Batch Renormalization layer in `module` (itself included);
    returns how many layers were set."""
    layers = [m for m in module.modules() if isinstance(m, _TritonBatchRenorm)]
    for layer in layers:
        layer.r_max, layer.d_max = r_max, d_max
    return len(layers)


class _TritonBatchRenorm(_TritonBatchNorm):
    """Batch Renormalization on torch's BatchNorm class (its buffers, state_dict and
    _check_input_dim) and bn_triton's kernels."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, r_max: float = 3.0, d_max: float = 5.0, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self._init_limits(r_max, d_max, device, dtype)

    def _init_limits(self, r_max: float, d_max: float, device, dtype) -> None:
        self.register_buffer("renorm_limits", torch.ones(2, device=device, dtype=dtype),
                             persistent=False)
        self.r_max, self.d_max = r_max, d_max

    @property
    def r_max(self) -> float:
        """The bound of r: r ∈ [1/r_max, r_max]. 1 turns the scale correction off."""
        return self._r_max

    @r_max.setter
    def r_max(self, value: float) -> None:
        value = float(value)
        if not value >= 1.0:
            raise ValueError(f"r_max must be at least 1, got {value}")
        with torch.no_grad():
            self.renorm_limits[0] = value
        self._r_max = value

    @property
    def d_max(self) -> float:
        """The bound of d: d ∈ [-d_max, d_max]. 0 turns the shift correction off."""
        return self._d_max

    @d_max.setter
    def d_max(self, value: float) -> None:
        value = float(value)
        if not value >= 0.0:
            raise ValueError(f"d_max must be non-negative, got {value}")
        with torch.no_grad():
            self.renorm_limits[1] = value
        self._d_max = value

    @traced_as_leaf
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._batch_norm(input)

    def _batch_norm(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None,
                    activation: Optional[Activation] = None,
                    memory_efficient: bool = False,
                    renorm_limits: Optional[torch.Tensor] = None) -> torch.Tensor:
        if memory_efficient:
            raise ValueError("memory_efficient=True is not available with Batch "
                             "Renormalization: x̂ cannot be recovered from its output")
        if self.training and recomputing():
            raise RuntimeError(RECOMPUTED)
        return super()._batch_norm(input, residual, activation, False, self.renorm_limits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"


class BatchRenorm1d(_TritonBatchRenorm, nn.BatchNorm1d):
    """Batch Renormalization of (N, C) or (N, C, L) input; nn.BatchNorm1d's buffers."""


class BatchRenorm2d(_TritonBatchRenorm, nn.BatchNorm2d):
    """Batch Renormalization of (N, C, H, W) input; nn.BatchNorm2d's buffers."""


class BatchRenorm3d(_TritonBatchRenorm, nn.BatchNorm3d):
    """Batch Renormalization of (N, C, D, H, W) input; nn.BatchNorm3d's buffers."""


class _TritonBatchRenormAct(_TritonBatchRenorm, _TritonBatchNormAct):
    """act(BatchRenorm(x) + residual) in the launches of Batch Renormalization alone: the
    fused layer's activation and residual (BatchNormAct) with renorm's statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 apply_act: bool = True, act_layer: Union[str, type, nn.Module, None] = "relu",
                 act_kwargs: Optional[Mapping[str, object]] = None, device=None,
                 dtype=None) -> None:
        _TritonBatchNormAct.__init__(self, num_features, eps, momentum, affine, True,
                                     apply_act=apply_act, act_layer=act_layer,
                                     act_kwargs=act_kwargs, device=device, dtype=dtype)
        self._init_limits(r_max, d_max, device, dtype)

    forward = _TritonBatchNormAct.forward

    def extra_repr(self) -> str:
        return f"{_TritonBatchNormAct.extra_repr(self)}, r_max={self.r_max}, d_max={self.d_max}"


class BatchRenormAct1d(_TritonBatchRenormAct, nn.BatchNorm1d):
    """act(BatchRenorm1d(x) + residual), fused."""


class BatchRenormAct2d(_TritonBatchRenormAct, nn.BatchNorm2d):
    """act(BatchRenorm2d(x) + residual), fused."""


class BatchRenormAct3d(_TritonBatchRenormAct, nn.BatchNorm3d):
    """act(BatchRenorm3d(x) + residual), fused."""


class SyncBatchRenorm(_TritonSyncBatchNorm, _TritonBatchRenorm, nn.SyncBatchNorm):
    """Batch Renormalization whose batch statistics span the ranks of a process group, as
    bn_triton.SyncBatchNorm's do (one all_gather forward, one all_reduce backward): r and d
    from the statistics of the whole distributed batch, so every rank normalizes alike and
    keeps the same running statistics. Outside a process group (or with one rank, or in
    eval) it is BatchRenorm; nn.SyncBatchNorm's buffers and state_dict."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 process_group=None, device=None, dtype=None) -> None:
        nn.SyncBatchNorm.__init__(self, num_features, eps, momentum, affine, True,
                                  process_group, device=device, dtype=dtype)
        self._init_limits(r_max, d_max, device, dtype)

    @traced_as_leaf
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group_name = sync_group_name(self)
        if group_name is None:
            return self._batch_norm(input)
        if backend(input) == TORCH:
            raise RuntimeError(
                "SyncBatchRenorm across ranks runs bn_triton's kernels: CUDA tensors, or CPU "
                "tensors with TRITON_INTERPRET=1 set before triton is imported; got a "
                f"{input.device.type} tensor")
        if recomputing():
            raise RuntimeError(RECOMPUTED)
        return self._sync_batch_norm(input, group_name, renorm_limits=self.renorm_limits)
