"""What the first step costs (issue 17): compile and tuning counts pinned, autotune results
kept on disk and reused only where everything they depend on is the same.

benchmarks/coldstart.py counts, for one ResNet-50 training step's BN layers in each setting,
the kernel specializations, the compilations and the configs timed with the autotuner; the
counts are pinned here, so that they cannot creep up unseen (a change that adds some updates
PINNED, and says why in its commit).

Persistence runs Triton's own autotune cache (triton.autotune(cache_results=True), as
tuning.TunedKernel builds it) in subprocesses without the interpreter, which keeps no cache:
the GPU target comes from a stand-in driver, the timing from a counting stand-in benchmarker,
and the kernel launch is recorded instead of compiled. Every process writes into a temporary
TRITON_CACHE_DIR, never the user's.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import coldstart
from bn_triton.ops import tuning
from conftest import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# setting -> (specializations, tuning keys, compilations with the autotuner, configs timed).
# Before issue 17 (num_splits in the key): compilations 19/19/22/20/36/36/32/28 and configs
# timed 22/22/22/12/36/36/28/20, in this order. Then the split counts became do_not_specialize
# and the combine's chunk a function of the tile alone (one compilation for every split count):
# specializations 16/16/16/14/28/28/24/20 -> those below.
PINNED = {
    "b32-NCHW-fp32": (13, 3, 16, 6),
    "b32-NCHW-bf16": (12, 3, 15, 6),
    "b32-NHWC-fp32": (7, 2, 9, 4),
    "b32-NHWC-bf16": (7, 2, 9, 4),
    "b256-NCHW-fp32": (14, 6, 20, 12),
    "b256-NCHW-bf16": (14, 6, 20, 12),
    "b256-NHWC-fp32": (4, 2, 6, 4),
    "b256-NHWC-bf16": (4, 2, 6, 4),
}


@pytest.fixture(scope="module")
def counts():
    return coldstart.counts()


@pytest.mark.parametrize("setting", coldstart.SETTINGS)
def test_cold_step_counts_are_pinned(counts, setting):
    c = counts[setting]
    got = (c["specializations"], c["tuning_keys"], c["compilations"], c["benchmarks"])
    assert got == PINNED[setting], (setting, got, c)
    # Each tuned key times every surviving config once; the rest compile once each.
    assert c["benchmarks"] <= c["tuning_keys"] * len(tuning.TUNED_CONFIGS)
    assert c["compilations_untuned"] == c["specializations"]


def test_no_duplicate_configs():
    for name, (_, configs) in tuning.TUNING.items():
        settings = [tuple(sorted(c.all_kwargs().items())) for c in configs]
        assert len(set(settings)) == len(settings), name


class CountingBench:
    def __init__(self):
        self.timed = 0

    def __call__(self, kernel_call, quantiles=None):
        self.timed += 1
        return tuning.run_once(kernel_call, quantiles)


def test_a_key_with_one_surviving_config_is_not_timed(monkeypatch, launches):
    """A split tile of 4 x 32 values: 8 warps would hold copies, so 4 warps run, untimed (Triton
    3.6's autotuner would time a lone pruned config; TunedKernel does not ask it)."""
    import bn_triton
    from bn_triton.ops import plan
    monkeypatch.setattr(plan, "MAX_SLAB_FORWARD", 0)
    monkeypatch.setattr(plan, "MAX_SLAB_BACKWARD", 0)
    bench = CountingBench()
    monkeypatch.setattr(tuning, "LAUNCHERS", tuning.make_launchers(tune=True, do_bench=bench))
    assert [c.num_warps for c in tuning.surviving_configs(
        "normalize_kernel", {"BLOCK_C": 4, "BLOCK_S": 32})] == [4]
    assert len(tuning.surviving_configs(
        "normalize_kernel", {"BLOCK_C": 1, "BLOCK_S": 2048})) == len(tuning.TUNED_CONFIGS)
    x = torch.randn(4, 3, 5, 5, device=DEVICE, requires_grad=True)
    y = bn_triton.batch_norm(x, None, None, training=True)
    y.backward(torch.randn_like(y))
    assert bench.timed == 0
    assert launches.count_of("normalize_kernel") == 1
    assert launches.count_of("input_grad_kernel") == 1


def test_configs_carry_the_package_version_and_gpu():
    kernel = tuning.TunedKernel("normalize_kernel", tuning.run_once, cache=True)
    autotuner, _ = kernel.for_device(torch.device("cuda", 0))
    import bn_triton
    for config in autotuner.configs:
        assert str(config).endswith(tuning.namespace(torch.device("cuda", 0)))
        assert f"bn_triton {bn_triton.__version__} on " in str(config)
    assert [c.all_kwargs() for c in autotuner.configs] == [
        c.all_kwargs() for c in tuning.TUNED_CONFIGS]


def test_environment_selects_the_disk_cache(monkeypatch):
    monkeypatch.delenv("BN_TRITON_AUTOTUNE_CACHE", raising=False)
    assert tuning.autotune_cache()
    assert tuning.make_launchers(tune=True)["normalize_kernel"].cache
    monkeypatch.setenv("BN_TRITON_AUTOTUNE_CACHE", "0")
    assert not tuning.autotune_cache()
    assert not tuning.make_launchers(tune=True)["normalize_kernel"].cache


# A process that tunes normalize_kernel for one key through Triton's autotune cache: argv is
# JSON, a list of runs [namespace, compute capability], each with a fresh autotuner; prints how
# many configs each run timed and whether it found its result on disk.
CHILD = r"""
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from bn_triton.ops import tuning

class Target:  # the one driver call the autotune cache makes
    cc = 90
    def get_current_target(self):
        return GPUTarget("cuda", self.cc, 32)

class Recorder:  # the launch, recorded: no GPU here
    def __init__(self, fn):
        self.fn = fn  # Triton walks .fn to the JITFunction for its source hash
    def run(self, *args, **kwargs):
        pass

class CountingBench:
    timed = 0
    def __call__(self, kernel_call, quantiles=None):
        self.timed += 1
        return tuning.run_once(kernel_call, quantiles)

target = Target()
driver.set_active(target)
arguments = dict(x_ptr=torch.empty(0, dtype=torch.bfloat16), y_ptr=torch.empty(0),
                 BLOCK_C=1, BLOCK_S=2048, INT64=False)
out = []
for space, cc in json.loads(sys.argv[1]):
    target.cc = cc
    bench = CountingBench()
    autotuner = tuning.tuned("normalize_kernel", bench, cache=True, space=space)
    assert autotuner.cache_results
    autotuner.fn = Recorder(autotuner.fn)
    autotuner[(1,)](**arguments)
    out.append({"timed": bench.timed, "best": autotuner.best_config.num_warps})
print(json.dumps(out))
"""


def _tune_in_new_process(cache_dir, runs):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                             "TRITON_CACHE_AUTOTUNING")}
    env.update(TRITON_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(runs)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [run["timed"] for run in json.loads(proc.stdout.splitlines()[-1])]


def test_autotune_results_persist_and_are_keyed(tmp_path):
    """A second process with the same cache times nothing; another package version or GPU
    name (the namespace), or another GPU target, times again."""
    here = "bn_triton 0.1.0 on NVIDIA H200"
    configs = len(tuning.TUNED_CONFIGS)
    assert _tune_in_new_process(tmp_path, [[here, 90]]) == [configs]
    entries = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert entries == ["normalize_kernel.autotune.json"], entries
    assert _tune_in_new_process(tmp_path, [
        [here, 90],                               # warm: nothing timed
        ["bn_triton 0.2.0 on NVIDIA H200", 90],   # another package version
        ["bn_triton 0.1.0 on NVIDIA H100", 90],   # another GPU of the same arch
        [here, 80],                               # another GPU target
        [here, 90],                               # and the first entry is still there
    ]) == [0, configs, configs, configs, 0]


def test_nothing_is_kept_under_the_interpreter():
    """Triton keeps no autotune cache under its interpreter, whatever cache_results says."""
    if DEVICE != "cpu":
        pytest.skip("compiled kernels: the interpreter's rule does not apply")
    assert not tuning.tuned("normalize_kernel", tuning.run_once, cache=True).cache_results
