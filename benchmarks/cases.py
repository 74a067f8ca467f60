"""The benchmark cases, modes, dtypes and bytes models: one list, used by the pytest-benchmark
file and by `python -m benchmarks`.

Shapes are (N, C, *spatial); each case runs in NCHW-like (contiguous) layout and, for 4-D and
5-D input, channels-last (NHWC / NDHWC). M = N·prod(spatial) is the number of values per
channel; issue 4's targets differ for M ≤ 8192 (one launch, one pass) and larger M.

This module imports torch only: whether Triton runs interpreted is decided by the caller before
anything imports triton.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

SMALL_M_MAX = 8192

MODES = ("forward", "backward", "forward+backward", "eval")
# The modes whose traffic is counted under the interpreter; forward+backward is their sum.
COUNTED_MODES = ("forward", "backward", "eval")

# The one bytes model of the GPU figures, in element sizes per element of x: the least any
# kernel can move. forward: read x, write y; backward: read x and dy, write dx; eval: read x,
# write y. GB/s = MIN_BYTES[mode] · numel · element_size / time.
MIN_BYTES: Dict[str, int] = {"forward": 2, "backward": 3, "forward+backward": 5, "eval": 2}
# relu(BN(x) + residual), fused: the residual read forward; backward reads what act'(z)
# needs (y) and writes d(residual) besides BN's own.
MIN_BYTES_RESIDUAL: Dict[str, int] = {"forward": 3, "backward": 5, "forward+backward": 8,
                                      "eval": 3}
# What a two-pass implementation moves (torch eager, attorch, FlagGems): forward reads x for
# the statistics and again to normalize; backward reads x and dy for the sums and again for dx.
TWO_PASS_BYTES: Dict[str, int] = {"forward": 3, "backward": 5, "forward+backward": 8, "eval": 2}

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}

LAYOUT_NAMES = {  # (ndim, layout) -> the name people use
    (2, "contiguous"): "NC", (3, "contiguous"): "NCL", (4, "contiguous"): "NCHW",
    (5, "contiguous"): "NCDHW", (4, "channels_last"): "NHWC", (5, "channels_last"): "NDHWC",
}


@dataclass(frozen=True)
class Case:
    """One input shape in one memory layout."""
    name: str                 # e.g. "resnet50-b32-64x56x56"
    group: str                # resnet50, mlp, long-thin, few-channels, video
    shape: Tuple[int, ...]
    layout: str = "contiguous"  # or "channels_last" (channels_last_3d for 5-D input)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.layout_name}"

    @property
    def layout_name(self) -> str:
        return LAYOUT_NAMES[(len(self.shape), self.layout)]

    @property
    def C(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def M(self) -> int:
        return values_per_channel(self.shape)

    @property
    def regime(self) -> str:
        return regime(self.M)

    @property
    def module_name(self) -> str:
        return {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[
            len(self.shape)]


def values_per_channel(shape: Sequence[int]) -> int:
    return math.prod(shape) // shape[1]


def regime(M: int) -> str:
    return "M<=8192" if M <= SMALL_M_MAX else "M>8192"


def memory_format(ndim: int, layout: str) -> torch.memory_format:
    if layout == "contiguous":
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}[ndim]


def make_tensor(shape: Sequence[int], layout: str, dtype: torch.dtype, device,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """N(0, 1) values of `dtype` in the case's layout (drawn in float32, then cast)."""
    t = torch.randn(tuple(shape), generator=generator, device=device).to(dtype)
    return t.contiguous(memory_format=memory_format(len(shape), layout))


def _resnet50() -> List[Tuple[str, Tuple[int, ...]]]:
    # ResNet-50's BatchNorm2d inputs: (C, H, W) of each BN layer kind, at batch 32 and 256.
    maps = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
            (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]
    return [(f"resnet50-b{n}-{c}x{h}x{w}", (n, c, h, w)) for n in (32, 256) for c, h, w in maps]


def _build() -> List[Case]:
    cases = []
    for name, shape in _resnet50():
        cases += [Case(name, "resnet50", shape), Case(name, "resnet50", shape, "channels_last")]
    # BatchNorm1d after a 4096-wide linear layer of an MLP, at two batch sizes.
    cases += [Case(f"mlp-b{b}-4096", "mlp", (b, 4096)) for b in (256, 4096)]
    # Long and thin: few channels, many rows (tabular data, point clouds).
    cases += [Case("long-thin-100000x32", "long-thin", (100000, 32))]
    # Few channels, a huge extent per sample (audio, 1-D signals): small C must still fill a GPU.
    cases += [Case("few-channels-20x6x65536", "few-channels", (20, 6, 65536))]
    # Video BatchNorm3d: (N, C, T, H, W).
    video = (8, 64, 16, 56, 56)
    cases += [Case("video-8x64x16x56x56", "video", video),
              Case("video-8x64x16x56x56", "video", video, "channels_last")]
    return cases


