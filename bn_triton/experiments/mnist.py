"""§4.1 of Ioffe & Szegedy (2015), Figure 1: the same sigmoid network trained with and without
batch normalization.

The network: 3 fully connected hidden layers of 100 sigmoid units, weights drawn from a small
Gaussian, biases 0, a linear layer to the 10 classes and cross-entropy; mini-batches of 60,
plain SGD. With BN, each hidden layer is Linear -> bn_triton.BatchNorm1d -> sigmoid (BN before
the nonlinearity, §3.2). Both networks start from the same weights and see the same batches.
Every few steps: the test accuracy (Figure 1a) and the 15th/50th/85th percentiles, over the test
set, of the input to one sigmoid of the last hidden layer (Figures 1b, 1c).
"""
import argparse
import json
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import bn_triton

from .common import header, pick_device, progress, set_seed
from .data import Dataset, batches, load

DEFAULT_STEPS = 400  # the whole command: ~2 minutes on a 2-core CPU, kernels interpreted
LR = 1.0
BATCH = 60
HIDDEN = 100
# "Small random Gaussian values". At 0.01 the baseline's three sigmoid layers pass almost no
# signal and at this LR it stays at chance for ~1500 steps on the digits; at 0.2 (half of Glorot's
# 4·sqrt(2/(100+100)) for sigmoids) it learns within the default run, slower than with BN.
INIT_STD = 0.2
EVALUATIONS = 20  # test-set evaluations per run, evenly spaced
UNIT = 0  # the sigmoid of the last hidden layer whose input Figures 1b/1c follow
PERCENTILES = (15, 50, 85)
LEVELS = (0.80, 0.90, 0.95)


def network(n_inputs: int, batch_norm: bool) -> nn.Sequential:
    """(Linear -> [BN ->] sigmoid) x 3 -> Linear to 10. The BN network keeps its Linear biases,
    which BN's mean subtraction cancels, so that both networks draw the same initial weights."""
    layers, width = [nn.Flatten()], n_inputs
    for _ in range(3):
        layers.append(nn.Linear(width, HIDDEN))
        if batch_norm:
            layers.append(bn_triton.BatchNorm1d(HIDDEN))
        layers.append(nn.Sigmoid())
        width = HIDDEN
    layers.append(nn.Linear(width, 10))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=INIT_STD)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


@torch.no_grad()
def evaluate(model: nn.Sequential, data: Dataset) -> Tuple[float, List[float]]:
    """Test accuracy, and the PERCENTILES of the input to the last hidden layer's sigmoid UNIT
    over the test set (inference mode: BN uses its running statistics)."""
    model.eval()
    sigmoid_input = model[:-2](data.test_images)  # everything before the last sigmoid
    logits = model[-2:](sigmoid_input)
    model.train()
    accuracy = (logits.argmax(1) == data.test_labels).float().mean().item()
    q = torch.tensor(PERCENTILES, dtype=torch.float32, device=sigmoid_input.device) / 100
    return accuracy, torch.quantile(sigmoid_input[:, UNIT], q).tolist()


