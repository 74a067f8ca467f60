"""python -m benchmarks.gpu_check: its dry run (every stage, on the CPU through the
interpreter) passes here, so the command is known to work before it meets a GPU; a short budget
cuts cases, not stages, and starts nothing that cannot finish; a failing stage is recorded and
the next one runs; and the run cannot pass without proof: with the stages stubbed, every kind
of failure the issue names makes main() exit 1, and only a clean run exits 0."""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import gpu_check, model_step

ROOT = Path(__file__).resolve().parent.parent


def dry_run(out: Path, budget_s: int, timeout_s: int) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process, no TRITON_INTERPRET set beforehand."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run",
                           "--out", str(out), "--budget-s", str(budget_s)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def test_dry_run_runs_every_stage(tmp_path):
    done = dry_run(tmp_path, budget_s=240, timeout_s=300)  # the issue: under 5 minutes
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["verdict"] == {"passed": True, "reasons": [],
                                 "not_run": ["model: cuda_graph: needs CUDA"]}, result["verdict"]
    assert list(result["stages"]) == list(gpu_check.STAGES)
    assert all(stage["status"] == "ok" for stage in result["stages"].values()), result["stages"]
    assert result["environment"]["bn_triton_path"] == "triton-interpreter"
    assert result["environment"]["copy_bandwidth_gbs"] > 0
    tests = result["tests"]
    assert tests["passed"] >= 3 and tests["failed"] == tests["error"] == 0, tests
    assert tests["returncode"] == 0 and not tests["timed_out"], tests
    kernels = result["kernels"]
    assert kernels["cut"] == []
    for provider in ("bn_triton", "torch", "torch.compile"):
        rows = [r for r in kernels["rows"] if r["provider"] == provider and r["variant"] == "bn"]
        assert len(rows) == len(gpu_check.DRY_CASES) * len(gpu_check.KERNEL_MODES), provider
        assert all("ms" in r and r["gbs"] > 0 and r["setup_s"] >= 0 for r in rows), rows
        # the CPU's times are host times, and say so
        assert all(r["timing"] == gpu_check.HOST_TIMING for r in rows), rows
    assert kernels["device_time"] is False
    assert all(set(r["speedup"]) == {"torch", "torch.compile"}
               for r in kernels["rows"] if r["provider"] == "bn_triton")
    variants = result["model"]["variants"]
    assert list(variants) == list(model_step.VARIANTS)
    for name, variant in variants.items():
        assert variant["images_per_s"] > 0, (name, variant)
        if name != "torch":  # float32: within check.TOLERANCES' 1e-5 + 1e-5
            for key in ("outputs", "grads", "running_stats"):
                assert variant[f"{key}_max_relative_difference"] < 2e-5, (name, variant)
    assert result["model"]["cuda_graph"] == {"skipped": "needs CUDA"}
    sync = result["model"]["sync"]
    assert sync["backend"] == "gloo" and sync["sync_layers"] == 7, sync
    assert sync["collective_events_in_a_step"] >= 2 * 7, sync  # one each way a layer
    assert sync["outputs_max_relative_difference"] < 1e-5, sync
    assert sync["grads_max_relative_difference"] < 2e-5, sync
    assert sync["running_stats_max_relative_difference"] < 2e-5, sync
    # The small ResNet's stem BN and the 3 of each of its 2 bottlenecks feed a ReLU.
    assert variants["bn_triton.fused"]["fused_layers"] == 7
    fused_rows = [r for r in kernels["rows"] if r["variant"] == "bn+add+relu"]
    assert {r["provider"] for r in fused_rows} == {"bn_triton", "torch", "torch.compile"}
    assert all("ms" in r for r in fused_rows), fused_rows
    files = sorted(p.name for p in tmp_path.iterdir())
    assert all((tmp_path / name).is_file() for name in files) and len(files) <= 8
    assert sorted(result["results"]["files"]) == files
    log = (tmp_path / "gpu_check.log").read_text()
    for stage in gpu_check.STAGES:
        assert f"{stage}" in log
    assert "left]" in log  # every line says the stage's time left
    assert "] passed in " in log.splitlines()[-1], log.splitlines()[-1]


