"""Full waves on every layout (issue 17): the plans of ResNet-50 (b32, b256), MLP and video
calls, NCHW and channels_last, float32 and half, training forward and backward, for 132-SM
(H100/H200) and 108-SM (A100) GPUs. Every launch that moves 4 MiB or more has

  - ≥ 2 programs per SM: with fewer, the last wave's tail leaves
    SMs idle. The exception is a slab whose programs hold the fewest channels they can (one,
    or 16 bytes of channels where they are contiguous): no one-pass plan has more programs.
    Where M ≤ 8192 one launch is the target (issue 4); where M > 8192 (NCHW 128x28x28 at
    batch 32) the split path would fill the waves at one more element size of traffic, and
    the plan keeps the slab (a choice for the GPU to settle: see the exceptions test);
  - ≥ 24 KiB in flight per SM (benchmarks.waves.IN_FLIGHT_TARGET, Little's law for an H200:
    ~4.8 TB/s × ~650 ns ≈ 3.1 MB over 132 SMs), or all it loads spread over the SMs where that
    is less. In flight: one tile of each tensor loaded per iteration × the programs an SM
    holds at once (its share of the grid, at most what registers allow; see
    benchmarks/waves.py, whose register bounds tests/test_compile.py checks).

Plans only (meta tensors, launches recorded, nothing run): fast.
"""
import pytest
import torch
import triton

from benchmarks import waves
from bn_triton.ops import plan

DTYPES = ("fp32", "bf16", "fp16")
# The targets are the issue's, not the plan's own constants.
MIN_PROGRAMS_PER_SM = 2
CASES = [(case, dtype) for case in waves.shape_sets() for dtype in DTYPES]


