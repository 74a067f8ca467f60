"""The mnist experiment (§4.1) end to end on a few steps, the IDX reader on files written here,
the default data split, and the command line starting the interpreter by itself."""
import argparse
import gzip
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from bn_triton.experiments import data, mnist


def run_mnist(out, device, steps):
    args = argparse.Namespace(steps=steps, data=None, out=str(out), seed=0, device=device)
    assert mnist.main(args) == 0
    return json.loads((out / "mnist.json").read_text())


def test_mnist_end_to_end(tmp_path, device, launches, monkeypatch):
    monkeypatch.setattr(mnist, "EVALUATIONS", 4)  # test-set passes dominate a short run
    result = run_mnist(tmp_path, device, steps=40)
    assert launches.forward_calls() > 0 and launches.backward_calls() > 0
    for key in ("baseline", "bn"):
        run = result[key]
        assert run["steps"] == [0, 10, 20, 30, 40]
        assert len(run["test_accuracy"]) == 5 and len(run["train_loss"]) == 40
        assert sorted(run["sigmoid_input_percentiles"]) == ["15", "50", "85"]
        assert all(len(v) == 5 for v in run["sigmoid_input_percentiles"].values())
    loss = result["bn"]["train_loss"]
    assert np.mean(loss[-10:]) < np.mean(loss[:10]) - 0.5, loss
    assert result["settings"]["steps"] == 40 and result["settings"]["lr"] == mnist.LR
    assert result["settings"]["path"] in ("triton", "triton-interpreter")
    assert (tmp_path / "mnist.png").stat().st_size > 10_000


def test_mnist_same_seed_same_numbers(tmp_path, device, monkeypatch):
    monkeypatch.setattr(mnist, "EVALUATIONS", 2)
    first = run_mnist(tmp_path / "first", device, steps=4)
    second = run_mnist(tmp_path / "second", device, steps=4)
    assert first == second


def test_mnist_command_sets_up_the_interpreter(tmp_path):
    """Without TRITON_INTERPRET in its environment, the command restarts itself with it. (4
    steps: each interpreted test-set pass takes ~0.6 s, and a short run evaluates every step.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bn_triton.experiments", "mnist", "--steps", "4",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    expected = "'triton'" if torch.cuda.is_available() else "'triton-interpreter'"
    assert expected in done.stdout.splitlines()[0], done.stdout
    assert (tmp_path / "mnist.json").exists() and (tmp_path / "mnist.png").exists()


def test_default_data_is_the_fixed_digits_split():
    torch.manual_seed(123)
    np.random.seed(123)  # the split must not follow the experiment's seed
    first, second = data.load(), data.load()
    assert first.train_images.shape == (1438, 1, 8, 8) and first.test_images.shape == (359, 1, 8, 8)
    assert first.train_images.dtype == torch.float32 and first.train_labels.dtype == torch.int64
    assert first.train_images.min() >= 0 and first.train_images.max() == 1
    assert set(first.test_labels.tolist()) == set(range(10))
    assert torch.equal(first.test_labels, second.test_labels)
    assert first.source == "scikit-learn digits (8x8)"


# --- IDX files --------------------------------------------------------------------------------

def write_idx(path, array, code=0x08, cut=0):
    """`array` as an IDX file (gzipped when the name ends in .gz), less its last `cut` bytes."""
    raw = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    raw = (raw + array.tobytes())[:len(raw) + array.nbytes - cut]
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def write_mnist(folder, n_train=6, n_test=4, gz=(True, False, False, True)):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_test, dtype=np.uint8)]
    for name, array, zipped in zip(data.MNIST_FILES.values(), arrays, gz):
        write_idx(folder / (name + ".gz" * zipped), array)
    return arrays


@pytest.mark.parametrize("name", ["plain", "plain.gz"])
def test_read_idx(tmp_path, name):
    for array, code in ((np.arange(60, dtype=np.uint8).reshape(3, 4, 5), 0x08),
                        (np.linspace(-1, 1, 7).astype(">f4"), 0x0D)):
        write_idx(tmp_path / name, array, code)
        np.testing.assert_array_equal(data.read_idx(str(tmp_path / name)), array)


def test_load_mnist(tmp_path):
    train_images, train_labels, test_images, test_labels = write_mnist(tmp_path)
    mnist_data = data.load(str(tmp_path))
    assert mnist_data.train_images.shape == (6, 1, 28, 28) and mnist_data.test_labels.shape == (4,)
    assert mnist_data.train_images.dtype == torch.float32
    assert mnist_data.test_labels.dtype == torch.int64
    torch.testing.assert_close(mnist_data.test_images[:, 0], torch.tensor(test_images / 255.0,
                                                                          dtype=torch.float32))
    assert mnist_data.train_labels.tolist() == train_labels.tolist()
    assert str(tmp_path) in mnist_data.source


def test_missing_mnist_file(tmp_path):
    write_mnist(tmp_path)
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    where = re.escape(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"t10k-images-idx3-ubyte .*not found in {where}"):
        data.load(str(tmp_path))


MALFORMED = [  # (what is wrong, how the test-set labels file is written, the error's words)
    ("bad magic", lambda path: path.write_bytes(b"\x08\x03\x00\x00" + bytes(12)), "bad magic"),
    ("truncated data", lambda path: write_idx(path, np.zeros(4, np.uint8), cut=1), "truncated"),
    ("truncated header", lambda path: path.write_bytes(b"\x00\x00\x08\x01\x00"), "truncated"),
    ("int32 labels", lambda path: write_idx(path, np.zeros(4, ">i4"), code=0x0C), "unsigned bytes"),
    ("5 labels, 4 images", lambda path: write_idx(path, np.zeros(5, np.uint8)), "4 images but"),
]


@pytest.mark.parametrize("write, message", [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_mnist_file(tmp_path, write, message):
    write_mnist(tmp_path, gz=(True, False, False, False))
    write(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(ValueError, match=message):
        data.load(str(tmp_path))
