"""The seam below torch: shapes, strides and launches, no torch semantics.

plan (slab or split, tiles, splits: shapes in, a Plan out), tuning (autotune configs and the one
place kernels are launched), compiled (direct launches of known compiled kernels), launch (one
wrapper per kernel), library (the torch.library ops: schemas, fake kernels, autograd), with
their torch.func rules (batching, forward_ad), the second derivative (double_backward), the
collectives of the synced ops, the epilogue's activations, and traffic (memory requests
counted under Triton's interpreter). Imports go one way: library -> launch -> plan, kernels.
"""
