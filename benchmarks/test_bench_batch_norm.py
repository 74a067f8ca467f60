"""pytest-benchmark: bn_triton against torch on the same tensors.

    python -m pytest benchmarks/ --benchmark-only            (GPU: compiled kernels)

On a CUDA device each timed call ends in a synchronize. Without one the kernels run through
Triton's interpreter (set below, before triton is imported), whose times say nothing about a
GPU; there the cases are scaled down so the suite stays short.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import bn_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (name, shape on a GPU, shape under the interpreter)
CASES = [
    ("resnet50-bn2d-64x56x56", (32, 64, 56, 56), (4, 8, 28, 28)),
    ("resnet50-bn2d-2048x7x7", (32, 2048, 7, 7), (4, 64, 7, 7)),
    ("mlp-bn1d-4096", (256, 4096), (64, 256)),
]
PROVIDERS = {"bn_triton": bn_triton.batch_norm, "torch": F.batch_norm}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,gpu_shape,cpu_shape", CASES, ids=[c[0] for c in CASES])
def test_train_forward_backward(benchmark, name, gpu_shape, cpu_shape, memory_format, provider):
    shape = gpu_shape if DEVICE == "cuda" else cpu_shape
    if memory_format == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last applies to 4-D input only")
    x = torch.randn(shape, device=DEVICE)
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    C = shape[1]
    weight = torch.ones(C, device=DEVICE, requires_grad=True)
    bias = torch.zeros(C, device=DEVICE, requires_grad=True)
    running_mean, running_var = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    grad_output = torch.randn_like(x)
    fn = PROVIDERS[provider]

    def step():
        y = fn(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        y.backward(grad_output)
        _sync()

    benchmark.extra_info.update(device=DEVICE, shape=list(shape), path=bn_triton.backend(x)
                                if provider == "bn_triton" else "torch")
    benchmark(step)
