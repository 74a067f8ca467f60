"""Which configuration runs each kernel, and the one place kernels are launched.

`launch(name, grid, num_warps, device, **arguments)` starts kernel `name` on `device`, under
that device's guard (Triton launches on the current device and its current stream, so a tensor
on cuda:1 while cuda:0 is current would otherwise be launched on the wrong GPU), either with
the heuristic num_warps or through triton.autotune.

What may be tuned: only what leaves a kernel's bits unchanged. num_warps sets the layout of a
tile over threads, and tl.sum's combine tree follows the layout, so a kernel that reduces
(statistics, the backward sums, the slabs) would give different bits for different configs:
the same input in two processes, or on two ranks, could normalize differently. Those kernels
run their heuristic warps, always. The streaming kernels (normalize, input_grad) compute each
element alone, so their warps are tuned. num_stages is not: the tile loops are not software
pipelined, and stages 2 and 3 compile to the same code.

When the autotuner runs (BN_TRITON_AUTOTUNE):
  unset  on a GPU; under Triton's interpreter the heuristic (there is nothing to time);
  "1"    always, under the interpreter too, each config timed by one run (tests, CPU checks);
  "0"    never.
A tuned kernel gets one triton.autotune per device (the best config of an H100 need not be an
A100's, and the Autotuner keys its cache on arguments only), and every call of it holds that
autotuner's lock: the Autotuner keeps a call's arguments on itself while it benchmarks, so two
threads tuning the same key at once (nn.DataParallel's replicas on their first step) would
otherwise mix their calls.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction

from . import kernels

# Warps of a split-path program (slab programs: Plan.slab_num_warps): 16 tile values a thread.
NUM_WARPS = 4
# The kernels the autotuner may configure, and over what: warps only (see the module docstring).
# Keyed on the tile shape, the split count and the offset width, which bucket (M, C, layout);
# Triton adds the dtypes.
SPLIT_KEY = ["BLOCK_C", "BLOCK_S", "num_splits", "INT64"]
TUNED_CONFIGS = [triton.Config({}, num_warps=warps) for warps in (4, 8)]
TUNING = {  # kernel name -> (key, configs)
    "normalize_kernel": (SPLIT_KEY, TUNED_CONFIGS),
    "input_grad_kernel": (SPLIT_KEY, TUNED_CONFIGS),
}
KERNELS = ("batch_stats_kernel", "normalize_kernel", "forward_slab_kernel", "dy_sums_kernel",
           "input_grad_kernel", "backward_slab_kernel", "merge_statistics_kernel")


def run_once(kernel_call: Callable, quantiles=None):
    """A stand-in for Triton's benchmarker: runs the config once, calls every config equally
    fast (so the first config wins). What BN_TRITON_AUTOTUNE=1 times with where no GPU is."""
    kernel_call()
    return [1.0, 1.0, 1.0] if quantiles else 1.0


def tuned(name: str, do_bench: Optional[Callable] = None) -> Autotuner:
    """Kernel `name` wrapped in triton.autotune over its TUNING entry (do_bench: Triton's own
    benchmarker when None)."""
    key, configs = TUNING[name]
    return triton.autotune(configs=configs, key=key, do_bench=do_bench)(getattr(kernels, name))


def autotuning() -> Tuple[bool, Optional[Callable]]:
    """(whether the autotuner runs, the benchmarker it times with) under BN_TRITON_AUTOTUNE."""
    setting = os.environ.get("BN_TRITON_AUTOTUNE")
    if setting == "0":
        return False, None
    interpreted = isinstance(kernels.normalize_kernel, InterpretedFunction)
    if setting == "1":
        return True, run_once if interpreted else None
    return not interpreted, None


class TunedKernel:
    """A kernel of TUNING as launched: one triton.autotune per device, each behind its lock."""

    def __init__(self, name: str, do_bench: Optional[Callable] = None):
        self.name = name
        self.do_bench = do_bench
        self.autotuners: Dict[torch.device, Autotuner] = {}
        self.locks: Dict[torch.device, threading.Lock] = {}
        self._guard = threading.Lock()  # creates autotuners and locks

    def for_device(self, device: torch.device) -> Tuple[Autotuner, threading.Lock]:
        autotuner = self.autotuners.get(device)
        if autotuner is None:
            with self._guard:
                if device not in self.autotuners:
                    self.locks[device] = threading.Lock()
                    self.autotuners[device] = tuned(self.name, self.do_bench)
                autotuner = self.autotuners[device]
        return autotuner, self.locks[device]

    def __call__(self, grid, device: torch.device, arguments: dict) -> None:
        autotuner, lock = self.for_device(device)
        with lock:
            autotuner[grid](**arguments)


def make_launchers(tune: Optional[bool] = None, do_bench: Optional[Callable] = None) -> dict:
    """name -> the kernel itself (heuristic warps) or its TunedKernel; `tune` and `do_bench`
    default to what BN_TRITON_AUTOTUNE says (see autotuning)."""
    if tune is None:
        tune, do_bench = autotuning()
    return {name: TunedKernel(name, do_bench) if tune and name in TUNING
            else getattr(kernels, name) for name in KERNELS}


LAUNCHERS = make_launchers()


def device_guard(device: torch.device):
    """The context every launch runs in: `device` made current (and with it its current
    stream, the one Triton launches on and the tickets are kept for), as Inductor's
    launchers do. Nothing for the CPU, where the interpreter runs."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(name: str, grid: Sequence[int], num_warps: int, device: torch.device,
           **arguments) -> None:
    """Launch kernel `name` over `grid` on `device`: the autotuner picks the warps where it runs
    (TunedKernel), the heuristic num_warps elsewhere."""
    kernel = LAUNCHERS[name]
    with device_guard(device):
        if isinstance(kernel, TunedKernel):
            kernel(grid, device, arguments)
        else:
            kernel[grid](**arguments, num_warps=num_warps)
