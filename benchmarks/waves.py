"""Waves: programs per SM and bytes in flight per SM of every launch, per case (issue 17).

    python -m benchmarks.waves [--out DIR] [--access] [--case PATTERN ...]

A case is called through bn_triton's launch layer on meta tensors with tuning.launch replaced
by a recorder, so the grids and tiles are exactly those launch.py derives from plan.make_plan,
with nothing run: planned once per SM count (plan._sm_count patched) for a 132-SM H100/H200
and a 108-SM A100. Per launch:

  programs      the grid's size;
  per SM        programs / SMs (the waves: below 1 some SMs idle, below 2 a wave's tail
                leaves half of them idle while it drains);
  in flight     bytes per SM that the resident programs have requested at once (see
                bytes_in_flight), against IN_FLIGHT_TARGET;
  lanes         the fraction of tile lanes that the masks keep (tiles never cross samples
                in NCHW: S = 196 in 256-value rows keeps 77%);
  vec           the split kernels' VECTOR hint (plan.vector_width): values an access where
                rows run along S;
and with --access (compiled by tests/compile_kernels.py for sm_90, which takes seconds a
kernel: by default the ResNet-50 b32 cases and b256's 1024x14x14, see --access-case) the
widths of the tile loop's global loads and stores (a slab's: the whole kernel's), the
registers and spills.

rows() returns the table rows, for `python -m benchmarks` to call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from benchmarks import cases

ROOT = Path(__file__).resolve().parent.parent
# The SM counts planned for: H100 / H200 SXM, A100.
SM_COUNTS = (132, 108)
# Launches that move less than this are latency-bound, whatever their waves.
MIN_BYTES = 4 * 2**20
# Little's law: an H200 streams ~4.8 TB/s at ~650 ns loaded DRAM latency, 3.1 MB in flight,
# 24 KiB per SM of 132 (an H100's 3.35 TB/s needs 17 KiB, an A100's 2.0 TB/s at ~600 ns 11 KiB).
IN_FLIGHT_TARGET = 24 * 2**10
# Registers a thread of each split kernel takes at most in the plain training and eval
# launches (identity, no residual) of 16- and 32-bit input on sm_80/sm_90, which
# tests/test_compile.py asserts: what bounds the programs an SM holds at once (65536 / (128
# threads x registers) at 4 warps: 5 of 96, 4 of 128, 3 of 168). The largest seen: half tiles
# of 14x14 maps (16 x 256 values, 32 a thread) at 127 (batch_stats) and 143 (dy_sums), the
# eval normalize of 7x7 maps (scalar rows, an address a value) at 127, input_grad at 96.
SPLIT_REGISTERS = {"batch_stats_kernel": 128, "normalize_kernel": 128, "dy_sums_kernel": 168,
                   "input_grad_kernel": 96}
# A slab program's registers, per slab value a thread holds: ptxas gives 48-80 registers at 16
# values a thread (ResNet-50's 7x7 maps, an MLP's BN1d in bfloat16, forward and backward), and
# the largest slabs (64 values a thread) fill the register file at 16 warps (plan.MAX_SLAB_*).
SLAB_REGISTERS_PER_VALUE = 4
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Which activation-sized arguments each kernel stores (the others it loads).
STORED = {"y_ptr": ("normalize_kernel", "forward_slab_kernel"), "dx_ptr": None,
          "grad_residual_ptr": None}


def shape_sets() -> List[cases.Case]:
    """The ResNet-50 (b32, b256), MLP and video cases, each layout."""
    return [case for case in cases.CASES if case.group in ("resnet50", "mlp", "video")]


@contextlib.contextmanager
def planned_for(sm_count: int) -> Iterator[None]:
    """Plans made inside the block are those of a GPU with sm_count SMs (the launch layer's
    remembered plans, where it keeps any, are forgotten on the way in and out)."""
    from bn_triton.ops import launch, plan

    def forget():
        remembered = getattr(launch, "_PLANS", None)
        if remembered is not None:
            remembered.clear()

    original = plan._sm_count
    plan._sm_count = lambda device: sm_count
    forget()
    try:
        yield
    finally:
        plan._sm_count = original
        forget()


def record(shape: Sequence[int], layout: str, dtype: torch.dtype, sm_count: int,
           training: bool = True) -> List[Dict[str, Any]]:
    """The launches of a training forward and backward (x and dy in `layout`) on meta tensors,
    planned for sm_count SMs: [{"kernel", "grid", "num_warps", "arguments"}]."""
    from bn_triton.ops import launch as launching

    fmt = cases.memory_format(len(shape), layout)
    x = torch.empty(tuple(shape), dtype=dtype, device="meta").contiguous(memory_format=fmt)
    C = shape[1]
    weight, bias = (torch.empty(C, dtype=dtype, device="meta") for _ in range(2))
    running = [torch.empty(C, dtype=dtype, device="meta") for _ in range(2)]
    launches: List[Dict[str, Any]] = []

    def recorder(name, grid, num_warps, device, *constants, **tensors):
        # tuning.launch(name, grid, num_warps, device, **arguments), or with the non-tensor
        # arguments in a dict before the tensors.
        arguments = {**(constants[0] if constants else {}), **tensors}
        launches.append(dict(kernel=name, grid=tuple(grid), num_warps=num_warps,
                             arguments=arguments))

    original = launching.launch
    launching.launch = recorder
    try:
        with planned_for(sm_count):
            y, mean, invstd = launching.batch_norm_forward(
                x, weight, bias, *running, None, training, 0.1, 1e-5)
            dy = torch.empty_like(x)
            launching.batch_norm_backward(dy, x, y, None, weight, bias, mean, invstd, training,
                                          (True, True, True, False), bias.dtype)
    finally:
        launching.launch = original
    return launches


def streamed(launch: Dict[str, Any], numel: int) -> Dict[str, List[torch.Tensor]]:
    """The activation-sized tensors a launch loads and stores (x, dy, y, dx, residual, ...)."""
    out: Dict[str, List[torch.Tensor]] = {"loaded": [], "stored": []}
    for name, value in launch["arguments"].items():
        if not (isinstance(value, torch.Tensor) and value.numel() == numel):
            continue
        kernels = STORED.get(name, ())
        stored = name in STORED and (kernels is None or launch["kernel"] in kernels)
        out["stored" if stored else "loaded"].append(value)
    return out


def resident_programs(launch: Dict[str, Any], sm_count: int) -> float:
    """Programs an SM holds at once: the launch's share, at most what registers and threads
    allow: split programs at SPLIT_REGISTERS a thread, slab programs at SLAB_REGISTERS_PER_VALUE
    registers a slab value a thread holds (at least 32)."""
    programs = math.prod(launch["grid"])
    threads = 32 * launch["num_warps"]
    if "BLOCK_N" in launch["arguments"]:
        registers = min(255, max(32, SLAB_REGISTERS_PER_VALUE * tile_values(launch) // threads))
    else:
        registers = SPLIT_REGISTERS[launch["kernel"]]
    fit = max(1, min(REGISTERS_PER_SM // (threads * registers), MAX_THREADS_PER_SM // threads))
    return min(programs / sm_count, fit)


def tile_values(launch: Dict[str, Any]) -> int:
    args = launch["arguments"]
    return args["BLOCK_C"] * args["BLOCK_S"] * args.get("BLOCK_N", 1)


def lane_use(launch: Dict[str, Any], shape: Sequence[int]) -> float:
    """The fraction of the tiles' lanes that the masks keep: M·C values over the lanes of
    every tile (split) or slab the launch walks."""
    args = launch["arguments"]
    C, M = shape[1], math.prod(shape) // shape[1]
    c_lanes = launch["grid"][0] * args["BLOCK_C"]
    if "BLOCK_N" in args:
        lanes = c_lanes * args["BLOCK_N"] * args["BLOCK_S"]
    else:
        lanes = c_lanes * args["num_tiles"] * args["BLOCK_S"]
    return C * M / lanes


def bytes_in_flight(launch: Dict[str, Any], shape: Sequence[int], sm_count: int) -> float:
    """Bytes per SM its resident programs request at once: one tile of each tensor a program
    loads per loop iteration (its loads are issued together, before their first use; the tile
    loop is not software pipelined, so nothing more), times the programs resident."""
    numel = math.prod(shape)
    loaded = streamed(launch, numel)["loaded"]
    tile_bytes = sum(tile_values(launch) * t.element_size() for t in loaded)
    return tile_bytes * resident_programs(launch, sm_count)


def launch_rows(case: cases.Case, dtype_name: str) -> List[Dict[str, Any]]:
    """One row per launch of the case's training forward and backward."""
    dtype = DTYPES[dtype_name]
    numel = case.numel
    per_sm = {sm: record(case.shape, case.layout, dtype, sm) for sm in SM_COUNTS}
    rows = []
    for index, launch in enumerate(per_sm[SM_COUNTS[0]]):
        tensors = streamed(launch, numel)
        moved = sum(t.numel() * t.element_size() for group in tensors.values() for t in group)
        loaded = sum(t.numel() * t.element_size() for t in tensors["loaded"])
        args = launch["arguments"]
        row = dict(case=case.label, dtype=dtype_name, launch=launch["kernel"],
                   bytes=moved, loaded=loaded, tile=f"{args['BLOCK_C']}x{args.get('BLOCK_N', 1)}x"
                                     f"{args['BLOCK_S']}" if "BLOCK_N" in args
                   else f"{args['BLOCK_C']}x{args['BLOCK_S']}",
                   lanes=round(lane_use(launch, case.shape), 4),
                   vector=args.get("VECTOR", 1))
        for sm, launches in per_sm.items():
            other = launches[index]
            row[f"programs_{sm}"] = math.prod(other["grid"])
            row[f"per_sm_{sm}"] = math.prod(other["grid"]) / sm
            row[f"in_flight_{sm}"] = bytes_in_flight(other, case.shape, sm)
        rows.append(row)
    return rows


