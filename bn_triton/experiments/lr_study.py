"""§4.2 of Ioffe & Szegedy (2015), Figures 2 and 3, at a laptop's scale: what batch normalization
lets a convolutional network do with higher learning rates.

The network, small enough for the 8x8 digits (28x28 MNIST runs it unchanged):

    conv 3x3/2, 16 maps -> [BN] -> act -> conv 3x3/2, 32 maps -> [BN] -> act -> linear 10

with softmax cross-entropy. BN (bn_triton.BatchNorm2d, per feature map) sits between each
convolution and its nonlinearity (§3.2). The variants, as in the paper's Figure 3:

    Baseline        no BN, ReLU, base learning rate
    BN-Baseline     BN, ReLU, base learning rate
    BN-x5, BN-x30   BN, ReLU, learning rate x5, x30
    BN-x5-Sigmoid   BN, sigmoid instead of ReLU, learning rate x5

All start from the same weights (He-normal, one seed) and see the same mini-batches of 60; SGD
with momentum 0.9 at a constant learning rate. Only the learning rate and the nonlinearity change
between variants: the paper's other adjustments for BN (no dropout, less L2, faster decay, no
LRN) have nothing to act on in this net. The test set is evaluated every EVAL_EVERY steps
(inference mode: BN uses its running statistics), the resolution of the "steps to reach" column.

BASE_LR, measured with the digits on five seeds at 200 steps: at 0.01 the Baseline is still
climbing (best 94-95%), the BN variants reach that in fewer steps (BN-Baseline 80-130, BN-x5
30-50, BN-x30 30-60, BN-x5-Sigmoid 70-170, against 180-190) and peak higher (96-98%), as in the
paper. At 0.03-0.06, nearer the Baseline's own best rate (96-98%), BN-Baseline and BN-x5 still
get there first, but BN-x30 (0.9-1.8) diverges.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bn_triton

from .common import header, pick_device, progress, set_seed
from .data import Dataset, batches, load

DEFAULT_STEPS = 200  # about 3 minutes on a 2-core CPU with the kernels interpreted
BASE_LR = 0.01
MOMENTUM = 0.9
BATCH = 60
EVAL_EVERY = 10
CHANNELS = (16, 32)
VARIANTS = {  # name: (batch norm, nonlinearity, learning-rate multiple)
    "Baseline": (False, nn.ReLU, 1),
    "BN-Baseline": (True, nn.ReLU, 1),
    "BN-x5": (True, nn.ReLU, 5),
    "BN-x30": (True, nn.ReLU, 30),
    "BN-x5-Sigmoid": (True, nn.Sigmoid, 5),
}


def network(image_size: int, batch_norm: bool, activation) -> nn.Sequential:
    """The net above, He-normal weights, zero biases. The convolutions keep their biases with BN
    too (BN's mean subtraction cancels them) so that every variant draws the same weights."""
    def norm(channels: int) -> list:
        return [bn_triton.BatchNorm2d(channels)] if batch_norm else []

    c1, c2 = CHANNELS
    side = (image_size + 3) // 4  # after two stride-2 convolutions with padding 1
    model = nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2, padding=1), *norm(c1), activation(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), *norm(c2), activation(),
        nn.Flatten(), nn.Linear(c2 * side * side, 10))
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    # channels_last: with 4x4 and 2x2 maps, bn_triton's kernels then walk each channel across
    # the whole batch in long tiles rather than one short row per image; measured on the
    # interpreter, a training step takes 0.7x the time and a test-set evaluation 0.1x.
    return model.to(memory_format=torch.channels_last)


@torch.no_grad()
def accuracy(model: nn.Sequential, data: Dataset) -> float:
    model.eval()
    correct = (model(data.test_images).argmax(1) == data.test_labels).float().mean().item()
    model.train()
    return correct


