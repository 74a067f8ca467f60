"""merge_statistics_kernel (kernels/merge.py), SyncBatchNorm's merge of every rank's statistics,
in one process on gathered tensors made up here: the same bits as the loop of torch ops it
replaced (rank-order Chan merge in float64), uneven counts and empty ranks, C across several
channel blocks, the running statistics updated once; a constant number of ATen ops and one
launch whatever the world size; and the kernel compiled for sm_80 and sm_90 by Triton's real
compiler without spills or FMA contraction. tests/test_sync.py runs it across processes."""
import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from bn_triton.ops import collectives

HERE = Path(__file__).resolve().parent
EXACT = {"atol": 0, "rtol": 0}
# The running update divides var·(n/(n - 1)), the loop divided var·n/(n - 1), and momentum
# arrives as a float32 pair (to 2⁻⁴⁸ relative): a few float64 ulps apart, before the buffer's
# own rounding.
RUNNING_TOL = {torch.float64: {"atol": 1e-15, "rtol": 1e-14},
               torch.float32: {"atol": 1e-7, "rtol": 1e-6}}


def chan_merge(gathered):
    """The loop of torch ops collectives.combine ran before the kernel (the oracle): Chan's
    merge in rank order, float64; (mean, biased var, total count as a 0-d tensor)."""
    count = torch.zeros_like(gathered[0, 0])
    mean = torch.zeros_like(count)
    m2 = torch.zeros_like(count)
    for rank_count, rank_mean, rank_var in gathered:
        total = count + rank_count
        share = torch.where(total > 0, rank_count / total.clamp_min(1), 0.0)
        delta = rank_mean - mean
        mean = mean + delta * share
        m2 = m2 + rank_var * rank_count + delta * delta * count * share
        count = total
    return mean, m2 / count.clamp_min(1), count[0]


def gathered_statistics(counts, C, transposed=False):
    """(world, 3, C) float64 as the all_gather gives it: rank k's count counts[k] in every
    channel, means around 3 (one rank far off), biased vars in (0.1, 4); an empty rank holds
    zeros (launch.local_statistics). transposed: the same values through non-contiguous
    strides."""
    world = len(counts)
    gathered = torch.zeros(world, 3, C, dtype=torch.float64)
    gathered[:, 0] = torch.tensor(counts, dtype=torch.float64)[:, None]
    gathered[:, 1] = torch.randn(world, C, dtype=torch.float64) + 3
    gathered[:, 1, 0] += 1e3
    gathered[:, 2] = torch.rand(world, C, dtype=torch.float64) * 3.9 + 0.1
    gathered[torch.tensor(counts) == 0] = 0.0
    if transposed:
        gathered = gathered.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    return gathered


# (counts by rank, C): C = 3 one masked block; C = 300 three blocks of merge_block_c's 128,
# the last mostly masked; C = 513 five, the last with one channel.
CASES = {
    "world1": ([7], 300),
    "world3-empty-rank": ([5, 0, 9], 300),
    "world3-c3": ([1, 2, 0], 3),
    "world8-uneven": ([3, 1, 0, 250, 17, 2, 0, 1024], 513),
    "all-empty": ([0, 0], 5),
}


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CASES)
def test_merge_is_the_torch_loop_bit_for_bit(name, acc_dtype, launches):
    counts, C = CASES[name]
    gathered = gathered_statistics(counts, C, transposed=name == "world3-empty-rank")
    mean, var, count = collectives.merge_statistics(gathered, acc_dtype, None, None, None, 0.1)
    want_mean, want_var, want_count = chan_merge(gathered)
    assert mean.dtype == var.dtype == acc_dtype and mean.shape == var.shape == (C,)
    assert count.dtype == torch.float64 and count.shape == ()
    torch.testing.assert_close(mean, want_mean.to(acc_dtype), **EXACT, msg=lambda m: f"mean: {m}")
    torch.testing.assert_close(var, want_var.to(acc_dtype), **EXACT, msg=lambda m: f"var: {m}")
    torch.testing.assert_close(count, want_count, **EXACT, msg=lambda m: f"count: {m}")
    assert count.item() == sum(counts)
    assert list(launches) == ["merge_statistics_kernel"]


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_updated_once(momentum, buffer_dtype, launches):
    counts, C = CASES["world8-uneven"]
    gathered = gathered_statistics(counts, C)
    running_mean = torch.randn(C, dtype=buffer_dtype)
    running_var = torch.rand(C, dtype=buffer_dtype) + 0.5
    num_batches_tracked = torch.tensor(3) if momentum is None else None
    want_mean, want_var, want_count = chan_merge(gathered)
    # The loop's update, once: unbiased over the total count, factor momentum or 1/3.
    factor = 1.0 / 3 if momentum is None else momentum
    unbiased = want_var * want_count / (want_count - 1)
    want_running_mean = (1 - factor) * running_mean.double() + factor * want_mean
    want_running_var = (1 - factor) * running_var.double() + factor * unbiased
    collectives.merge_statistics(gathered, torch.float32, running_mean, running_var,
                                 num_batches_tracked, 0.0 if momentum is None else momentum)
    tol = RUNNING_TOL[buffer_dtype]
    torch.testing.assert_close(running_mean, want_running_mean.to(buffer_dtype), **tol,
                               msg=lambda m: f"running_mean: {m}")
    torch.testing.assert_close(running_var, want_running_var.to(buffer_dtype), **tol,
                               msg=lambda m: f"running_var: {m}")
    if num_batches_tracked is not None:
        assert num_batches_tracked.item() == 3  # read, not advanced (the layer advances it)
    assert list(launches) == ["merge_statistics_kernel"]