def test_a_short_budget_cuts_cases_not_stages(tmp_path):
    done = dry_run(tmp_path, budget_s=12, timeout_s=200)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(result["stages"]) == list(gpu_check.STAGES), done.stderr[-3000:]
    assert result["kernels"]["cut"] or any(
        "skipped" in v for v in result["model"]["variants"].values())
    assert (tmp_path / "gpu_check.log").exists()
    # 3.6 s for the tests cannot hold the selection: pytest is not started, and the run,
    # having proved nothing there, fails
    assert result["tests"]["not_started"] and result["tests"]["returncode"] is None
    assert done.returncode == 1 and not result["verdict"]["passed"]


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def broken(run):
        raise RuntimeError("no such device")

    monkeypatch.setattr(gpu_check, "RUNNERS", {**{stage: (lambda run: {"ran": True})
                                                  for stage in gpu_check.STAGES},
                                               "kernels": broken})
    args = argparse.Namespace(out=str(tmp_path), budget_s=10.0, dry_run=True, device="cpu")
    run = gpu_check.Run(args)
    try:
        assert gpu_check.run_stages(run) == 1
    finally:
        run.log_file.close()
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["kernels"] == {"error": "RuntimeError: no such device"}
    assert result["stages"]["kernels"]["status"] == "error"
    assert result["model"] == {"ran": True} and result["results"] == {"ran": True}


def test_without_a_gpu_the_real_run_refuses(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real run would start")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["--out", str(tmp_path)])


# ------------------------------------------------------------------- the verdict, stubbed
# What each stage records in a run that passes (the shapes stage_* return), and, below, one
# change for each kind of failure the issue names: each must make main() exit 1.
CLEAN = {
    "environment": {"copy_bandwidth_gbs": 4000.0},
    "tests": {"passed": 63, "failed": 0, "error": 0, "skipped": 0, "failures": [],
              "timed_out": False, "returncode": 0},
    "kernels": {"rows": [{"provider": "bn_triton", "case": "c", "dtype": "bf16", "ms": 0.1},
                         {"provider": "flag_gems", "case": "c", "dtype": "bf16",
                          "error": "a baseline's failure is no failure of bn_triton"}],
                "cut": []},
    "model": {"compared_dtype": "bfloat16",
              "variants": {"torch": {"images_per_s": 1000.0},
                           "bn_triton": {"outputs_max_relative_difference": 0.04,
                                         "grads_max_relative_difference": 0.01,
                                         "running_stats_max_relative_difference": 0.01}},
              "cuda_graph": {"captured": True, "params_max_relative_difference_vs_eager": 0.0,
                             "running_stats_max_relative_difference_vs_eager": 0.0},
              "sync": {"compared_dtype": "float32", "collective_events_in_a_step": 14,
                       "outputs_max_relative_difference": 1e-6,
                       "grads_max_relative_difference": 1e-6,
                       "running_stats_max_relative_difference": 1e-6}},
    "results": {"files": ["gpu_check.json", "gpu_check.log"]},
}


def _set(path: str, value):
    def change(results):
        *keys, last = path.split(".")
        part = results
        for key in keys:
            part = part[key]
        part[last] = value
    return change


def _raise(results):
    results["kernels"] = RuntimeError("no such device")


FAILURES = {
    "a stage raised": _raise,
    # the case: pytest collected nothing
    "pytest returned 4, nothing passed": lambda r: r["tests"].update(returncode=4, passed=0),
    "pytest returned non-zero": _set("tests.returncode", 1),
    "nothing passed": _set("tests.passed", 0),
    "a test failed": lambda r: r["tests"].update(failed=1, returncode=1,
                                                 failures=["tests/test_x.py::test_y"]),
    "the tests stage timed out": lambda r: r["tests"].update(timed_out=True, returncode=-9),
    "the tests were not started": _set("tests.not_started", "needs 125s, 30s left"),
    "a bn_triton kernel case failed": lambda r: r["kernels"]["rows"].append(
        {"provider": "bn_triton", "case": "c", "dtype": "fp32", "error": "illegal address"}),
    "no kernel case was timed": _set("kernels.rows", []),
    "a model variant failed": lambda r: r["model"]["variants"].update(
        {"bn_triton.fused": {"error": "KeyError: missing layer1.0.bn1.running_mean"}}),
    "no variant was compared": _set("model.variants",
                                    {"torch": {"skipped": "not started: needs about 10s"}}),
    "an output beyond bf16's tolerance": _set(
        "model.variants.bn_triton.outputs_max_relative_difference", 0.05),
    "a gradient beyond bf16's tolerance": _set(
        "model.variants.bn_triton.grads_max_relative_difference", 0.05),
    "a running statistic beyond bf16's tolerance": _set(
        "model.variants.bn_triton.running_stats_max_relative_difference", 0.05),
    "a difference that is NaN": _set(
        "model.variants.bn_triton.grads_max_relative_difference", math.nan),
    "float32 judged as float32": _set("model.compared_dtype", "float32"),  # 0.04 > 2e-5
    "the CUDA-graph capture failed": _set("model.cuda_graph", {
        "captured": False, "error": "operation not permitted when stream is capturing"}),
    "replayed steps differ from eager": _set(
        "model.cuda_graph.params_max_relative_difference_vs_eager", 0.1),
    "the collectives failed": _set("model.sync", {"error": "DistBackendError: NCCL"}),
    "no collective ran": _set("model.sync.collective_events_in_a_step", 0),
    "synced running statistics beyond float32's tolerance": _set(
        "model.sync.running_stats_max_relative_difference", 1e-4),
}


def stubbed_main(tmp_path, monkeypatch, results) -> int:
    """main() --dry-run with every stage replaced by one returning (or raising) `results`'."""
    def runner(stage):
        def run(_run):
            if isinstance(results[stage], Exception):
                raise results[stage]
            return results[stage]
        return run

    monkeypatch.setattr(gpu_check, "RUNNERS", {stage: runner(stage) for stage in gpu_check.STAGES})
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as the dry run sets it (on a GPU, too)
    return gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "60"])


