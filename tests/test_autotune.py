"""The GPU's tuned path, exercised under the interpreter: the real triton.autotune around the
kernels (as BN_TRITON_AUTOTUNE=1 runs them), each config timed by one run.

On a GPU the streaming kernels are wrapped in triton.autotune (tuning.TUNING). Asserted here:
BN_TRITON_AUTOTUNE selects it; on every path (slab, split, eval, with and without running
statistics, the fused epilogue) the tuned call gives the untuned call's bits, updates the
running statistics once, and a second identical call does not tune again; only kernels that
compute each element alone are tuned (a reduction's bits follow num_warps), and every config
of every kernel gives the same bits; two threads tuning at once keep their calls apart; one
autotuner per device.
"""
import inspect
import threading
import time

import pytest
import torch
from triton.runtime.autotuner import Autotuner

import bn_triton
from bn_triton import kernels
from bn_triton.ops import launch, tuning
from conftest import DEVICE, assert_path


class CountingBench:
    """tuning.run_once, counting the configs it times (optionally slowly, to open races)."""

    def __init__(self, delay: float = 0.0):
        self.timed = 0
        self.delay = delay

    def __call__(self, kernel_call, quantiles=None):
        self.timed += 1
        time.sleep(self.delay)
        return tuning.run_once(kernel_call, quantiles)


@pytest.fixture
def bench():
    return CountingBench()


@pytest.fixture
def autotuned(monkeypatch, bench):
    """The tuned path (BN_TRITON_AUTOTUNE=1's launchers) with the counting benchmark."""
    monkeypatch.setattr(tuning, "LAUNCHERS", tuning.make_launchers(tune=True, do_bench=bench))
    return tuning.LAUNCHERS


def test_environment_selects_the_tuned_path(monkeypatch):
    monkeypatch.setenv("BN_TRITON_AUTOTUNE", "1")
    assert tuning.autotuning() == (True, tuning.run_once)  # interpreted: one run a config
    tuned = tuning.make_launchers()
    assert {name for name, k in tuned.items() if isinstance(k, tuning.TunedKernel)} == set(
        tuning.TUNING)
    monkeypatch.setenv("BN_TRITON_AUTOTUNE", "0")
    assert tuning.autotuning() == (False, None)
    monkeypatch.delenv("BN_TRITON_AUTOTUNE")
    assert tuning.autotuning() == (False, None)  # the interpreter, unset: nothing to time
    assert not any(isinstance(k, tuning.TunedKernel) for k in tuning.make_launchers().values())


