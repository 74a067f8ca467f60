"""BatchNorm1d/2d/3d and BatchNormAct1d/2d/3d as subclasses of torch's BatchNorm classes, with
the computation on the Triton kernels."""
import functools
from typing import Callable, Mapping, Optional, Union

import torch
from torch import fx, nn

from ..dispatch import TORCH, backend
from ..functional import (apply_batch_norm, check_batch_norm_args, check_ghost_args,
                          composed_batch_norm, composed_batch_renorm, composed_ghost_batch_norm)
from ..ops.epilogue import (ACTIVATIONS, IDENTITY, Activation, activation_of_layer,
                            check_memory_efficient, torch_activation)


def traced_as_leaf(forward: Callable) -> Callable:
    """A layer's forward that torch.fx's symbolic tracing records as one call_module node, as
    it records torch's own BatchNorm (a leaf module of its default Tracer), instead of tracing
    into the checks and the kernel choice, which branch on the input's shape and device. The
    traced model then calls the layer at run time: its training flag, its errors and its
    kernels are those of the call, not baked in at trace time."""

    @functools.wraps(forward)
    def forward_or_record(self, input, *args, **kwargs):
        if isinstance(input, fx.Proxy):
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self),
                                       (input, *args), kwargs)
        return forward(self, input, *args, **kwargs)

    return forward_or_record


def recomputing() -> bool:
    """Whether this forward runs inside autograd's backward pass: the recomputation of a
    checkpointed forward (torch.utils.checkpoint, reentrant or not, checkpoint_sequential),
    which must not count the batch a second time (pytorch issue 96136; fairscale's
    patch_batchnorm works around the same). Under torch.compile the compiled graphs do not
    replay the running-statistic updates when they recompute, and this is not asked."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


_MISSING = object()


def _member(store: dict, module: nn.Module, name: str):
    """module.<name> for a parameter or buffer: read from its _parameters or _buffers dict
    (`store`), which is where nn.Module.__getattr__ finds it (~1 µs a lookup through
    __getattr__, a tenth of that here), and through getattr where it is not there (a property
    or parametrization that a subclass or torch.nn.utils.parametrize put in its place)."""
    value = store.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def _state(module: nn.Module):
    """(running_mean, running_var, weight, bias) of a batch-norm module, each read as
    module.<name> would read it (see _member), once a call."""
    buffers, parameters = module._buffers, module._parameters
    return (_member(buffers, module, "running_mean"), _member(buffers, module, "running_var"),
            _member(parameters, module, "weight"), _member(parameters, module, "bias"))


class _TritonBatchNorm:
    """forward() of torch's _BatchNorm, line for line, on bn_triton's kernels. Everything else
    (constructor, buffers, _check_input_dim, state_dict, extra_repr) is torch's own class."""

    @traced_as_leaf
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if backend(input) == TORCH:
            return super().forward(input)
        return self._batch_norm(input)

    def _batch_norm(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None,
                    activation: Optional[Activation] = None,
                    memory_efficient: bool = False,
                    renorm_limits: Optional[torch.Tensor] = None,
                    virtual_batch_size: Optional[int] = None) -> torch.Tensor:
        """torch's bookkeeping (num_batches_tracked, momentum=None, which statistics), then the
        batch norm and its epilogue: on the kernels, or in torch's ops where none serves.
        renorm_limits: Batch Renormalization's (r_max, d_max) in training (renorm.py);
        virtual_batch_size: ghost batch norm's in training (ghost.py)."""
        self._check_input_dim(input)
        running_mean, running_var, weight, bias = _state(self)
        training = self.training
        bn_training = training or (running_mean is None and running_var is None)
        # A forward recomputed by activation checkpointing counts nothing: the batch was
        # counted by the forward it repeats (see recomputing). Batch statistics normalize it,
        # as they did the first time.
        tracking = self.track_running_stats and not (training and recomputing())
        if training and not tracking:
            running_mean = running_var = None
        # Check before counting the batch: a call that fails leaves every buffer as it was
        # (torch's own module has already incremented num_batches_tracked by then).
        check_batch_norm_args(input, running_mean, running_var, weight, bias, bn_training,
                              self.eps)
        if not training:
            virtual_batch_size = None  # eval: batch norm's, with the running statistics
        if virtual_batch_size is not None:
            check_ghost_args(input, virtual_batch_size)
        momentum = 0.0 if self.momentum is None else self.momentum
        num_batches_tracked = None
        if training and tracking:
            counter = _member(self._buffers, self, "num_batches_tracked")
            if counter is not None:
                counter.add_(1)
                if self.momentum is None:
                    # 1/num_batches_tracked is read by the kernel: no host synchronisation,
                    # and nothing that torch.compile has to break its graph for.
                    num_batches_tracked = counter
        if renorm_limits is not None and not (training and tracking):
            renorm_limits = None  # eval: the running statistics normalize, as batch norm's
        if backend(input) == TORCH:
            if num_batches_tracked is not None:
                momentum = 1.0 / float(num_batches_tracked)
            if virtual_batch_size is not None and input.numel() > 0:
                return composed_ghost_batch_norm(input, running_mean, running_var, weight, bias,
                                                 momentum, self.eps, virtual_batch_size,
                                                 residual, activation or IDENTITY)
            if renorm_limits is not None and input.numel() > 0:
                return composed_batch_renorm(input, running_mean, running_var, weight, bias,
                                             momentum, self.eps, renorm_limits, residual,
                                             activation or IDENTITY)
            return composed_batch_norm(input, running_mean, running_var, weight, bias,
                                       bn_training, momentum, self.eps, residual,
                                       activation or IDENTITY, memory_efficient)
        return apply_batch_norm(input, running_mean, running_var, weight, bias, bn_training,
                                momentum, self.eps, num_batches_tracked, residual=residual,
                                activation=activation, memory_efficient=memory_efficient,
                                renorm_limits=renorm_limits,
                                virtual_batch_size=virtual_batch_size)


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d computed by bn_triton's kernels."""


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d computed by bn_triton's kernels."""


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d computed by bn_triton's kernels."""


