"""python -m benchmarks.gpu_check: the proof of bn_triton on a GPU, in one command of minutes.

    pip install -e . --no-deps --no-build-isolation     # offline, on the GPU machine
    python -m benchmarks.gpu_check --out gpu-check       # [--budget-s 480] [--dry-run]

Stages, each with its share of the budget (a stage that ends early leaves its time to the next),
each writing what it has to <out>/gpu_check.json as soon as it ends, whether it passed, failed
or ran out of time:

  1. environment  GPU, SM count, L2, driver, CUDA, torch, triton; the measured device-to-device
                  copy bandwidth, the roofline every GB/s below is compared with
  2. tests        a bounded selection of the test suite on CUDA tensors
                  (BN_TRITON_TEST_DEVICE=cuda): its tally and the names of what failed
  3. kernels      ResNet-50's BatchNorm2d shapes, an MLP's BatchNorm1d, few channels with a huge
                  extent, a video BatchNorm3d; bf16 and fp32; training forward, backward, eval;
                  relu(BN(x) + residual) fused against torch's three ops;
                  bn_triton against torch eager, torch.compile and FlagGems where it imports:
                  device time from CUDA-graph replay (graph_timer: no host work inside the
                  window, L2 flushed before each call), GB/s, % of the copy bandwidth,
                  speedups, and the first calls' compile/autotune time apart
  4. model        a ResNet-50 training step, converted and not, fused (BN+ReLU, BN+add+ReLU),
                  eager and compiled, and the converted step in a CUDA graph
                  (benchmarks/model_step.py)
  5. results      gpu_check.json, gpu_check.log and the kernel charts: at most 8 files

Cases are cut, never stages, when the budget runs short, and a case starts only while its
estimated cost, first calls included, is left. --dry-run runs every stage on the CPU through
Triton's interpreter at tiny sizes (the tests run it), so the command is known to work before it
meets a GPU; its times are host wall clock, and say so.

The verdict (`verdict`, in gpu_check.json with its reasons) is taken from every stage's
recorded results: the run exits 1 when a stage raised; when pytest returned non-zero, passed
nothing or ran out of time; when a bn_triton kernel case, a model variant, the CUDA-graph
capture or the collectives failed; when any compared output, gradient or running statistic
differs beyond its dtype's tolerance (bn_triton.check.TOLERANCES / STAT_TOLERANCES).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

STAGES = ("environment", "tests", "kernels", "model", "results")
# Each stage's share of the budget; time a stage leaves goes to the next.
SHARES = {"environment": 0.04, "tests": 0.30, "kernels": 0.30, "model": 0.34, "results": 0.02}

# Stage 2: what of the suite runs on the GPU, sized to the stage's share of the default budget
# (0.30 x 480 s = 144 s) on a cold H200, where nothing is compiled yet. What it costs is the
# Triton compilations: each distinct specialization a test launches (kernel, dtypes, constexprs,
# 16-byte alignments, num_warps) compiles once, about 1 s each on the GPU machine's CPU (a
# ResNet-50 step's ~20 compilations take about 20 s there; sm_90 PTX and cubin take 0.35-0.6 s
# each on this project's 2-core CPU). Counted by recording every launch of the tests under the
# interpreter and turning it into the specialization a GPU launch gets
# (tests/compile_kernels.specialize): the whole of what this stage used to run (test_library,
# test_switch, test_fused_modules, test_functional, test_errors, two test_fused and four
# test_modules tests) needs 657 distinct compilations today, over 10 minutes cold. This
# selection needs 91, plus Inductor's own compilations in the four compile/export tests and
# pytest's and CUDA's start: about TESTS_GPU_S. It keeps what only a GPU shows, first: the ATen
# routes of CUDA (cuDNN's included), torch.compile and torch.export on CUDA, same bits from two
# runs with real concurrent programs, then one case of each numerics family: the split path at
# many splits in every dtype, the fused epilogue and the memory-saving mode, the modules'
# running statistics, half input with float32 parameters, empty and non-finite batches. The
# rest of the suite is the CPU's (the kernels compile for sm_80/sm_90 in tests/test_compile.py).
TESTS_GPU = ["tests/test_switch.py",
             "tests/test_library.py::test_compile_fullgraph_trains_and_evaluates_like_eager[2]",
             "tests/test_library.py::test_compiled_graphs_hold_the_ops_and_nothing_of_triton",
             "tests/test_library.py::test_torch_momentum_none_breaks_fullgraph_ours_does_not",
             "tests/test_library.py::test_export_runs_and_matches_eager",
             "tests/test_functional.py::test_bit_identical_runs",
             "tests/test_autotune.py::test_every_config_gives_the_same_bits",
             "tests/test_functional.py::test_training_matches_reference["
             "few-channels-many-values-torch.float32]",
             "tests/test_functional.py::test_training_matches_reference["
             "few-channels-many-values-torch.bfloat16]",
             "tests/test_functional.py::test_training_matches_reference["
             "many-channels-few-values-torch.float16]",
             "tests/test_functional.py::test_training_matches_reference[video-5d-torch.float64]",
             "tests/test_functional.py::test_training_matches_reference[mlp-2d-torch.float32]",
             "tests/test_functional.py::test_training_matches_reference[odd-4d-torch.bfloat16]",
             "tests/test_fused.py::test_split_path_and_eval[split-relu-residual]",
             "tests/test_fused.py::test_split_path_and_eval[auto-silu-plain]",
             "tests/test_fused.py::test_memory_efficient_gradients_equal_the_fused_ones["
             "split-leaky_relu-torch.float32]",
             "tests/test_modules.py::test_running_stats_after_three_steps_match_reference",
             "tests/test_modules.py::test_half_input_float32_module[bf16]",
             "tests/test_errors.py::test_empty_batch_like_torch",
             "tests/test_errors.py::test_nonfinite_value_poisons_its_channel_only"]
# Seconds the selection needs, cold: 91 compilations at ~1 s, ~20 s of Inductor in the compile
# and export tests, ~15 s of start. The stage starts pytest only with this much of its time left
# (a run that cannot finish proves nothing), and stops it when its time is over.
TESTS_GPU_S = 125.0
TESTS_DRY = ["tests/test_functional.py::test_bit_identical_runs",
             "tests/test_library.py::test_opcheck_forward",
             "tests/test_switch.py::test_dispatch_trace_every_batch_norm_op_reached_is_switched"]
TESTS_DRY_K = "contiguous or 2d-f32-train or dispatch"
TESTS_DRY_S = 20.0  # about 15 s on this project's 2-core CPU

# Stage 3: case labels of benchmarks/cases.py in the order they run (the budget may cut the
# tail), and the tiny cases of the dry run.
KERNEL_CASES = ["resnet50-b32-256x56x56/NCHW", "resnet50-b32-256x56x56/NHWC",
                "resnet50-b32-1024x14x14/NCHW", "resnet50-b32-1024x14x14/NHWC",
                "resnet50-b256-64x112x112/NHWC", "resnet50-b256-2048x7x7/NCHW",
                "mlp-b4096-4096/NC", "few-channels-20x6x65536/NCL",
                "video-8x64x16x56x56/NDHWC", "resnet50-b32-2048x7x7/NHWC"]
KERNEL_DTYPES = ("bf16", "fp32")
# fp32 for these only: the dtype's own code paths (no rounding on store, wider tiles' bytes);
# every pair costs its own compilations.
FP32_CASES = ["resnet50-b32-256x56x56/NHWC", "resnet50-b256-2048x7x7/NCHW"]
KERNEL_MODES = ("forward", "backward", "eval")
# What a (case, dtype) pair costs on a cold cache until one has run: bn_triton's ~7 distinct
# specializations of forward, backward and eval (the tuned ones twice, ~1 s each), Inductor's
# compilation of torch.compile's train and eval graphs (~10 s), cuDNN's first calls, and the
# timing itself (3 providers x 3 modes x 2 CUDA graphs of 10 calls: well under a second).
# The stage's share of 480 s, 144 s, holds about 7 pairs cold: the cut takes the tail.
KERNEL_JOB_S = 20.0
# relu(BN(x) + residual), the end of every ResNet block: bn_triton's fused layer against
# torch's three ops (and torch.compile's fusion of them), in bf16 after the bf16 cases.
FUSED_CASES = ["resnet50-b32-256x56x56/NHWC", "resnet50-b32-1024x14x14/NCHW",
               "resnet50-b256-2048x7x7/NCHW"]
DRY_CASES = [("dry-4x8x6x6", (4, 8, 6, 6), "contiguous"), ("dry-4x8x6x6", (4, 8, 6, 6),
                                                            "channels_last"),
             ("dry-mlp-16x32", (16, 32), "contiguous")]


class Run:
    """What a run shares: its options, the clock, the log, the results so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.end = self.start + args.budget_s
        self.stage = ""
        self.stage_end = self.end
        self.log_file = open(self.out / "gpu_check.log", "w", encoding="utf-8")
        self.results: Dict[str, object] = {
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_check"]
                                + sys.argv[1:]),
            "dry_run": args.dry_run, "budget_s": args.budget_s, "stages": {}}

    def left(self) -> float:
        """Seconds left to the current stage."""
        return max(0.0, self.stage_end - time.monotonic())

    def log(self, message: str) -> None:
        line = (f"[{time.monotonic() - self.start:6.1f}s] [{self.stage or 'start'}, "
                f"{self.left():.0f}s left] {message}")
        self.log_file.write(line + "\n")
        self.log_file.flush()
        write(line)

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str)
                                                 + "\n", encoding="utf-8")


