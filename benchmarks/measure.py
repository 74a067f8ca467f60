"""Measuring one case: device time on a GPU, counted traffic under Triton's interpreter.

GPU (`time_case`): each provider runs the same tensors; `triton.testing.do_bench` times the
call (it flushes L2 before every run and reports CUDA-event time); GB/s use the one bytes model
of cases.MIN_BYTES. Providers:
  bn_triton      bn_triton.BatchNorm1d/2d/3d
  torch          torch.nn.BatchNorm1d/2d/3d, eager (cuDNN or ATen's native kernels)
  torch.compile  torch.compile(torch.nn.BatchNorm*d) (Inductor's generated Triton)
  flag_gems      torch.nn.BatchNorm*d under flag_gems.use_gems(), where `import flag_gems` works
Modules hold float32 parameters and buffers for every input dtype (mixed precision, as under
autocast). Modes: training forward; backward alone (of a graph built once, grads reset between
runs); training forward + backward; eval forward under no_grad.

Interpreter (`count_shape`, `count_case`): bn_triton only, on the case's scaled shape
(cases.interpreter_shape); bn_triton.ops.traffic counts the launches and the bytes the kernels
request. A count, not a time.

Callers set TRITON_INTERPRET before this module imports triton (cases.py imports torch only).
"""
from __future__ import annotations

import contextlib
import platform
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .cases import (DTYPES, MIN_BYTES, MIN_BYTES_RESIDUAL, TWO_PASS_BYTES, Case,
                    interpreter_shape, make_tensor, regime, values_per_channel)

PROVIDERS = ("bn_triton", "torch", "torch.compile", "flag_gems")
DO_BENCH_TIMING = "triton.testing.do_bench: CUDA events around each call, L2 flushed"
BASELINES = ("torch", "torch.compile", "flag_gems")

# Peak DRAM bandwidth by GPU name, GB/s (vendor figures). Other GPUs report n/a.
PEAK_BANDWIDTH_GBS = (("H200", 4800.0), ("H100 80GB HBM3", 3350.0), ("H100 SXM", 3350.0))


def peak_bandwidth(gpu_name: str) -> Optional[float]:
    """H100 SXM 3.35 TB/s, H200 4.8 TB/s; None for anything else (an H100 PCIe or NVL has
    other memory: no guess)."""
    for key, gbs in PEAK_BANDWIDTH_GBS:
        if key.lower() in gpu_name.lower():
            return gbs
    return None


def machine_info(device: str) -> dict:
    import triton

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_model(), "cpu_count": cpu_count(), "torch": torch.__version__,
            "triton": triton.__version__, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    sm_count=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    peak_bandwidth_gbs=peak_bandwidth(torch.cuda.get_device_name(0)))
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _module_class(module_name: str, provider: str):
    if provider == "bn_triton":
        import bn_triton

        return getattr(bn_triton, module_name)
    return getattr(nn, module_name)


