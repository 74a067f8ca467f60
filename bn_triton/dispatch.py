"""Which implementation a tensor's batch norm runs on.

CUDA tensors run the compiled Triton kernels. CPU tensors run the same kernels through Triton's
interpreter when TRITON_INTERPRET=1 was set before triton was imported (Triton reads it when a
kernel is decorated); otherwise they fall back to torch's own batch norm.
"""
import torch
from triton.runtime.interpreter import InterpretedFunction

from .kernels import normalize_kernel

TRITON = "triton"
INTERPRETER = "triton-interpreter"
TORCH = "torch"


def backend(tensor: torch.Tensor) -> str:
    """'triton' (compiled kernels), 'triton-interpreter' (the kernels, interpreted on the CPU)
    or 'torch' (torch's batch norm) for a batch norm of `tensor`."""
    interpreted = isinstance(normalize_kernel, InterpretedFunction)
    if tensor.device.type == "cuda" and not interpreted:
        return TRITON
    if tensor.device.type == "cpu" and interpreted:
        return INTERPRETER
    return TORCH
