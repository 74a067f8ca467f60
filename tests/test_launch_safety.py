"""What Triton's interpreter hides, tested on purpose: the device every launch runs under,
tickets that drifted, the order programs run in, and indices past 2³¹.

- Device guard: the front end on FakeTensors of cuda:1 (no GPU needed), with torch.cuda.device
  replaced by a recorder: every launch happens while cuda:1 is current.
- Tickets: a poisoned ticket buffer (random words, stale epochs, stray increments) and every
  program order (grid order, reversed, shuffled; the interpreter runs one at a time) give the
  same bits as a clean run, from the very next call on; CUDA-graph capture gets buffers of its
  own.
- Indices: for shapes whose merged channel extent reaches 2³¹, the kernels' own index helpers
  (tile_offsets, tile_values, split_counts, split_range) run through the interpreter on the
  plan's extreme programs and equal exact integer arithmetic; no tensor of that size is made.
"""
import contextlib
import random

import pytest
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.interpreter import InterpreterBuilder

import bn_triton
from bn_triton.ops import launch, plan, tuning
from bn_triton.kernels import stats


# ---------------------------------------------------------------------------- device guard
class FakeCudaDevice:
    """Stands in for torch.cuda.device: records the device made current, and restores."""
    current = None
    entered = []

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        self.previous, FakeCudaDevice.current = FakeCudaDevice.current, self.device
        FakeCudaDevice.entered.append(self.device)

    def __exit__(self, *exc):
        FakeCudaDevice.current = self.previous