# ------------------------------------------------------------------------------ the interpreter
def count_shape(shape: Sequence[int], layout: str, module_name: str, dtype_name: str
                ) -> Dict[str, dict]:
    """{mode: launches, kernels, bytes_per_element, interpreter_s} of bn_triton's training
    forward, backward (dx, dγ, dβ) and eval forward for one input (float32 parameters)."""
    import bn_triton
    from bn_triton.ops import traffic

    x, dy = make_inputs(shape, layout, dtype_name, "cpu")
    if bn_triton.backend(x) != "triton-interpreter":
        raise RuntimeError(f"bn_triton.backend(x) is {bn_triton.backend(x)!r}: counting needs "
                           "TRITON_INTERPRET=1 set before triton is imported")
    module = _module_class(module_name, "bn_triton")(shape[1])
    records, seconds = {}, {}
    start = time.perf_counter()
    with traffic.record() as records["forward"]:
        y = module(x)
    seconds["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    with traffic.record() as records["backward"]:
        torch.autograd.grad(y, (x, module.weight, module.bias), dy)
    seconds["backward"] = time.perf_counter() - start
    module.eval()
    start = time.perf_counter()
    with torch.no_grad(), traffic.record() as records["eval"]:
        module(x.detach())
    seconds["eval"] = time.perf_counter() - start
    return {mode: dict(launches=rec.n_launches, kernels=rec.kernels,
                       bytes_per_element=rec.per_element(x.numel(), x.element_size()),
                       interpreter_s=round(seconds[mode], 3))
            for mode, rec in records.items()}


def counted_rows(case: Case, dtype_name: str, shape: Sequence[int],
                 counts: Dict[str, dict]) -> List[dict]:
    """One row per mode for `case` from count_shape's result on its interpreter shape;
    forward+backward is the sum of forward and backward."""
    fwd, bwd = counts["forward"], counts["backward"]
    counts = dict(counts)
    counts["forward+backward"] = dict(
        launches=fwd["launches"] + bwd["launches"], kernels=fwd["kernels"] + bwd["kernels"],
        bytes_per_element={key: fwd["bytes_per_element"][key] + bwd["bytes_per_element"][key]
                           for key in ("loaded", "stored", "total")},
        interpreter_s=round(fwd["interpreter_s"] + bwd["interpreter_s"], 3))
    base = dict(case=case.label, name=case.name, layout=case.layout_name, dtype=dtype_name,
                shape=list(case.shape), M=case.M, regime=case.regime, shape_run=list(shape),
                M_run=values_per_channel(shape), regime_run=regime(values_per_channel(shape)))
    return [dict(base, mode=mode, minimum=MIN_BYTES[mode], two_pass=TWO_PASS_BYTES[mode],
                 **counts[mode]) for mode in ("forward", "backward", "eval", "forward+backward")]


def count_case(case: Case, dtype_name: str, budget: Optional[int] = None) -> List[dict]:
    """counted_rows of the case on its interpreter shape (cases.interpreter_shape)."""
    shape = interpreter_shape(case.shape, *(() if budget is None else (budget,)))
    return counted_rows(case, dtype_name, shape,
                        count_shape(shape, case.layout, case.module_name, dtype_name))


def count_worker(job: Tuple[Tuple[int, ...], str, str, str]) -> Dict[str, dict]:
    """count_shape in a worker process of `python -m benchmarks` (which set TRITON_INTERPRET=1
    in the environment the process inherits); one thread, as each process has a core."""
    torch.set_num_threads(1)
    return count_shape(*job)


# ------------------------------------------------------------------------------------ the GPU
def flag_gems_available() -> Tuple[bool, str]:
    try:
        import flag_gems  # noqa: F401
    except Exception as error:  # not installed, or it fails to import (it needs a GPU)
        return False, f"{type(error).__name__}: {error}"
    return True, ""


def provider_context(provider: str):
    if provider == "flag_gems":
        import flag_gems

        return flag_gems.use_gems()
    return contextlib.nullcontext()


def configure_compile() -> None:
    """Every case compiles its own graphs; keep dynamo from giving up after a few recompiles
    (it would silently fall back to eager), and let a retained graph run its backward again
    (donated buffers forbid retain_graph=True)."""
    from torch import _dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(_dynamo.config, name):
            setattr(_dynamo.config, name, 1024)
    try:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except ImportError:
        pass


def build_module(module_name: str, num_features: int, provider: str, device: str,
                 residual: Optional[torch.Tensor] = None) -> nn.Module:
    """provider's BatchNorm1d/2d/3d (module_name) with float32 parameters and buffers; with a
    residual, relu(BN(x) + residual): bn_triton's fused BatchNormAct, the others unfused."""
    if residual is None:
        module = _module_class(module_name, provider)(num_features, device=device)
    else:
        module = ResidualBlock(module_name, num_features, provider, residual)
    if provider == "torch.compile":
        return torch.compile(module, dynamic=False)
    return module


class ResidualBlock(nn.Module):
    """relu(BN(x) + residual) for a fixed residual: the end of a ResNet block, fused into one
    layer by bn_triton (BatchNormAct), three ops for torch."""

    def __init__(self, module_name: str, num_features: int, provider: str,
                 residual: torch.Tensor):
        super().__init__()
        self.fused = provider == "bn_triton"
        if self.fused:
            import bn_triton

            self.bn = getattr(bn_triton, module_name.replace("Norm", "NormAct"))(
                num_features, device=residual.device)
        else:
            self.bn = getattr(nn, module_name)(num_features, device=residual.device)
        self.register_buffer("residual", residual)

    def forward(self, x):
        if self.fused:
            return self.bn(x, self.residual)
        return torch.relu(self.bn(x) + self.residual)


def make_inputs(shape: Sequence[int], layout: str, dtype_name: str, device: str
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (requiring grad, as an activation in training) and dy, in the case's layout."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = make_tensor(shape, layout, DTYPES[dtype_name], device, generator).requires_grad_()
    return x, make_tensor(shape, layout, DTYPES[dtype_name], device, generator)


def make_step(mode: str, module: nn.Module, x: torch.Tensor, dy: torch.Tensor
              ) -> Tuple[Callable[[], object], Optional[List[torch.Tensor]]]:
    """(fn, grad_to_none) for do_bench: the call to time, and the tensors whose .grad do_bench
    resets before each run (so that backward writes fresh gradients, never accumulates)."""
    params = [p for p in module.parameters()]
    if mode == "eval":
        module.eval()
        x_eval = x.detach()

        def eval_forward():
            with torch.no_grad():
                return module(x_eval)

        return eval_forward, None
    module.train()
    if mode == "forward":
        return (lambda: module(x)), None
    if mode == "backward":
        y = module(x)
        return (lambda: y.backward(dy, retain_graph=True)), [x] + params
    if mode == "forward+backward":
        return (lambda: module(x).backward(dy)), [x] + params
    raise ValueError(f"unknown mode {mode!r}")


def time_case(case: Case, dtype_name: str, providers: Sequence[str], modes: Sequence[str],
              warmup_ms: int = 10, rep_ms: int = 50, timer: Optional[Callable] = None,
              device: str = "cuda", residual_relu: bool = False) -> List[dict]:
    """One row per (provider, mode): median time (ms) and 20/80% quantiles from `timer`
    (do_bench by default; a timer may return a fourth element, how it timed, which the row
    keeps as "timing"), GB/s under MIN_BYTES (MIN_BYTES_RESIDUAL for relu(BN(x) + residual)),
    and setup_s: the wall time of the two untimed first calls (compilation, autotuning,
    allocation), reported apart. A provider that fails gets a row with its error instead."""
    from triton.testing import do_bench

    timer = timer or (lambda fn, grad_to_none: do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]))
    x, dy = make_inputs(case.shape, case.layout, dtype_name, device)
    residual = make_inputs(case.shape, case.layout, dtype_name, device)[1] if residual_relu \
        else None
    minimum = MIN_BYTES_RESIDUAL if residual_relu else MIN_BYTES
    variant = "bn+add+relu" if residual_relu else "bn"
    numel, size = x.numel(), x.element_size()
    rows = []
    for provider in providers:
        if provider == "torch.compile":
            from torch import _dynamo

            _dynamo.reset()  # compile this case's graphs afresh, drop the last case's
        try:
            if provider == "bn_triton":
                import bn_triton

                if bn_triton.backend(x) == "torch":  # timing torch's fallback would prove nothing
                    raise RuntimeError("bn_triton would fall back to torch for this tensor")
            with provider_context(provider):
                module = build_module(case.module_name, case.C, provider, device, residual)
                for mode in modes:
                    start = time.perf_counter()
                    fn, grad_to_none = make_step(mode, module, x, dy)
                    for _ in range(2):  # compile, autotune, allocate outside the timing
                        fn()
                        if grad_to_none:
                            for t in grad_to_none:
                                t.grad = None
                    _synchronize(device)
                    setup_s = time.perf_counter() - start
                    timed = timer(fn, grad_to_none)
                    ms, ms_lo, ms_hi = timed[:3]
                    gbs = minimum[mode] * numel * size / (ms * 1e-3) / 1e9
                    rows.append(dict(case=case.label, name=case.name, layout=case.layout_name,
                                     dtype=dtype_name, shape=list(case.shape), M=case.M,
                                     regime=case.regime, provider=provider, mode=mode,
                                     variant=variant,
                                     ms=ms, ms_q20=ms_lo, ms_q80=ms_hi, gbs=gbs,
                                     timing=timed[3] if len(timed) > 3 else DO_BENCH_TIMING,
                                     setup_s=round(setup_s, 3)))
        except Exception as error:  # noqa: BLE001 - one provider's failure is a result
            rows.append(dict(case=case.label, dtype=dtype_name, provider=provider,
                             variant=variant,
                             error=f"{type(error).__name__}: {error}"[:500]))
        x.grad = None
    return rows


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def add_relative(rows: List[dict], peak_gbs: Optional[float]) -> None:
    """Give each bn_triton row its % of peak bandwidth and its speedup over each baseline
    timed on the same (case, dtype, mode, variant): t_baseline / t_bn_triton."""
    times = {(r["case"], r["dtype"], r["mode"], r.get("variant"), r["provider"]): r["ms"]
             for r in rows if "ms" in r}
    for row in rows:
        if "ms" not in row:
            continue
        row["pct_of_peak"] = None if peak_gbs is None else 100.0 * row["gbs"] / peak_gbs
        if row["provider"] != "bn_triton":
            continue
        row["speedup"] = {}
        for baseline in BASELINES:
            t = times.get((row["case"], row["dtype"], row["mode"], row.get("variant"), baseline))
            if t is not None:
                row["speedup"][baseline] = t / row["ms"]