def write(line: str) -> None:
    """A line on the terminal that does not break a progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def counter(description: str, unit: str):
    """A tqdm counter of things done (no total), or one that shows nothing without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(desc=description, unit=unit, dynamic_ncols=True, leave=False)


def progress(items: Sequence, description: str):
    """items with a tqdm bar (a plain iteration where tqdm is missing: the GPU machine is
    offline and has what its preinstalled packages brought)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------- 1. environment
def stage_environment(run: Run) -> dict:
    import torch
    import triton

    import bn_triton

    device = run.args.device
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "device": device,
            "bn_triton_path": bn_triton.backend(torch.empty(0, device=device))}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count,
                    l2_bytes=getattr(props, "L2_cache_size", None),
                    memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", driver=_driver())
    info["copy_bandwidth_gbs"] = round(copy_bandwidth(device, run.args.dry_run), 1)
    run.log(f"{info.get('gpu', 'CPU')}: torch {info['torch']}, triton {info['triton']}, "
            f"path {info['bn_triton_path']}, copy bandwidth {info['copy_bandwidth_gbs']} GB/s")
    return info


def _driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def copy_bandwidth(device: str, dry_run: bool) -> float:
    """GB/s of dst.copy_(src): bytes read plus bytes written over the median time (device time
    on a GPU, graph_timer); 1 GiB of float32 on a GPU, 64 MiB on a CPU."""
    import torch

    numel = 2**28 if device == "cuda" and not dry_run else 2**24
    with _side_stream(device):
        src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        dst.copy_(src)
        ms = timer(device)(lambda: dst.copy_(src), None)[0]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _side_stream(device: str):
    """A fresh CUDA stream made current (graph_timer captures on it), nothing on a CPU."""
    import contextlib

    import torch

    if device != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream())


HOST_TIMING = "host wall clock, median of 3 (dry run): not a device time"
GRAPH_TIMING = ("device time: CUDA-graph replay of {calls} calls, each after an L2 flush, "
                "minus the flushes alone; median of {replays} replays")


def timer(device: str) -> Callable:
    """(fn, grad_to_none) -> (median, q20, q80 ms, how it was timed): graph_timer on a GPU,
    host wall clock on a CPU (the dry run)."""
    if device == "cuda":
        return graph_timer()

    def wall(fn, grad_to_none):
        times = []
        for _ in range(3):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return times[1], times[0], times[-1], HOST_TIMING
    return wall


def graph_timer(calls: int = 10, replays: int = 7, flush_bytes: int = 256 * 2**20) -> Callable:
    """A call's device time, without the 150-300 µs of host work an eager call of bn_triton (or
    of torch) spends before its kernels start, which event windows around each call (do_bench)
    would count: `calls` calls, each after an L2 flush as do_bench does, are captured in one
    CUDA graph on the current stream, the flushes alone in another; the two are replayed in
    turn, each replay timed with events, and a call's time is the difference over `calls`.
    A replay launches the captured kernels back to back, so what is timed is the kernels and
    the gaps between them on the device. fn runs on the current stream, which must not be the
    default one (a capture needs a side stream); tensors in grad_to_none lose .grad before
    each call, so backward writes its gradients and never accumulates into them. fn must have
    run before (compilation, autotuning and allocation happen outside the capture)."""
    import torch

    cache = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    how = GRAPH_TIMING.format(calls=calls, replays=replays)

    def quantile(values: List[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[round(q * (len(ordered) - 1))]

    def time_fn(fn, grad_to_none):
        stream = torch.cuda.current_stream()
        graphs = []
        for with_fn in (True, False):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(calls):
                    cache.zero_()
                    if with_fn:
                        for t in grad_to_none or ():
                            t.grad = None
                        fn()
            graphs.append(graph)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def replay(graph) -> float:
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end)

        for graph in graphs:  # the first replay uploads the graph
            replay(graph)
        per_call = []
        for _ in range(replays):
            with_fn, flushes = replay(graphs[0]), replay(graphs[1])
            # a floor of 0.1 µs: a difference at the noise of the flushes is not a time
            per_call.append(max(with_fn - flushes, 1e-4) / calls)
        del graphs
        return quantile(per_call, 0.5), quantile(per_call, 0.2), quantile(per_call, 0.8), how
    return time_fn


# ----------------------------------------------------------------------------------- 2. tests
TEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def stage_tests(run: Run) -> dict:
    """The selection under pytest in a child process, killed when the stage's time ends; the
    tally counts what finished."""
    dry = run.args.dry_run
    selection = TESTS_DRY if dry else TESTS_GPU
    command = [sys.executable, *(("-c", PYTEST_WITH_FIX) if dry else ("-m", "pytest")), "-v",
               "-p", "no:cacheprovider", "--tb=line", "-o", "console_output_style=classic",
               *selection]
    if dry:
        command += ["-k", TESTS_DRY_K]
    # The fixed launch heuristic: the tests count launches, which the autotuner's timing runs
    # would add to; autotuning itself runs in the kernels stage.
    env = dict(os.environ, BN_TRITON_TEST_DEVICE="cpu" if dry else "cuda",
               BN_TRITON_AUTOTUNE="0")
    if not dry:
        env.pop("TRITON_INTERPRET", None)
    needs = TESTS_DRY_S if dry else TESTS_GPU_S
    if run.left() < needs:
        why = (f"not started: the selection needs about {needs:.0f}s on a cold cache, "
               f"{run.left():.0f}s of the stage left")
        run.log(why)
        return {"selection": selection, "not_started": why, "passed": 0, "failed": 0,
                "error": 0, "skipped": 0, "failures": [], "timed_out": False,
                "returncode": None}
    timeout = max(5.0, run.left() - 5.0)
    run.log(f"pytest {' '.join(selection)}{' -k ' + repr(TESTS_DRY_K) if dry else ''} "
            f"(device {env['BN_TRITON_TEST_DEVICE']}, at most {timeout:.0f}s)")
    outcomes: Dict[str, str] = {}
    tail: List[str] = []
    # Its own process group: Inductor's compile workers hold the output pipe too, and end
    # with it.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=_repository_root(),
                               start_new_session=True)
    killed = threading.Event()

    def kill() -> None:  # a hung test ends with the stage
        killed.set()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            process.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    bar = counter("tests", "test")

    def read() -> None:
        nonlocal tail
        for line in process.stdout:
            match = TEST_LINE.match(line)
            if match:
                outcomes[match.group(1)] = match.group(2)
                bar.update(1)
            tail = (tail + [line.rstrip()])[-40:]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait()
    finally:
        watchdog.cancel()
        timed_out = killed.is_set()
        try:  # what pytest left of its group (compile workers) goes with it
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        reader.join(timeout=30)
        bar.close()
    tally = {status.lower(): sum(1 for s in outcomes.values() if s == status)
             for status in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failures = sorted(name for name, s in outcomes.items() if s in ("FAILED", "ERROR"))
    run.log(f"{tally['passed']} passed, {tally['failed']} failed, {tally['error']} errors, "
            f"{tally['skipped']} skipped, pytest returned {process.returncode}"
            f"{' (timed out)' if timed_out else ''}")
    for name in failures:
        run.log(f"FAILED {name}")
    return {"selection": selection, "device": env["BN_TRITON_TEST_DEVICE"], **tally,
            "failures": failures, "timed_out": timed_out, "returncode": process.returncode,
            "output_tail": tail if (failures or timed_out or process.returncode) else []}


def _repository_root() -> Path:
    return Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------- 3. kernels
def kernel_cases(dry_run: bool, fused: bool = False) -> list:
    from . import cases

    if dry_run:
        dry = [cases.Case(name, "dry", shape, layout) for name, shape, layout in DRY_CASES]
        return dry[:1] if fused else dry
    by_label = {case.label: case for case in cases.CASES}
    return [by_label[label] for label in (FUSED_CASES if fused else KERNEL_CASES)]


def stage_kernels(run: Run) -> dict:
    import torch

    from . import measure

    dry = run.args.dry_run
    device = run.args.device
    providers = list(measure.PROVIDERS)
    notes = {}
    available, why = measure.flag_gems_available()
    if not available:
        providers.remove("flag_gems")
        notes["flag_gems"] = f"not run: import flag_gems failed ({why})"
    measure.configure_compile()
    dtypes = ("fp32",) if dry else KERNEL_DTYPES
    # Every case in bf16, then the fused ones, then fp32 of FP32_CASES: a cut takes the tail.
    cases = kernel_cases(dry)
    jobs = [(case, dtypes[0], False) for case in cases]
    jobs += [(case, dtypes[0], True) for case in kernel_cases(dry, fused=True)]
    jobs += [(case, dtype, False) for dtype in dtypes[1:] for case in cases]
    jobs = [job for job in jobs if dry or job[1] != "fp32" or job[0].label in FP32_CASES]
    bandwidth = (run.results.get("environment") or {}).get("copy_bandwidth_gbs")
    time_one = timer(device)
    rows: List[dict] = []
    seconds: List[float] = []
    done = 0
    # Every pair on one side stream, where graph_timer captures (a capture needs one).
    with _side_stream(device):
        for case, dtype, fused in progress(jobs, "kernels"):
            # Never start a pair that cannot finish: the first costs KERNEL_JOB_S, a later one
            # the longest that ran after the first (which also paid the one-time starts).
            needs = max(seconds[1:], default=KERNEL_JOB_S / (10 if dry else 1))
            if run.left() < needs:
                run.log(f"{run.left():.0f}s left, a (case, dtype) pair needs about "
                        f"{needs:.0f}s: the rest are cut")
                break
            run.log(f"{case.label} {dtype}{' relu(BN(x) + residual)' if fused else ''}")
            started = time.monotonic()
            case_rows = measure.time_case(case, dtype, providers,
                                          ("forward", "backward") if fused else KERNEL_MODES,
                                          timer=time_one, device=device, residual_relu=fused)
            measure.add_relative(case_rows, bandwidth)
            rows += case_rows
            done += 1
            seconds.append(time.monotonic() - started)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    cut = [f"{case.label} {dtype}{' fused' if fused else ''}" for case, dtype, fused in
           jobs[done:]]
    if cut:
        run.log(f"the budget cut {len(cut)} of {len(jobs)} (case, dtype) pairs")
    setup = sum(r.get("setup_s", 0.0) for r in rows if r.get("provider") == "bn_triton")
    return {"providers": providers, "notes": notes, "modes": list(KERNEL_MODES),
            "dtypes": list(dtypes),
            "timing": GRAPH_TIMING.format(calls=10, replays=7) if device == "cuda"
            else HOST_TIMING, "device_time": device == "cuda",
            "bandwidth_reference_gbs": bandwidth, "pair_seconds": [round(t, 1) for t in seconds],
            "bn_triton_first_calls_s": round(setup, 2), "cut": cut, "rows": rows}


# ----------------------------------------------------------------------------------- 4. model
def stage_model(run: Run) -> dict:
    from . import model_step

    # The dry run times one step a variant: the interpreter's speed is no result, and each of
    # its steps costs about a second.
    return model_step.run(run.args.dry_run, run.args.device,
                          timed_steps=1 if run.args.dry_run else 5,
                          deadline=time.monotonic() + run.left(), log=run.log)


# --------------------------------------------------------------------------------- 5. results
def stage_results(run: Run) -> dict:
    """The kernel charts, one a dtype that ran."""
    from . import report

    kernels = run.results.get("kernels") or {}
    rows = kernels.get("rows", [])
    meta = {"gpu": run.results.get("environment", {}).get("gpu", "CPU (dry run)"),
            "torch": run.results.get("environment", {}).get("torch"),
            "triton": run.results.get("environment", {}).get("triton"),
            "peak_bandwidth_gbs": kernels.get("bandwidth_reference_gbs")}
    charts = []
    for dtype in kernels.get("dtypes", []):
        path = run.out / f"kernels-{dtype}.png"
        try:
            report.timed_chart(rows, meta, path, dtype, kernels.get("providers", []))
        except SystemExit as error:  # matplotlib missing: the JSON holds every figure
            run.log(str(error))
            break
        if path.exists():
            charts.append(path.name)
    return {"files": ["gpu_check.json", "gpu_check.log"] + charts}


RUNNERS = {"environment": stage_environment, "tests": stage_tests, "kernels": stage_kernels,
           "model": stage_model, "results": stage_results}


# ----------------------------------------------------------------------------------- verdict
def allowed(dtype_name: str, statistic: bool = False) -> float:
    """The largest relative difference a comparison in `dtype_name` may show: atol + rtol of
    bn_triton.check's table, the form allclose takes on tensors scaled to a largest magnitude
    of 1 (every difference here is max |got - want| / max |want|). A running statistic takes
    the larger of STAT_TOLERANCES and TOLERANCES: STAT_TOLERANCES hold for one layer on one
    input, while a model's later layers see activations rounded to the dtype."""
    import torch

    from bn_triton.check import STAT_TOLERANCES, TOLERANCES

    dtype = getattr(torch, dtype_name)
    value = sum(TOLERANCES[dtype])
    return max(value, sum(STAT_TOLERANCES[dtype])) if statistic else value