def train(model: nn.Sequential, data: Dataset, steps: int, every: int, seed: int,
          label: str) -> dict:
    """SGD for `steps` mini-batches; the test set evaluated at step 0, every `every` steps and
    at the end. Returns the curves."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    indices = batches(len(data.train_labels), BATCH, torch.Generator().manual_seed(seed))
    run = {"steps": [], "test_accuracy": [], "train_loss": [],
           "sigmoid_input_percentiles": {str(p): [] for p in PERCENTILES}}

    def record(step: int) -> None:
        accuracy, percentiles = evaluate(model, data)
        run["steps"].append(step)
        run["test_accuracy"].append(accuracy)
        for p, value in zip(PERCENTILES, percentiles):
            run["sigmoid_input_percentiles"][str(p)].append(value)

    record(0)
    for step in progress(steps, label):
        batch = next(indices).to(data.train_labels.device)
        loss = F.cross_entropy(model(data.train_images[batch]), data.train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run["train_loss"].append(loss.item())  # one value per step
        if (step + 1) % every == 0 or step + 1 == steps:
            record(step + 1)
    return run


def steps_to_reach(run: dict, level: float) -> Optional[int]:
    """The first evaluated step with test accuracy >= level, or None."""
    return next((s for s, a in zip(run["steps"], run["test_accuracy"]) if a >= level), None)


def summary(runs: dict, every: int) -> str:
    """A table: each network's final test accuracy and the steps it took to reach LEVELS."""
    columns = ["final accuracy"] + [f"steps to {level:.0%}" for level in LEVELS]
    lines = [" " * 12 + "".join(f"{column:>16}" for column in columns)
             + f"   (test set evaluated every {every} steps)"]
    for key, name in (("baseline", "without BN"), ("bn", "with BN")):
        reached = [steps_to_reach(runs[key], level) for level in LEVELS]
        cells = [f"{runs[key]['test_accuracy'][-1]:.4f}"] + [
            "never" if step is None else str(step) for step in reached]
        lines.append(f"{name:12}" + "".join(f"{cell:>16}" for cell in cells))
    return "\n".join(lines)


def plot(runs: dict, path: Path, title: str) -> None:
    """Figure 1 (a, b, c): test accuracy; the sigmoid input's percentiles without and with BN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    c.sharey(b)  # one scale, so that the two distributions compare at a glance
    for key, name, style in (("baseline", "Without BN", "--"), ("bn", "With BN", "-")):
        a.plot(runs[key]["steps"], runs[key]["test_accuracy"], style, label=name)
    a.set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy", ylim=(0, 1))
    a.legend(loc="lower right")
    for axis, key, name in ((b, "baseline", "(b) without BN"), (c, "bn", "(c) with BN")):
        for p, values in runs[key]["sigmoid_input_percentiles"].items():
            axis.plot(runs[key]["steps"], values, label=f"{p}th")
        axis.set(title=f"{name}: input to one last-layer sigmoid", xlabel="training step")
    low, high = b.get_ylim()
    b.set_ylim(low - 0.3 * (high - low), high)  # room for the legends below the curves
    for axis in (b, c):
        axis.legend(title="percentile over the test set", loc="lower center", ncol=3,
                    fontsize="small", title_fontsize="small")
    b.set_ylabel("sigmoid input")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    if device.type == "cpu":
        # 60x100 matrices gain nothing from threads; one thread gives the same numbers on any
        # CPU, and does not stall when another process holds a core (2 threads: 3x slower).
        torch.set_num_threads(1)
    data = load(args.data, device)
    print(header("mnist (§4.1, Figure 1)", device, data))
    settings = {"steps": args.steps, "lr": LR, "batch": BATCH, "hidden": [HIDDEN] * 3,
                "init_std": INIT_STD, "evaluated_every": max(1, args.steps // EVALUATIONS),
                "seed": args.seed, "data": data.source,
                "device": str(device), "path": bn_triton.backend(data.test_images),
                "sigmoid_unit": UNIT}
    print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()
                                   if k not in ("data", "device", "path")))
    start, runs = time.monotonic(), {}
    for key, batch_norm in (("baseline", False), ("bn", True)):
        set_seed(args.seed)  # the same initial weights for both networks
        model = network(data.train_images[0].numel(), batch_norm).to(device)
        runs[key] = train(model, data, args.steps, settings["evaluated_every"], args.seed,
                          "with BN" if batch_norm else "without BN")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mnist.json").write_text(json.dumps({"settings": settings, **runs}, indent=1))
    plot(runs, out / "mnist.png", f"{data.source}, {args.steps} steps of SGD (lr {LR}, "
                                  f"batch {BATCH}), batch norm on '{settings['path']}'")
    print(summary(runs, settings["evaluated_every"]))
    print(f"{time.monotonic() - start:.0f} s; wrote {out / 'mnist.json'} and {out / 'mnist.png'}")
    return 0