def rows(patterns: Optional[Sequence[str]] = None,
         dtypes: Sequence[str] = ("fp32", "bf16")) -> List[Dict[str, Any]]:
    """The table: every launch of every case of shape_sets() (those matching `patterns`)."""
    selected = [case for case in shape_sets()
                if not patterns or any(p.lower() in case.label.lower() for p in patterns)]
    return [row for case in selected for dtype in dtypes for row in launch_rows(case, dtype)]


def in_flight_target(row: Dict[str, Any], sm_count: int) -> float:
    """IN_FLIGHT_TARGET, or all the launch loads spread over the SMs where that is less (a
    3 MiB x cannot keep 24 KiB in flight on each of 132 SMs)."""
    return min(IN_FLIGHT_TARGET, row["loaded"] / sm_count) * (1 - 1e-9)  # float rounding


def meets_target(row: Dict[str, Any]) -> bool:
    """≥ 2 programs per SM and in_flight_target bytes in flight per SM on every SM count, for
    a launch that moves MIN_BYTES or more (smaller ones always pass)."""
    if row["bytes"] < MIN_BYTES:
        return True
    return all(row[f"per_sm_{sm}"] >= 2 and row[f"in_flight_{sm}"] >= in_flight_target(row, sm)
               for sm in SM_COUNTS)


