"""The renorm experiment (Batch Renormalization's two settings) end to end on a few steps, its
non-i.i.d. sampler, its schedule, and the command line."""
import argparse
import json
import os
import subprocess
import sys

import torch

import bn_triton
from bn_triton.experiments import data, renorm

STEPS = 20


def run_renorm(out, device, steps):
    args = argparse.Namespace(steps=steps, data=None, out=str(out), seed=0, device=device)
    assert renorm.main(args) == 0
    return json.loads((out / "renorm.json").read_text())


def test_renorm_end_to_end(tmp_path, device, launches, monkeypatch, capsys):
    monkeypatch.setattr(renorm, "EVALUATIONS", 4)  # every 5 steps: test-set passes are slow
    calls = []  # each Batch Renorm call: training or not, its limits, the launches it made
    forward = bn_triton.BatchRenorm1d.forward

    def counted(self, input):
        before = len(launches)
        output = forward(self, input)
        calls.append((self.training, self.r_max, self.d_max, len(launches) - before))
        return output

    monkeypatch.setattr(bn_triton.BatchRenorm1d, "forward", counted)
    result = run_renorm(tmp_path, device, STEPS)

    assert set(result["variants"]) == set(renorm.VARIANTS)
    # The same initial weights: before training, every variant is the same network.
    assert len({run["test_accuracy"][0] for run in result["variants"].values()}) == 1
    for name, run in result["variants"].items():
        setting, is_renorm, batch, classes = renorm.VARIANTS[name]
        assert run["steps"] == [0, 5, 10, 15, 20], name
        assert len(run["test_accuracy"]) == 5 and len(run["train_loss"]) == STEPS, name
        assert run["layer"] == ("BatchRenorm1d" if is_renorm else "BatchNorm1d"), name
        assert (run["setting"], run["batch"], run["classes_per_batch"]) == (setting, batch,
                                                                            classes)
        assert run["final_accuracy"] == run["test_accuracy"][-1]
        assert run["best_accuracy"] == max(run["test_accuracy"])
        assert ("r_max" in run) == ("d_max" in run) == is_renorm, name
        if is_renorm:
            # The limits the layers held at each evaluation: those of the step before it (at
            # step 0, the first step's): plain BN (1, 0), then up the ramps to (3, 5).
            expected = [renorm.limits(max(step - 1, 0), STEPS) for step in run["steps"]]
            assert list(zip(run["r_max"], run["d_max"])) == expected, name
            assert expected[0] == (1.0, 0.0) and expected[-1] == (renorm.R_MAX, renorm.D_MAX)
            assert 1.0 < expected[1][0] < renorm.R_MAX and 0 < expected[1][1] < renorm.D_MAX
    assert result["settings"]["schedule"] == {"warmup_end": 1, "r_max_full": 8,
                                              "d_max_full": 5}
    assert result["settings"]["steps"] == STEPS and result["settings"]["lr"] == renorm.LR
    assert result["settings"]["path"] in ("triton", "triton-interpreter")

    # Batch Renorm really ran: 2 layers x STEPS training calls in each of its 2 variants, with
    # every step of the schedule, and on Triton kernels like the BN variants'.
    training = [call for call in calls if call[0]]
    assert len(training) == 2 * 2 * STEPS
    limits = [renorm.limits(step, STEPS) for step in range(STEPS)]
    assert [call[1:3] for call in training] == [x for x in limits for _ in range(2)] * 2
    assert all(call[3] > 0 for call in calls), "a Batch Renorm call launched no Triton kernel"
    assert launches.forward_calls() > 0 and launches.backward_calls() > 0

    loss = result["variants"]["BN-32"]["train_loss"]
    assert sum(loss[-5:]) < 0.8 * sum(loss[:5]), f"BN-32's training loss did not fall: {loss}"
    assert (tmp_path / "renorm.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "batch norm path 'triton" in printed  # 'triton' or 'triton-interpreter', not 'torch'
    assert all(name in printed for name in renorm.VARIANTS)


def test_renorm_same_seed_same_numbers(tmp_path, device, monkeypatch):
    monkeypatch.setattr(renorm, "EVALUATIONS", 1)
    first = run_renorm(tmp_path / "first", device, steps=3)
    second = run_renorm(tmp_path / "second", device, steps=3)
    assert first == second


def test_non_iid_batches_hold_only_few_classes():
    labels = data.load().train_labels
    draws = renorm.class_batches(labels, 32, 2, torch.Generator().manual_seed(0))
    again = renorm.class_batches(labels, 32, 2, torch.Generator().manual_seed(0))
    drawn, chosen = torch.zeros(len(labels), dtype=torch.int64), set()
    for _ in range(200):
        batch = next(draws)
        assert torch.equal(batch, next(again))  # deterministic for a seed
        assert batch.shape == (32,) and len(set(batch.tolist())) == 32  # no example twice
        classes, counts = torch.unique(labels[batch], return_counts=True)
        assert len(classes) == 2 and counts.tolist() == [16, 16]
        chosen.update(classes.tolist())
        drawn[batch] += 1
    # The classes vary from batch to batch, and within each class every example is drawn:
    # 200 batches are about 4 epochs of each class.
    assert chosen == set(range(10)) and drawn.min() >= 1
    # A class smaller than its share of a batch (a tiny data set) repeats its examples.
    tiny = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    batch = next(renorm.class_batches(tiny, 8, 2, torch.Generator().manual_seed(0)))
    assert sorted(torch.bincount(tiny[batch]).tolist()) == [4, 4]


def test_schedule_is_the_papers_scaled():
    """5% of the run plain batch norm; d_max at 5 by 25%, r_max at 3 by 40% (the paper's 5k,
    25k and 40k steps)."""
    assert renorm.limits(0, 400) == renorm.limits(19, 400) == (1.0, 0.0)
    assert renorm.limits(100, 400)[1] == renorm.D_MAX and renorm.limits(99, 400)[1] < 5
    assert renorm.limits(160, 400)[0] == renorm.R_MAX and renorm.limits(159, 400)[0] < 3
    r_max = [renorm.limits(step, 400)[0] for step in range(400)]
    assert r_max == sorted(r_max)


def test_renorm_command_sets_up_the_interpreter(tmp_path):
    """The sub-command through `python -m`, without TRITON_INTERPRET set: it restarts itself
    with it and writes its two files."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bn_triton.experiments", "renorm", "--steps",
                           "2", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = "'triton'" if torch.cuda.is_available() else "'triton-interpreter'"
    assert expected in done.stdout.splitlines()[0], done.stdout
    assert (tmp_path / "renorm.json").exists() and (tmp_path / "renorm.png").exists()
