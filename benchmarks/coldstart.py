"""python -m benchmarks.coldstart [--out DIR] [--compile]: what the first training step of a
ResNet-50 costs bn_triton in compiling and autotuning (issue 17, "Cold start").

For each setting (batch 32 / 256 x NCHW / NHWC x fp32 / bf16; bf16 is autocast's: bf16
activations, fp32 weights and running statistics) it records the launches of one training
step's BN layers, forward and backward (dx, dweight, dbias) of each of ResNet-50's 12 BN input
shapes, and counts, as a GPU launch would meet them:

  specializations   distinct (kernel, constexprs, Triton's argument specialization: dtypes,
                    16-divisibility of pointers and ints, ints equal to 1, launch options); a
                    tuned kernel's num_warps comes from its configs and is not part of it
  compilations      with the autotuner: every config of a tuning key's first specialization,
                    then the chosen config for each further specialization of the same key;
                    without it, one per specialization
  benchmarks        configs timed: the surviving configs of each tuning key (Triton's key:
                    tuning.TUNING's argument names plus every tensor's dtype); a key with one
                    surviving config is not timed (tuning.surviving_configs)
  warm              a new process whose Triton kernel cache and autotune cache (tuning.py,
                    BN_TRITON_AUTOTUNE_CACHE) are warm: nothing compiled, nothing timed

The launches are recorded with tests/compile_kernels.py's recorder on meta tensors and
specialized by its `specialize` (its docstring says how a GPU launch specializes), so that the
counts are those of the code as it stands, with no GPU. triton.compile cannot run under the
interpreter, so this runs without TRITON_INTERPRET (a subprocess where the caller has it set).

--compile also times triton.compile for sm_90 (the NVIDIA backend, ptxas included) of one
specialization of each kernel on this machine's CPU, in an empty Triton cache, and estimates a
cold first step's compile time as compilations x mean compile time. It is an estimate from CPU
compile time: on a GPU machine compiling is host work too (Triton compiles in the launching
thread, one kernel at a time), so the per-compile time of a similar server core is a fair
proxy. Timing is estimated as configs timed x tuning.quick_bench's warm-up + repetition time.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# ResNet-50's (torchvision, stride on the 3x3) BatchNorm2d inputs (C, H, W): the stem, then per
# stage its width at the input resolution (the first block's conv1), its width and output width
# at the stage's resolution. benchmarks/cases.py times 9 of these 12.
RESNET50_BN = [(64, 112, 112),
               (64, 56, 56), (256, 56, 56),
               (128, 56, 56), (128, 28, 28), (512, 28, 28),
               (256, 28, 28), (256, 14, 14), (1024, 14, 14),
               (512, 14, 14), (512, 7, 7), (2048, 7, 7)]
BATCHES = (32, 256)
LAYOUTS = {"NCHW": "contiguous", "NHWC": "channels_last"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SETTINGS = [f"b{n}-{layout}-{dtype}" for n in BATCHES for layout in LAYOUTS for dtype in DTYPES]


def _compile_kernels():
    """tests/compile_kernels.py, loaded by path (tests/ is no package)."""
    path = os.path.join(ROOT, "tests", "compile_kernels.py")
    spec = importlib.util.spec_from_file_location("bn_triton_compile_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scenarios(setting: str) -> List[Dict[str, Any]]:
    """One training step's BN calls of `setting` ("b32-NHWC-bf16") in compile_kernels' format."""
    batch, layout, dtype = setting.split("-")
    return [dict(name=f"{setting}-{c}x{h}x{w}", shape=[int(batch[1:]), c, h, w],
                 dtype=DTYPES[dtype], param_dtype="float32", layout=LAYOUTS[layout],
                 dy_layout=LAYOUTS[layout], grads=(True, True, True), training=True,
                 running=True, momentum=0.1)
            for c, h, w in RESNET50_BN]


def _check_compiled_triton() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    from bn_triton import kernels
    if isinstance(kernels.normalize_kernel, InterpretedFunction):
        raise RuntimeError("benchmarks.coldstart needs Triton without TRITON_INTERPRET=1")


def record(setting: str) -> List[Tuple[str, Dict[str, Any], Optional[tuple]]]:
    """(kernel name, specialization, tuning key or None) of every launch of `setting`'s step.
    The launches are the heuristic ones (BN_TRITON_AUTOTUNE=0 is set for this process): the
    tuned kernels' specializations drop num_warps, which their configs set."""
    _check_compiled_triton()
    from bn_triton.ops import tuning

    ck = _compile_kernels()
    out = []
    for scenario in scenarios(setting):
        for fn, args, kwargs in ck.run_scenario(scenario):
            name = fn.__name__
            tuned = name in tuning.TUNING
            key = tuning.tuning_key(name, dict(zip(fn.arg_names, args), **kwargs)) if tuned \
                else None
            spec = ck.specialize(fn, args, dict(kwargs))
            if tuned:
                spec["options"] = {k: v for k, v in spec["options"].items()
                                   if k not in ("num_warps", "num_stages")}
            out.append((name, spec, key))
    return out


