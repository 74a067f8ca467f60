"""Which configuration runs each kernel, and the one place kernels are launched.

`launch(name, grid, num_warps, device, constants, **tensors)` starts kernel `name` on `device`,
under that device's guard (Triton launches on the current device and its current stream, so a
tensor on cuda:1 while cuda:0 is current would otherwise be launched on the wrong GPU), either
with the heuristic num_warps or through triton.autotune.

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
On a GPU each config is timed by quick_bench: do_bench for BENCH_REP_MS.
A tuned kernel gets one triton.autotune per device (the best config of an H100 need not be an
A100's, and the Autotuner keys its cache on arguments only), and every call of it holds that
autotuner's lock: the Autotuner keeps a call's arguments on itself while it benchmarks, so two
threads tuning the same key at once (nn.DataParallel's replicas on their first step) would
otherwise mix their calls.

What is tuned, and how often: a key is the tile (BLOCK_C, BLOCK_S), the offset width (INT64)
and, as Triton adds, every tensor's dtype; not the split count, which make_plan sets per layer
to fill the GPU (~PROGRAMS_PER_SM programs an SM) whatever the tile, so that one ResNet-50
step times a few keys, not one per layer (benchmarks/coldstart.py counts them). A config is
timed only where it can differ (surviving_configs): 8 warps over a tile of fewer than
8·32·MIN_VALUES_PER_THREAD values leave threads holding copies of each other's values, and a
key with one surviving config runs it untimed (Triton 3.9 skips timing a lone pruned config,
3.6 does not: TunedKernel launches it directly).

Autotune results on disk (BN_TRITON_AUTOTUNE_CACHE):
  unset, "1"  kept with triton.autotune(cache_results=True) in Triton's cache (TRITON_CACHE_DIR,
              default ~/.triton/cache), so that a new process whose caches are warm times
              nothing, as it compiles nothing;
  "0"         kept in memory only (TRITON_CACHE_AUTOTUNING=1 still turns Triton's own on).
Triton (3.6 to 3.9) keys an entry on its own version and source hash, the GPU target (arch and
ptxas version), the kernel's source hash, its cache-invalidating environment, the tuning key
and the text of the configs timed. The configs here end their text in namespace(device), this
package's version and the GPU's name (an H100 and an H200 are both sm_90), so that neither a
different Triton, GPU nor bn_triton reuses an entry. Under the interpreter Triton keeps none.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from . import compiled

from .. import kernels

# Warps of a split-path program (slab programs: Plan.slab_num_warps): 16 tile values a thread.
NUM_WARPS = 4
# The kernels the autotuner may configure, and over what: warps only (see the module docstring).
# Keyed on the tile shape and the offset width, which bucket (M, C, layout); Triton adds the
# dtypes (see the module docstring for why not the split count).
SPLIT_KEY = ["BLOCK_C", "BLOCK_S", "INT64"]
TUNED_CONFIGS = [triton.Config({}, num_warps=warps) for warps in (4, 8)]
TUNING = {  # kernel name -> (key, configs)
    "normalize_kernel": (SPLIT_KEY, TUNED_CONFIGS),
    "input_grad_kernel": (SPLIT_KEY, TUNED_CONFIGS),
}
# Tile values a thread holds at least under a config worth timing: one 128-bit float32 vector.
MIN_VALUES_PER_THREAD = 4
# The GPU's time a config (quick_bench). do_bench's defaults, 25 ms of warm-up and 100 ms of
# runs, make every config timed cost ~0.13 s of a cold step; ResNet-50's BN calls take 10 µs to
# 1 ms, so 20 ms still gives tens to thousands of runs for do_bench's median.
BENCH_WARMUP_MS, BENCH_REP_MS = 5, 20
KERNELS = ("batch_stats_kernel", "normalize_kernel", "forward_slab_kernel", "dy_sums_kernel",
           "input_grad_kernel", "backward_slab_kernel", "merge_statistics_kernel",
           "ghost_running_update_kernel", "sum_runs_kernel")


def tuning_key(name: str, arguments: dict) -> tuple:
    """The key Triton's Autotuner (3.6 to 3.9) keeps kernel `name`'s choice under for a call
    with `arguments`: the TUNING key's argument values, then every tensor's dtype."""
    key, _ = TUNING[name]
    return tuple([arguments[k] for k in key if k in arguments]
                 + [str(v.dtype) for v in arguments.values() if hasattr(v, "dtype")])


def prune(configs: Sequence[triton.Config], arguments: dict) -> list:
    """The configs worth timing for a call with `arguments` (its key's values suffice): those
    whose threads hold at least MIN_VALUES_PER_THREAD values of a [BLOCK_C, BLOCK_S] tile; the
    first config where none does."""
    values = arguments["BLOCK_C"] * arguments["BLOCK_S"]
    kept = [c for c in configs if c.num_warps * 32 * MIN_VALUES_PER_THREAD <= values]
    return kept or list(configs[:1])


def surviving_configs(name: str, arguments: dict) -> list:
    """prune over kernel `name`'s TUNING configs."""
    return prune(TUNING[name][1], arguments)


def autotune_cache() -> bool:
    """Whether autotune results are kept on disk (BN_TRITON_AUTOTUNE_CACHE; on unless "0")."""
    return os.environ.get("BN_TRITON_AUTOTUNE_CACHE") != "0"


def namespace(device: torch.device) -> str:
    """What an autotune entry on disk is keyed on beyond Triton's own key (module docstring):
    this package's version and the name of `device`'s GPU."""
    from .. import __version__
    gpu = (torch.cuda.get_device_name(device)
           if device.type == "cuda" and torch.cuda.is_available() else str(device.type))
    return f"bn_triton {__version__} on {gpu}"


class NamespacedConfig(triton.Config):
    """A triton.Config whose text, which Triton's autotune cache key includes, ends in its
    class's `namespace`. Kept on the class, not the instance: Triton writes a config's __dict__
    to disk and reads it back as triton.Config(**fields)."""
    namespace = ""

    def __str__(self) -> str:
        return f"{super().__str__()}, {self.namespace}"


@functools.lru_cache(maxsize=None)
def _config_class(name: str) -> type:
    return type("NamespacedConfig", (NamespacedConfig,), {"namespace": name})


def namespaced(configs: Sequence[triton.Config], name: str) -> list:
    """`configs`, the same settings, their text ending in `name`."""
    cls = _config_class(name)
    return [cls(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                num_ctas=c.num_ctas, maxnreg=c.maxnreg, pre_hook=c.pre_hook,
                ir_override=c.ir_override) for c in configs]


def quick_bench(kernel_call: Callable, quantiles=None):
    """Triton's benchmarker (triton.testing.do_bench, its L2 flush included) with less time a
    config: BENCH_WARMUP_MS of warm-up, BENCH_REP_MS of timed runs. What the GPU tunes with."""
    from triton.testing import do_bench
    return do_bench(kernel_call, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, quantiles=quantiles)


def run_once(kernel_call: Callable, quantiles=None):
    """A stand-in for Triton's benchmarker: runs the config once, calls every config equally
    fast (so the first config wins). What BN_TRITON_AUTOTUNE=1 times with where no GPU is."""
    kernel_call()
    return [1.0, 1.0, 1.0] if quantiles else 1.0


def tuned(name: str, do_bench: Optional[Callable] = None, cache: bool = False,
          space: str = "") -> Autotuner:
    """Kernel `name` wrapped in triton.autotune over its TUNING entry, pruned per call (do_bench:
    Triton's own benchmarker when None; cache: keep results on disk, under the namespace
    `space`)."""
    key, configs = TUNING[name]
    return triton.autotune(
        configs=namespaced(configs, space), key=key, do_bench=do_bench, cache_results=cache,
        prune_configs_by={"early_config_prune": lambda configs, nargs, **kwargs: prune(
            configs, {**nargs, **kwargs})})(getattr(kernels, name))


def autotuning() -> Tuple[bool, Optional[Callable]]:
    """(whether the autotuner runs, the benchmarker it times with) under BN_TRITON_AUTOTUNE."""
    setting = os.environ.get("BN_TRITON_AUTOTUNE")
    if setting == "0":
        return False, None
    interpreted = isinstance(kernels.normalize_kernel, InterpretedFunction)
    if setting == "1":
        return True, run_once if interpreted else quick_bench
    return (False, None) if interpreted else (True, quick_bench)


class TunedKernel:
    """A kernel of TUNING as launched: one triton.autotune per device, each behind its lock; a
    call with one surviving config launches it untimed."""

    def __init__(self, name: str, do_bench: Optional[Callable] = None, cache: bool = False):
        self.name = name
        self.do_bench = do_bench
        self.cache = cache
        self.autotuners: Dict[torch.device, Autotuner] = {}
        self.locks: Dict[torch.device, threading.Lock] = {}
        self._guard = threading.Lock()  # creates autotuners and locks

    def for_device(self, device: torch.device) -> Tuple[Autotuner, threading.Lock]:
        autotuner = self.autotuners.get(device)
        if autotuner is None:
            with self._guard:
                if device not in self.autotuners:
                    self.locks[device] = threading.Lock()
                    self.autotuners[device] = tuned(self.name, self.do_bench, self.cache,
                                                    namespace(device))
                autotuner = self.autotuners[device]
        return autotuner, self.locks[device]

    def __call__(self, grid, device: torch.device, arguments: dict):
        """Launch through the autotuner; returns the compiled kernel that ran (compiled.py
        launches it directly from then on)."""
        configs = surviving_configs(self.name, arguments)
        if len(configs) == 1:  # nothing to choose, on every Triton release
            return getattr(kernels, self.name)[grid](**arguments, **configs[0].all_kwargs())
        autotuner, lock = self.for_device(device)
        with lock:
            return autotuner[grid](**arguments)


def make_launchers(tune: Optional[bool] = None, do_bench: Optional[Callable] = None,
                   cache: Optional[bool] = None) -> dict:
    """name -> the kernel itself (heuristic warps) or its TunedKernel; `tune` and `do_bench`
    default to what BN_TRITON_AUTOTUNE says (see autotuning), `cache` to
    BN_TRITON_AUTOTUNE_CACHE's (autotune_cache)."""
    if tune is None:
        tune, do_bench = autotuning()
    if cache is None:
        cache = autotune_cache()
    return {name: TunedKernel(name, do_bench, cache) if tune and name in TUNING
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
           constants: Mapping[str, object], **tensors) -> None:
    """Launch kernel `name` over `grid` on `device` with its `constants` (the non-tensor
    arguments, a dict the launch wrappers keep per plan and flags) and its `tensors`: the
    autotuner picks the warps where it runs (TunedKernel), the heuristic num_warps elsewhere.
    Once a launch's compiled kernel is known it is launched directly (compiled.py)."""
    kernel = LAUNCHERS[name]
    if device.type == "cuda":
        with device_guard(device):
            _launch(name, kernel, grid, num_warps, device, constants, tensors)
    else:  # no device to make current (device_guard's nullcontext, without its cost)
        _launch(name, kernel, grid, num_warps, device, constants, tensors)


def _launch(name, kernel, grid, num_warps, device, constants, tensors) -> None:
    direct = DIRECT.get(name)
    if direct is not None and kernel is DIRECT_SOURCES[name]:
        direct.launch(grid, num_warps, device, constants, tensors,
                      lambda: _through_triton(kernel, grid, num_warps, device, constants,
                                              tensors))
    else:
        _through_triton(kernel, grid, num_warps, device, constants, tensors)


def _through_triton(kernel, grid, num_warps, device, constants, tensors):
    """Triton's own launch (JITFunction.run, or the Autotuner's): its compiled kernel."""
    if isinstance(kernel, TunedKernel):
        return kernel(grid, device, {**constants, **tensors})
    return kernel[grid](**constants, **tensors, num_warps=num_warps)


def make_direct_launches(launchers: dict) -> Tuple[dict, dict]:
    """name -> CompiledLaunches for each launcher over a JIT function (compiled.py), and the
    launcher each was made for (a launcher replaced later, by a test's stand-in, say, is
    launched through Triton's path alone)."""
    if not compiled.enabled():
        return {}, {}
    direct, sources = {}, {}
    for name, launcher in launchers.items():
        function = getattr(kernels, name) if isinstance(launcher, TunedKernel) else launcher
        if type(function) is JITFunction:
            direct[name], sources[name] = compiled.CompiledLaunches(function), launcher
    return direct, sources


DIRECT, DIRECT_SOURCES = make_direct_launches(LAUNCHERS)