# ------------------------------------------------------------------------ compiled accesses
ACCESS_CASES = ("resnet50-b32", "resnet50-b256-1024x14x14")


def access_widths(patterns: Sequence[str] = ACCESS_CASES,
                  dtypes: Sequence[str] = ("fp32", "bf16")) -> Dict[str, Dict[str, Any]]:
    """{(case/dtype): [per launch: {"kernel", "ld", "st"}]} of the tile loops' global accesses
    (bits: count) on sm_90, by tests/compile_kernels.py in a subprocess without the
    interpreter. Slow: seconds a kernel."""
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    scenarios = []
    for case in shape_sets():
        if not any(p in case.label for p in patterns):
            continue
        for dtype in dtypes:
            scenarios.append(dict(name=f"{case.label}/{dtype}", shape=list(case.shape),
                                  dtype=names[dtype], layout=case.layout, dy_layout=case.layout,
                                  targets=[90], training=True, running=True, momentum=0.1,
                                  grads=(True, True, True)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", BN_TRITON_AUTOTUNE="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_kernels.py")],
                          input=json.dumps({"scenarios": scenarios}), capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"compile_kernels.py failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout)
    out = {}
    for name, keys in result["scenarios"].items():
        launches = []
        for key in keys:
            r = result["results"][key]["90"]
            loop = r.get("loops") and (r.get("loop_ld") or r.get("loop_st"))
            launches.append(dict(kernel=result["specs"][key]["kernel"],
                                 ld=r["loop_ld"] if loop else r["ld"],
                                 st=r["loop_st"] if loop else r["st"],
                                 registers=r["registers"],
                                 spills=r["spill_stores"] + r["spill_loads"]))
        out[name] = launches
    return out


def widest(counts: Dict[str, int]) -> str:
    """"128" / "32x4,16" ...: the widths of a loop's accesses, widest first."""
    return ",".join(f"{w}" for w in sorted(counts, key=int, reverse=True)) or "-"


def table(table_rows: List[Dict[str, Any]]) -> str:
    head = (f"{'case':34} {'dt':4} {'launch':21} {'MiB':>6} {'tile':10} "
            + " ".join(f"{'prog' + str(sm):>8} {'/SM':>5} {'KiB':>5}" for sm in SM_COUNTS)
            + f" {'lanes':>5} {'vec':>3} {'ok':>3}  ld / st bits")
    lines = [head]
    for row in table_rows:
        cols = " ".join(f"{row[f'programs_{sm}']:>8} {row[f'per_sm_{sm}']:>5.2f} "
                        f"{row[f'in_flight_{sm}'] / 1024:>5.1f}" for sm in SM_COUNTS)
        access = (f"{widest(row['ld_bits'])} / {widest(row['st_bits'])}" if "ld_bits" in row
                  else "")
        lines.append(f"{row['case']:34} {row['dtype']:4} {row['launch']:21} "
                     f"{row['bytes'] / 2**20:>6.1f} {row['tile']:10} {cols} {row['lanes']:>5.2f}"
                     f" {row['vector']:>3} {'yes' if meets_target(row) else 'NO':>3}  {access}")
    return "\n".join(lines)


def summary(table_rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    big = [row for row in table_rows if row["bytes"] >= MIN_BYTES]
    out: Dict[str, Any] = {"launches_4MiB": len(big)}
    for sm in SM_COUNTS:
        out[f"two_per_sm_{sm}"] = sum(row[f"per_sm_{sm}"] >= 2 for row in big)
        out[f"in_flight_{sm}"] = sum(row[f"in_flight_{sm}"] >= in_flight_target(row, sm)
                                     for row in big)
    out["meet_target"] = sum(meets_target(row) for row in big)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.waves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="folder of waves.json")
    parser.add_argument("--case", nargs="*", help="only cases whose label contains one of these")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--access", action="store_true",
                        help="compile some cases for sm_90 and add their access widths")
    parser.add_argument("--access-case", nargs="*", default=list(ACCESS_CASES),
                        help="the cases --access compiles (label substrings)")
    args = parser.parse_args(argv)
    table_rows = rows(args.case, args.dtypes)
    if args.access:
        widths = access_widths(args.access_case, args.dtypes)
        for case_dtype, launches in widths.items():
            label, dtype = case_dtype.rsplit("/", 1)
            mine = [row for row in table_rows if row["case"] == label and row["dtype"] == dtype]
            for row, compiled in zip(mine, launches):
                row.update(ld_bits=compiled["ld"], st_bits=compiled["st"],
                           registers=compiled["registers"], spills=compiled["spills"])
    print(table(table_rows))
    totals = summary(table_rows)
    print(json.dumps(totals))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rounded = [{key: round(value, 2) if isinstance(value, float) else value
                for key, value in row.items()} for row in table_rows]
    with open(out / "waves.json", "w") as f:
        json.dump({"summary": totals, "in_flight_target": IN_FLIGHT_TARGET,
                   "sm_counts": SM_COUNTS, "rows": rounded}, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
