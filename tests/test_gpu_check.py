"""python -m benchmarks.gpu_check: its dry run (every stage, on the CPU through the
interpreter) passes here, so the command is known to work before it meets a GPU; a short budget
cuts cases, not stages; a failing stage is recorded and the next one runs."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert list(result["stages"]) == list(gpu_check.STAGES)
    assert all(stage["status"] == "ok" for stage in result["stages"].values()), result["stages"]
    assert result["environment"]["bn_triton_path"] == "triton-interpreter"
    assert result["environment"]["copy_bandwidth_gbs"] > 0
    tests = result["tests"]
    assert tests["passed"] >= 3 and tests["failed"] == tests["error"] == 0, tests
    kernels = result["kernels"]
    assert kernels["cut"] == []
    for provider in ("bn_triton", "torch", "torch.compile"):
        rows = [r for r in kernels["rows"] if r["provider"] == provider and r["variant"] == "bn"]
        assert len(rows) == len(gpu_check.DRY_CASES) * len(gpu_check.KERNEL_MODES), provider
        assert all("ms" in r and r["gbs"] > 0 and r["setup_s"] >= 0 for r in rows), rows
    assert all(set(r["speedup"]) == {"torch", "torch.compile"}
               for r in kernels["rows"] if r["provider"] == "bn_triton")
    variants = result["model"]["variants"]
    assert list(variants) == list(model_step.VARIANTS)
    for name, variant in variants.items():
        assert variant["images_per_s"] > 0, (name, variant)
        if name != "torch":
            assert variant["outputs_max_relative_difference"] < 1e-4, (name, variant)
            assert variant["grads_max_relative_difference"] < 1e-4, (name, variant)
    assert result["model"]["cuda_graph"] == {"skipped": "needs CUDA"}
    sync = result["model"]["sync"]
    assert sync["backend"] == "gloo" and sync["sync_layers"] == 7, sync
    assert sync["collective_events_in_a_step"] >= 2 * 7, sync  # one each way a layer
    assert sync["outputs_max_relative_difference"] < 1e-5, sync
    assert sync["grads_max_relative_difference"] < 1e-4, sync
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


def test_a_short_budget_cuts_cases_not_stages(tmp_path):
    done = dry_run(tmp_path, budget_s=12, timeout_s=200)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(result["stages"]) == list(gpu_check.STAGES), done.stderr[-3000:]
    assert result["kernels"]["cut"] or any(
        "skipped" in v for v in result["model"]["variants"].values())
    assert (tmp_path / "gpu_check.log").exists()


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