def count(launches) -> Dict[str, Any]:
    """The counts of one step's launches (see the module docstring), as the autotuner meets
    them in launch order. Where a tuning key has more than one specialization the later ones
    compile only the chosen config: the first surviving one here (run_once's choice); which
    config a GPU picks changes the count only where one specialization falls under two keys."""
    from bn_triton.ops import tuning

    specs: Dict[str, str] = {}  # canonical specialization -> kernel
    compiled = set()  # (specialization, num_warps or None)
    chosen: Dict[Tuple[str, tuple], int] = {}  # (kernel, tuning key) -> num_warps
    compilations: Dict[str, int] = {}
    benchmarks = 0
    for name, spec, key in launches:
        canonical = json.dumps(spec, sort_keys=True)
        specs.setdefault(canonical, name)
        if key is None:
            wanted = [None]
        elif (name, key) in chosen:
            wanted = [chosen[(name, key)]]
        else:
            configs = tuning.surviving_configs(name, dict(zip(tuning.TUNING[name][0], key)))
            wanted = [c.num_warps for c in configs]
            benchmarks += len(configs) if len(configs) > 1 else 0
            chosen[(name, key)] = wanted[0]
        for warps in wanted:
            if (canonical, warps) not in compiled:
                compiled.add((canonical, warps))
                compilations[name] = compilations.get(name, 0) + 1
    by_kernel: Dict[str, int] = {}
    for name in specs.values():
        by_kernel[name] = by_kernel.get(name, 0) + 1
    return {"launches": len(launches), "specializations": len(specs),
            "specializations_by_kernel": dict(sorted(by_kernel.items())),
            "tuning_keys": len(chosen), "compilations": sum(compilations.values()),
            "compilations_by_kernel": dict(sorted(compilations.items())),
            "compilations_untuned": len(specs), "benchmarks": benchmarks,
            "warm_compilations": 0, "warm_benchmarks": 0}


def _counts_here(settings) -> Dict[str, Dict[str, Any]]:
    return {setting: count(record(setting)) for setting in settings}


def counts(settings=None) -> Dict[str, Dict[str, Any]]:
    """setting -> its counts. Runs in this process where Triton compiles (not interpreted) and
    bn_triton is not yet imported with autotuning on; in a subprocess otherwise."""
    settings = list(settings or SETTINGS)
    from_here = (os.environ.get("TRITON_INTERPRET") != "1"
                 and os.environ.get("BN_TRITON_AUTOTUNE") == "0"
                 and os.environ.get("BN_TRITON_DIRECT_LAUNCH") == "0")
    if from_here:
        return _counts_here(settings)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(BN_TRITON_AUTOTUNE="0", BN_TRITON_DIRECT_LAUNCH="0")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.coldstart", "--json", "--settings",
                           *settings], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.coldstart failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def time_compiles(launches, repeats: int = 3) -> Dict[str, Any]:
    """Seconds of triton.compile for sm_90 of the first specialization of each kernel in
    `launches` (a tuned one at its first config) in an empty Triton cache, the least of
    `repeats` (other work on a shared machine only adds), after one untimed compile that pays
    the process's one-time start (LLVM, the backend); then once from the now warm cache."""
    from triton import knobs

    from bn_triton import kernels

    from bn_triton.ops import tuning

    ck = _compile_kernels()
    first: Dict[str, Dict[str, Any]] = {}
    for name, spec, _ in launches:
        first.setdefault(name, spec)

    def compile_one(name, spec):
        options = dict(spec["options"])
        if name in tuning.TUNING:
            options["num_warps"] = tuning.TUNED_CONFIGS[0].num_warps
        attrs = {(index,): attr for index, attr in spec["attrs"]}
        start = time.perf_counter()
        ck.compile_kernel(getattr(kernels, name), dict(spec["signature"]),
                          dict(spec["constexprs"]), attrs, 90, options)
        return time.perf_counter() - start

    times: Dict[str, float] = {}
    warm: Dict[str, float] = {}
    previous = knobs.cache.dir
    try:
        with tempfile.TemporaryDirectory() as scratch:
            knobs.cache.dir = os.path.join(scratch, "start")  # never the user's cache
            name, spec = next(iter(first.items()))
            start_s = compile_one(name, spec)
            for repeat in range(repeats):
                knobs.cache.dir = os.path.join(scratch, str(repeat))  # cold
                for name, spec in first.items():
                    seconds = round(compile_one(name, spec), 3)
                    times[name] = min(times.get(name, seconds), seconds)
            for name, spec in first.items():  # the last cache, warm
                warm[name] = round(compile_one(name, spec), 4)
    finally:
        knobs.cache.dir = previous
    return {"seconds": times, "warm_seconds": warm, "process_start_s": round(start_s, 3),
            "mean_s": round(sum(times.values()) / len(times), 3),
            "warm_mean_s": round(sum(warm.values()) / len(warm), 4)}


