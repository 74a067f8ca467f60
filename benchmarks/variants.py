"""The batch-norm variants against batch norm itself: launches and bytes each training step
requests, counted under Triton's interpreter (bn_triton.ops.traffic), forward and backward, on
the slab and the split path, NCHW and channels_last.

    python -m benchmarks.variants [--out DIR]

Batch Renormalization (bn_triton.BatchRenorm2d) runs batch norm's kernels with a constexpr
flag: r and d are computed where the batch statistics are, from the running statistics the
same launch reads to update them, and the backward is batch norm's with γ·r. So it must make
the same launches (the same kernels) and request the same bytes per element; the only extra
traffic is per channel and per program: r and d written once and read back by each program
of a channel block, the (2,) limits, γ and the running statistics read a second time. On
these interpreter-sized cases (M = 512 to 4096 values a channel) that is under 1% of batch
norm's bytes (the bound checked: EXTRA_FRACTION), and a smaller share the larger M is.

Ghost batch norm (bn_triton.GhostBatchNorm2d, runs of 3 samples here, the last shorter) runs
the same kernels over one more grid dimension, one row a virtual batch, and one launch more
each way for what spans the runs (ghost_running_update_kernel, sum_runs_kernel: O(runs·C)
values). Its rows check batch norm's kernels in order plus exactly those, whatever the number
of runs, and the same bytes within EXTRA_FRACTION plus RUN_CHANNEL_BYTES for each (run,
channel): its statistics rows written and read back across the runs. (With runs planned on their own, a run
may take the slab where the whole batch would take the split path: the rows force the split
path on both alike.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .host import forced_split

EXTRA_FRACTION = 0.01
RUN_CHANNEL_BYTES = 32
GHOST_RUN = 3  # samples a virtual batch in the ghost rows
# (label, shape, channels_last, forced split): ResNet-like slabs and a split-sized case.
CASES = [
    ("slab NCHW", (8, 32, 8, 8), False, False),
    ("slab NHWC", (8, 32, 8, 8), True, False),
    ("split NCHW", (4, 8, 32, 32), False, True),
    ("split NHWC", (4, 8, 32, 32), True, True),
]


def step_traffic(layer, x) -> dict:
    """Launches and bytes of one training forward and of its backward."""
    import torch

    from bn_triton.ops import traffic

    x = x.clone().requires_grad_()
    with traffic.record() as forward:
        y = layer(x)
    dy = torch.ones_like(y)
    with traffic.record() as backward:
        torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
    return {phase: {"launches": rec.n_launches,
                    "kernels": [launch.kernel for launch in rec.launches],
                    "bytes": rec.bytes_loaded + rec.bytes_stored}
            for phase, rec in (("forward", forward), ("backward", backward))}


def layers(C: int) -> List[tuple]:
    """(name, layer factory)."""
    import bn_triton

    return [("BatchNorm2d", lambda: bn_triton.BatchNorm2d(C)),
            ("BatchRenorm2d", lambda: bn_triton.BatchRenorm2d(C, r_max=1.5, d_max=0.5)),
            ("GhostBatchNorm2d", lambda: bn_triton.GhostBatchNorm2d(C, GHOST_RUN))]


# What a variant launches beyond batch norm's kernels, forward and backward.
EXTRA_KERNELS = {"BatchRenorm2d": {"forward": [], "backward": []},
                 "GhostBatchNorm2d": {"forward": ["ghost_running_update_kernel"],
                                      "backward": ["sum_runs_kernel"]}}


def measure() -> List[dict]:
    import torch

    rows = []
    for label, shape, channels_last, split in CASES:
        torch.manual_seed(0)
        x = torch.randn(shape)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with forced_split(split):
            for name, make in layers(shape[1]):
                counted = step_traffic(make(), x)
                runs = -(-shape[0] // GHOST_RUN) if name.startswith("Ghost") else 1
                rows.append({"case": label, "shape": list(shape), "layer": name, "runs": runs,
                             **counted,
                             "bytes_per_element": {
                                 phase: round(counted[phase]["bytes"] / x.numel()
                                              / x.element_size(), 3)
                                 for phase in ("forward", "backward")}})
    return rows


def compare(rows: List[dict]) -> List[dict]:
    """Each variant's row against batch norm's of the same case: the same kernels in the same
    order (and its EXTRA_KERNELS after them), and at most EXTRA_FRACTION more bytes."""
    base = {row["case"]: row for row in rows if row["layer"] == "BatchNorm2d"}
    out = []
    for row in rows:
        if row["layer"] == "BatchNorm2d":
            continue
        ref = base[row["case"]]
        for phase in ("forward", "backward"):
            extra = row[phase]["bytes"] - ref[phase]["bytes"]
            allowed = int(EXTRA_FRACTION * ref[phase]["bytes"]
                          + RUN_CHANNEL_BYTES * row["runs"] * row["shape"][1] * (row["runs"] > 1))
            expected = ref[phase]["kernels"] + EXTRA_KERNELS[row["layer"]][phase]
            out.append({"case": row["case"], "layer": row["layer"], "phase": phase,
                        "launches": row[phase]["launches"],
                        "batch_norm_launches": ref[phase]["launches"],
                        "same_kernels": row[phase]["kernels"] == expected,
                        "extra_bytes": extra, "allowed_extra_bytes": allowed,
                        "ok": row[phase]["kernels"] == expected and 0 <= extra <= allowed})
    return out


def table(comparison: List[dict], rows: List[dict]) -> str:
    per_element = {(r["case"], r["layer"]): r["bytes_per_element"] for r in rows}
    lines = ["| case | layer | phase | launches (BN's) | bytes/element (BN's) | extra bytes "
             "(allowed) |", "|---|---|---|---|---|---|"]
    for c in comparison:
        ours = per_element[(c["case"], c["layer"])][c["phase"]]
        theirs = per_element[(c["case"], "BatchNorm2d")][c["phase"]]
        lines.append(f"| {c['case']} | {c['layer']} | {c['phase']} | {c['launches']} "
                     f"({c['batch_norm_launches']}) | {ours} ({theirs}) | {c['extra_bytes']} "
                     f"({c['allowed_extra_bytes']}) |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.variants",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for variants.json")
    args = parser.parse_args(argv)
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the counts need the interpreter
    rows = measure()
    comparison = compare(rows)
    print(table(comparison, rows))
    ok = all(c["ok"] for c in comparison)
    print(f"variants make batch norm's launches (ghost: + one each way), and its bytes within "
          f"{EXTRA_FRACTION:.0%} (ghost: + {RUN_CHANNEL_BYTES} B a run and channel): "
          f"{'yes' if ok else 'NO'}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "variants.json").write_text(json.dumps(
            {"rows": rows, "comparison": comparison, "ok": ok}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
