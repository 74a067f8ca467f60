"""The GPU autotuning wiring, exercised under the interpreter with a stand-in benchmark.

On a GPU every kernel is wrapped in triton.autotune (tuning.TUNING). Benchmarking a config runs
the kernel, so kernels that update the running statistics must come back to one update
(restore_value), and the tickets of the split path must be left zeroed by every trial run.
"""
import pytest
import torch

import bn_triton
from triton.runtime.autotuner import Autotuner

from bn_triton import launch, reference, tuning
from conftest import assert_path, stat_tolerance, tolerance


def run_each_config_once(kernel_call, quantiles):
    """A benchmark that runs the config once and calls every config equally fast."""
    kernel_call()
    return [1.0, 1.0, 1.0]


@pytest.fixture
def autotuned(monkeypatch):
    tuned = {name: tuning.tuned(name, do_bench=run_each_config_once) for name in tuning.TUNING}
    monkeypatch.setattr(tuning, "LAUNCHERS", tuned)
    return tuned


# The small shape runs both paths (the forced split path autotunes the split kernels on it); the
# large one is the plan's own split case, so forcing the split on it too would repeat a case.
@pytest.mark.parametrize("shape, path", [((6, 4, 5), "auto"), ((6, 4, 5), "split"),
                                         ((2, 3, 130, 130), "auto")],
                         ids=["slab-auto", "slab-split", "split-auto"], indirect=["path"])
def test_autotuning_updates_running_stats_once(shape, device, launches, autotuned, path):
    x = torch.randn(shape, device=device, requires_grad=True)
    C = shape[1]
    weight = torch.randn(C, device=device, requires_grad=True)
    running_mean, running_var = torch.randn(C, device=device), torch.rand(C, device=device) + 1
    want_mean, want_var = running_mean.clone(), running_var.clone()
    y = bn_triton.batch_norm(x, running_mean, running_var, weight, None, training=True,
                             momentum=0.5)
    y.backward(torch.randn_like(y))

    y64, mean, var = reference.batch_norm_train(x.detach(), weight.detach())
    want_mean, want_var = reference.updated_running_stats(want_mean, want_var, mean, var,
                                                          x.numel() // C, 0.5)
    torch.testing.assert_close(running_mean.double(), want_mean, **stat_tolerance(x.dtype))
    torch.testing.assert_close(running_var.double(), want_var, **stat_tolerance(x.dtype))
    torch.testing.assert_close(y.double(), y64, **tolerance(x.dtype))
    # Every candidate config was timed, then the chosen one ran once more.
    for name in set(launches):
        candidates = 2 if name.endswith("slab_kernel") else len(tuning.TUNING[name][1])
        assert launches.count_of(name) == candidates + 1, name
    assert torch.count_nonzero(launch.tickets(x.device, 1)) == 0
    assert_path(launches, path)


def test_interpreter_runs_the_fixed_heuristic():
    """Under the interpreter nothing is autotuned (there is nothing to time)."""
    assert all(not isinstance(kernel, Autotuner) for kernel in tuning.LAUNCHERS.values())
