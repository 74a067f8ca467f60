"""SyncBatchNorm and SyncBatchNormAct: batch statistics over every rank of a process group, on
bn_triton's kernels and torch.distributed's collectives.

Forward: this rank's (count, mean, var) from the statistics kernel, one all_gather of every
rank's, combined in rank order by Chan's formula (exact for uneven batches and for a rank whose
batch is empty; the same bits on every rank), then the normalize kernel with the fused epilogue.
Backward: this rank's (Σdz, Σdz·x̂), one all_reduce, then dx; dγ, dβ stay this rank's (DDP
reduces parameter gradients). The collectives run inside bn_triton's sync ops, so
torch.compile(fullgraph=True) sees two op calls, as for BatchNorm2d (bn_triton/ops/collectives.py).

Outside an initialized process group, with a world of one rank, or in eval, a layer computes
exactly what bn_triton's BatchNorm (BatchNormAct) does. BN_TRITON_SYNC_ALWAYS=1 takes the
collective path with one rank too: the GPU check runs the synced kernels and NCCL that way.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..dispatch import TORCH, backend
from ..functional import apply_batch_norm, check_batch_norm_args, check_epilogue_args
from ..ops.epilogue import IDENTITY, Activation, torch_activation
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                      BatchNormAct3d, _matches, _TritonBatchNorm, _TritonBatchNormAct,
                      check_addable, recomputing, traced_as_leaf)


# What SyncBatchNorm.convert_sync_batchnorm and convert_batchnorm(sync=True) turn into
# bn_triton's sync layers: exactly these classes (a subclass may compute anything).
_FUSED_CLASSES = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)
_TO_SYNC = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNorm1d,
            BatchNorm2d, BatchNorm3d, *_FUSED_CLASSES)


def to_sync(layer: nn.Module, process_group=None) -> bool:
    """Make `layer` bn_triton's SyncBatchNorm (a BatchNormAct: SyncBatchNormAct) in place,
    synchronizing over process_group, if it is of one of the _TO_SYNC classes; whether it
    was."""
    if type(layer) not in _TO_SYNC:
        return False
    layer.__class__ = SyncBatchNormAct if type(layer) in _FUSED_CLASSES else SyncBatchNorm
    layer.process_group = process_group
    return True


def sync_group_name(layer: nn.SyncBatchNorm) -> Optional[str]:
    """The name of the process group this call's statistics span, or None where the call is
    a plain batch norm: not training, no initialized group, or a group of one rank (unless
    BN_TRITON_SYNC_ALWAYS=1)."""
    if not (layer.training and dist.is_available() and dist.is_initialized()):
        return None
    group = layer.process_group if layer.process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) == 1 and os.environ.get("BN_TRITON_SYNC_ALWAYS") != "1":
        return None
    return group.group_name


class _TritonSyncBatchNorm:
    """forward() of torch's SyncBatchNorm on bn_triton's kernels; mixed in front of
    nn.SyncBatchNorm (and of BatchNormAct for the fused layer)."""

    def _sync_batch_norm(self, input: torch.Tensor, group_name: str,
                         residual: Optional[torch.Tensor] = None,
                         activation: Optional[Activation] = None,
                         memory_efficient: bool = False,
                         renorm_limits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """torch's SyncBatchNorm bookkeeping, every check before the first collective, then
        the synced ops (Batch Renormalization's, renorm_limits given: SyncBatchRenorm). A
        failing call leaves every buffer as it was."""
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        tracking = self.track_running_stats and not recomputing()  # see modules.recomputing
        running_mean = self.running_mean if tracking else None
        running_var = self.running_var if tracking else None
        check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias, True,
                              self.eps, synced=True)
        check_epilogue_args(input, residual, activation or IDENTITY, memory_efficient)
        momentum = 0.0 if self.momentum is None else self.momentum
        num_batches_tracked = None
        if tracking:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                num_batches_tracked = self.num_batches_tracked  # read on the device
        return apply_batch_norm(input, running_mean, running_var, self.weight, self.bias, True,
                                momentum, self.eps, num_batches_tracked, residual=residual,
                                activation=activation, memory_efficient=memory_efficient,
                                group_name=group_name,
                                renorm_limits=renorm_limits if tracking else None)


class SyncBatchNorm(_TritonSyncBatchNorm, _TritonBatchNorm, nn.SyncBatchNorm):
    """Drop-in for torch.nn.SyncBatchNorm on bn_triton's kernels (see the module docstring);
    unlike torch's, it also runs on CPU tensors (gloo; the kernels through Triton's
    interpreter) and compiles with fullgraph."""

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """torch's classmethod, to bn_triton's sync layers: what convert_batchnorm(module,
        sync=True, process_group) does, in place (a fused layer becomes a SyncBatchNormAct)."""
        for layer in list(module.modules()):
            to_sync(layer, process_group)
        return module

    @traced_as_leaf
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group_name = sync_group_name(self)
        if group_name is None:
            return _TritonBatchNorm.forward(self, input)
        if backend(input) == TORCH:
            return nn.SyncBatchNorm.forward(self, input)  # torch's own, errors included
        return self._sync_batch_norm(input, group_name)


class SyncBatchNormAct(_TritonSyncBatchNorm, _TritonBatchNormAct, nn.SyncBatchNorm):
    """act(SyncBatchNorm(x) + residual), fused: timm's SyncBatchNormAct on bn_triton's kernels,
    with BatchNormAct2d's constructor plus process_group."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: Union[str, type, nn.Module, None] = "relu",
                 act_kwargs: Optional[Mapping[str, object]] = None,
                 memory_efficient: bool = False, process_group=None, device=None,
                 dtype=None, **batch_norm_kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, apply_act,
                         act_layer, act_kwargs, memory_efficient, device=device, dtype=dtype,
                         **batch_norm_kwargs)
        self.process_group = process_group

    @traced_as_leaf
    def forward(self, input: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        group_name = sync_group_name(self)
        if group_name is None:
            return _TritonBatchNormAct.forward(self, input, residual)
        activation = Activation(self.activation, self.activation_param, self.activation_param2)
        unfused = residual is not None and not _matches(residual, input)
        if unfused:
            check_addable(input, residual)
        if backend(input) == TORCH or unfused:
            # torch's own SyncBatchNorm where no kernel serves; a residual that torch's add
            # would broadcast or promote is added after the synced batch norm, as unfused.
            output = (nn.SyncBatchNorm.forward(self, input) if backend(input) == TORCH
                      else self._sync_batch_norm(input, group_name))
            if residual is not None:
                output = output + residual
            return torch_activation(activation)(output)
        return self._sync_batch_norm(input, group_name, residual, activation,
                                     self.memory_efficient)