class _TritonBatchNormAct(_TritonBatchNorm):
    """act(BN(x) + residual) in the launches of BN alone: timm's BatchNormAct as a subclass of
    torch's BatchNorm class, so the parameters and buffers, and so the state_dict keys, are
    nn.BatchNorm's (weights load both ways). The activation is held by name and parameters
    (activation, activation_param, activation_param2: hardtanh's min_val and max_val), not as
    a submodule."""

    # A layer pickled before activation_param2 existed reads this one.
    activation_param2 = 0.0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: Union[str, type, nn.Module, None] = "relu",
                 act_kwargs: Optional[Mapping[str, object]] = None,
                 memory_efficient: bool = False, device=None, dtype=None,
                 **batch_norm_kwargs) -> None:
        # batch_norm_kwargs: keyword-only arguments of torch's BatchNorm beyond these, such as
        # bias=False where the installed torch has it.
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **batch_norm_kwargs)
        activation = activation_of_layer(act_layer if apply_act else None, act_kwargs)
        if memory_efficient:
            check_memory_efficient(activation, has_residual=False)
        self.activation = activation.name
        self.activation_param = activation.param
        self.activation_param2 = activation.param2
        self.memory_efficient = memory_efficient

    @traced_as_leaf
    def forward(self, input: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """act(BN(input) + residual). A residual that does not match the input in shape, dtype
        or device (one that torch's add would broadcast or promote) is added unfused, after a
        batch norm without activation, so that the result is exactly the unfused one's."""
        activation = Activation(self.activation, self.activation_param, self.activation_param2)
        if residual is not None and not _matches(residual, input):
            check_addable(input, residual)
            out = self._batch_norm(input) + residual
            return torch_activation(activation)(out)
        if self.memory_efficient:
            check_memory_efficient(activation, residual is not None)
        return self._batch_norm(input, residual, activation, self.memory_efficient)

    def extra_repr(self) -> str:
        act = self.activation
        keywords = [keyword for keyword, _ in ACTIVATIONS.get(act, ())]
        if keywords:
            values = (self.activation_param, self.activation_param2)
            act = f"{act}({', '.join(f'{k}={v}' for k, v in zip(keywords, values))})"
        saving = ", memory_efficient=True" if self.memory_efficient else ""
        return f"{super().extra_repr()}, act={act}{saving}"


def check_addable(input: torch.Tensor, residual: object) -> None:
    """Raise what torch's BN(input) + residual would raise (shapes that do not broadcast,
    tensors on two devices, an operand add refuses), before the batch norm moves a buffer.
    The shapes and operand go through torch's own add, on meta tensors."""
    if isinstance(residual, torch.Tensor):
        if residual.device != input.device and not (residual.dim() == 0
                                                    and residual.device.type == "cpu"):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at "
                               f"least two devices, {input.device} and {residual.device}!")
        residual = residual.to("meta")
    torch.add(input.to("meta"), residual)


def _matches(residual: torch.Tensor, input: torch.Tensor) -> bool:
    return (isinstance(residual, torch.Tensor) and residual.shape == input.shape
            and residual.dtype == input.dtype and residual.device == input.device)


class BatchNormAct1d(_TritonBatchNormAct, nn.BatchNorm1d):
    """act(BatchNorm1d(x) + residual), fused: timm's BatchNormAct for (N, C) and (N, C, L)."""


class BatchNormAct2d(_TritonBatchNormAct, nn.BatchNorm2d):
    """act(BatchNorm2d(x) + residual), fused: timm's BatchNormAct2d, bn_triton's kernels."""


class BatchNormAct3d(_TritonBatchNormAct, nn.BatchNorm3d):
    """act(BatchNorm3d(x) + residual), fused: timm's BatchNormAct for (N, C, D, H, W)."""