def _step(shape, training, running, fused, channels_last=False, seed=0):
    """One forward + backward through bn_triton.batch_norm; everything it produced."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):  # made on the CPU for the same values everywhere, then moved
        return torch.randn(*size, generator=gen).to(DEVICE)

    x = randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    C = shape[1]
    weight = randn(C).requires_grad_(True)
    bias = randn(C).requires_grad_(True)
    rm = randn(C) if running else None
    rv = randn(C).abs() + 0.5 if running else None
    extra = {}
    if fused:
        residual = randn(shape).requires_grad_(True)
        extra = dict(activation="relu", residual=residual)
    y = bn_triton.batch_norm(x, rm, rv, weight, bias, training=training, momentum=0.3,
                             **extra)
    assert bn_triton.backend(x) != "torch"  # the kernels ran, not a fallback
    y.backward(randn(shape))
    out = {"y": y, "dx": x.grad, "dw": weight.grad, "db": bias.grad}
    if running:
        out.update(running_mean=rm, running_var=rv)
    if fused:
        out["dr"] = extra["residual"].grad
    return out


CASES = {  # name -> (shape, training, running, fused, channels_last)
    "slab-train": ((4, 3, 5, 5), True, True, False, False),
    "slab-no-running": ((4, 3, 5, 5), True, False, False, False),
    "slab-fused": ((4, 3, 5, 5), True, True, True, True),
    "split-train": ((2, 3, 24, 24), True, True, False, False),
    "split-no-running": ((2, 3, 24, 24), True, False, False, True),
    "split-fused": ((2, 3, 24, 24), True, True, True, False),
    "eval": ((2, 3, 24, 24), False, True, False, False),
    "eval-fused": ((2, 3, 24, 24), False, True, True, True),
}


@pytest.mark.parametrize("case", CASES)
def test_tuned_calls_equal_untuned_and_tune_once(case, monkeypatch, launches, bench):
    shape, training, running, fused, channels_last = CASES[case]
    if shape[2] > 5:  # the split path for every size: the split kernels and their tuning
        from bn_triton.ops import plan
        monkeypatch.setattr(plan, "MAX_SLAB_FORWARD", 0)
        monkeypatch.setattr(plan, "MAX_SLAB_BACKWARD", 0)
    untuned = _step(shape, training, running, fused, channels_last)
    kernels_run = set(launches)
    launches.clear()

    monkeypatch.setattr(tuning, "LAUNCHERS", tuning.make_launchers(tune=True, do_bench=bench))
    tuned = _step(shape, training, running, fused, channels_last)
    for name, value in untuned.items():  # the same bits; running stats moved once
        assert torch.equal(tuned[name], value), name
    tuned_kernels = kernels_run & set(tuning.TUNING)
    for name in kernels_run:  # each kernel runs once a step: then once more per config timed
        timed = len(tuning.TUNING[name][1]) if name in tuned_kernels else 0
        assert launches.count_of(name) == 1 + timed, name
    assert bench.timed == sum(len(tuning.TUNING[name][1]) for name in tuned_kernels)
    assert_path(launches, "split" if shape[2] > 5 else "auto")

    timed, launches[:] = bench.timed, []
    again = _step(shape, training, running, fused, channels_last)
    assert bench.timed == timed  # cached: the second identical call tunes nothing
    assert sorted(launches) == sorted(kernels_run)
    for name in ("y", "dx", "dw", "db"):
        assert torch.equal(again[name], untuned[name]), name


def _reduces(fn) -> bool:
    """Whether a kernel combines values across a tile (its bits then follow the layout)."""
    return "tl.sum(" in inspect.getsource(fn.fn if hasattr(fn, "fn") else fn)


def test_only_elementwise_kernels_are_tuned():
    """A reducing kernel runs one config: its heuristic warps, in every process."""
    for name in tuning.KERNELS:
        if _reduces(getattr(kernels, name)):
            assert name not in tuning.TUNING, name
    assert set(tuning.TUNING) == {"normalize_kernel", "input_grad_kernel"}
    for _, configs in tuning.TUNING.values():
        assert all(c.num_stages == configs[0].num_stages and not c.kwargs for c in configs)
        assert len({c.num_warps for c in configs}) == len(configs)  # no duplicate configs


def test_every_config_gives_the_same_bits(monkeypatch):
    """Each config of each tuned kernel, forced, on one input: identical outputs. (The
    interpreter ignores num_warps; the GPU check runs this on CUDA, where it does not.)"""
    from bn_triton.ops import plan
    monkeypatch.setattr(plan, "MAX_SLAB_FORWARD", 0)
    monkeypatch.setattr(plan, "MAX_SLAB_BACKWARD", 0)
    runs, tuning_table = [], dict(tuning.TUNING)
    for index in range(len(tuning.TUNED_CONFIGS)):
        monkeypatch.setattr(tuning, "TUNING", {name: (key, [configs[index]])
                                               for name, (key, configs) in tuning_table.items()})
        monkeypatch.setattr(tuning, "LAUNCHERS", tuning.make_launchers(
            tune=True, do_bench=tuning.run_once))
        runs.append([_step((2, 3, 24, 24), True, True, True, True),
                     _step((2, 3, 24, 24), False, True, False, False)])
    for run in runs[1:]:
        for step, reference in zip(run, runs[0]):
            for name, value in reference.items():
                assert torch.equal(step[name], value), name


def test_two_threads_tuning_at_once_keep_their_calls_apart(monkeypatch):
    """Two threads make the first (tuning) call of the same key at once, each on its own
    tensors; a slow benchmark holds the first inside the autotuner while the second arrives.
    Each gets its own result. (Eval: normalize_kernel alone, so the interpreter, which keeps
    one global program index, never runs two kernels at once.)"""
    shape = (2, 3, 40, 40)
    inputs = [torch.randn(shape, device=DEVICE) for _ in range(2)]
    stats = [(torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5)
             for _ in range(2)]
    expected = [bn_triton.batch_norm(x, rm, rv, training=False) for x, (rm, rv) in
                zip(inputs, stats)]
    monkeypatch.setattr(tuning, "LAUNCHERS", tuning.make_launchers(
        tune=True, do_bench=CountingBench(delay=0.05)))
    results, errors = [None, None], []

    def call(i):
        try:
            results[i] = bn_triton.batch_norm(inputs[i], *stats[i], training=False)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    assert not errors, errors
    for result, want in zip(results, expected):
        assert torch.equal(result, want)


def test_one_autotuner_per_device():
    kernel = tuning.TunedKernel("normalize_kernel", tuning.run_once)
    first, lock = kernel.for_device(torch.device("cuda", 0))
    assert isinstance(first, Autotuner)
    assert kernel.for_device(torch.device("cuda", 0)) == (first, lock)
    other, other_lock = kernel.for_device(torch.device("cuda", 1))
    assert other is not first and other_lock is not lock


def test_interpreter_runs_the_fixed_heuristic_by_default():
    """Under the interpreter, unless BN_TRITON_AUTOTUNE=1, nothing is autotuned."""
    assert not any(isinstance(k, tuning.TunedKernel) for k in tuning.LAUNCHERS.values())
    assert launch.NUM_WARPS == tuning.NUM_WARPS
