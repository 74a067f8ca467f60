"""python -m benchmarks: the kernel benchmark suite for people (see benchmarks/README.md).

With a GPU it times bn_triton against torch eager, torch.compile and FlagGems (if it imports)
with triton.testing.do_bench. Without one it runs bn_triton's kernels through Triton's
interpreter on scaled-down cases and counts launches and requested bytes per element:
a count of memory traffic, not a timing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    from .cases import DTYPES, INTERPRETER_BUDGET, MODES

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="BatchNorm kernel benchmarks. GPU: device time (do_bench), GB/s, % of peak "
                    "bandwidth, speedups over torch eager / torch.compile / FlagGems. No GPU: "
                    "launches and bytes per element counted under Triton's interpreter on "
                    "scaled-down shapes (not a timing). Writes JSON + one PNG to "
                    "benchmarks/results/. Sub-commands (python -m benchmarks NAME ...): "
                    + "; ".join(f"{name}: {what}" for name, what in SUBCOMMANDS.items()))
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="cuda: time on the GPU; cpu: count under the interpreter; "
                             "auto (default): cuda when available")
    parser.add_argument("--cases", nargs="+", metavar="PATTERN",
                        help="only cases whose label contains a pattern, e.g. resnet50-b32 NHWC")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="GPU default: fp32 bf16 fp16. CPU default: fp32 for every case and "
                             "bf16 too for a few (bytes per element do not depend on dtype)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="GPU only (CPU counts forward, backward, eval; fwd+bwd is the sum)")
    parser.add_argument("--providers", nargs="+",
                        default=["bn_triton", "torch", "torch.compile", "flag_gems"],
                        choices=["bn_triton", "torch", "torch.compile", "flag_gems"],
                        help="GPU only; flag_gems is skipped when it does not import")
    parser.add_argument("--warmup-ms", type=int, default=10, help="do_bench warmup (GPU)")
    parser.add_argument("--rep-ms", type=int, default=50, help="do_bench repetition time (GPU)")
    parser.add_argument("--budget", type=int, default=INTERPRETER_BUDGET,
                        help="elements per case under the interpreter (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes for the interpreter (default: the CPUs available)")
    parser.add_argument("--chart-dtype", choices=list(DTYPES), default=None,
                        help="GPU chart's dtype (default: bf16 if run, else the first)")
    parser.add_argument("--name", default=None,
                        help="file stem under benchmarks/results/ (default cpu-counted, "
                             "gpu-<gpu name>)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    parser.add_argument("--list", action="store_true",
                        help="print the cases (and the shapes the interpreter would run) and exit")
    return parser


# Sub-commands: what a GPU exposes beyond bytes and launches, measured on the CPU. Each is
# also `python -m benchmarks.<name>`; `python -m benchmarks <name> --help` lists its options.
SUBCOMMANDS = {
    "host": "host µs per call, launches stubbed, against torch's module in the same run; "
            "Triton's and the direct launch's µs per launch",
    "waves": "programs per SM on 132- and 108-SM GPUs, bytes in flight, access width",
    "coldstart": "specializations, compilations and tuned configs of one ResNet-50 step",
    "variants": "Batch Renormalization and ghost batch norm against batch norm: launches, bytes",
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(f"benchmarks.{argv[0]}")
        return module.main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

    from . import cases as cases_module

    selected = cases_module.select(args.cases)
    if not selected:
        raise SystemExit(f"no case matches {args.cases}; try --list")
    if args.list:
        for case in selected:
            ran = cases_module.interpreter_shape(case.shape, args.budget)
            print(f"{case.label:<36} {str(case.shape):<24} M={case.M:<8} {case.regime:<8} "
                  f"interpreter: {ran} M={cases_module.values_per_channel(ran)}")
        return 0
    if device == "cpu":
        return _counted(args, selected)
    return _timed(args, selected)


def _out_dir(args):
    from pathlib import Path

    from .report import RESULTS_DIR

    return Path(args.out) if args.out else RESULTS_DIR


def _counted(args, selected) -> int:
    import concurrent.futures
    import multiprocessing

    from . import cases as cases_module
    from . import measure, report

    # Cases that scale to the same (shape, layout, module, dtype) are counted once.
    pairs, jobs = [], []
    for case in selected:
        dtypes = args.dtypes or (["fp32", "bf16"] if case.label in cases_module.COUNT_BOTH_DTYPES
                                 else ["fp32"])
        shape = cases_module.interpreter_shape(case.shape, args.budget)
        for dtype in dtypes:
            job = (shape, case.layout, case.module_name, dtype)
            pairs.append((case, dtype, job))
            if job not in jobs:
                jobs.append(job)
    workers = max(1, min(args.jobs or measure.cpu_count(), len(jobs)))
    print(f"counting {len(pairs)} (case, dtype) pairs, {len(jobs)} distinct after scaling to "
          f"<= {args.budget} elements (see 'ran'), under Triton's interpreter in {workers} "
          "process(es)", flush=True)
    start = time.perf_counter()
    if workers == 1:
        results = [measure.count_worker(job) for job in jobs]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(measure.count_worker, jobs))
    counts = dict(zip(jobs, results))
    rows = [row for case, dtype, job in pairs
            for row in measure.counted_rows(case, dtype, job[0], counts[job])]
    elapsed = time.perf_counter() - start
    meta = measure.machine_info("cpu")
    meta.update(elapsed_s=round(elapsed, 1), interpreter_budget=args.budget, workers=workers)
    print(report.counted_table(rows))
    print(f"{elapsed:.0f} s. Counted under the interpreter: requested bytes, not a GPU timing.")
    stem = args.name or "cpu-counted"
    out = _out_dir(args)
    payload = dict(
        kind="cpu-counted", meta=meta,
        what=("bn_triton's launches per call and bytes requested per element of x (in element "
              "sizes), counted by bn_triton.ops.traffic under Triton's CPU interpreter: every "
              "tl.load/tl.store, mask-true elements x element size, summed over programs. Not a "
              "timing and not DRAM traffic (no caches)."),
        minimum=cases_module.MIN_BYTES, two_pass=cases_module.TWO_PASS_BYTES,
        targets=cases_module.TARGETS, o_c_slack=cases_module.O_C_SLACK,
        scaling_rule=" ".join(cases_module.interpreter_shape.__doc__.split()),
        rows=rows)
    report.write_json(out / f"{stem}.json", payload)
    print(f"wrote {out / (stem + '.json')}")
    if not args.no_chart:
        report.counted_chart(rows, meta, out / f"{stem}.png")
        print(f"wrote {out / (stem + '.png')}")
    return 0


def _timed(args, selected) -> int:
    import torch

    from . import cases as cases_module
    from . import measure, report

    dtypes = args.dtypes or ["fp32", "bf16", "fp16"]
    providers = list(args.providers)
    notes = {}
    if "flag_gems" in providers:
        available, why = measure.flag_gems_available()
        if not available:
            providers.remove("flag_gems")
            notes["flag_gems"] = f"not run: import flag_gems failed ({why})"
    if "torch.compile" in providers:
        measure.configure_compile()
    meta = measure.machine_info("cuda")
    meta.update(dtypes=dtypes, modes=args.modes, providers=providers, notes=notes,
                do_bench=dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                              quantiles=[0.5, 0.2, 0.8]))
    print(f"{meta['gpu']}: peak {meta['peak_bandwidth_gbs'] or 'n/a'} GB/s; "
          f"{len(selected)} cases x {dtypes} x {args.modes} x {providers}", flush=True)
    print(report.TIMED_HEADER, flush=True)
    rows = []
    start = time.perf_counter()
    for case in selected:
        for dtype in dtypes:
            case_rows = measure.time_case(case, dtype, providers, args.modes, args.warmup_ms,
                                          args.rep_ms)
            measure.add_relative(case_rows, meta["peak_bandwidth_gbs"])
            print("\n".join(report.timed_lines(case_rows)), flush=True)
            rows += case_rows
            torch.cuda.empty_cache()
    print(report.TIMED_FOOTER)
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    stem = args.name or f"gpu-{report.slug(meta['gpu'])}"
    out = _out_dir(args)
    payload = dict(
        kind="gpu-timed", meta=meta,
        bytes_model=("GB/s = minimum bytes / time: forward 2, backward 3, forward+backward 5, "
                     "eval 2 element sizes per element of x"),
        minimum=cases_module.MIN_BYTES, rows=rows)
    report.write_json(out / f"{stem}.json", payload)
    print(f"wrote {out / (stem + '.json')}")
    if not args.no_chart:
        chart_dtype = args.chart_dtype or ("bf16" if "bf16" in dtypes else dtypes[0])
        report.timed_chart(rows, meta, out / f"{stem}.png", chart_dtype, providers)
        print(f"wrote {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
