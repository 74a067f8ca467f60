"""enable / disable / enabled: bn_triton's kernels under every batch norm of an unmodified model.

While the switch is on, the ATen operators that a batch norm reaches have kernels of bn_triton's
for the CUDA dispatch key (and for the CPU key when Triton's interpreter is on): torch's
BatchNorm modules and their subclasses, F.batch_norm and torch.batch_norm all end in one of
them. They are registered with torch.library (a Library of kind IMPL over the aten namespace),
the way Triton operator libraries plug into PyTorch; nothing in torch is replaced or patched,
and ATen's own autograd formulas stay, calling the backward operators registered here.

    forward                          backward (ATen's autograd formula calls it)
    native_batch_norm                native_batch_norm_backward
    cudnn_batch_norm (CUDA)          cudnn_batch_norm_backward
    miopen_batch_norm (ROCm)         miopen_batch_norm_backward
    _batch_norm_with_update, _batch_norm_no_update            batch_norm_backward
    _native_batch_norm_legit (+ .no_stats, _no_training)      native_batch_norm_backward

Each kernel serves a call when bn_triton.batch_norm would (backend, dtypes, shapes: the checks of
functional.check_batch_norm_args) and hands every other call, unchanged, to the kernel that was
registered before it (torch.library.get_kernel): torch then computes it, or raises its own error.
What the operators return follows ATen's contract for the device: saved statistics of shape
(C,) in the accumulation dtype on CUDA; on the CPU in the parameters' dtype, and empty in eval.

Under torch.compile the switch changes nothing: Inductor decomposes these operators into its own
generated code before any kernel is chosen. Convert the model (convert_batchnorm) to keep
bn_triton's kernels inside compiled graphs; its layers call bn_triton's own ops.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from .dispatch import INTERPRETED, TORCH, backend
from .functional import check_batch_norm_args
from .ops import launch
from .ops.plan import accumulation_dtype

_library: Optional[torch.library.Library] = None


def enable() -> None:
    """Run every batch norm on bn_triton's kernels (CUDA tensors; CPU tensors too when
    TRITON_INTERPRET=1), until disable(). Calling it again changes nothing."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        # torch warns once that a kernel of aten is overridden: that is what was asked for.
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        for key in _dispatch_keys():
            for op, adapter in _ADAPTERS.items():
                try:
                    original = torch.library.get_kernel(f"aten::{op}", key)
                except RuntimeError:  # no kernel for this key (cudnn on a ROCm build, say)
                    continue
                library.impl(op, _kernel(adapter, original), key, with_keyset=True)
    _library = library


def disable() -> None:
    """Give every batch norm back to torch's kernels. Calling it again changes nothing."""
    global _library
    # A Library's registrations last as long as the object: dropping the only reference
    # removes them and torch's kernels take over again.
    _library = None


def is_enabled() -> bool:
    """Whether the switch is on."""
    return _library is not None


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """The switch on inside a with block, and as it was after it (nested blocks included)."""
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()


def _dispatch_keys() -> List[str]:
    """The dispatch keys bn_triton's kernels serve here: CUDA with the compiled kernels, CPU
    under the interpreter (and no other: CPU tensors otherwise stay on torch's kernels)."""
    if INTERPRETED:
        return ["CPU"]
    return ["CUDA"] if torch.cuda.is_available() else []


def _kernel(adapter: Callable, original) -> Callable:
    """The kernel registered for one (operator, key): the adapter, with the kernel it
    replaces to fall back to."""
    def kernel(keyset, *args, **kwargs):
        result = adapter(*args, **kwargs)
        if result is None:
            return original.call_boxed(keyset, *args, **kwargs)
        return result
    return kernel


# --- forward -------------------------------------------------------------------------------

def _serves(input: torch.Tensor, weight, bias, running_mean, running_var, training: bool,
            eps: float) -> bool:
    """Whether bn_triton.batch_norm would run its kernels on these arguments."""
    if backend(input) == TORCH or input.numel() == 0:
        return False
    try:
        check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    except (RuntimeError, ValueError, IndexError, NotImplementedError):
        return False  # torch's kernel decides: its result, or its own error
    return True


