"""Triton kernels of bn_triton (installed as ``bn_triton.kernels``).

Every kernel sees its tensors as (N, C, S): N the batch, C the channels, S the product of the
spatial dims, addressed through strides so that contiguous and channels-last memory are read in
place. M = N·S values belong to each channel. A program owns BLOCK_C channels and one *split*
of the M axis, walked in tiles of BLOCK_S values along S; the grid is (cdiv(C, BLOCK_C), SPLITS).

- stats.py     per-split Welford partials of x, and their fixed-order combine (a @jit helper)
- forward.py   y = (x - mean)·invstd·γ + β, with the combine and the running-stat update in
               its prologue
- backward.py  per-split Σdy and Σdy·(x - mean), then dγ, dβ and dx with the combine in the
               prologue

Reference: S. Ioffe and C. Szegedy, Batch Normalization, arXiv:1502.03167, Algorithm 1.
"""
from .backward import dy_partials_kernel, input_grad_kernel
from .forward import normalize_kernel
from .stats import welford_partials_kernel

__all__ = ["welford_partials_kernel", "normalize_kernel", "dy_partials_kernel", "input_grad_kernel"]
