"""Batch Renormalization (Ioffe, NeurIPS 2017, arXiv:1702.03275), its two experiments at a
laptop's scale: where batch norm's minibatch statistics fail it, and what renormalizing does.

1. Small minibatches: batches of 4. Batch norm normalizes each feature by the mean and variance
   of 4 values, noisy statistics the network never meets at inference, where the running
   averages replace them. Batch norm and Batch Renorm at 4, and batch norm at 32 (i.i.d.) as
   the reference.
2. Non-i.i.d. minibatches: batches of 32 drawn from CLASSES_PER_BATCH classes only (the
   paper's were 16 labels of ImageNet's 1000, 2 images each; here 16 images of each of 2 of the
   10 digits). A batch's statistics then tell the network which classes the batch holds, and
   at inference, on one population's running averages, that cue is gone. Batch norm and Batch
   Renorm on such batches; batch norm at 32 on i.i.d. batches is the same reference run.

The network: 2 fully connected hidden layers of HIDDEN ReLU units,

    linear -> [bn_triton.BatchNorm1d | bn_triton.BatchRenorm1d] -> relu, twice -> linear 10

softmax cross-entropy, SGD with momentum 0.9 at one constant learning rate for every variant.
All variants start from the same weights (one seed); variants with the same batch size and
sampler see the same minibatches. The test set is evaluated in inference mode (eval(): the
running statistics), EVALUATIONS times per run.

Batch Renorm's r and d are clipped to [1/r_max, r_max] and [-d_max, d_max]; the paper holds
r_max = 1, d_max = 0 (plain batch norm) for its first 5k steps, then relaxes them linearly to
reach r_max = 3 at 40k steps and d_max = 5 at 25k. Here those marks are WARMUP, R_FULL and
D_FULL of the run's steps (bn_triton.nn.renorm.renorm_limits), set on every layer before each step.

LR, CLASSES_PER_BATCH, measured with the digits on the torch path (the same layers without the
interpreter, seconds a run) over the mean of the last 5 evaluations, 400 steps: at 0.05, on
seeds 0-9, Batch Renorm is ahead of batch norm on every seed in both settings (by 6-7 points
on average), and batch norm at 32 on i.i.d. batches ahead of both (97-98%). At 0.02 (seeds 0-4)
the gaps narrow (BN-4 90%, BRN-4 93%; non-i.i.d. 91% and 96%); at 0.1 batch norm at 4 and on
2-class batches falls to about 50% and Batch Renorm to 70-78%. With 4 classes a batch instead
of 2, batch norm loses nothing to i.i.d. batches (97.6% for both layers): the second setting
needs batches this lopsided to show at all on 10 classes.
"""
import argparse
import json
import time
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import bn_triton
from bn_triton.nn.renorm import renorm_limits, set_renorm_limits

from .common import header, pick_device, progress, set_seed
from .data import Dataset, batches, load

DEFAULT_STEPS = 400  # the whole command: about 3 minutes on a 2-core CPU, kernels interpreted
LR = 0.05
MOMENTUM = 0.9
HIDDEN = 64
SMALL_BATCH, BATCH = 4, 32
CLASSES_PER_BATCH = 2
EVALUATIONS = 20  # test-set evaluations per run, evenly spaced (and one at step 0)
LAST = 5  # the table's "mean of the last evaluations"
R_MAX, D_MAX = 3.0, 5.0
# The paper's schedule (5k steps of plain BN; r_max at 3 by 40k, d_max at 5 by 25k) as
# fractions of the run.
WARMUP, R_FULL, D_FULL = 0.05, 0.40, 0.25
VARIANTS = {  # name: (setting, Batch Renorm, batch size, classes per batch or None for i.i.d.)
    "BN-4": ("small minibatches", False, SMALL_BATCH, None),
    "BRN-4": ("small minibatches", True, SMALL_BATCH, None),
    "BN-32": ("reference", False, BATCH, None),
    "BN-noniid": ("non-i.i.d. minibatches", False, BATCH, CLASSES_PER_BATCH),
    "BRN-noniid": ("non-i.i.d. minibatches", True, BATCH, CLASSES_PER_BATCH),
}
PANELS = (("(a) small minibatches (4 examples)", ("BN-4", "BRN-4", "BN-32")),
          (f"(b) non-i.i.d. minibatches ({CLASSES_PER_BATCH} classes each)",
           ("BN-noniid", "BRN-noniid", "BN-32")))