class RecordingKernel:
    """A launcher that records the device current at each launch instead of running."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def run(**arguments):
            self.log.append((self.name, FakeCudaDevice.current))
        return run


def test_every_launch_runs_under_the_input_device(monkeypatch):
    log = []
    monkeypatch.setattr(tuning, "LAUNCHERS", {name: RecordingKernel(name, log)
                                              for name in tuning.KERNELS})
    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: type("Stream", (), {"cuda_stream": 7})())
    monkeypatch.setattr(plan, "_sm_count", lambda device: plan.H100_SM_COUNT)
    monkeypatch.setattr(launch, "_TICKETS", {})
    FakeCudaDevice.current, FakeCudaDevice.entered = torch.device("cuda", 0), []
    device = torch.device("cuda", 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for shape in ((8, 4, 6, 6), (4, 3, 128, 128)):  # slab, split
            x = torch.empty(shape, device=device)
            weight = torch.empty(shape[1], device=device)
            rm, rv = torch.empty_like(weight), torch.empty_like(weight)
            for training in (True, False):
                y, mean, invstd = launch.batch_norm_forward(x, weight, weight, rm, rv, None,
                                                            training, 0.1, 1e-5)
                launch.batch_norm_backward(torch.empty_like(y), x, y, None, weight, weight,
                                           mean, invstd, training, (True, True, True, False),
                                           weight.dtype)
    names = {name for name, _ in log}
    assert {"forward_slab_kernel", "backward_slab_kernel", "batch_stats_kernel",
            "normalize_kernel", "dy_sums_kernel", "input_grad_kernel"} <= names
    assert all(current == device for _, current in log), log
    assert FakeCudaDevice.current == torch.device("cuda", 0)  # the caller's device again
    assert len(FakeCudaDevice.entered) == len(log)


def test_device_guard_of_a_cuda_device_is_torch_cuda_device():
    guard = tuning.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # not entered: no GPU here
    assert isinstance(tuning.device_guard(torch.device("cpu")), contextlib.nullcontext)


# -------------------------------------------------------------------------------- tickets
@pytest.fixture
def split_path(monkeypatch):
    monkeypatch.setattr(plan, "MAX_SLAB_FORWARD", 0)
    monkeypatch.setattr(plan, "MAX_SLAB_BACKWARD", 0)


def _split_step(seed=0):
    """A training step on the split path with several splits per channel block (so that the
    last program of a block is a different one in each order); everything it produced."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 32, 32, generator=gen).requires_grad_(True)
    weight = torch.randn(3, generator=gen).requires_grad_(True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = bn_triton.batch_norm(x, rm, rv, weight, None, training=True, momentum=0.5)
    y.backward(torch.randn(y.shape, generator=gen))
    return [y, x.grad, weight.grad, rm, rv]


_REFERENCES = {}


def _reference(seed):
    """A clean _split_step of `seed` (on a fresh ticket buffer), made once per session."""
    if seed not in _REFERENCES:
        _REFERENCES[seed] = _split_step(seed)
    return _REFERENCES[seed]


def _assert_same(results, reference):
    for got, want in zip(results, reference):
        assert torch.equal(got, want)


def test_split_step_has_several_splits(split_path):
    x = torch.empty(4, 3, 32, 32)
    p = plan.make_plan(x.shape, [plan.ncs_strides(x)], x.device)
    assert not p.slab and p.num_splits >= 4


@pytest.mark.parametrize("poison", ["random", "ones", "stale-epochs", "previous-epoch"])
def test_poisoned_tickets_are_right_from_the_next_call(poison, split_path):
    """Words no launch of this buffer left (random bits; ones, as a stray increment of a
    zeroed buffer leaves; another epoch half way through its count; the launch before this
    one, never reset) are reclaimed by the next launch. Each call has its own input, so a
    stale partial in memory cannot make a wrong combine look right. (A word holding the next
    launch's own epoch is trusted: only that launch writes it.)"""
    references = [_reference(seed) for seed in (1, 2)]
    buffer, _ = launch.tickets(torch.device("cpu"), 1)
    entry = launch._TICKETS[(torch.device("cpu"), 0)]
    gen = torch.Generator().manual_seed(1)
    if poison == "random":
        buffer.copy_(torch.randint(-2**62, 2**62, buffer.shape, generator=gen))
    elif poison == "ones":
        buffer.fill_(1)
    elif poison == "stale-epochs":
        buffer.copy_(((entry.next_epoch + 12345) << 32) + 3)
    else:
        buffer.copy_(((entry.next_epoch - 1) << 32) + 2)
    for seed, reference in zip((1, 2), references):
        _assert_same(_split_step(seed), reference)


class ProgramOrder:
    """Runs the interpreter's programs in a permuted order: the k-th program started gets
    the index of the perm[k]-th in grid order."""

    def __init__(self, order, seed=0):
        self.order, self.rng = order, random.Random(seed)
        self.original = InterpreterBuilder.set_grid_idx

    def set_grid_idx(self, builder, x, y, z):
        nx, ny, nz = builder.grid_dim
        k = (x * ny + y) * nz + z
        if k == 0:  # a new launch: a new permutation of its programs
            total = nx * ny * nz
            self.perm = list(range(total))[::-1] if self.order == "reversed" else (
                self.rng.sample(range(total), total))
        j = self.perm[k]
        self.original(builder, j // (ny * nz), (j // nz) % ny, j % nz)


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_program_order_does_not_change_a_bit(order, split_path, monkeypatch):
    reference = _reference(1)
    permuted = ProgramOrder(order)
    monkeypatch.setattr(InterpreterBuilder, "set_grid_idx",
                        lambda builder, x, y, z: permuted.set_grid_idx(builder, x, y, z))
    _assert_same(_split_step(1), reference)


def test_capture_gets_tickets_of_its_own(monkeypatch):
    """Inside CUDA-graph capture a launch's tickets are a fresh zeroed buffer with epoch 0,
    never the eager (device, stream) buffer. (torch.zeros is captured as a memset node, so a
    replay starts from zero.)"""
    eager, _ = launch.tickets(torch.device("cpu"), 4)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: (a, device, k))
    captured, epoch = launch.tickets(torch.device("cuda", 0), 4)
    assert epoch == 0 and captured == ((4,), torch.device("cuda", 0), {"dtype": torch.int64})
    assert launch.tickets(torch.device("cpu"), 4)[0] is eager


def test_epochs_advance_per_launch_and_wrap_in_31_bits():
    """Eager epochs run 1 .. 2³¹ - 1 (0 is capture's, and a zeroed word's: stale to them)."""
    entry = launch.Tickets(torch.zeros(1, dtype=torch.int64))
    assert [entry.take() for _ in range(3)] == [1, 2, 3]
    entry.next_epoch = launch.EPOCHS - 1
    assert [entry.take(), entry.take()] == [launch.EPOCHS - 1, 1]


# ---------------------------------------------------------------------- indices past 2³¹
@triton.jit
def index_probe_kernel(offsets_ptr, mask_ptr, values_ptr, counts_ptr, range_ptr, pid_c, split,
                       tile, tiles_per_n, num_tiles, tiles_per_split, C, S, stride_n,
                       stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                       SPLITS_P2: tl.constexpr, INT64: tl.constexpr):
    """The kernels' index helpers for one (channel block, split, tile), stored as int64."""
    offsets, mask = stats.tile_offsets(pid_c, tile, tiles_per_n, C, S, stride_n, stride_c,
                                       stride_s, BLOCK_C, BLOCK_S, INT64)
    lanes = tl.arange(0, BLOCK_C)[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
    tl.store(offsets_ptr + lanes, offsets.to(tl.int64))
    tl.store(mask_ptr + lanes, mask.to(tl.int8))
    tl.store(values_ptr, stats.tile_values(tile, tiles_per_n, S, BLOCK_S, INT64).to(tl.int64))
    k = tl.arange(0, SPLITS_P2)
    counts = stats.split_counts(k, tiles_per_split, num_tiles, tiles_per_n, S, BLOCK_S, INT64)
    tl.store(counts_ptr + k, counts.to(tl.int64))
    first, last = stats.split_range(tl.program_id(0) + split, tiles_per_split, num_tiles, INT64)
    tl.store(range_ptr, first.to(tl.int64))
    tl.store(range_ptr + 1, last.to(tl.int64))


HUGE = {  # name -> (shape, memory format, element size): one channel's extent ≥ 2³¹
    "ncdhw-1x2x1100x1500x1500-fp32": ((1, 2, 1100, 1500, 1500), torch.contiguous_format, 4),
    "ndhwc-33x4x256x512x512-bf16": ((33, 4, 256, 512, 512), torch.channels_last_3d, 2),
    "nchw-n1-1x3x50000x50000-fp32": ((1, 3, 50000, 50000), torch.contiguous_format, 4),
    "2d-2200000000x2-fp16": ((2_200_000_000, 2), torch.contiguous_format, 2),
}


def _exact_probe(p, strides, pid_c, split, tile):
    """What the probe must store, in Python's exact integers."""
    n, j = divmod(tile, p.tiles_per_n)
    sn, sc, ss = strides
    c = [pid_c * p.BLOCK_C + i for i in range(p.BLOCK_C)]
    s = [j * p.BLOCK_S + i for i in range(p.BLOCK_S)]
    offsets = [[n * sn + ci * sc + si * ss for si in s] for ci in c]
    mask = [[ci < p.C and si < p.S for si in s] for ci in c]
    values = min(p.S - j * p.BLOCK_S, p.BLOCK_S)
    counts = []  # tiles [first, last) of split k, less what the samples' last tiles lack
    for k in range(p.SPLITS_P2):
        first = k * p.tiles_per_split
        last = max(min(first + p.tiles_per_split, p.num_tiles), first)
        last_tiles = last // p.tiles_per_n - first // p.tiles_per_n
        counts.append((last - first) * p.BLOCK_S - last_tiles * (p.tiles_per_n * p.BLOCK_S - p.S))
    first = split * p.tiles_per_split
    return offsets, mask, values, counts, (first, min(first + p.tiles_per_split, p.num_tiles))


@pytest.mark.parametrize("name", HUGE)
def test_indices_past_2_31_are_formed_in_64_bits(name):
    shape, memory_format, element_size = HUGE[name]
    x = torch.empty(shape, device="meta", memory_format=memory_format)
    strides = plan.ncs_strides(x)
    p = plan.make_plan(shape, [strides], torch.device("cpu"), element_size)
    assert not p.slab and p.INT64
    assert p.N * p.S >= 2**31  # the merged channel extent itself passes 2³¹
    sn, sc, ss = p.strides[0]
    last_block = triton.cdiv(p.C, p.BLOCK_C) - 1
    for split, tile in ((p.num_splits - 1, p.num_tiles - 1),  # the very last tile
                        (p.num_splits - 1, (p.num_splits - 1) * p.tiles_per_split),
                        (p.num_splits // 2, p.num_tiles // 2)):
        offsets = torch.empty(p.BLOCK_C * p.BLOCK_S, dtype=torch.int64)
        mask = torch.empty(p.BLOCK_C * p.BLOCK_S, dtype=torch.int8)
        values = torch.empty(1, dtype=torch.int64)
        counts = torch.empty(p.SPLITS_P2, dtype=torch.int64)
        bounds = torch.empty(2, dtype=torch.int64)
        index_probe_kernel[(1,)](offsets, mask, values, counts, bounds, last_block, split, tile,
                                 p.tiles_per_n, p.num_tiles, p.tiles_per_split, p.C, p.S, sn,
                                 sc, ss, BLOCK_C=p.BLOCK_C, BLOCK_S=p.BLOCK_S,
                                 SPLITS_P2=p.SPLITS_P2, INT64=p.INT64)
        want_offsets, want_mask, want_values, want_counts, want_bounds = _exact_probe(
            p, (sn, sc, ss), last_block, split, tile)
        assert offsets.view(p.BLOCK_C, p.BLOCK_S).tolist() == want_offsets
        assert mask.view(p.BLOCK_C, p.BLOCK_S).bool().tolist() == want_mask
        assert values.item() == want_values
        assert tuple(bounds.tolist()) == want_bounds
        assert counts.tolist() == want_counts
        assert sum(want_counts) == p.N * p.S  # every value of a channel, counted once
