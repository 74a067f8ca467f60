"""What the experiments share: the device, the printed header, a progress bar, the seed."""
import random
import sys
import time
from typing import Iterator, Optional

import numpy as np
import torch
import triton

import bn_triton

from .data import Dataset

PATHS = {"triton": "bn_triton's Triton kernels, compiled",
         "triton-interpreter": "bn_triton's Triton kernels through Triton's CPU interpreter",
         "torch": "torch's own batch_norm, not bn_triton's kernels"}


def pick_device(name: Optional[str]) -> torch.device:
    """`name` where given, else CUDA where there is a GPU, else the CPU."""
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def header(experiment: str, device, dataset: Dataset) -> str:
    """Two lines: the experiment, the device and the batch-norm path it runs, the versions; the
    data."""
    device = torch.device(device)
    path = bn_triton.backend(torch.empty(0, device=device))
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    height, width = dataset.train_images.shape[-2:]
    return (f"{experiment} on {device} ({machine}): batch norm path '{path}' ({PATHS[path]}); "
            f"torch {torch.__version__}, triton {triton.__version__}\n"
            f"data: {dataset.source}: {len(dataset.train_labels)} training and "
            f"{len(dataset.test_labels)} test images of {height}x{width}")


def progress(total: int, label: str, width: int = 30) -> Iterator[int]:
    """range(total), drawing `label [####......] done/total, elapsed, left` on stderr as the
    loop runs: at most once per percent, so a long run does not flood a log."""
    start = time.monotonic()

    def draw(done: int) -> None:
        elapsed = time.monotonic() - start
        left = elapsed / done * (total - done) if done else 0.0
        bar = "#" * (width * done // max(total, 1))
        sys.stderr.write(f"\r{label} [{bar:.<{width}}] {done}/{total}, "
                         f"{elapsed:.0f}s elapsed, {left:.0f}s left ")
        sys.stderr.flush()

    draw(0)
    try:
        for step in range(total):
            yield step
            if (step + 1) * 100 // total != step * 100 // total:
                draw(step + 1)
    finally:
        sys.stderr.write("\n")


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
