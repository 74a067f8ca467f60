"""Compiled kernels launched without Triton's per-call binder, once their specialization is known.

Every `kernel[grid](**arguments)` of a JIT function spends 15-30 µs of host time (measured by
benchmarks/host.py with a stand-in sm_90 driver) binding the ~50 arguments to the signature,
specializing each (dtype, 16-byte alignment, ints equal to 1 or divisible by 16), hashing that
into a cache key and looking it up, before the driver's launch call. bn_triton's launch
wrappers pass every non-tensor argument in one `constants` dict that they keep per plan and
flags (launch.py), so of a call only the tensors can change what Triton would pick: their
dtypes and whether their addresses are 16-byte aligned. A launch is therefore keyed on

    (the constants dict itself, num_warps, device, per tensor: None or (dtype, aligned))

and the first launch of each key goes through Triton (compiling, or tuning, as always); the
compiled kernel it returns is then launched directly, with the arguments in signature order,
exactly as JITFunction.run launches it: `compiled.run(grid_0, grid_1, grid_2, stream,
function, packed_metadata, launch_metadata, enter_hook, exit_hook, *arguments)`.
tests/test_compiled.py proves on the CPU, with a stand-in driver, that for every launch the
direct path picks the very compiled kernel Triton's path picks and passes the same grid,
stream and arguments.

Launch metadata and Triton's launch hooks (what a profiler such as proton reads) are passed as
Triton passes them. Triton's own path is kept for everything else: the interpreter,
BN_TRITON_DIRECT_LAUNCH=0, a launcher replaced after import, and ints among the per-call
arguments other than the kernels' do_not_specialize ones.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

def enabled() -> bool:
    """Whether launches may skip Triton's binder (BN_TRITON_DIRECT_LAUNCH, default on)."""
    return os.environ.get("BN_TRITON_DIRECT_LAUNCH", "1") != "0"


class CompiledLaunches:
    """The compiled kernels of one JIT function by launch key (see the module docstring)."""

    def __init__(self, kernel: JITFunction):
        self.kernel = kernel
        self.parameters: List[Tuple[str, object]] = [
            (name, parameter.default)
            for name, parameter in kernel.signature.parameters.items()]
        self.do_not_specialize = {
            parameter.name for parameter in kernel.params if parameter.do_not_specialize}
        # key -> (constants, compiled kernel); the constants are kept so that an id is never
        # taken for that of a dict the cache has since dropped.
        self.compiled: Dict[tuple, Tuple[dict, object]] = {}
        self.lock = threading.Lock()

    def key(self, constants: dict, num_warps: int, device: torch.device,
            tensors: Dict[str, object]) -> Optional[tuple]:
        """The launch key of a call, or None where only Triton's binder can tell (an int
        argument it would specialize)."""
        spec = []
        for name, value in tensors.items():
            if value is None:
                spec.append(None)
            elif isinstance(value, torch.Tensor):
                spec.append((value.dtype, value.data_ptr() % 16 == 0))
            elif isinstance(value, int) and name in self.do_not_specialize:
                spec.append(("i64" if not -2**31 <= value < 2**31 else "i32",))
            else:
                return None
        return (id(constants), num_warps, device, tuple(spec))

    def launch(self, grid: Sequence[int], num_warps: int, device: torch.device,
               constants: dict, tensors: Dict[str, object], first_launch) -> None:
        """Launch directly when this key's compiled kernel is known; else `first_launch()`
        (Triton's own path), remembering the compiled kernel it returns. `device` is the
        tensors' (current, under tuning.device_guard)."""
        key = self.key(constants, num_warps, device, tensors)
        entry = self.compiled.get(key) if key is not None else None
        if entry is None or entry[0] is not constants:
            compiled = first_launch()
            if hasattr(compiled, "result"):  # an asynchronous compile's future (3.6)
                compiled = compiled.result()
            if key is not None and compiled is not None and hasattr(compiled, "packed_metadata"):
                with self.lock:
                    if len(self.compiled) >= 4096:
                        self.compiled.clear()
                    self.compiled[key] = (constants, compiled)
            return
        compiled = entry[1]
        arguments = [tensors[name] if name in tensors else
                     constants[name] if name in constants else default
                     for name, default in self.parameters]
        stream = driver.active.get_current_stream(driver.active.get_current_device())
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        hooks = knobs.runtime
        compiled.run(grid[0], grid_1, grid_2, stream, compiled.function,
                     compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *arguments),
                     hooks.launch_enter_hook, hooks.launch_exit_hook, *arguments)

