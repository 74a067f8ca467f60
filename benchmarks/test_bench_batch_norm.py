"""pytest-benchmark over the suite's cases (benchmarks/cases.py); outside the default test run.

    python -m pytest benchmarks/ --benchmark-only                  (all of it)
    python -m pytest benchmarks/ --benchmark-only -k "resnet50-b32 and bf16 and forward"

On a GPU: every case x {fp32, bf16, fp16} x mode x provider (bn_triton, torch eager,
torch.compile, flag_gems where it imports), on the same tensors. The timed call resets the
gradients, runs, and ends in torch.cuda.synchronize(): wall-clock time with launch overhead,
L2 not flushed. `python -m benchmarks` gives the figures of record (do_bench device time, L2
flushed, GB/s, % of peak, speedups). extra_info holds the bytes model and GB/s.

Without a GPU: bn_triton alone, through Triton's interpreter (set below, before triton is
imported), on the scaled shapes of cases.interpreter_shape, fp32, one round each. Those times
say nothing about a GPU; extra_info holds the launches and bytes per element counted by
bn_triton.ops.traffic.
"""
import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import measure  # noqa: E402
from benchmarks.cases import (CASES, COUNTED_MODES, DTYPES, MIN_BYTES, MODES,  # noqa: E402
                              interpreter_shape)

if GPU:
    FLAG_GEMS, FLAG_GEMS_ERROR = measure.flag_gems_available()
    measure.configure_compile()
    PARAMS = [(case, dtype, mode, provider) for case in CASES for dtype in DTYPES
              for mode in MODES for provider in measure.PROVIDERS]
else:
    PARAMS = [(case, "fp32", mode, "bn_triton") for case in CASES for mode in COUNTED_MODES]
IDS = [f"{case.label}-{dtype}-{mode}-{provider}" for case, dtype, mode, provider in PARAMS]


@pytest.mark.parametrize("case,dtype,mode,provider", PARAMS, ids=IDS)
def test_batch_norm(benchmark, case, dtype, mode, provider):
    device = "cuda" if GPU else "cpu"
    shape = case.shape if GPU else interpreter_shape(case.shape)
    if provider == "flag_gems" and not FLAG_GEMS:
        pytest.skip(f"flag_gems does not import: {FLAG_GEMS_ERROR}")
    if provider == "torch.compile":
        from torch import _dynamo

        _dynamo.reset()
    x, dy = measure.make_inputs(shape, case.layout, dtype, device)
    numel_bytes = x.numel() * x.element_size()
    benchmark.extra_info.update(case=case.label, shape=list(shape), M=case.M,
                                regime=case.regime, dtype=dtype, mode=mode, provider=provider,
                                bytes_model=MIN_BYTES[mode] * numel_bytes)
    with measure.provider_context(provider):
        module = measure.build_module(case.module_name, shape[1], provider, device)
        fn, grad_to_none = measure.make_step(mode, module, x, dy)

        def step():
            for t in grad_to_none or ():
                t.grad = None
            result = fn()
            if GPU:
                torch.cuda.synchronize()
            return result

        if GPU:
            step(), step()  # compile, autotune, allocate outside the timing
            benchmark(step)
            stats = getattr(benchmark, "stats", None)
            if stats is not None:
                benchmark.extra_info["gbs_median"] = (MIN_BYTES[mode] * numel_bytes
                                                      / stats.stats.median / 1e9)
        else:
            from bn_triton.ops import traffic

            def counted():
                with traffic.record() as rec:
                    step()
                return rec

            rec = benchmark.pedantic(counted, rounds=1, iterations=1)
            benchmark.extra_info.update(launches=rec.n_launches, kernels=rec.kernels,
                                        bytes_per_element=rec.per_element(x.numel(),
                                                                          x.element_size()))
