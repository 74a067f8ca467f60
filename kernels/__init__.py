"""Triton kernels of bn_triton (installed as ``bn_triton.kernels``).

Every kernel sees its tensors as (N, C, S): N the batch, C the channels, S the product of the
spatial dims, addressed through strides so that contiguous and channels-last memory are read in
place. M = N·S values belong to each channel. Two paths:

- slab (small M): a program owns BLOCK_C whole channels, holds their M values in registers and
  does a whole training forward or backward in one launch, one pass over memory;
- split (large M): a program owns BLOCK_C channels and one *split* of the M axis, walked in
  tiles of BLOCK_S values; grid (cdiv(C, BLOCK_C), num_splits). Per-channel sums finish in the
  last program of each channel block, the next kernel streams with O(C) statistics.

- stats.py     batch_stats_kernel (split statistics) and the @jit helpers they share
- forward.py   normalize_kernel (split / eval), forward_slab_kernel
- backward.py  dy_sums_kernel + input_grad_kernel (split), backward_slab_kernel
- merge.py     merge_statistics_kernel (SyncBatchNorm: every rank's statistics, merged)
- ghost.py     ghost_running_update_kernel, sum_runs_kernel (ghost batch norm: what spans the
               virtual batches the kernels above normalize one grid row each)

Reference: S. Ioffe and C. Szegedy, Batch Normalization, arXiv:1502.03167, Algorithm 1.
"""
from .backward import backward_slab_kernel, dy_sums_kernel, input_grad_kernel
from .forward import forward_slab_kernel, normalize_kernel
from .ghost import ghost_running_update_kernel, sum_runs_kernel
from .merge import merge_statistics_kernel
from .stats import batch_stats_kernel

# merge_statistics_kernel is compiled for sm_80/sm_90 by tests/test_merge.py, not by the
# front-end scenarios of tests/test_compile.py (which require every name here): its launch
# needs a process group, which those single-process meta-tensor calls do not have.
__all__ = ["batch_stats_kernel", "normalize_kernel", "forward_slab_kernel", "dy_sums_kernel",
           "input_grad_kernel", "backward_slab_kernel", "ghost_running_update_kernel",
           "sum_runs_kernel"]