def _forward(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """(output, save_mean, save_invstd) as ATen's kernels for the device return them, or None
    where the kernels do not serve the call."""
    if not _serves(input, weight, bias, running_mean, running_var, training, eps):
        return None
    # Below autograd, every mode and subclass (this is the device's kernel of an ATen op):
    # what the op's own kernel would do, without dispatching it again.
    output, mean, invstd = launch.batch_norm_forward(
        input, weight, bias, running_mean, running_var, None, training, momentum, eps)
    if input.device.type == "cpu":
        saved_dtype = next((t.dtype for t in (weight, bias, running_mean, running_var)
                            if t is not None), input.dtype)
        if not training:
            return output, mean.new_empty((0,), dtype=saved_dtype), \
                invstd.new_empty((0,), dtype=saved_dtype)
        return output, mean.to(saved_dtype), invstd.to(saved_dtype)
    return output, mean, invstd


def _native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    return _forward(input, weight, bias, running_mean, running_var, training, momentum, eps)


def _native_batch_norm_no_stats(input, weight, bias, training, momentum, eps):
    return _forward(input, weight, bias, None, None, training, momentum, eps)


def _native_batch_norm_no_training(input, weight, bias, running_mean, running_var, momentum,
                                   eps):
    return _forward(input, weight, bias, running_mean, running_var, False, momentum, eps)


def _with_reserve(result, input):
    """result + the (empty) reserve tensor of ATen's 4-output batch norms: cuDNN's workspace,
    which bn_triton's backward does not need."""
    if result is None:
        return None
    return (*result, input.new_empty((0,), dtype=torch.uint8))


def _batch_norm_with_update(input, weight, bias, running_mean, running_var, momentum, eps):
    return _with_reserve(_forward(input, weight, bias, running_mean, running_var, True,
                                  momentum, eps), input)


def _batch_norm_no_update(input, weight, bias, running_mean, running_var, momentum, eps):
    return _with_reserve(_forward(input, weight, bias, running_mean, running_var, False,
                                  momentum, eps), input)


def _cudnn_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """cudnn_batch_norm: saved statistics in training only (empty in eval), and a reserve."""
    result = _forward(input, weight, bias, running_mean, running_var, training, momentum, eps)
    if result is None:
        return None
    output, mean, invstd = result
    if not training:
        mean, invstd = weight.new_empty((0,)), weight.new_empty((0,))
    return output, mean, invstd, input.new_empty((0,), dtype=torch.uint8)


def _miopen_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    result = _cudnn_batch_norm(input, weight, bias, running_mean, running_var, training,
                               momentum, eps)
    return None if result is None else result[:3]


# --- backward ------------------------------------------------------------------------------

def _backward(grad_output, input, weight, running_mean, running_var, save_mean, save_invstd,
              training: bool, eps: float, output_mask: Sequence[bool]):
    """(grad_input, grad_weight, grad_bias) as ATen's backward returns them (None where
    output_mask does not ask), or None where the kernels do not serve the call. Training
    reads the saved statistics, eval the running ones, as ATen does."""
    statistics = (save_mean, save_invstd) if training else (running_mean, running_var)
    if (not _serves(input, weight, None, running_mean, running_var, training, eps)
            or any(t is None or t.numel() != input.shape[1] for t in statistics)):
        return None
    acc_dtype = accumulation_dtype(input.dtype)
    if training:
        mean, invstd = save_mean.to(acc_dtype), save_invstd.to(acc_dtype)
    else:
        mean = running_mean.to(acc_dtype)
        invstd = torch.rsqrt(running_var.to(acc_dtype) + eps)
    output_mask = [bool(wanted) for wanted in output_mask]
    if weight is None:
        output_mask[1] = False  # nothing to differentiate; ATen returns no gradient either
    grad_dtype = weight.dtype if weight is not None else input.dtype
    grads = launch.batch_norm_backward(grad_output, input, None, None, weight, None, mean,
                                       invstd, training, output_mask + [False], grad_dtype)
    return tuple(grad if wanted else None for grad, wanted in zip(grads, output_mask))


def _native_batch_norm_backward(grad_output, input, weight, running_mean, running_var,
                                save_mean, save_invstd, train, eps, output_mask):
    return _backward(grad_output, input, weight, running_mean, running_var, save_mean,
                     save_invstd, train, eps, output_mask)


def _batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                         save_invstd, update, eps, output_mask, reserve):
    return _backward(grad_output, input, weight, running_mean, running_var, save_mean,
                     save_invstd, update, eps, output_mask)


def _cudnn_batch_norm_backward(input, grad_output, weight, running_mean, running_var,
                               save_mean, save_invstd, eps, reserve=None):
    """cuDNN's backward (training only, all three gradients); miopen's has no reserve."""
    return _backward(grad_output, input, weight, running_mean, running_var, save_mean,
                     save_invstd, True, eps, (True, True, True))


_ADAPTERS = {
    "native_batch_norm": _native_batch_norm,
    "_native_batch_norm_legit": _native_batch_norm,
    "_native_batch_norm_legit.no_stats": _native_batch_norm_no_stats,
    "_native_batch_norm_legit_no_training": _native_batch_norm_no_training,
    "_batch_norm_with_update": _batch_norm_with_update,
    "_batch_norm_no_update": _batch_norm_no_update,
    "cudnn_batch_norm": _cudnn_batch_norm,
    "miopen_batch_norm": _miopen_batch_norm,
    "native_batch_norm_backward": _native_batch_norm_backward,
    "batch_norm_backward": _batch_norm_backward,
    "cudnn_batch_norm_backward": _cudnn_batch_norm_backward,
    "miopen_batch_norm_backward": _cudnn_batch_norm_backward,
}
