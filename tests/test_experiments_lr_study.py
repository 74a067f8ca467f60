"""The learning-rate study (§4.2) end to end, shortened: 30 steps of each variant on the digits."""
import argparse
import json

from bn_triton.experiments import lr_study

STEPS = 20


def test_lr_study_short_run(tmp_path, launches, capsys, device):
    args = argparse.Namespace(steps=STEPS, data=None, out=str(tmp_path), seed=0, device=device)
    assert lr_study.main(args) == 0

    result = json.loads((tmp_path / "lr_study.json").read_text())
    assert set(result["variants"]) == set(lr_study.VARIANTS)
    for name, run in result["variants"].items():
        assert run["steps"][0] == 0 and run["steps"][-1] == STEPS, name
        assert len(run["test_accuracy"]) == len(run["steps"]), name
        assert len(run["train_loss"]) == STEPS, name
        assert "steps_to_baseline_best" in run and 0 <= run["best_accuracy"] <= 1, name
    # The Baseline reaches its own best, at the first evaluation that shows it.
    baseline = result["variants"]["Baseline"]
    assert baseline["steps_to_baseline_best"] == baseline["steps"][
        baseline["test_accuracy"].index(result["baseline_best_accuracy"])]

    loss = result["variants"]["BN-Baseline"]["train_loss"]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.8 * first, f"BN-Baseline's training loss did not fall: {first} -> {last}"

    assert (tmp_path / "lr_study.png").stat().st_size > 0
    assert launches.forward_calls() > 0 and launches.backward_calls() > 0
    printed = capsys.readouterr().out
    assert "batch norm path 'triton" in printed  # 'triton' or 'triton-interpreter', not 'torch'
    assert all(name in printed for name in lr_study.VARIANTS)
