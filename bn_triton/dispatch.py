"""Which implementation a tensor's batch norm runs on.

CUDA tensors run the compiled Triton kernels. CPU tensors run the same kernels through Triton's
interpreter when TRITON_INTERPRET=1 was set before triton was imported (Triton reads it when a
kernel is decorated); otherwise they fall back to torch's own batch norm.
"""
import os
import sys
from typing import Sequence

import torch
from triton.runtime.interpreter import InterpretedFunction

from .kernels import normalize_kernel

TRITON = "triton"
INTERPRETER = "triton-interpreter"
TORCH = "torch"


# Triton decides this when it decorates the kernels, reading TRITON_INTERPRET then.
INTERPRETED = isinstance(normalize_kernel, InterpretedFunction)


def backend(tensor: torch.Tensor) -> str:
    """'triton' (compiled kernels), 'triton-interpreter' (the kernels, interpreted on the CPU)
    or 'torch' (torch's batch norm) for a batch norm of `tensor`."""
    if tensor.is_cuda:  # is_cuda / is_cpu: device.type without building a torch.device
        return TORCH if INTERPRETED else TRITON
    return INTERPRETER if INTERPRETED and tensor.is_cpu else TORCH


def rerun_with_interpreter_if_no_gpu(module: str, argv: Sequence[str]) -> None:
    """For command-line entry points: without a GPU the kernels run through Triton's
    interpreter, which Triton reads from TRITON_INTERPRET when it is imported. bn_triton (and
    so triton) is imported before a `python -m` module's code runs, so the command starts
    itself again, `python -m module *argv`, with the variable set. Returns where nothing needs
    doing (a GPU, or the variable already set)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