def estimate(c: Dict[str, Any], timing: Dict[str, Any]) -> float:
    """A cold step's compile seconds: each kernel's compilations x its measured compile time,
    plus the process's one-time start."""
    seconds = timing["seconds"]
    return round(timing["process_start_s"] + sum(
        n * seconds.get(name, timing["mean_s"]) for name, n in
        c["compilations_by_kernel"].items()), 1)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coldstart",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=RESULTS, help="folder of coldstart.json")
    parser.add_argument("--compile", action="store_true",
                        help="time triton.compile for sm_90 here and estimate the cold step")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=SETTINGS)
    parser.add_argument("--json", action="store_true",
                        help="print the counts as JSON and write nothing (for counts())")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("benchmarks.coldstart compiles: run it without TRITON_INTERPRET=1")
    # Record the heuristic launches (see record), each through JITFunction.run, where the
    # recorder sits: no launch straight to a compiled kernel (BN_TRITON_DIRECT_LAUNCH).
    os.environ.update(BN_TRITON_AUTOTUNE="0", BN_TRITON_DIRECT_LAUNCH="0")
    if "bn_triton" in sys.modules:
        raise SystemExit("bn_triton was imported before its environment could be set")
    launches = {setting: record(setting) for setting in args.settings}
    results = {setting: count(launches[setting]) for setting in args.settings}
    if args.json:
        json.dump(results, sys.stdout)
        return 0

    import torch
    import triton

    import bn_triton
    from bn_triton.ops import tuning
    report: Dict[str, Any] = {
        "what": "one ResNet-50 training step's BN layers (12 shapes, forward + backward)",
        "versions": {"bn_triton": bn_triton.__version__, "triton": triton.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "tuned": {name: [str(c) for c in configs] for name, (_, configs) in
                  tuning.TUNING.items()},
        "settings": results}
    print(f"{'setting':16} {'specs':>6} {'keys':>5} {'compiles':>9} {'untuned':>8} "
          f"{'benchmarks':>10} {'warm':>5}")
    for setting, c in results.items():
        print(f"{setting:16} {c['specializations']:6} {c['tuning_keys']:5} "
              f"{c['compilations']:9} {c['compilations_untuned']:8} {c['benchmarks']:10} "
              f"{c['warm_compilations'] + c['warm_benchmarks']:5}")
    if args.compile:
        timing = time_compiles([launch for setting in args.settings
                                for launch in launches[setting]])
        timing["estimate_cold_s"] = {setting: estimate(c, timing)
                                     for setting, c in results.items()}
        # do_bench runs about warm-up + repetition time a config (tuning.quick_bench).
        per_config_s = (tuning.BENCH_WARMUP_MS + tuning.BENCH_REP_MS) / 1000
        timing["estimate_tuning_s"] = {setting: round(c["benchmarks"] * per_config_s, 2)
                                       for setting, c in results.items()}
        timing.update(
            cpu=_cpu_model(), cpus=os.cpu_count(),
            note="an estimate from CPU compile time: per kernel, compilations x its sm_90 "
                 "triton.compile seconds on this machine, serial as in the launching thread, "
                 "plus one process start; loading from a warm cache (warm_seconds) is not "
                 "included. estimate_tuning_s: configs timed x quick_bench's warm-up + "
                 "repetition time")
        report["compile"] = timing
        print(f"sm_90 triton.compile on this CPU: {timing['seconds']} s cold, "
              f"{timing['warm_mean_s']} s a kernel from the warm cache, "
              f"{timing['process_start_s']} s the process's first")
        for setting, seconds in timing["estimate_cold_s"].items():
            print(f"  {setting:16} estimated cold step: {seconds} s of compiling (an estimate "
                  f"from CPU compile time) + {timing['estimate_tuning_s'][setting]} s of timing")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "coldstart.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
