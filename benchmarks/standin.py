"""A stand-in for the GPU below Triton's JIT, so that launches take Triton's real compiled-kernel
path on a machine without one (no TRITON_INTERPRET): a driver that reports an sm_90 device and
stream 0, and compiled kernels whose launch records its arguments instead of running.

Used in a fresh process (the kernels must be JIT functions, not interpreted ones) by
benchmarks/host.py (Triton's and bn_triton's host cost per launch) and tests/test_compiled.py
(the direct launches of bn_triton/ops/compiled.py against Triton's own). `install()` first, then
import bn_triton's launch code.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

LAUNCHED: List[Tuple["Compiled", tuple]] = []


class StandInDriver:
    """What JITFunction.run and bn_triton ask of the active driver, for one sm_90 GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


class Compiled:
    """A compiled kernel of one launch key (Triton's specialization and options) whose launch
    records (itself, the launch arguments) in LAUNCHED, or nothing when `record` is off."""

    record = True
    function = None
    packed_metadata = None

    def __init__(self, name: str, key):
        self.name, self.key = name, key

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        if Compiled.record:
            LAUNCHED.append((self, args))


def install(kernels) -> List["Compiled"]:
    """Make the stand-in driver active and every JIT function of `kernels` (bn_triton.kernels)
    "compile" to a Compiled; returns the list each new Compiled is appended to."""
    driver.set_active(StandInDriver())
    made: List[Compiled] = []
    for name in kernels.__all__ + ["merge_statistics_kernel"]:
        kernel = getattr(kernels, name)

        def compile_once(key, *args, _kernel=kernel, _name=name, **kwargs):
            compiled = Compiled(_name, key)
            made.append(compiled)
            _kernel.device_caches[0][0][key] = compiled
            return compiled

        kernel._do_compile = compile_once
    return made