def _differences(part: dict, dtype_name: str, where: str) -> List[str]:
    """Reasons for each *_max_relative_difference in `part` beyond its tolerance (NaN is)."""
    reasons = []
    for key, value in part.items():
        if "max_relative_difference" not in key:
            continue
        limit = allowed(dtype_name, statistic="running_stats" in key)
        if not (isinstance(value, (int, float)) and value <= limit):
            reasons.append(f"{where}: {key} = {value:.3g} > {limit:.3g} ({dtype_name})"
                           if isinstance(value, (int, float)) else f"{where}: {key} = {value!r}")
    return reasons


def verdict(results: dict) -> List[str]:
    """Why the run failed, from what every stage recorded; an empty list is a pass."""
    reasons: List[str] = []
    stages = results.get("stages", {})
    for stage in STAGES:
        status = stages.get(stage, {}).get("status")
        if status != "ok":
            error = (results.get(stage) or {}).get("error", "it did not run")
            reasons.append(f"{stage}: the stage raised: {error}" if status else
                           f"{stage}: {error}")

    tests = results.get("tests")
    if stages.get("tests", {}).get("status") == "ok" and isinstance(tests, dict):
        if tests.get("not_started"):
            reasons.append(f"tests: {tests['not_started']}")
        else:
            if tests.get("timed_out"):
                reasons.append("tests: the stage ran out of time before pytest finished")
            if tests.get("returncode") != 0:
                reasons.append(f"tests: pytest returned {tests.get('returncode')}")
            if not tests.get("passed"):
                reasons.append("tests: nothing passed")
            failures = tests.get("failures") or []
            if failures or tests.get("failed") or tests.get("error"):
                reasons.append(f"tests: {tests.get('failed', 0)} failed, {tests.get('error', 0)} "
                               f"errors: {', '.join(failures[:5])}")

    kernels = results.get("kernels")
    if stages.get("kernels", {}).get("status") == "ok" and isinstance(kernels, dict):
        ours = [r for r in kernels.get("rows", []) if r.get("provider") == "bn_triton"]
        for row in ours:
            if "error" in row:
                reasons.append(f"kernels: bn_triton on {row.get('case')} {row.get('dtype')} "
                               f"{row.get('variant', '')}: {row['error']}")
        if not any("ms" in row for row in ours):
            reasons.append("kernels: no bn_triton case was timed")

    model = results.get("model")
    if stages.get("model", {}).get("status") == "ok" and isinstance(model, dict):
        dtype_name = model.get("compared_dtype", "float32")
        variants = model.get("variants") or {}
        compared = 0
        for name, variant in variants.items():
            if "error" in variant:
                reasons.append(f"model: {name} failed: {variant['error']}")
            reasons += _differences(variant, dtype_name, f"model: {name}")
            compared += "outputs_max_relative_difference" in variant
        if not compared:
            reasons.append("model: no bn_triton variant was compared with torch eager")
        graph = model.get("cuda_graph") or {}
        if "error" in graph or graph.get("captured") is False:
            reasons.append(f"model: CUDA graph: {graph.get('error', 'not captured')}")
        reasons += _differences(graph, dtype_name, "model: CUDA graph")
        sync = model.get("sync") or {}
        if "error" in sync:
            reasons.append(f"model: sync failed: {sync['error']}")
        elif "skipped" not in sync:
            if not sync.get("collective_events_in_a_step"):
                reasons.append("model: sync: no collective ran in a synced step")
            reasons += _differences(sync, sync.get("compared_dtype", "float32"), "model: sync")
    return reasons


