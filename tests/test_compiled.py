"""bn_triton/ops/compiled.py: a launch whose compiled kernel is known skips Triton's binder and is
launched exactly as Triton would launch it.

The kernels run as JIT functions here (a subprocess without TRITON_INTERPRET) over the stand-in
driver of benchmarks/standin.py: Triton's real JITFunction.run binds, specializes and keys
every launch, and "compiles" each specialization to a Compiled that records its launches. The
same calls (every layout, dtype, alignment, flag, and the autotuned kernels with a stub
benchmarker) run with the direct launches on and off; each launch must reach the same Compiled
with the same grid, stream and arguments, and with them on, Triton's binder must run only for
each key's first launch.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, sys
import torch
from triton.runtime.jit import JITFunction
from benchmarks import standin
from bn_triton import kernels
made = standin.install(kernels)
from bn_triton.ops import launch, tuning
from bn_triton.ops.epilogue import Activation

tuning.LAUNCHERS.update(tuning.make_launchers(True, tuning.run_once))
tuning.DIRECT, tuning.DIRECT_SOURCES = tuning.make_direct_launches(tuning.LAUNCHERS)
direct = dict(tuning.DIRECT)

binder_runs = [0]
original_run = JITFunction.run
def counted_run(self, *args, **kwargs):
    binder_runs[0] += 1
    return original_run(self, *args, **kwargs)
JITFunction.run = counted_run


def tensor(shape, dtype, channels_last=False, misaligned=False):
    numel = torch.Size(shape).numel()
    if misaligned:  # 4 bytes past a 16-byte boundary
        return torch.randn(numel + 4)[1:numel + 1].to(dtype).view(shape) if dtype == torch.float32 \
            else torch.randn(numel + 8).to(dtype)[1:numel + 1].view(shape)
    t = torch.randn(shape).to(dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def cases():
    """(name, x, dy, residual, activation, training, momentum None, memory_efficient)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    yield "slab relu residual", tensor((4, 8, 6, 6), f32), tensor((4, 8, 6, 6), f32), \
        tensor((4, 8, 6, 6), f32), Activation("relu"), True, False, False
    yield "split NCHW momentum None", tensor((2, 4, 128, 128), f32), \
        tensor((2, 4, 128, 128), f32), None, Activation("identity"), True, True, False
    yield "split channels_last bf16 silu", tensor((2, 64, 64, 64), bf16, True), \
        tensor((2, 64, 64, 64), bf16, True), None, Activation("silu"), True, False, False
    yield "eval fp16 leaky_relu", tensor((3, 5, 7, 7), f16), tensor((3, 5, 7, 7), f16), None, \
        Activation("leaky_relu", 0.2), False, False, False
    for misaligned in (False, True):  # the same call but for x's address
        yield f"x misaligned {misaligned}", tensor((4, 3, 128, 128), f32, misaligned=misaligned), \
            tensor((4, 3, 128, 128), f32), None, Activation("identity"), True, False, False
    yield "slab memory efficient", tensor((8, 4, 5, 5), f32), tensor((8, 4, 5, 5), f32), None, \
        Activation("identity"), True, False, True


def step(x, dy, residual, activation, training, from_count, memory_efficient):
    C = x.shape[1]
    dtype = torch.float32
    weight, bias = torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)
    running_mean, running_var = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    count = torch.tensor(3) if from_count else None
    y, mean, invstd = launch.batch_norm_forward(
        x, weight, bias, running_mean, running_var, count, training, 0.1, 1e-5, residual,
        activation, memory_efficient)
    launch.batch_norm_backward(
        dy, None if memory_efficient else x, y, residual, weight, bias, mean, invstd, training,
        [True, True, True, residual is not None], bias.dtype, residual is not None, activation,
        memory_efficient, 1e-5)


def describe(value):
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape), list(value.stride()),
                value.data_ptr() % 16]
    return repr(value)


def run_all():
    """case -> its launches: (compiled kernel, its name, the arguments described)."""
    launch._TICKETS.clear()  # each run's ticket epochs from 1, so that the runs compare
    launched = {}
    for name, *arguments in cases():
        standin.LAUNCHED.clear()
        step(*arguments)
        launched[name] = [(id(compiled), compiled.name, [describe(a) for a in args])
                          for compiled, args in standin.LAUNCHED]
    return launched


torch.manual_seed(0)
run_all()                       # first launches: through Triton, compiled kernels remembered
binder_runs[0] = 0
direct_run = run_all()          # every launch direct
direct_binder_runs = binder_runs[0]
tuning.DIRECT = {}              # Triton's path for every launch
binder_runs[0] = 0
triton_run = run_all()
print(json.dumps({"direct": direct_run, "triton": triton_run,
                  "direct_binder_runs": direct_binder_runs, "triton_binder_runs": binder_runs[0],
                  "directly_launched": sorted(direct), "compiled": len(made)}))
'''


def test_direct_launches_equal_triton_launches(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), BN_TRITON_DIRECT_LAUNCH="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["directly_launched"]) >= {
        "batch_stats_kernel", "normalize_kernel", "forward_slab_kernel", "dy_sums_kernel",
        "input_grad_kernel", "backward_slab_kernel"}
    direct, triton = report["direct"], report["triton"]
    assert direct.keys() == triton.keys() and len(direct) == 7
    for case in direct:
        # the same compiled kernel, grid, stream and arguments in the same order
        assert direct[case] == triton[case] and direct[case], case
    launched = [launch for case in direct.values() for launch in case]
    assert {"normalize_kernel", "input_grad_kernel", "forward_slab_kernel",
            "backward_slab_kernel", "batch_stats_kernel", "dy_sums_kernel"} <= {
                name for _, name, _ in launched}
    # an x 4 bytes past a 16-byte boundary is a specialization of its own
    aligned, misaligned = direct["x misaligned False"], direct["x misaligned True"]
    assert aligned[0][1] == misaligned[0][1] and aligned[0][0] != misaligned[0][0]
    assert report["direct_binder_runs"] == 0      # no launch went through Triton's binder
    assert report["triton_binder_runs"] == len(launched)
