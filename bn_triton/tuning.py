"""Which configuration runs each kernel: triton.autotune on a GPU, a fixed heuristic elsewhere.

`LAUNCHERS[name]` is the kernel `name` as launch.py calls it, and `launch` starts it with the
heuristic warps where no autotuner runs.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction

from . import kernels

# Warps of a split-path program where no autotuner picks them (slab programs: Plan.slab_num_warps).
NUM_WARPS = 4
# Autotune configs of a slab kernel hold at most this many values a thread per live tensor
# (more spill): forward, backward.
MAX_SLAB_VALUES_PER_THREAD = {"forward_slab_kernel": 64, "backward_slab_kernel": 32}
# Autotuning, on a GPU only: the warps (and pipelining stages) of each kernel, keyed on its tile
# shape and split count, which bucket (M, C, layout), and on the dtypes (Triton adds those).
# Tile shapes stay with the plan: they set the grid, and the traffic model counts on them.
# A kernel that updates the running statistics is tuned with restore_value, so benchmarking
# its configs leaves one update, not one per trial; the tickets need nothing (every run
# leaves them zeroed). Under the interpreter, or with BN_TRITON_AUTOTUNE=0, the fixed
# heuristic (NUM_WARPS, Plan.slab_num_warps) runs instead: autotuning there has nothing to time.
SPLIT_KEY = ["BLOCK_C", "BLOCK_S", "num_splits", "INT64"]
SLAB_KEY = ["BLOCK_C", "BLOCK_N", "BLOCK_S", "INT64"]
SPLIT_CONFIGS = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (2, 3)]
SLAB_CONFIGS = [triton.Config({}, num_warps=w) for w in (8, 16)]
RUNNING = ["running_mean_ptr", "running_var_ptr"]
TUNING = {  # kernel name -> (key, configs, restore_value)
    "batch_stats_kernel": (SPLIT_KEY, SPLIT_CONFIGS, RUNNING),
    "normalize_kernel": (SPLIT_KEY, SPLIT_CONFIGS, []),
    "forward_slab_kernel": (SLAB_KEY, SLAB_CONFIGS, RUNNING),
    "dy_sums_kernel": (SPLIT_KEY, SPLIT_CONFIGS, []),
    "input_grad_kernel": (SPLIT_KEY, SPLIT_CONFIGS, []),
    "backward_slab_kernel": (SLAB_KEY, SLAB_CONFIGS, []),
}


def candidate_configs(name: str, configs: Sequence[triton.Config], meta: dict) -> list:
    """The configs of kernel `name` worth timing for a launch with constexprs `meta`: for a
    slab kernel, those whose threads hold at most MAX_SLAB_VALUES_PER_THREAD values each (the
    widest config stays if none does)."""
    if name not in MAX_SLAB_VALUES_PER_THREAD:
        return list(configs)
    values = meta["BLOCK_C"] * meta["BLOCK_N"] * meta["BLOCK_S"]
    kept = [config for config in configs
            if values // (32 * config.num_warps) <= MAX_SLAB_VALUES_PER_THREAD[name]]
    return kept or [max(configs, key=lambda config: config.num_warps)]


def tuned(name: str, do_bench: Optional[Callable] = None):
    """Kernel `name` wrapped in triton.autotune over its TUNING entry (do_bench: Triton's
    own benchmarker when None), timing only its candidate_configs."""
    key, configs, restore_value = TUNING[name]

    def prune(configs, named_args, **meta):
        return candidate_configs(name, configs, {**named_args, **meta})

    return triton.autotune(configs=configs, key=key, restore_value=restore_value,
                           prune_configs_by={"early_config_prune": prune},
                           do_bench=do_bench)(getattr(kernels, name))


def _launchers() -> dict:
    interpreted = isinstance(kernels.normalize_kernel, InterpretedFunction)
    if interpreted or os.environ.get("BN_TRITON_AUTOTUNE") == "0":
        return {name: getattr(kernels, name) for name in TUNING}
    return {name: tuned(name) for name in TUNING}


LAUNCHERS = _launchers()


def launch(name: str, grid, num_warps: int, **arguments) -> None:
    """Launch kernel `name`: the autotuner picks warps and stages where it runs, the heuristic
    num_warps elsewhere."""
    kernel = LAUNCHERS[name]
    options = {} if isinstance(kernel, Autotuner) else {"num_warps": num_warps}
    kernel[grid](**arguments, **options)
