"""Shared test setup: the interpreter switch, the device, the tolerance table, launch counting.

Tests run the Triton kernels through Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before anything imports triton). With BN_TRITON_TEST_DEVICE=cuda they run the compiled kernels
on CUDA tensors instead.
"""
import os

DEVICE = os.environ.get("BN_TRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Forward tolerances against the float64 reference (and torch), keyed by input dtype:
# (atol, rtol). float32: the stored mean is rounded to float32 and y = (x - mean)·scale + β,
# measured ≤ 1e-6 on N(0,1) data. Half types: one rounding of y on store, 2⁻¹¹ (fp16) and
# 2⁻⁸ (bf16) relative, on |y| up to ~5.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.6e-2),
}
# Statistics (mean, var, running buffers) are float32 even for half input: only the input's
# own rounding matters, so they take the float32 tolerance.
STAT_TOLERANCES = {dtype: (1e-5, 1e-5) for dtype in (torch.float32, torch.float16, torch.bfloat16)}
STAT_TOLERANCES[torch.float64] = (1e-10, 1e-10)


def tolerance(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def stat_tolerance(dtype: torch.dtype) -> dict:
    atol, rtol = STAT_TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_no_worse_than_torch(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
                               atol: float, name: str = "") -> None:
    """flash-attention's rule: |ours - ref64| <= 2·|torch - ref64| + atol, elementwise max."""
    ours_err = (ours.double() - ref).abs().max().item()
    torch_err = (theirs.double() - ref).abs().max().item()
    assert ours_err <= 2 * torch_err + atol, (
        f"{name}: bn_triton error {ours_err:.3e} > 2 x torch error {torch_err:.3e} + {atol:.1e}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    return DEVICE


class LaunchLog(list):
    """Names of the Triton kernels launched, in order."""

    def count_of(self, name: str) -> int:
        return sum(1 for launched in self if launched == name)


@pytest.fixture
def launches(monkeypatch) -> LaunchLog:
    """Record every Triton kernel launch (interpreted or compiled) made during the test."""
    log = LaunchLog()
    for cls in (InterpretedFunction, JITFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            log.append(self.fn.__name__ if hasattr(self, "fn") else self.__name__)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return log
