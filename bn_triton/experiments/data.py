"""The images: scikit-learn's bundled 8x8 digits by default (no download), or MNIST from its four
IDX files (http://yann.lecun.com/exdb/mnist/), read here with numpy.

IDX layout: two zero bytes, a type code, the number of dims; then each dim as a big-endian
uint32; then the values, big-endian, in C order.
"""
import gzip
import os
from typing import Iterator, NamedTuple, Optional, Tuple

import numpy as np
import torch


class Dataset(NamedTuple):
    train_images: torch.Tensor  # (N, 1, H, W) float32 in [0, 1]
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# The digits split is fixed, whatever the experiment's seed: RandomState's stream is frozen
# by NumPy's compatibility policy, so the same 20% are the test set on every machine.
DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION = 0, 0.2


def read_idx(path: str) -> np.ndarray:
    """The array in an IDX file, plain or gzipped (by its .gz name). ValueError if malformed."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad magic number {raw[:4].hex() or '(empty file)'}: an IDX "
                         "file starts with two zero bytes, a type code and the number of dims")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated: the header names {ndim} dims, the file ends first")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[code])
    expected, found = int(np.prod(shape)) * dtype.itemsize, len(raw) - 4 - 4 * ndim
    if found != expected:
        raise ValueError(f"{path}: {'truncated' if found < expected else 'trailing bytes'}: "
                         f"shape {shape} needs {expected} bytes of data, the file holds {found}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(shape)


def read_mnist_file(data_dir: str, name: str, ndim: int) -> np.ndarray:
    """`name` or `name`.gz in data_dir, checked to hold unsigned bytes in `ndim` dims."""
    for path in (os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz")):
        if os.path.isfile(path):
            array = read_idx(path)
            if array.dtype != np.uint8 or array.ndim != ndim:
                raise ValueError(f"{path}: expected {ndim}-d unsigned bytes (IDX type 0x08), "
                                 f"found {array.ndim}-d {array.dtype}")
            return array
    raise FileNotFoundError(f"MNIST file {name} (or {name}.gz) not found in {data_dir}")


def load_mnist(data_dir: str) -> Tuple[np.ndarray, ...]:
    """(train_images, train_labels, test_images, test_labels); images in [0, 1]."""
    arrays = {key: read_mnist_file(data_dir, name, 3 if key.endswith("images") else 1)
              for key, name in MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[split + "_images"], arrays[split + "_labels"]
        if len(images) != len(labels):
            raise ValueError(f"{data_dir}: {MNIST_FILES[split + '_images']} holds {len(images)} "
                             f"images but {MNIST_FILES[split + '_labels']} {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{data_dir}: {MNIST_FILES[split + '_labels']} holds a label "
                             f"{labels.max()}, not a digit")
    return (arrays["train_images"].astype(np.float32) / 255, arrays["train_labels"],
            arrays["test_images"].astype(np.float32) / 255, arrays["test_labels"])


def load_digits_split() -> Tuple[np.ndarray, ...]:
    """scikit-learn's 1797 8x8 digits (values 0..16), split 80/20 by a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(digits.target))
    test, train = np.split(order, [round(DIGITS_TEST_FRACTION * len(order))])
    images = digits.images / 16.0
    return images[train], digits.target[train], images[test], digits.target[test]


def load(data_dir: Optional[str] = None, device="cpu") -> Dataset:
    """MNIST from the IDX files in data_dir, or by default scikit-learn's digits."""
    if data_dir is None:
        arrays, source = load_digits_split(), "scikit-learn digits (8x8)"
    else:
        arrays, source = load_mnist(data_dir), f"MNIST IDX files in {data_dir}"
    train_images, train_labels, test_images, test_labels = arrays

    def images(a):
        return torch.tensor(a, dtype=torch.float32, device=device).unsqueeze(1)

    def labels(a):
        return torch.tensor(a, dtype=torch.int64, device=device)

    return Dataset(images(train_images), labels(train_labels), images(test_images),
                   labels(test_labels), source)


def batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Mini-batch indices forever: a fresh permutation each epoch, cut into whole batches."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield order[start:start + size]