def test_strided_running_statistics_are_written_back():
    counts, C = CASES["world3-empty-rank"]
    gathered = gathered_statistics(counts, C)
    contiguous_mean, contiguous_var = torch.zeros(C), torch.ones(C)
    collectives.merge_statistics(gathered, torch.float32, contiguous_mean, contiguous_var,
                                 None, 0.1)
    strided = torch.zeros(C, 2)  # columns: stride 2
    strided[:, 1] = 1.0
    collectives.merge_statistics(gathered, torch.float32, strided[:, 0], strided[:, 1], None,
                                 0.1)
    torch.testing.assert_close(strided[:, 0], contiguous_mean, **EXACT)
    torch.testing.assert_close(strided[:, 1], contiguous_var, **EXACT)


class _CountOps(TorchDispatchMode):
    """ATen ops by name, as torch dispatches them below autograd (views included), except
    those the interpreter runs inside a launch to emulate the GPU (a GPU runs none)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.in_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_launch:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_ops_and_launches_do_not_grow_with_the_world(launches, monkeypatch):
    """The merge and the running update: 3 allocations and one launch at any world size (the
    loop of torch ops ran 40 ATen ops at one rank, 56 at two, 152 at eight)."""
    counter = _CountOps()
    for cls in (InterpretedFunction, JITFunction):
        def run(self, *args, _original=cls.run, **kwargs):
            counter.in_launch = True
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter.in_launch = False

        monkeypatch.setattr(cls, "run", run)
    seen = {}
    for world in (1, 2, 8):
        gathered = gathered_statistics([4] * world, 64)
        running_mean, running_var = torch.zeros(64), torch.ones(64)
        num_batches_tracked = torch.tensor(2)
        before = len(launches)
        counter.ops.clear()
        with counter:
            collectives.merge_statistics(gathered, torch.float32, running_mean, running_var,
                                         num_batches_tracked, 0.0)
        seen[world] = (dict(counter.ops), len(launches) - before)
    assert all(ops == seen[1] for ops in seen.values()), seen
    ops, launched = seen[1]
    assert ops == {"empty": 2, "empty_like": 1} and launched == 1, seen


# Compiled for sm_80 and sm_90 in a subprocess without TRITON_INTERPRET (under the interpreter
# @triton.jit gives objects triton.compile refuses), as tests/test_compile.py does for the
# other kernels, with the specializations a GPU launch of merge_statistics gets: contiguous
# gathered (stride_gc = 1 a constexpr), aligned pointers, world > 1, absent pointers None.
COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from compile_kernels import compile_kernel, run_ptxas
    from bn_triton.kernels import merge_statistics_kernel as fn

    results = []
    for variant in json.load(sys.stdin):
        signature, constexprs, attrs = {}, {}, {}
        for index, name in enumerate(fn.arg_names):
            value = variant["args"].get(name)
            if name in variant["constexprs"]:
                signature[name], constexprs[name] = "constexpr", variant["constexprs"][name]
            elif value is None:
                signature[name], constexprs[name] = "constexpr", None
            else:
                signature[name] = value
                if value.startswith("*"):
                    attrs[(index,)] = [["tt.divisibility", 16]]
        options = dict(variant["options"], enable_fp_fusion=False)
        result = dict(variant)
        for cc in (80, 90):
            ptx = compile_kernel(fn, signature, constexprs, attrs, cc, options).asm["ptx"]
            ptxas = run_ptxas(ptx, cc)
            result[str(cc)] = {"registers": ptxas["registers"],
                               "spills": ptxas["spill_stores"] + ptxas["spill_loads"],
                               "fma": ptx.count("fma.rn"), "div": ptx.count("div.rn.f64")}
        results.append(result)
    json.dump(results, sys.stdout)
""")
SCALARS = {"C": "i32", "world": "i32", "momentum": "fp32", "momentum_lo": "fp32",
           "stride_gw": "i32", "stride_gs": "i32"}


def compile_variant(acc, running, update, from_count):
    pointers = {"gathered_ptr": "*fp64", "mean_ptr": acc, "var_ptr": acc, "count_ptr": "*fp64"}
    if update:
        pointers.update(running_mean_ptr=running, running_var_ptr=running)
    if from_count:
        pointers["num_batches_tracked_ptr"] = "*i64"
    return {"args": {**pointers, **SCALARS},
            "constexprs": {"stride_gc": 1, "BLOCK_C": collectives.MERGE_BLOCK_C,
                           "UPDATE_RUNNING": update, "MOMENTUM_FROM_COUNT": from_count},
            "options": {"num_warps": collectives.MERGE_NUM_WARPS}}


def test_compiles_for_sm80_and_sm90_without_spills_or_fma():
    variants = [compile_variant("*fp32", "*fp32", True, False),   # BatchNorm2d's SyncBatchNorm
                compile_variant("*fp32", "*fp16", True, True),    # momentum=None, half buffers
                compile_variant("*fp64", None, False, False)]     # float64, no running stats
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(HERE)],
                          input=json.dumps(variants), capture_output=True, text=True, env=env,
                          cwd=HERE.parent, timeout=600)
    assert proc.returncode == 0, f"compiling merge_statistics_kernel failed:\n{proc.stderr[-6000:]}"
    for result in json.loads(proc.stdout):
        for cc in ("80", "90"):
            r = result[cc]
            where = f"sm_{cc} {result['args']} {result['constexprs']}: {r}"
            assert r["spills"] == 0, where
            # enable_fp_fusion=False took: every product and sum rounded, as the torch loop;
            # float64 divisions correctly rounded.
            assert r["fma"] == 0 and r["div"] >= 2, where
