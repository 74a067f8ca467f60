"""Shared test setup: the interpreter switch, the device, the tolerance table, launch counting.

Tests run the Triton kernels through Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before anything imports triton). With BN_TRITON_TEST_DEVICE=cuda they run the compiled kernels
on CUDA tensors instead.
"""
import os

DEVICE = os.environ.get("BN_TRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist (-n N) each worker takes its share of the cores for torch's intra-op
# threads, and so do the processes its tests start (the sync ranks, the compile pool, the
# commands run end to end): N workers with every core's threads each oversubscribe the
# machine (on 2 cores, -n 2 spent about 10% more CPU time with torch's default threads).
# Set before torch is imported; an OMP_NUM_THREADS already set wins.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(
        1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bn_triton.check import STAT_TOLERANCES, TOLERANCES  # noqa: E402  (one table)


# Modules whose tests must all run on one xdist worker: test_compile.py's module-scoped
# `compiled` fixture compiles every kernel for sm_80 and sm_90 (minutes of CPU), once per worker
# that runs any of the module's tests.
ONE_WORKER_MODULES = {"test_compile.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` alone (--dist load) deals the tests out one at a time, fastest to balance; this
    does the same but deals each module of ONE_WORKER_MODULES out whole, and first (xdist
    orders work units by size). Any other --dist is left as given."""
    if config.getvalue("dist") != "load":
        return None
    try:
        from xdist.scheduler import LoadScopeScheduling
    except ImportError:  # another xdist: its own --dist load
        return None

    class TestsAloneModulesWhole(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if os.path.basename(path) in ONE_WORKER_MODULES else nodeid

    return TestsAloneModulesWhole(config, log)


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
    """Names of the Triton kernels launched, in order, with counts of the calls they make up:
    a call takes the slab path (one kernel) or the split path (two), see bn_triton.ops.launch."""

    def count_of(self, name: str) -> int:
        return sum(1 for launched in self if launched == name)

    def forward_calls(self) -> int:
        """Forward calls: each writes y with exactly one of these kernels."""
        return self.count_of("forward_slab_kernel") + self.count_of("normalize_kernel")

    def batch_stat_calls(self) -> int:
        """Forward calls that computed batch statistics."""
        return self.count_of("forward_slab_kernel") + self.count_of("batch_stats_kernel")

    def backward_calls(self) -> int:
        """Backward calls: a slab kernel, or dy_sums and/or input_grad (one call either way)."""
        calls = 0
        for i, name in enumerate(self):
            if name in ("backward_slab_kernel", "input_grad_kernel"):
                calls += 1
            elif name == "dy_sums_kernel" and self[i + 1:i + 2] != ["input_grad_kernel"]:
                calls += 1
        return calls


@pytest.fixture(params=["auto", "split"])
def path(request, monkeypatch) -> str:
    """'auto': the plan's choice (slab where whole channels fit in registers); 'split': the
    split path forced for every size, so that both paths see the same cases."""
    if request.param == "split":
        from bn_triton.ops import plan
        monkeypatch.setattr(plan, "MAX_SLAB_FORWARD", 0)
        monkeypatch.setattr(plan, "MAX_SLAB_BACKWARD", 0)
    return request.param


def assert_path(launches: "LaunchLog", path: str) -> None:
    """A forced split path never launched a slab kernel, and did launch the split ones."""
    if path == "split":
        assert "forward_slab_kernel" not in launches and "backward_slab_kernel" not in launches
        assert any(name in launches for name in ("batch_stats_kernel", "normalize_kernel",
                                                  "dy_sums_kernel", "input_grad_kernel"))


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
