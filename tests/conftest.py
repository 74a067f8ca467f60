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

from bn_triton.check import STAT_TOLERANCES, TOLERANCES  # noqa: E402  (one table)


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