def channel_bound(row, case, dtype) -> bool:
    """A slab whose programs hold the fewest channels they can: no one-pass launch has more
    programs."""
    if not row["launch"].endswith("slab_kernel"):
        return False
    block_c = int(row["tile"].split("x")[0])
    contiguous = case.layout == "channels_last" or len(case.shape) == 2
    size = waves.DTYPES[dtype].itemsize
    narrowest = (min(triton.next_power_of_2(case.C), plan.MIN_ROW_BYTES // size)
                 if contiguous else 1)
    return block_c == narrowest


@pytest.mark.parametrize("case, dtype", CASES, ids=[f"{c.label}-{d}" for c, d in CASES])
def test_every_large_launch_fills_the_waves(case, dtype):
    rows = waves.launch_rows(case, dtype)
    assert rows, f"{case.label}: no launch recorded"
    for row in rows:
        if row["bytes"] < waves.MIN_BYTES:
            continue
        for sm in waves.SM_COUNTS:
            where = (f"{case.label} {dtype} {row['launch']} (tile {row['tile']}) on {sm} SMs: "
                     f"{row[f'programs_{sm}']} programs")
            if not channel_bound(row, case, dtype):
                assert row[f"per_sm_{sm}"] >= MIN_PROGRAMS_PER_SM, (
                    f"{where}, {row[f'per_sm_{sm}']:.2f} an SM")
            target = waves.in_flight_target(row, sm)
            assert row[f"in_flight_{sm}"] >= target, (
                f"{where}, {row[f'in_flight_{sm}'] / 1024:.1f} KiB in flight an SM, "
                f"under {target / 1024:.1f} KiB")


def test_the_exceptions_are_the_one_launch_slabs_at_their_narrowest():
    """What the waves test lets through, named: ResNet-50 b32's 28x28 (C = 128, M = 25088,
    the only ones with M > 8192), 14x14 and 7x7 stages, whose C (128-256 NCHW; 256-2048
    channels_last in 16-byte rows) gives fewer than 2·132 programs. The list pins it: a plan
    change that adds or removes one shows here."""
    short = set()
    for case in waves.shape_sets():
        for dtype in ("fp32", "bf16"):
            for row in waves.launch_rows(case, dtype):
                if row["bytes"] >= waves.MIN_BYTES and row["per_sm_132"] < MIN_PROGRAMS_PER_SM:
                    assert channel_bound(row, case, dtype), row
                    short.add((case.label, dtype, row["launch"]))
    assert short == {
        ("resnet50-b32-128x28x28/NCHW", "fp32", "forward_slab_kernel"),
        ("resnet50-b32-128x28x28/NCHW", "bf16", "forward_slab_kernel"),
        ("resnet50-b32-256x14x14/NCHW", "fp32", "forward_slab_kernel"),
        ("resnet50-b32-256x14x14/NCHW", "fp32", "backward_slab_kernel"),
        ("resnet50-b32-256x14x14/NCHW", "bf16", "forward_slab_kernel"),
        ("resnet50-b32-256x14x14/NCHW", "bf16", "backward_slab_kernel"),
        ("resnet50-b32-256x14x14/NHWC", "fp32", "forward_slab_kernel"),
        ("resnet50-b32-1024x14x14/NHWC", "fp32", "forward_slab_kernel"),
        ("resnet50-b32-512x7x7/NHWC", "fp32", "forward_slab_kernel"),
        ("resnet50-b32-512x7x7/NHWC", "fp32", "backward_slab_kernel"),
        ("resnet50-b32-512x7x7/NHWC", "bf16", "backward_slab_kernel"),
        ("resnet50-b32-2048x7x7/NHWC", "bf16", "forward_slab_kernel"),
        ("resnet50-b32-2048x7x7/NHWC", "bf16", "backward_slab_kernel"),
    }


@pytest.mark.parametrize("sm_count", waves.SM_COUNTS)
def test_split_counts_follow_the_sm_count(sm_count):
    """plan._sm_count is what the plans see (patched by waves.planned_for), and the channels-
    last bfloat16 stem (C = 64: one channel block) splits past the old MAX_COMBINE_TILE //
    BLOCK_C = 64 cap to fill every SM several times."""
    x = torch.empty(32, 64, 112, 112, dtype=torch.bfloat16, device="meta").contiguous(
        memory_format=torch.channels_last)
    with waves.planned_for(sm_count):
        made = plan.make_plan(x.shape, [plan.ncs_strides(x)] * 2, x.device, x.element_size())
    assert not made.slab and made.grid[0] == 1
    assert made.num_splits >= 4 * sm_count * 0.9
    assert made.num_splits * made.BLOCK_C > 4096


# ------------------------------------------------------------- many splits, combined in chunks
# Channels-last float32, C = 32 (one 32-channel block), M = 9216 (split both ways), planned as
# a bandwidth-bound call (plan.WAVE_BYTES patched to 0, as a 4 MiB call would be): 144
# splits, which the last program combines stats.COMBINE_TILE // 32 = 32 at a time, 5 chunks.
CHUNKED = (4, 32, 48, 48)


@pytest.fixture
def short_splits(monkeypatch):
    from bn_triton.ops import launch

    monkeypatch.setattr(plan, "WAVE_BYTES", 0)
    remembered = getattr(launch, "_PLANS", None)  # plans the launch layer keeps, if any
    if remembered is not None:
        monkeypatch.setattr(launch, "_PLANS", {})


def test_many_splits_are_combined_in_chunks_to_the_reference(device, launches, short_splits):
    from test_functional import check_against_reference_and_torch

    torch.manual_seed(0)
    x = torch.randn(CHUNKED, device=device).contiguous(memory_format=torch.channels_last) + 3.0
    made = plan.make_plan(x.shape, [plan.ncs_strides(x)] * 2, x.device, x.element_size())
    assert not made.slab and made.num_splits * made.BLOCK_C > 4 * 1024, made  # > 4 chunks
    check_against_reference_and_torch(x, affine=True, training=True)


def test_chunked_combine_gives_the_same_bits_every_run(device, launches, short_splits):
    import bn_triton

    torch.manual_seed(1)
    x = torch.randn(CHUNKED, device=device).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    outputs = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        weight = torch.ones(CHUNKED[1], device=device, requires_grad=True)
        y = bn_triton.batch_norm(xi, None, None, weight, None, True, 0.1, 1e-5)
        y.backward(grad)
        outputs.append((y.detach(), xi.grad, weight.grad))
    for first, second in zip(*outputs):
        assert torch.equal(first, second)