def network(n_inputs: int, renorm: bool) -> nn.Sequential:
    """The MLP above, torch's default initialization. Both layer kinds hold the same
    parameters and buffers, so every variant draws the same initial weights from one seed."""
    norm = bn_triton.BatchRenorm1d if renorm else bn_triton.BatchNorm1d
    layers, width = [nn.Flatten()], n_inputs
    for _ in range(2):
        layers += [nn.Linear(width, HIDDEN), norm(HIDDEN), nn.ReLU()]
        width = HIDDEN
    return nn.Sequential(*layers, nn.Linear(width, 10))


def class_batches(labels: torch.Tensor, size: int, classes: int,
                  generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Non-i.i.d. minibatch indices forever: each batch holds `size` // `classes` examples of
    each of `classes` classes drawn at random (the rest of `size` from the first of them).
    Each class hands out its examples in a permutation of its own, a fresh one when what is
    left of the last is short of a batch's share: every example is seen, none twice in a
    batch (unless a class holds fewer than its share)."""
    present = torch.unique(labels).tolist()
    classes = min(classes, len(present))
    pools = {c: torch.nonzero(labels.cpu() == c).flatten() for c in present}
    orders = {c: torch.empty(0, dtype=torch.int64) for c in present}
    while True:
        chosen = [present[i] for i in torch.randperm(len(present), generator=generator)[:classes]]
        counts = [size // classes] * classes
        counts[0] += size - sum(counts)
        batch = []
        for c, count in zip(chosen, counts):
            if len(orders[c]) < count:
                orders[c] = orders[c][:0]
                while len(orders[c]) < count:
                    fresh = pools[c][torch.randperm(len(pools[c]), generator=generator)]
                    orders[c] = torch.cat([orders[c], fresh])
            batch.append(orders[c][:count])
            orders[c] = orders[c][count:]
        yield torch.cat(batch)


def schedule(steps: int) -> Dict[str, int]:
    """The steps of a run of `steps` where plain batch norm ends, r_max reaches R_MAX and
    d_max reaches D_MAX."""
    return {"warmup_end": round(WARMUP * steps), "r_max_full": round(R_FULL * steps),
            "d_max_full": round(D_FULL * steps)}


def limits(step: int, steps: int) -> Tuple[float, float]:
    """(r_max, d_max) for training step `step` of `steps`: the paper's schedule, scaled."""
    marks = schedule(steps)
    warmup = marks["warmup_end"]
    return renorm_limits(step, warmup, marks["r_max_full"] - warmup,
                         marks["d_max_full"] - warmup, R_MAX, D_MAX)


BATCH_RENORM = (bn_triton.BatchRenorm1d, bn_triton.BatchRenorm2d, bn_triton.BatchRenorm3d)


def layer_limits(model: nn.Module) -> Tuple[float, float]:
    """(r_max, d_max) as the model's Batch Renorm layers hold them (all alike)."""
    held = {(m.r_max, m.d_max) for m in model.modules() if isinstance(m, BATCH_RENORM)}
    assert len(held) == 1, held
    return held.pop()



@torch.no_grad()
def accuracy(model: nn.Sequential, data: Dataset) -> float:
    """Test accuracy in inference mode: batch norm and Batch Renorm on their running
    statistics."""
    model.eval()
    correct = (model(data.test_images).argmax(1) == data.test_labels).float().mean().item()
    model.train()
    return correct


def train(model: nn.Sequential, data: Dataset, renorm: bool, batch: int, classes,
          steps: int, every: int, seed: int, label: str) -> dict:
    """SGD with momentum for `steps` minibatches; the test accuracy at step 0, every `every`
    steps and at the end, with the Batch Renorm limits the layers held for the last step; the
    training loss at every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(seed)
    if classes is None:
        indices = batches(len(data.train_labels), batch, generator)
    else:
        indices = class_batches(data.train_labels, batch, classes, generator)
    run = {"steps": [], "test_accuracy": [], "train_loss": []}
    if renorm:
        run.update(r_max=[], d_max=[])
        set_renorm_limits(model, *limits(0, steps))

    def record(step: int) -> None:
        run["steps"].append(step)
        run["test_accuracy"].append(accuracy(model, data))
        if renorm:
            r_max, d_max = layer_limits(model)
            run["r_max"].append(r_max)
            run["d_max"].append(d_max)

    record(0)
    for step in progress(steps, f"{label:10}"):
        if renorm:
            set_renorm_limits(model, *limits(step, steps))
        chosen = next(indices).to(data.train_labels.device)
        loss = F.cross_entropy(model(data.train_images[chosen]), data.train_labels[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run["train_loss"].append(round(loss.item(), 5))  # 5 decimals: a small JSON
        if (step + 1) % every == 0 or step + 1 == steps:
            record(step + 1)
    return run


def table(runs: Dict[str, dict]) -> str:
    """Each variant's setting, batch, final and best test accuracy, and the mean of its LAST
    evaluations (the curves are noisy at batch 4)."""
    columns = ("setting", "batch", "final", "best", f"mean of last {LAST}")
    lines = [f"{'variant':12}{columns[0]:24}" + "".join(f"{c:>16}" for c in columns[1:])]
    for name, run in runs.items():
        batch = f"{run['batch']}" + ("" if run["classes_per_batch"] is None
                                     else f" ({run['classes_per_batch']} classes)")
        cells = (batch, f"{run['final_accuracy']:.2%}", f"{run['best_accuracy']:.2%}",
                 f"{run['last_mean_accuracy']:.2%}")
        lines.append(f"{name:12}{run['setting']:24}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def plot(runs: Dict[str, dict], path: Path, title: str) -> None:
    """Test accuracy against steps in each setting, with batch norm at 32 on i.i.d. batches
    dotted in both; and Batch Renorm's limits at each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [3, 3, 2]})
    styles = {"BN-32": ("k:", "BN, batch 32, i.i.d. (reference)")}
    for axis, (name, variants) in zip(axes, PANELS):
        for key in variants:
            style, label = styles.get(key, ("-" if runs[key]["renorm"] else "--", None))
            if label is None:
                run = runs[key]
                label = (f"{'Batch Renorm' if run['renorm'] else 'BN'}, batch {run['batch']}"
                         + ("" if run["classes_per_batch"] is None
                            else f" of {run['classes_per_batch']} classes"))
            axis.plot(runs[key]["steps"], runs[key]["test_accuracy"], style, label=label)
        axis.set(title=name, xlabel="training step", ylabel="test accuracy (running statistics)",
                 ylim=(0, 1))
        axis.legend(loc="lower right")
    schedule, steps = axes[2], runs["BRN-4"]["steps"][-1]
    r_max, d_max = zip(*(limits(step, steps) for step in range(steps)))
    schedule.plot(range(steps), r_max, "-", label="r_max")
    schedule.plot(range(steps), d_max, "--", label="d_max")
    schedule.set(title="(c) Batch Renorm's limits", xlabel="training step", ylabel="limit",
                 ylim=(-0.2, max(R_MAX, D_MAX) + 0.5))
    schedule.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # small matrices; the same numbers on any CPU (see mnist.py)
    data = load(args.data, device)
    print(header("renorm (Batch Renormalization, Ioffe 2017)", device, data))
    every = max(1, args.steps // EVALUATIONS)
    settings = {"steps": args.steps, "lr": LR, "momentum": MOMENTUM, "hidden": [HIDDEN] * 2,
                "small_batch": SMALL_BATCH, "batch": BATCH,
                "classes_per_batch": CLASSES_PER_BATCH, "evaluated_every": every,
                "r_max": R_MAX, "d_max": D_MAX,
                "schedule": schedule(args.steps),
                "seed": args.seed, "data": data.source, "device": str(device),
                "path": bn_triton.backend(data.test_images)}
    print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()
                                   if k not in ("data", "device", "path")))
    start, runs = time.monotonic(), {}
    for name, (setting, renorm, batch, classes) in VARIANTS.items():
        set_seed(args.seed)  # the same initial weights for every variant
        model = network(data.train_images[0].numel(), renorm).to(device)
        run = train(model, data, renorm, batch, classes, args.steps, every, args.seed, name)
        accuracies = run["test_accuracy"]
        runs[name] = {"setting": setting, "renorm": renorm,
                      "layer": type(model[2]).__name__, "batch": batch,
                      "classes_per_batch": classes, "final_accuracy": accuracies[-1],
                      "best_accuracy": max(accuracies),
                      "last_mean_accuracy": sum(accuracies[-LAST:]) / len(accuracies[-LAST:]),
                      **run}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "renorm.json").write_text(json.dumps({"settings": settings, "variants": runs},
                                                indent=1))
    plot(runs, out / "renorm.png",
         f"{data.source}: SGD (lr {LR}, momentum {MOMENTUM}), {args.steps} steps, batch norm "
         f"on '{settings['path']}'")
    print(table(runs))
    print(f"{time.monotonic() - start:.0f} s; wrote {out / 'renorm.json'} and "
          f"{out / 'renorm.png'}")
    return 0
