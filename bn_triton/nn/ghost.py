"""Ghost batch norm (Hoffer, Hubara and Soudry, NeurIPS 2017, arXiv:1705.08741: "train longer,
generalize better"): GhostBatchNorm1d/2d/3d and the fused GhostBatchNormAct1d/2d/3d on
bn_triton's kernels.

In training the batch is cut into consecutive runs of virtual_batch_size samples, as
torch.split(x, virtual_batch_size) cuts it (the last may be shorter), and each run is
normalized with its own statistics (and the shared γ, β):

    y[run] = γ·(x[run] - μ_run)/sqrt(σ²_run + ε) + β.

The running statistics take ONE update per forward, with the unweighted mean over the runs of
their means and of their unbiased variances, and num_batches_tracked counts forwards, not
runs. A run with one value per channel raises torch's error. Eval is batch norm with the
running statistics (with track_running_stats=False, torch's batch statistics of the whole
batch, as nn.BatchNorm's eval).

All runs go through one set of launches: batch norm's kernels over one more grid dimension,
one row a run, planned for one full run (so a large batch of small virtual batches takes the
one-pass slab kernels), plus one launch over the channels for what spans the runs (the
running update forward, dγ and dβ backward; kernels/ghost.py). No Python loop over the runs,
no copy of x. The state_dict is nn.BatchNorm's.
"""
from typing import Mapping, Optional, Union

import torch
from torch import nn

from ..ops.epilogue import Activation
from .modules import _TritonBatchNorm, _TritonBatchNormAct, traced_as_leaf


def _checked_size(virtual_batch_size: object) -> int:
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
        raise TypeError("virtual_batch_size must be an int, got "
                        f"{type(virtual_batch_size).__name__}")
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be positive, got {virtual_batch_size}")
    return virtual_batch_size


class _TritonGhostBatchNorm(_TritonBatchNorm):
    """Ghost batch norm on torch's BatchNorm class (its buffers, state_dict, _check_input_dim)
    and bn_triton's kernels."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.virtual_batch_size = _checked_size(virtual_batch_size)

    @traced_as_leaf
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._batch_norm(input)

    def _batch_norm(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None,
                    activation: Optional[Activation] = None,
                    memory_efficient: bool = False,
                    renorm_limits: Optional[torch.Tensor] = None) -> torch.Tensor:
        if memory_efficient:
            raise ValueError("memory_efficient=True is not available with ghost batch norm")
        return super()._batch_norm(input, residual, activation, False, None,
                                   self.virtual_batch_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_TritonGhostBatchNorm, nn.BatchNorm1d):
    """Ghost batch norm of (N, C) or (N, C, L) input; nn.BatchNorm1d's buffers."""


class GhostBatchNorm2d(_TritonGhostBatchNorm, nn.BatchNorm2d):
    """Ghost batch norm of (N, C, H, W) input; nn.BatchNorm2d's buffers."""


class GhostBatchNorm3d(_TritonGhostBatchNorm, nn.BatchNorm3d):
    """Ghost batch norm of (N, C, D, H, W) input; nn.BatchNorm3d's buffers."""


class _TritonGhostBatchNormAct(_TritonGhostBatchNorm, _TritonBatchNormAct):
    """act(GhostBatchNorm(x) + residual) in the launches of ghost batch norm alone."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: Union[str, type, nn.Module, None] = "relu",
                 act_kwargs: Optional[Mapping[str, object]] = None, device=None,
                 dtype=None) -> None:
        _TritonBatchNormAct.__init__(self, num_features, eps, momentum, affine,
                                     track_running_stats, apply_act=apply_act,
                                     act_layer=act_layer, act_kwargs=act_kwargs, device=device,
                                     dtype=dtype)
        self.virtual_batch_size = _checked_size(virtual_batch_size)

    forward = _TritonBatchNormAct.forward

    def extra_repr(self) -> str:
        return (f"{_TritonBatchNormAct.extra_repr(self)}, "
                f"virtual_batch_size={self.virtual_batch_size}")


class GhostBatchNormAct1d(_TritonGhostBatchNormAct, nn.BatchNorm1d):
    """act(GhostBatchNorm1d(x) + residual), fused."""


class GhostBatchNormAct2d(_TritonGhostBatchNormAct, nn.BatchNorm2d):
    """act(GhostBatchNorm2d(x) + residual), fused."""


class GhostBatchNormAct3d(_TritonGhostBatchNormAct, nn.BatchNorm3d):
    """act(GhostBatchNorm3d(x) + residual), fused."""
