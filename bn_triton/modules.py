"""BatchNorm1d/2d/3d as subclasses of torch's, with the computation on the Triton kernels."""
import torch
from torch import nn

from .dispatch import TORCH, backend
from .functional import apply_batch_norm, check_batch_norm_args


class _TritonBatchNorm:
    """forward() of torch's _BatchNorm, line for line, on bn_triton's kernels. Everything else
    (constructor, buffers, _check_input_dim, state_dict, extra_repr) is torch's own class."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if backend(input) == TORCH:
            return super().forward(input)
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        # Check before counting the batch: a call that fails leaves every buffer as it was
        # (torch's own module has already incremented num_batches_tracked by then).
        check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias,
                              bn_training, self.eps)
        momentum = 0.0 if self.momentum is None else self.momentum
        num_batches_tracked = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                # 1/num_batches_tracked is read by the kernel: no host synchronisation, and
                # nothing that torch.compile has to break its graph for.
                num_batches_tracked = self.num_batches_tracked
        return apply_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                bn_training, momentum, self.eps, num_batches_tracked)


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d computed by bn_triton's kernels."""


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d computed by bn_triton's kernels."""


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d computed by bn_triton's kernels."""


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                 nn.BatchNorm3d: BatchNorm3d}


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Make every torch.nn.BatchNorm1d/2d/3d in `module` (itself and nested) bn_triton's, and
    return `module`.

    The layers are converted in place: each keeps its parameters, buffers, hooks, training flag,
    device and dtype (an optimizer built before still holds the same parameters), and only
    its class changes. Only layers of exactly torch's three classes change: bn_triton's layers,
    nn.SyncBatchNorm and user subclasses of torch's classes are left as they are."""
    for layer in module.modules():
        replacement = _REPLACEMENTS.get(type(layer))
        if replacement is not None:
            layer.__class__ = replacement
    return module