def train(model: nn.Sequential, data: Dataset, lr: float, steps: int, seed: int,
          label: str) -> dict:
    """SGD with momentum for `steps` mini-batches; the test accuracy at step 0, every
    EVAL_EVERY steps and at the end; the training loss at every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    indices = batches(len(data.train_labels), BATCH, torch.Generator().manual_seed(seed))
    run = {"steps": [0], "test_accuracy": [accuracy(model, data)], "train_loss": []}
    for step in progress(steps, f"{label:13}"):
        batch = next(indices).to(data.train_labels.device)
        loss = F.cross_entropy(model(data.train_images[batch]), data.train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run["train_loss"].append(loss.item())
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            run["steps"].append(step + 1)
            run["test_accuracy"].append(accuracy(model, data))
    return run


def steps_to_reach(run: dict, level: float):
    """The first evaluated step with test accuracy >= level, or None."""
    return next((s for s, a in zip(run["steps"], run["test_accuracy"]) if a >= level), None)


def table(runs: dict, target: float) -> str:
    """Figure 3: the steps each variant needs to reach the Baseline's best test accuracy, and
    each variant's best."""
    lines = [f"{'Model':15}{f'Steps to {target:.2%}':>18}{'Max accuracy':>15}"]
    for name, run in runs.items():
        reached = run["steps_to_baseline_best"]
        lines.append(f"{name:15}{'never' if reached is None else reached:>18}"
                     f"{run['best_accuracy']:>15.2%}")
    return "\n".join(lines)


def plot(runs: dict, target: float, path: Path, title: str) -> None:
    """Figure 2: test accuracy against training steps; the Baseline's best dotted, and where
    each variant first reaches it marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.5, 4.8))
    for name, run in runs.items():
        line, = axis.plot(run["steps"], run["test_accuracy"],
                          "--" if name == "Baseline" else "-", label=name)
        if run["steps_to_baseline_best"] is not None:
            axis.plot(run["steps_to_baseline_best"], target, "o", color=line.get_color())
    axis.axhline(target, color="grey", linestyle=":", linewidth=1,
                 label=f"Baseline's best ({target:.2%})")
    axis.set(xlabel="training step", ylabel="test accuracy", title=title,
             ylim=(max(0.0, target - 0.2), 1.0))
    axis.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    data = load(args.data, device)
    print(header("lr-study (§4.2, Figures 2 and 3)", device, data))
    settings = {"steps": args.steps, "base_lr": BASE_LR, "momentum": MOMENTUM, "batch": BATCH,
                "eval_every": EVAL_EVERY, "channels": list(CHANNELS), "seed": args.seed,
                "data": data.source, "device": str(device),
                "path": bn_triton.backend(data.test_images)}
    print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()
                                   if k not in ("data", "device", "path")))
    start, runs = time.monotonic(), {}
    for name, (batch_norm, activation, multiple) in VARIANTS.items():
        set_seed(args.seed)  # the same initial weights for every variant
        model = network(data.train_images.shape[-1], batch_norm, activation).to(device)
        lr = BASE_LR * multiple
        runs[name] = {"batch_norm": batch_norm, "activation": activation.__name__, "lr": lr,
                      **train(model, data, lr, args.steps, args.seed, name)}
    target = max(runs["Baseline"]["test_accuracy"])
    for run in runs.values():
        run["best_accuracy"] = max(run["test_accuracy"])
        run["steps_to_baseline_best"] = steps_to_reach(run, target)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_study.json").write_text(json.dumps(
        {"settings": settings, "baseline_best_accuracy": target, "variants": runs}, indent=1))
    plot(runs, target, out / "lr_study.png",
         f"{data.source}: SGD, momentum {MOMENTUM}, batch {BATCH}, base lr {BASE_LR}")
    print(table(runs, target))
    print(f"{time.monotonic() - start:.0f} s; wrote {out / 'lr_study.json'} and "
          f"{out / 'lr_study.png'}")
    return 0
