"""What the experiments share: the device, the printed header, a progress bar, the seed."""
import random
from typing import Iterator, Optional

import numpy as np
import torch
import triton
from tqdm import tqdm

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


def progress(total: int, label: str) -> Iterator[int]:
    """range(total) with a tqdm progress bar on stderr: the label, steps done, rate, elapsed
    and time left."""
    return iter(tqdm(range(total), desc=label, unit="step", dynamic_ncols=True))


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