CASES: List[Case] = _build()


def select(patterns: Optional[Sequence[str]] = None) -> List[Case]:
    """The cases whose label contains any of `patterns` (all cases when none are given)."""
    if not patterns:
        return list(CASES)
    return [case for case in CASES if any(p.lower() in case.label.lower() for p in patterns)]


# ---------------------------------------------------------------- scaling for the interpreter
# Elements of x the interpreter is given per case: ~2-3 s per counted call on one CPU core.
INTERPRETER_BUDGET = 2 ** 17
# A scaled large-M case keeps more values per channel than the largest one-pass slab holds
# (bn_triton.ops.plan.MAX_SLAB_FORWARD, 32768), or its own M if less: a case that takes the split
# path at full size takes it scaled, and one whose M ≤ 32768 is not scaled in M at all.
LARGE_M_FLOOR = 32768 + 1


def interpreter_shape(shape: Sequence[int], budget: int = INTERPRETER_BUDGET) -> Tuple[int, ...]:
    """The shape a case runs with under Triton's interpreter: at most `budget` elements, in the
    same layout, the same regime (M ≤ 8192 or M > 8192) and the same kernel path.

    The rule, applied only when the shape has more than `budget` elements:
      - M ≤ 8192: N and the spatial dims stay, so M and the per-channel work are exactly the
        GPU's; C is halved (rounding up) until the tensor fits. The path depends on M, and on
        C only below a slab row's 4-16 channels, which halving never reaches (C·M stays above
        budget/2 = 8·8192).
      - M > 8192: N is halved (rounding up), then the largest spatial dim, while M stays
        ≥ min(M, LARGE_M_FLOOR); then C is halved until the tensor fits.
    Bytes per element are independent of C except for O(C) terms (weights, statistics,
    partials), so a smaller C changes little; the shape that ran is reported with each result.
    """
    shape = list(shape)
    if math.prod(shape) <= budget:
        return tuple(shape)
    M = values_per_channel(shape)
    if M > SMALL_M_MAX:
        floor = min(M, LARGE_M_FLOOR)
        while math.prod(shape) > budget:
            candidate = list(shape)
            if candidate[0] > 1:
                candidate[0] = (candidate[0] + 1) // 2
            else:
                spatial = range(2, len(shape))
                largest = max(spatial, key=lambda d: candidate[d], default=None)
                if largest is None or candidate[largest] == 1:
                    break
                candidate[largest] = (candidate[largest] + 1) // 2
            if values_per_channel(candidate) < floor:
                break
            shape = candidate
    while math.prod(shape) > budget and shape[1] > 1:
        shape[1] = (shape[1] + 1) // 2
    return tuple(shape)


# Cases counted in bf16 as well as fp32 under the interpreter: bytes per element, in element
# sizes, do not depend on the dtype, and the first four show it (a small- and a large-M case
# per layout). Where the one-pass slab stops does depend on it (half rows hold twice the
# channels), and the last two show that: channels-contiguous M = 6272 and 4096.
COUNT_BOTH_DTYPES = ("resnet50-b32-512x7x7/NCHW", "resnet50-b32-512x7x7/NHWC",
                     "resnet50-b32-64x56x56/NCHW", "resnet50-b32-64x56x56/NHWC",
                     "resnet50-b32-256x14x14/NHWC", "mlp-b4096-4096/NC")


# --------------------------------------------------------------------------- issue 4's targets
# (launches, element sizes moved per element) a call may take, by regime; O(C) terms aside.
TARGETS = {
    "M<=8192": {"forward": (1, 2), "backward": (1, 3), "forward+backward": (2, 5),
                "eval": (1, 2)},
    "M>8192": {"forward": (2, 3), "backward": (2, 5), "forward+backward": (4, 8),
               "eval": (1, 2)},
}
# Allowance for the O(C) terms (weights, statistics, running buffers, split partials) in
# element sizes per element, as the tests allow.
O_C_SLACK = 0.05


def meets_target(mode: str, M: int, launches: int, bytes_per_element: float) -> bool:
    """Whether a call (forward+backward: two calls, two allowances) meets issue 4's target."""
    max_launches, max_bytes = TARGETS[regime(M)][mode]
    calls = 2 if mode == "forward+backward" else 1
    return launches <= max_launches and bytes_per_element <= max_bytes + calls * O_C_SLACK