def not_run(results: dict) -> List[str]:
    """What the budget cut or skipped: no failure, but no proof either."""
    kernels = results.get("kernels") or {}
    model = results.get("model") or {}
    parts = dict((model.get("variants") or {}),
                 **{key: model.get(key) or {} for key in ("cuda_graph", "sync")})
    return ([f"kernels: {pair}" for pair in kernels.get("cut", [])]
            + [f"model: {name}: {part['skipped']}" for name, part in parts.items()
               if isinstance(part, dict) and "skipped" in part])


def run_stages(run: Run) -> int:
    """Every stage in order, each bounded by its share and what earlier stages left; a stage
    that raises is recorded and the next one runs. Then the verdict: 0 when it passed, 1 with
    its reasons in gpu_check.json and the log."""
    for index, stage in enumerate(STAGES):
        now = time.monotonic()
        later = sum(SHARES[s] for s in STAGES[index + 1:]) * run.args.budget_s
        run.stage = stage
        run.stage_end = max(now, run.end - later)
        run.log(f"stage {index + 1}/{len(STAGES)}: {stage}")
        started = time.monotonic()
        try:
            run.results[stage] = RUNNERS[stage](run)
            status = "ok"
        except Exception as error:  # noqa: BLE001 - a stage's failure is a result
            run.results[stage] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            status = "error"
            run.log(f"stage {stage} failed: {type(error).__name__}: {error}")
        run.results["stages"][stage] = {"status": status,
                                        "seconds": round(time.monotonic() - started, 1)}
        run.save()
    run.stage, run.stage_end = "verdict", run.end
    try:
        reasons = verdict(run.results)
    except Exception as error:  # noqa: BLE001 - a verdict that cannot be taken is a failure
        reasons = [f"verdict: {type(error).__name__}: {error}"]
    skipped = not_run(run.results)
    run.results["verdict"] = {"passed": not reasons, "reasons": reasons, "not_run": skipped}
    run.save()
    for line in skipped:
        run.log(f"not run: {line}")
    for line in reasons:
        run.log(f"FAIL: {line}")
    tests = run.results.get("tests") or {}
    summary = (f"in {time.monotonic() - run.start:.0f}s: tests {tests.get('passed', 0)} passed "
               f"/ {tests.get('failed', 0)} failed; wrote {run.out}")
    if reasons:
        run.log(f"FAILED ({len(reasons)} reason{'s' if len(reasons) > 1 else ''}) {summary}")
        return 1
    run.log(f"passed {summary}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="bn_triton on a GPU in one bounded run: environment, tests on CUDA, kernel "
                    "timings against torch eager / torch.compile / FlagGems, a ResNet-50 "
                    "training step (compiled, converted, CUDA graph). Writes <out>/"
                    "gpu_check.json, gpu_check.log and kernel charts.")
    parser.add_argument("--out", required=True, help="folder for the results")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget of the whole run (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on the CPU through Triton's interpreter, tiny sizes")
    return parser


INDEX_FIX = ("triton's interpreter: a scalar's __index__ as int(data.squeeze()), triton 3.9's "
             "own form, for NumPy >= 2.4 (triton < 3.9 calls int() on the one-element array "
             "that holds every scalar, which NumPy 2.4 refuses)")


def fix_interpreter() -> Optional[str]:
    """Where this NumPy refuses int() of a one-element array (2.4 and later) and this triton's
    interpreter still converts scalars that way (3.6; 3.9 squeezes first), make its patch of
    tl.tensor.__index__ squeeze as 3.9's does. Without it, every `range(first, last)` over
    kernel arguments or program ids raises TypeError under the interpreter: the split kernels'
    tile loops (kernels/stats.py, forward.py, backward.py), so the dry run's split cases, sync
    and tests fail. Nothing changes elsewhere; returns what was done (None: nothing)."""
    import inspect

    import numpy
    from triton.runtime import interpreter

    if getattr(interpreter, "_bn_triton_index_fix", False):
        return INDEX_FIX
    try:
        int(numpy.array([1]))
        return None  # NumPy < 2.4
    except TypeError:
        pass
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or "int(self.handle.data)" not in inspect.getsource(patch):
        return None  # an interpreter that converts otherwise (3.9: squeezed)

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched
    interpreter._bn_triton_index_fix = True
    return INDEX_FIX


# The dry run's pytest child: the same fix before the tests run.
PYTEST_WITH_FIX = ("import sys; from benchmarks.gpu_check import fix_interpreter; "
                   "fix_interpreter(); import pytest; sys.exit(int(pytest.main(sys.argv[1:])))")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run: triton was imported before TRITON_INTERPRET=1 was set")
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        args.device = "cpu"
        args.interpreter_fix = fix_interpreter()
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run")
        args.device = "cuda"
    run = Run(args)
    run.results["interpreter_fix"] = getattr(args, "interpreter_fix", None)
    try:
        return run_stages(run)
    finally:
        run.log_file.close()


if __name__ == "__main__":
    sys.exit(main())