def test_a_clean_stubbed_run_exits_0(tmp_path, monkeypatch):
    assert stubbed_main(tmp_path, monkeypatch, copy.deepcopy(CLEAN)) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["verdict"] == {"passed": True, "reasons": [], "not_run": []}
    assert "] passed in " in (tmp_path / "gpu_check.log").read_text().splitlines()[-1]


@pytest.mark.parametrize("failure", list(FAILURES))
def test_each_failure_exits_1(failure, tmp_path, monkeypatch):
    results = copy.deepcopy(CLEAN)
    FAILURES[failure](results)
    assert stubbed_main(tmp_path, monkeypatch, results) == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["verdict"]["passed"] is False and result["verdict"]["reasons"], result
    last = (tmp_path / "gpu_check.log").read_text().splitlines()[-1]
    assert "FAILED" in last and "passed in" not in last and "done" not in last, last


def test_the_tolerances_are_the_tables():
    from bn_triton.check import STAT_TOLERANCES, TOLERANCES

    assert gpu_check.allowed("bfloat16") == sum(TOLERANCES[torch.bfloat16])
    assert gpu_check.allowed("float32") == sum(TOLERANCES[torch.float32])
    assert gpu_check.allowed("float32", statistic=True) == max(
        sum(STAT_TOLERANCES[torch.float32]), sum(TOLERANCES[torch.float32]))


def test_pytest_collecting_nothing_fails_the_run(tmp_path, monkeypatch):
    """The issue's run, with the real tests stage: a selection that pytest cannot find (it
    returns 4 and passes nothing) makes the run exit 1."""
    monkeypatch.setattr(gpu_check, "TESTS_DRY", ["tests/test_gpu_check.py::test_no_such_test"])
    results = copy.deepcopy(CLEAN)
    real_tests = gpu_check.stage_tests

    def runner(stage):
        return real_tests if stage == "tests" else (lambda run: results[stage])

    monkeypatch.setattr(gpu_check, "RUNNERS", {stage: runner(stage) for stage in gpu_check.STAGES})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "200"]) == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tests"]["returncode"] == 4 and result["tests"]["passed"] == 0, result["tests"]
    assert "tests: pytest returned 4" in result["verdict"]["reasons"]


@triton.jit
def _copy_two_tiles(x_ptr, y_ptr, num_tiles, BLOCK: tl.constexpr):
    first = tl.program_id(0) * 2
    for tile in range(first, tl.minimum(first + 2, num_tiles)):  # as the split kernels loop
        offsets = tile * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets))


def test_the_interpreter_loops_over_program_ids(device):
    """What NumPy 2.4 breaks in triton 3.6's interpreter (int() of the one-element array a
    scalar is), and gpu_check.fix_interpreter mends for the dry run: a loop whose bounds come
    from the program id. Passes untouched where there is nothing to mend."""
    if device != "cpu":
        pytest.skip("the interpreter's")
    gpu_check.fix_interpreter()
    x = torch.arange(5 * 8, dtype=torch.float32)
    y = torch.zeros_like(x)
    _copy_two_tiles[(3,)](x, y, 5, BLOCK=8)
    assert torch.equal(x, y)
